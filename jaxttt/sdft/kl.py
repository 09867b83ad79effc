"""Token-level analytic KL between student and teacher (handoff SDFT §5, A1, A2, F4).

Per generated token t, with p_s = softmax(student logits), p_t = softmax(teacher logits):
  reverse (default, the paper's objective)  KL(p_s || p_t) = Σ_v p_s (log p_s − log p_t)
  forward (what the SDFT authors' code ran) KL(p_t || p_s) = Σ_v p_t (log p_t − log p_s)
Always float32 via log_softmax; the teacher side is wrapped in stop_gradient.

Alignment (F4). Each row is right-padded `ctx + y + pad` with C context tokens and L generated
tokens; the logits that predict y_1..y_L sit at positions C−1 … C−2+L. Student (C = Cs) and
teacher (C = Ct) are sliced separately so the slices line up token for token. Rows with L = 0
are fully masked (no dummy token).

Memory. The full-vocabulary KL over [B, T, V] float32 is large (4·256·32k·4 B = 134 MB per
tensor, several live at once). `chunked_*` walk the time axis `chunk` tokens at a time in a
`lax.scan` whose body is rematerialised, so the forward and backward passes hold one
[B, chunk, V] block of intermediates. `chunked_kl_from_hidden` also projects hidden states
to logits inside the chunk, so full [B, T, V] logits never exist. Preferred path in the loop:
  h_s = gather_aligned(h_student_BTD, Cs − 1, L_max)
  h_t = gather_aligned(h_teacher_BTD, Ct − 1, L_max)
  kl_BL = chunked_kl_from_hidden(h_s, h_t, w_DV, mask_BL, direction, chunk)
(`aligned_kl_from_hidden` does exactly that.)
"""
from __future__ import annotations

from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp

from jaxttt.model.transformer import chunk_map

Array = jax.Array
Direction = Literal["reverse", "forward"]
DIRECTIONS = ("reverse", "forward")


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"KL direction must be one of {DIRECTIONS}, got {direction!r}")


def token_kl(student_logits_TV: Array, teacher_logits_TV: Array,
             direction: Direction = "reverse") -> Array:
    """Per-position KL over the last (vocabulary) axis, float32; leading axes are kept.

    Logits must be finite. Gradient flows to the student logits only.
    """
    _check_direction(direction)
    logp_s = jax.nn.log_softmax(student_logits_TV.astype(jnp.float32), axis=-1)
    logp_t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits_TV).astype(jnp.float32), axis=-1)
    if direction == "reverse":
        return jnp.sum(jnp.exp(logp_s) * (logp_s - logp_t), axis=-1)
    return jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)


def masked_mean(x_BT: Array, mask_BT: Array) -> Array:
    """Mean of `x` over positions where `mask` is true (0 when nothing is masked in)."""
    m = mask_BT.astype(jnp.float32)
    return jnp.sum(jnp.where(mask_BT, x_BT, 0.0)) / jnp.maximum(jnp.sum(m), 1.0)


@partial(jax.jit, static_argnames=("direction", "chunk",))
def chunked_token_kl(student_logits_BTV: Array, teacher_logits_BTV: Array, mask_BT: Array,
                     direction: Direction = "reverse", chunk: int = 64) -> Array:
    """Per-token KL [B, T] (zero where `mask` is false), computed `chunk` positions at a time."""
    B, T, _ = student_logits_BTV.shape
    if T == 0:
        return jnp.zeros((B, 0), jnp.float32)
    teacher_logits_BTV = jax.lax.stop_gradient(teacher_logits_BTV)

    def kl_chunk(start):
        c = min(chunk, T)
        s_BcV = jax.lax.dynamic_slice_in_dim(student_logits_BTV, start, c, axis=1)
        t_BcV = jax.lax.dynamic_slice_in_dim(teacher_logits_BTV, start, c, axis=1)
        return token_kl(s_BcV, t_BcV, direction)

    return jnp.where(mask_BT, chunk_map(kl_chunk, T, chunk, B), 0.0)


