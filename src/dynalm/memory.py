"""Memory: estimate a run's peak before any model loads its batch, and refuse one that
cannot fit with the setting to turn (train.memory_check: false to try anyway)."""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

from .config import Config
from .errors import UserError
from .models.policy import PolicyValueModel


# float32 values kept per token, hidden unit and layer for the backward pass: ~17 for a
# transformer block (Korthikanti et al. 2022, "Reducing Activation Recomputation", 34
# bytes at 16 bit), rounded up for wider MLPs and the LoRA inputs.
ACTIVATION_FACTOR = 20
# Copies of the [batch, new tokens, vocab] logits alive in the update: the logits, the
# tempered copy, log-softmax, the entropy's probabilities and product, their gradients.
LOGITS_FACTOR = 6
# The same in the no-grad passes over the whole batch before the update (the reference's
# log-probs, the recompute of π_old): the logits, the tempered copy, log-softmax.
NOGRAD_LOGITS_FACTOR = 3


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def set_mmap_threshold(kib: int | None) -> bool:
    """Fix glibc's mmap threshold at `kib` KiB (train.malloc_mmap_threshold_kb). Its default is
    dynamic: it rises to the largest block freed so far, so after the first step the update's
    activations (a few MB each) come from the heap, and the heap keeps their pages after free.
    True when set; False for None or where the C library is not glibc."""
    if kib is None:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, kib * 1024))


def estimate_memory(
    *, param_bytes: int, trainable_bytes: int, hidden: int, layers: int, vocab: int,
    batch: int, prompt_tokens: int, new_tokens: int, bytes_per_value: int = 4, checkpointing: bool = False,
    logits_chunk: int = 0, nograd_batch: int | None = None,
) -> dict[str, int]:
    """Peak bytes of one training step, by part; an upper bound for the per-token parts
    since prompts count at their maximum length.

    weights      all parameters (policy, reference copy, value head)
    optimizer    gradients + Adam's two moments of the trainable parameters
    activations  batch × (prompt + new tokens) × hidden × layers × ACTIVATION_FACTOR values
    logits       rows × (new tokens + 1) × vocab × LOGITS_FACTOR values, rows = the batch, or
                 train.logits_chunk's rows when the LM head runs in chunks; or, when larger,
                 the no-grad passes' nograd_rows × (new tokens + 1) × vocab × NOGRAD_LOGITS_FACTOR
    `batch` is the update's minibatch: the update (forward with gradients) is the peak.
    `nograd_batch` (default `batch`) the rows of the no-grad passes before it (the whole
    rollout batch), whose logits alone can outgrow a small minibatch's.
    With activation checkpointing a layer keeps only its input (1 value per token and hidden
    unit), and one layer at a time holds its full set while it is recomputed.
    """
    nograd = batch if nograd_batch is None else nograd_batch
    per_layer = layers + ACTIVATION_FACTOR if checkpointing else layers * ACTIVATION_FACTOR
    est = {
        "weights": param_bytes,
        "optimizer": 3 * trainable_bytes,
        "activations": batch * (prompt_tokens + new_tokens) * hidden * per_layer * bytes_per_value,
        "logits": (new_tokens + 1) * vocab * bytes_per_value * max(
            min(batch, logits_chunk or batch) * LOGITS_FACTOR,
            min(nograd, logits_chunk or nograd) * NOGRAD_LOGITS_FACTOR,
        ),
    }
    est["total"] = sum(est.values())
    return est


def model_memory_estimate(model: PolicyValueModel, cfg: Config, world_size: int = 1) -> dict[str, int]:
    """Per process: data-parallel, a process holds at most its share of a minibatch."""
    tc = model.lm.config.get_text_config()
    params = list(model.parameters())  # tied weights counted once
    return estimate_memory(
        param_bytes=sum(p.numel() * p.element_size() for p in params),
        trainable_bytes=sum(p.numel() * p.element_size() for p in params if p.requires_grad),
        hidden=tc.hidden_size,
        layers=tc.num_hidden_layers,
        vocab=tc.vocab_size,
        batch=min(cfg.algorithm.minibatch_size or cfg.train.batch_size, cfg.train.batch_size // world_size),
        prompt_tokens=cfg.model.max_prompt_tokens,
        new_tokens=_new_tokens(cfg),
        checkpointing=cfg.train.gradient_checkpointing,
        logits_chunk=cfg.train.logits_chunk,
        nograd_batch=cfg.train.batch_size // world_size,
    )


def _new_tokens(cfg: Config) -> int:
    """Tokens after the prompt in a training sequence; a dialog holds every turn (both sides)."""
    if cfg.env.kind == "dialog":
        from .envs.dialog import region_tokens

        return region_tokens(cfg.env, cfg.generation)
    if cfg.env.kind in ("custom", "model"):  # every turn, with a guess of 64 tokens per observation and template
        return cfg.env.max_turns * cfg.generation.max_new_tokens + (cfg.env.max_turns - 1) * 64
    return cfg.generation.max_new_tokens


def available_memory(device: torch.device) -> int | None:
    """Bytes free for this run: CUDA's free memory, or Linux's MemAvailable; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_memory(model: PolicyValueModel, cfg: Config, world_size: int = 1) -> str:
    """Refuse (UserError) a run whose estimate exceeds the memory available; returns the log line."""
    est = model_memory_estimate(model, cfg, world_size)
    avail = available_memory(model.device)
    line = (
        f"memory: ~{_size(est['total'])} peak estimated (weights {_size(est['weights'])}, "
        f"gradients+Adam {_size(est['optimizer'])}, activations {_size(est['activations'])}, "
        f"logits {_size(est['logits'])}); "
        + (f"{_size(avail)} available on {model.device.type}" if avail is not None else "available memory unknown")
    )
    # The model is already loaded, so `avail` no longer includes its weights.
    need = est["total"] - est["weights"]
    if avail is None or not cfg.train.memory_check or need <= avail:
        return line
    what = f"estimated peak memory {_size(est['total'])} exceeds the {_size(avail + est['weights'])} available"
    fixed = est["optimizer"]
    mb = min(cfg.algorithm.minibatch_size or cfg.train.batch_size, cfg.train.batch_size // world_size)
    per_sample = (est["activations"] + est["logits"]) / mb
    fit = int((avail - fixed) // per_sample) if avail > fixed else 0
    if fit >= 1:
        knob = (f"lower algorithm.minibatch_size to {fit} or less (now {mb})" if cfg.algorithm.minibatch_size
                else f"set algorithm.minibatch_size (or train.batch_size, now {mb}) to {fit} or less")
    elif avail > fixed:
        knob = (f"lower generation.max_new_tokens (now {cfg.generation.max_new_tokens}) "
                f"or model.max_prompt_tokens (now {cfg.model.max_prompt_tokens})")
    else:  # the weights' gradients and Adam state alone do not fit
        knob = "pick a smaller model.name" if cfg.model.lora.enabled else "enable model.lora.enabled or pick a smaller model.name"
    raise UserError(what, f"{knob}; or set train.memory_check=false to try anyway")
