"""Building blocks of the decoder: Linear (with optional LoRA), RMSNorm, RoPE, attention, SwiGLU.

Dimension letters: B batch, T time (queries), S cache/key slots, D model, F ffn, H heads,
G kv heads, K head dim, V vocab, R LoRA rank.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxttt.sharding import constrain

Init = jax.nn.initializers.normal(stddev=0.02)


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], init=Init,
          dtype=jnp.float32) -> nnx.Param:
    """A parameter that carries its logical axis names (see jaxttt.sharding.RULES)."""
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


class Linear(nnx.Module):
    """y = x W (+ b) (+ LoRA: dropout(x) A B · alpha/rank when adapters are attached and enabled)."""

    def __init__(self, d_in: int, d_out: int, *, axes: tuple[str | None, str | None], tag: str,
                 dtype: jnp.dtype, rngs: nnx.Rngs, bias: bool = False):
        self.kernel = param(rngs, (d_in, d_out), axes)
        self.bias = param(rngs, (d_out,), axes[1:], init=jax.nn.initializers.zeros) if bias else None
        self.tag = tag  # which projection this is (q, k, v, o, gate, up, down): LoRA targets it
        self.axes = axes
        self.dtype = dtype
        self.lora_a = nnx.data(None)  # set by jaxttt.model.lora.add_lora
        self.lora_b = nnx.data(None)
        self.lora_scale = 0.0
        self.lora_dropout = nnx.data(None)

    def __call__(self, x: jax.Array, *, use_lora: bool = True) -> jax.Array:
        y = x.astype(self.dtype) @ self.kernel[...].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if use_lora and self.lora_a is not None:
            h = self.lora_dropout(x) if self.lora_dropout is not None else x
            h = h.astype(self.dtype) @ self.lora_a[...].astype(self.dtype)
            y = y + (h @ self.lora_b[...].astype(self.dtype)) * self.lora_scale
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, axis_name: str = "norm"):
        self.scale = param(rngs, (dim,), (axis_name,), init=jax.nn.initializers.ones)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        return (x32 * jax.lax.rsqrt(var + self.eps) * self.scale[...]).astype(x.dtype)


def rope_frequencies(cfg) -> np.ndarray:
    """Inverse wavelengths [rot_dim/2] of RoPE, with the config's rope scaling (float32).

    `llama3` follows Llama 3.1: wavelengths longer than original_len/low_freq_factor are divided
    by `factor`, shorter than original_len/high_freq_factor kept, and the band between blended.
    """
    half = cfg.rope_dim // 2
    freq = 1.0 / (cfg.rope_theta ** (np.arange(half, dtype=np.float32) * 2 / max(cfg.rope_dim, 1)))
    freq = freq.astype(np.float32)
    if cfg.rope_scaling == "linear":
        return (freq / cfg.rope_factor).astype(np.float32)
    if cfg.rope_scaling == "llama3":
        wavelen = 2 * np.pi / freq
        low_wl = cfg.rope_original_max_len / cfg.rope_low_freq_factor
        high_wl = cfg.rope_original_max_len / cfg.rope_high_freq_factor
        scaled = np.where(wavelen > low_wl, freq / cfg.rope_factor, freq)
        smooth = (cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        blended = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        return np.where(medium, blended, scaled).astype(np.float32)
    return freq


def rope(x_BTHK: jax.Array, pos_BT: jax.Array, *, freq_J, rot_dim: int) -> jax.Array:
    """Rotary embedding on the first `rot_dim` features of each head (NeoX half-split layout).

    `freq_J` [rot_dim/2]: inverse wavelengths (see `rope_frequencies`).
    """
    if rot_dim == 0:
        return x_BTHK
    half = rot_dim // 2
    freq = jnp.asarray(freq_J, jnp.float32)
    ang_BTJ = pos_BT.astype(jnp.float32)[..., None] * freq
    cos, sin = jnp.cos(ang_BTJ)[:, :, None, :], jnp.sin(ang_BTJ)[:, :, None, :]
    x32 = x_BTHK.astype(jnp.float32)
    x1, x2, rest = x32[..., :half], x32[..., half:rot_dim], x32[..., rot_dim:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return out.astype(x_BTHK.dtype)


class Attention(nnx.Module):
    """Causal multi-head attention with GQA, RoPE and an optional KV cache."""

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        D, H, G, K = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.d_head
        self.n_heads, self.n_kv, self.d_head = H, G, K
        self.freq = tuple(float(f) for f in rope_frequencies(cfg))  # static: a constant in jit
        self.rot_dim = cfg.rope_dim
        self.impl = "cudnn" if cfg.attention == "cudnn" else None
        bias = getattr(cfg, "qkv_bias", False)
        self.q = Linear(D, H * K, axes=("embed", "heads"), tag="q", dtype=dtype, rngs=rngs, bias=bias)
        self.k = Linear(D, G * K, axes=("embed", "kv_heads"), tag="k", dtype=dtype, rngs=rngs,
                        bias=bias)
        self.v = Linear(D, G * K, axes=("embed", "kv_heads"), tag="v", dtype=dtype, rngs=rngs,
                        bias=bias)
        self.o = Linear(H * K, D, axes=("heads", "embed"), tag="o", dtype=dtype, rngs=rngs)
        qk_norm = getattr(cfg, "qk_norm", False)
        self.q_norm = RMSNorm(K, eps=cfg.norm_eps, rngs=rngs) if qk_norm else None
        self.k_norm = RMSNorm(K, eps=cfg.norm_eps, rngs=rngs) if qk_norm else None

    def __call__(self, x_BTD, pos_BT, *, cache=None, use_lora=True):
        B, T, _ = x_BTD.shape
        q_BTHK = self.q(x_BTD, use_lora=use_lora).reshape(B, T, self.n_heads, self.d_head)
        k_BTGK = self.k(x_BTD, use_lora=use_lora).reshape(B, T, self.n_kv, self.d_head)
        v_BTGK = self.v(x_BTD, use_lora=use_lora).reshape(B, T, self.n_kv, self.d_head)
        if self.q_norm is not None:
            q_BTHK, k_BTGK = self.q_norm(q_BTHK), self.k_norm(k_BTGK)
        q_BTHK = constrain(rope(q_BTHK, pos_BT, freq_J=self.freq, rot_dim=self.rot_dim),
                           "batch", "seq", "heads", "head_dim")
        k_BTGK = rope(k_BTGK, pos_BT, freq_J=self.freq, rot_dim=self.rot_dim)
        if cache is None:
            out_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BTGK, v_BTGK, is_causal=True,
                                                    implementation=self.impl)
            new_cache = None
        else:
            out_BTHK, new_cache = self._cached(q_BTHK, k_BTGK, v_BTGK, cache)
        y_BTD = self.o(out_BTHK.reshape(B, T, -1), use_lora=use_lora)
        return y_BTD, new_cache

    def _cached(self, q_BTHK, k_BTGK, v_BTGK, cache):
        """Write this call's keys/values at slot `cache['index']`, attend over valid slots.

        The cache is laid out [B, G, S, K] so each (row, kv head) block of keys is contiguous:
        the score and value contractions then read it in place (a [B, S, G, K] cache was
        transposed, i.e. copied, on every decode step). Prompts are left-padded: slots before
        `cache['start'][b]` hold padding for row b and are masked out.
        """
        idx, start_B = cache["index"], cache["start"]
        B, T, H, K = q_BTHK.shape
        G = k_BTGK.shape[2]
        k_BGSK = jax.lax.dynamic_update_slice_in_dim(
            cache["k"], k_BTGK.transpose(0, 2, 1, 3).astype(cache["k"].dtype), idx, 2)
        v_BGSK = jax.lax.dynamic_update_slice_in_dim(
            cache["v"], v_BTGK.transpose(0, 2, 1, 3).astype(cache["v"].dtype), idx, 2)
        S = k_BGSK.shape[2]
        q_BGQTK = q_BTHK.reshape(B, T, G, H // G, K).transpose(0, 2, 3, 1, 4)
        s_BGQTS = jnp.einsum("bgqtk,bgsk->bgqts", q_BGQTK, k_BGSK.astype(q_BTHK.dtype),
                             preferred_element_type=jnp.float32) * (K ** -0.5)
        slot_S, q_slot_T = jnp.arange(S), idx + jnp.arange(T)
        mask_BTS = (slot_S[None, None, :] <= q_slot_T[None, :, None]) & \
                   (slot_S[None, None, :] >= start_B[:, None, None])
        # a finite floor, not -inf: padding queries (fully masked rows) must stay finite, since
        # their values are later multiplied by zero weights (0 * nan = nan).
        s_BGQTS = jnp.where(mask_BTS[:, None, None], s_BGQTS, jnp.finfo(jnp.float32).min)
        p_BGQTS = jax.nn.softmax(s_BGQTS, axis=-1).astype(q_BTHK.dtype)
        out_BGQTK = jnp.einsum("bgqts,bgsk->bgqtk", p_BGQTS, v_BGSK.astype(q_BTHK.dtype))
        out_BTHK = out_BGQTK.transpose(0, 3, 1, 2, 4).reshape(B, T, H, K)
        return out_BTHK, {"k": k_BGSK, "v": v_BGSK, "index": idx + T, "start": start_B}


class SwiGLU(nnx.Module):
    def __init__(self, d_model: int, d_ff: int, *, dtype, rngs: nnx.Rngs):
        self.gate = Linear(d_model, d_ff, axes=("embed", "mlp"), tag="gate", dtype=dtype, rngs=rngs)
        self.up = Linear(d_model, d_ff, axes=("embed", "mlp"), tag="up", dtype=dtype, rngs=rngs)
        self.down = Linear(d_ff, d_model, axes=("mlp", "embed"), tag="down", dtype=dtype, rngs=rngs)

    def __call__(self, x_BTD, *, use_lora=True):
        h_BTF = jax.nn.silu(self.gate(x_BTD, use_lora=use_lora)) * self.up(x_BTD, use_lora=use_lora)
        h_BTF = constrain(h_BTF, "batch", "seq", "mlp")
        return self.down(h_BTF, use_lora=use_lora)