@partial(jax.jit, static_argnames=("direction", "chunk",))
def chunked_kl_from_hidden(h_student_BTD: Array, h_teacher_BTD: Array, w_unembed_DV: Array,
                           mask_BT: Array, direction: Direction = "reverse", chunk: int = 64,
                           *, w_teacher_DV: Array | None = None) -> Array:
    """Per-token KL [B, T] from final (post-norm) hidden states and the unembedding matrix.

    Logits = h @ w are formed chunk by chunk (float32 accumulation), so no [B, T, V] tensor is
    ever materialised. `w_teacher_DV` is the teacher's own unembedding (an EMA copy differs
    from the student's); None = the same matrix as the student's. For tied embeddings pass
    `embed_VD.T`. Gradient flows to `h_student_BTD` and `w_unembed_DV` only.
    """
    B, T, _ = h_student_BTD.shape
    if T == 0:
        return jnp.zeros((B, 0), jnp.float32)
    h_teacher_BTD = jax.lax.stop_gradient(h_teacher_BTD)
    w_t_DV = jax.lax.stop_gradient(w_unembed_DV if w_teacher_DV is None else w_teacher_DV)

    def kl_chunk(start):
        c = min(chunk, T)
        hs_BcD = jax.lax.dynamic_slice_in_dim(h_student_BTD, start, c, axis=1)
        ht_BcD = jax.lax.dynamic_slice_in_dim(h_teacher_BTD, start, c, axis=1)
        s_BcV = jnp.einsum("bcd,dv->bcv", hs_BcD, w_unembed_DV, preferred_element_type=jnp.float32)
        t_BcV = jnp.einsum("bcd,dv->bcv", ht_BcD, w_t_DV, preferred_element_type=jnp.float32)
        return token_kl(s_BcV, t_BcV, direction)

    return jnp.where(mask_BT, chunk_map(kl_chunk, T, chunk, B), 0.0)


# ---------------------------------------------------------------------------------------------
# Alignment (F4)
# ---------------------------------------------------------------------------------------------
@partial(jax.jit, static_argnames=("l_max",))
def gen_mask(gen_len_B: Array, l_max: int) -> Array:
    """[B, l_max] bool: position l is a real generated token (l < gen_len). L = 0 rows: all false."""
    return jnp.arange(l_max)[None, :] < jnp.asarray(gen_len_B)[:, None]


@partial(jax.jit, static_argnames=("total_T", "l_max",))
def align_positions(ctx_len_B: Array, gen_len_B: Array, total_T: int,
                    l_max: int) -> tuple[Array, Array]:
    """Positions [B, l_max] of the logits that predict y_1..y_L in `ctx + y + pad`, and the mask.

    pos[b, l] = ctx_len[b] − 1 + l (clipped into [0, total_T − 1]; clipped entries are masked).
    Call once with the student's context lengths Cs and once with the teacher's Ct.
    Contexts must be non-empty (they start with BOS).
    """
    ctx_len_B = jnp.asarray(ctx_len_B)
    pos_BL = ctx_len_B[:, None] - 1 + jnp.arange(l_max)[None, :]
    mask_BL = gen_mask(gen_len_B, l_max) & (pos_BL < total_T)
    return jnp.clip(pos_BL, 0, total_T - 1), mask_BL


@partial(jax.jit, static_argnames=("l_max",))
def gather_aligned(x_BTX: Array, start_B: Array, l_max: int) -> Array:
    """Rows x[b, start[b] : start[b] + l_max] -> [B, l_max, X] (indices clipped at T − 1).

    `start_B` = context length − 1. Use on hidden states ([B, T, D], cheap) rather than
    logits where possible; mask the result with `gen_mask`.
    """
    T = x_BTX.shape[1]
    pos_BL = jnp.clip(jnp.asarray(start_B)[:, None] + jnp.arange(l_max)[None, :], 0, T - 1)
    return jnp.take_along_axis(x_BTX, pos_BL[:, :, None], axis=1)


@partial(jax.jit, static_argnames=("l_max", "direction", "chunk",))
def aligned_kl_from_hidden(h_student_BTD: Array, h_teacher_BTD: Array, w_unembed_DV: Array,
                           s_ctx_len_B: Array, t_ctx_len_B: Array, gen_len_B: Array, l_max: int,
                           direction: Direction = "reverse", chunk: int = 64,
                           *, w_teacher_DV: Array | None = None) -> tuple[Array, Array]:
    """Full F4 path: align student/teacher hidden states, then chunked KL. -> (kl_BL, mask_BL)."""
    hs_BLD = gather_aligned(h_student_BTD, jnp.asarray(s_ctx_len_B) - 1, l_max)
    ht_BLD = gather_aligned(h_teacher_BTD, jnp.asarray(t_ctx_len_B) - 1, l_max)
    _, s_mask = align_positions(s_ctx_len_B, gen_len_B, h_student_BTD.shape[1], l_max)
    _, t_mask = align_positions(t_ctx_len_B, gen_len_B, h_teacher_BTD.shape[1], l_max)
    mask_BL = s_mask & t_mask
    kl_BL = chunked_kl_from_hidden(hs_BLD, ht_BLD, w_unembed_DV, mask_BL, direction, chunk,
                                   w_teacher_DV=w_teacher_DV)
    return kl_BL, mask_BL
