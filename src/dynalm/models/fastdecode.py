"""A decode step with little per-token overhead, for Llama-family models (Llama, Qwen2).

Sampling spends most of its time outside the weight reads that bound it (see
docs/performance.md): every token walks transformers' module tree and peft's LoRA wrappers
(four small extra matmuls and an add per adapted projection), and the KV cache grows by
concatenation, copying itself every step. Here, for the one-token steps after the prefill:

- each adapted projection's LoRA delta is folded into a copy of its weight, W + s·B·A
  (unfolded = never written into the model: the copies live beside it, and are rebuilt
  when an optimiser step changes any weight they came from, which `Tensor._version` tells);
  q, k and v become one matmul;
- the KV cache is preallocated for the whole completion and written in place;
- a step is a flat loop of tensor calls: fused RMSNorm, one rotary pass over q and k
  together, SDPA with grouped heads.

The maths is the model's own (same operations, same order up to float rounding); the prefill
still runs through the model itself. tests/test_fastdecode.py holds log-probs and values to
a full forward of the training model within 1e-5. Models it does not know (GPT-2, DoRA
adapters, sliding windows, ...) keep the transformers path: `supports()` says which.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED_TYPES = ("llama", "qwen2")


def _base_model(lm):
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def supports(lm) -> str | None:
    """None when this decode path reproduces `lm`; else why not (kept for the log)."""
    base = _base_model(lm)
    cfg = base.config
    if cfg.model_type not in SUPPORTED_TYPES:
        return f"model type {cfg.model_type}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act}"
    if getattr(cfg, "use_sliding_window", False) or getattr(cfg, "pretraining_tp", 1) != 1:
        return "sliding-window attention or tensor-parallel weights"
    for m in base.modules():
        if hasattr(m, "lora_A"):
            if any(getattr(m, "use_dora", {}).get(a, False) for a in m.lora_A) or getattr(m, "merged", False):
                return "DoRA or merged adapters"
            if any(m.lora_B[a].bias is not None for a in m.lora_B):
                return "LoRA with bias"
            if type(m.base_layer).__name__ != "Linear":
                return f"LoRA on a {type(m.base_layer).__name__}"
    return None


def _weight_and_bias(m, adapters_on: bool):
    """The effective weight of a (possibly LoRA-wrapped) linear layer, and its bias."""
    if not hasattr(m, "lora_A"):
        return m.weight, m.bias
    w = m.base_layer.weight
    if adapters_on and not m.disable_adapters:
        for a in m.active_adapters:
            if a in m.lora_A:
                w = w + m.scaling[a] * (m.lora_B[a].weight @ m.lora_A[a].weight)
    return w, m.base_layer.bias


def _sources(m) -> list[torch.Tensor]:
    if not hasattr(m, "lora_A"):
        return [m.weight]
    return [m.base_layer.weight, *(m.lora_A[a].weight for a in m.lora_A), *(m.lora_B[a].weight for a in m.lora_B)]


def static_cache(kv: list[tuple[torch.Tensor, torch.Tensor]], total: int, rows: torch.Tensor | None = None):
    """Per layer (K, V) buffers [B, kv heads, total, head dim] whose first L slots hold the
    given [B, kv heads, L, head dim] keys and values (rows `rows` of them, when given); the
    decode step writes slot L onwards in place."""
    cache = []
    for k, v in kv:
        if rows is not None:
            k, v = k[rows], v[rows]
        B, H, L, D = k.shape
        K = k.new_empty((B, H, total, D))
        V = v.new_empty((B, H, total, D))
        K[:, :, :L].copy_(k)
        V[:, :, :L].copy_(v)
        cache.append((K, V))
    return cache


class FastDecoder:
    """Folded weights of one LM (policy or reference view) and the static-cache decode step."""

    def __init__(self, lm):
        self.lm = lm
        self.base = _base_model(lm)
        c = self.base.config
        self.n_heads = c.num_attention_heads
        self.n_kv = c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.eps = c.rms_norm_eps
        self._key = None
        self._layers: list[tuple] = []

    def _version_key(self, adapters_on: bool):
        key = [adapters_on]
        for layer in self.base.model.layers:
            for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                      layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                key += [(id(t), t._version) for t in _sources(m)]
                key.append(bool(getattr(m, "disable_adapters", False)))
                key.append(tuple(getattr(m, "active_adapters", ())))
        return tuple(key)

    @torch.no_grad()
    def refresh(self, adapters_on: bool) -> None:
        """(Re)build the folded weights when the model's weights or adapter state changed."""
        key = self._version_key(adapters_on)
        if key == self._key:
            return
        self._layers = []
        for layer in self.base.model.layers:
            at, mlp = layer.self_attn, layer.mlp
            wq, bq = _weight_and_bias(at.q_proj, adapters_on)
            wk, bk = _weight_and_bias(at.k_proj, adapters_on)
            wv, bv = _weight_and_bias(at.v_proj, adapters_on)
            w_qkv = torch.cat([wq, wk, wv], 0).contiguous()
            b_qkv = torch.cat([bq, bk, bv], 0) if bq is not None else None
            self._layers.append((
                layer.input_layernorm.weight, w_qkv, b_qkv, *_weight_and_bias(at.o_proj, adapters_on),
                layer.post_attention_layernorm.weight,
                *_weight_and_bias(mlp.gate_proj, adapters_on), *_weight_and_bias(mlp.up_proj, adapters_on),
                *_weight_and_bias(mlp.down_proj, adapters_on),
            ))
        self._key = key

    def start(self, past, total: int, rows: torch.Tensor | None = None):
        """Static KV buffers [B, kv heads, total, head dim] per layer, holding the prefill's cache
        (row i of the buffers takes the prefill's row rows[i] when `rows` is given)."""
        return static_cache([(layer.keys, layer.values) for layer in past.layers], total, rows)

    def _norm(self, x, w):
        return w * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def step(self, tok: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor, cache, t: int) -> torch.Tensor:
        """One token per row: `tok` [B] at positions `pos` [B], written to cache slot `t`;
        `keep` [B, t+1] (bool) marks the cache slots each row attends to. Returns the last
        hidden state after the final norm [B, hidden]."""
        if not self._layers:  # released before an update, or never built: no layer would run
            raise RuntimeError("FastDecoder.step needs folded weights: call refresh() first")
        B = tok.shape[0]
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        h = self.base.model.embed_tokens(tok)[:, None]  # [B, 1, H]
        cos, sin = self.base.model.rotary_emb(h, pos[:, None])  # [B, 1, hd]
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        half = hd // 2
        mask = keep[:, None, None, :]
        for (w_in, w_qkv, b_qkv, w_o, b_o, w_post, w_g, b_g, w_u, b_u, w_d, b_d), (K, V) in zip(self._layers, cache):
            x = self._norm(h, w_in)
            qkv = F.linear(x, w_qkv, b_qkv).view(B, nh + 2 * nkv, hd)
            qk = qkv[:, : nh + nkv]
            rot = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
            qk = qk * cos + rot * sin
            K[:, :, t].copy_(qk[:, nh:])
            V[:, :, t].copy_(qkv[:, nh + nkv :])
            a = F.scaled_dot_product_attention(
                qk[:, :nh, None], K[:, :, : t + 1], V[:, :, : t + 1], attn_mask=mask, enable_gqa=nkv != nh
            )  # [B, nh, 1, hd]
            h = h + F.linear(a.reshape(B, 1, nh * hd), w_o, b_o)
            x = self._norm(h, w_post)
            h = h + F.linear(F.silu(F.linear(x, w_g, b_g)) * F.linear(x, w_u, b_u), w_d, b_d)
        return self._norm(h, self.base.model.norm.weight)[:, 0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head in float32 outside autocast, as `head.float32_head` runs it."""
        head = self.base.get_output_embeddings()
        with torch.autocast(hidden.device.type, enabled=False):
            # (W·hᵀ)ᵀ, not h·Wᵀ: with 8 rows and a 49k-row head, MKL runs this layout 2× faster on CPU
            out = torch.mm(head.weight.float(), hidden.float().t()).t()
            return out + head.bias.float() if head.bias is not None else out


def release(owner) -> None:
    """Drop every fast decoder's folded weights (about a fifth of the model's bytes for LoRA
    on q/k/v/o): before an update, which changes the weights they came from, so the next
    `refresh` would rebuild them anyway, and the update's peak memory need not hold them."""
    for dec in owner.__dict__.get("_fast_decoders", {}).values():
        if dec is not None:
            dec._layers, dec._key = [], None


def decoder_for(owner, lm) -> FastDecoder | None:
    """The fast decoder of `lm` (kept on `owner`, one per LM), or None where unsupported."""
    cache = owner.__dict__.setdefault("_fast_decoders", {})
    if id(lm) not in cache:
        cache[id(lm)] = FastDecoder(lm) if supports(lm) is None else None
    return cache[id(lm)]
