"""Prefill + KV-cache decode under `jit`, with ragged prompts.

Prompts are left-padded into a static bucket of P columns, so every row's last prompt token
sits in column P-1 and decode writes all rows at the same cache slot; each row's RoPE positions
start at 0 at its first real token and its padding slots are masked out. A prompt repeated
over rows (the rollouts of one RL group) is prefilled once and its cache rows copied. Cache
and prompt widths come in few buckets (`bucket`), so repeated calls with similar shapes do not
recompile.
Weights are passed to the compiled program as arguments (graph and state split), tunix-style.

Returned log-probs are the model's own log π(token | prefix) at temperature 1 with no top-p/k
truncation: the quantity RL and KL shaping need (handoff F3).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxttt.model.transformer import init_cache

MIN_BUCKET = 16


@dataclasses.dataclass
class SampleOutput:
    tokens: np.ndarray  # [B, M] generated ids, pad after each row's end
    logprobs: np.ndarray  # [B, M] log π(token) at temperature 1, 0 after the end
    lengths: np.ndarray  # [B] generated tokens per row (an EOS, when hit, is counted)

    def completions(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def bucket(n: int) -> int:
    """Smallest bucket >= n: powers of two up to 128, then also 3/4 of each power of two
    (192, 384, 768, ...), so a long row is padded by under half its length rather than doubled."""
    b = max(MIN_BUCKET, 1 << max(0, int(n) - 1).bit_length())
    return 3 * b // 4 if b >= 256 and n <= 3 * b // 4 else b


def left_pad(prompts: list[list[int]], pad_id: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, width] int32 with each prompt right-aligned, and the first real column per row."""
    toks = np.full((len(prompts), width), pad_id, np.int32)
    start = np.zeros(len(prompts), np.int32)
    for b, p in enumerate(prompts):
        if not 0 < len(p) <= width:
            raise ValueError(f"prompt {b} has length {len(p)}; expected 1..{width}")
        toks[b, width - len(p):] = p
        start[b] = width - len(p)
    return toks, start


def filter_probs(logits_BV: jax.Array, temperature, top_p, top_k: int, pad_id: int) -> jax.Array:
    """Sampling weights after temperature, top-k and nucleus (top-p) filtering.

    Unnormalised (the sampler scales its uniform by the row total); PAD gets 0 (unless None).
    """
    if pad_id is not None:
        logits_BV = logits_BV.at[:, pad_id].set(-jnp.inf)
    logits_BV = logits_BV / jnp.maximum(temperature, 1e-6)
    if top_k > 0:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
    probs_BV = jax.nn.softmax(logits_BV, axis=-1)
    return jnp.where(probs_BV >= _nucleus_threshold(probs_BV, top_p), probs_BV, 0.0)


def _nucleus_threshold(probs_BV: jax.Array, top_p, iters: int = 24) -> jax.Array:
    """Largest tau with mass(p >= tau) >= top_p, by bisection: the nucleus is {p >= tau}.

    Equals the sort-based rule (smallest prefix of the sorted distribution reaching top_p, ties
    kept together) up to a resolution of max(p) / 2^iters, without an O(V log V) sort per
    decode step, which dominated CPU sampling.
    """
    def mass(tau_B1):
        return jnp.sum(jnp.where(probs_BV >= tau_B1, probs_BV, 0.0), axis=-1, keepdims=True)

    def body(_, lo_hi):
        lo, hi = lo_hi
        mid = 0.5 * (lo + hi)
        ok = mass(mid) >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    hi = jnp.max(probs_BV, axis=-1, keepdims=True)
    lo, hi = jax.lax.fori_loop(0, iters, body, (jnp.zeros_like(hi), hi))
    tau_B1 = jnp.where(mass(hi) >= top_p, hi, lo)  # the top token alone may already suffice
    return jnp.where(top_p >= 1.0, 0.0, tau_B1)


def _inverse_cdf_sample(key, w_BV: jax.Array, block: int = 128) -> jax.Array:
    """Exact categorical sample ∝ weights w >= 0, one uniform per row, two-level inverse CDF.

    Gumbel-max would draw B*V random numbers and a flat cumsum over V is a slow serial scan on
    CPU; here the CDF runs over V/block block masses, then inside the chosen block.
    """
    return inverse_cdf_at(jax.random.uniform(key, (w_BV.shape[0], 1)), w_BV, block)


def inverse_cdf_at(frac_B1: jax.Array, w_BV: jax.Array, block: int = 128) -> jax.Array:
    """The token at fraction `frac` in [0, 1] of each row's total weight.

    Token i owns [C_i, C_i + w_i) where C is the EXCLUSIVE cumulative sum, and the draw is the
    last token with w > 0 and C <= u: a zero-weight token is never drawn, whatever the float
    rounding of the sums (an inclusive cumsum compared with `<` could land on one when the
    block-level and in-block sums round differently, or when u rounds up to the total).
    """
    B, V = w_BV.shape
    if V % block:
        block = V  # single level
    w_BNK = w_BV.reshape(B, V // block, block)
    mass_BN = w_BNK.sum(-1)
    excl_BN = _exclusive_cumsum(mass_BN)
    u_B1 = frac_B1 * (excl_BN[:, -1:] + mass_BN[:, -1:])
    blk_B = _last_owner(excl_BN, mass_BN > 0, u_B1)
    inner_BK = jnp.take_along_axis(w_BNK, blk_B[:, None, None], 1)[:, 0]
    u_in_B1 = u_B1 - jnp.take_along_axis(excl_BN, blk_B[:, None], 1)
    return blk_B * block + _last_owner(_exclusive_cumsum(inner_BK), inner_BK > 0, u_in_B1)


def _exclusive_cumsum(x_BX: jax.Array) -> jax.Array:
    inclusive = jnp.cumsum(x_BX, axis=-1)
    return jnp.concatenate([jnp.zeros_like(inclusive[:, :1]), inclusive[:, :-1]], axis=-1)


def _last_owner(excl_BX: jax.Array, positive_BX: jax.Array, u_B1: jax.Array) -> jax.Array:
    """Last index with positive weight whose interval starts at or below u (else the first
    positive one: only reachable through rounding below the first start, which is 0)."""
    ok_BX = positive_BX & (excl_BX <= u_B1)
    X = excl_BX.shape[1]
    last = X - 1 - jnp.argmax(ok_BX[:, ::-1], axis=-1)
    return jnp.where(jnp.any(ok_BX, axis=-1), last, jnp.argmax(positive_BX, axis=-1))


def _choose(key, logits_BV, temperature, top_p, top_k, greedy, pad_id):
    """pad_id None: nothing is banned (a checkpoint that pads with its EOS must still end)."""
    banned_BV = logits_BV if pad_id is None else logits_BV.at[:, pad_id].set(-jnp.inf)
    raw_logp_BV = jax.nn.log_softmax(banned_BV, axis=-1)
    if greedy:
        tok_B = jnp.argmax(raw_logp_BV, axis=-1)
    else:
        tok_B = _inverse_cdf_sample(key, filter_probs(logits_BV, temperature, top_p, top_k, pad_id))
    return tok_B.astype(jnp.int32), jnp.take_along_axis(raw_logp_BV, tok_B[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "top_k", "greedy", "use_lora",
                                             "pad_id", "eos_id", "slots"))
def _generate(graphdef, state, toks_UP, start_U, rows_B, key, temperature, top_p, *, max_new,
              top_k, greedy, use_lora, pad_id, eos_id, slots):
    model = nnx.merge(graphdef, state)
    P = toks_UP.shape[1]
    B = rows_B.shape[0]
    pos_UP = jnp.maximum(jnp.arange(P)[None, :] - start_U[:, None], 0)
    cache = init_cache(model.cfg, toks_UP.shape[0], slots, start_U)
    logits_U1V, cache = model.decode(toks_UP, pos_UP, cache, use_lora=use_lora, last_only=True)
    cache, logits_B1V = _take_rows(cache, rows_B), logits_U1V[rows_B]
    len_B = P - cache["start"]

    def cond(carry):
        i, _, _, done_B, _, _, _ = carry
        return (i < max_new) & ~jnp.all(done_B)

    def body(carry):
        i, out_BM, logp_BM, done_B, cache, key, logits_BV = carry
        key, sub = jax.random.split(key)
        tok_B, logp_B = _choose(sub, logits_BV, temperature, top_p, top_k, greedy,
                                None if pad_id == eos_id else pad_id)
        tok_B = jnp.where(done_B, pad_id, tok_B)
        logp_B = jnp.where(done_B, 0.0, logp_B)
        out_BM = out_BM.at[:, i].set(tok_B)
        logp_BM = logp_BM.at[:, i].set(logp_B)
        if eos_id is not None:
            done_B = done_B | (tok_B == eos_id)
        logits_B1V, cache = model.decode(tok_B[:, None], (len_B + i)[:, None], cache,
                                         use_lora=use_lora)
        return i + 1, out_BM, logp_BM, done_B, cache, key, logits_B1V[:, 0]

    init = (jnp.int32(0), jnp.full((B, max_new), pad_id, jnp.int32), jnp.zeros((B, max_new)),
            jnp.zeros((B,), bool), cache, key, logits_B1V[:, 0])
    _, out_BM, logp_BM, done_B, _, _, _ = jax.lax.while_loop(cond, body, init)
    return out_BM, logp_BM


def generate(model: nnx.Module, prompts: list[list[int]], key: jax.Array, *, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, greedy: bool = False,
             eos_id: int | None = None, pad_id: int = 0, use_lora: bool = True) -> SampleOutput:
    """Sample continuations of `prompts` (lists of token ids, any lengths) in one compiled call.

    Deterministic for a given `key`. `use_lora=False` runs the base model of an adapted one.
    """
    width = bucket(max(len(p) for p in prompts))
    slots = bucket(width + max_new_tokens)
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({longest}) + {max_new_tokens} new tokens exceeds the model's "
                         f"max_seq_len={model.cfg.max_seq_len}")
    unique, rows_B = unique_prompts(prompts)
    toks_UP, start_U = left_pad(unique, pad_id, width)
    graphdef, state = nnx.split(model)
    out_BM, logp_BM = _generate(graphdef, state, jnp.asarray(toks_UP), jnp.asarray(start_U),
                                jnp.asarray(rows_B), key,
                                jnp.float32(temperature), jnp.float32(top_p),
                                max_new=int(max_new_tokens), top_k=int(top_k), greedy=bool(greedy),
                                use_lora=bool(use_lora), pad_id=int(pad_id),
                                eos_id=None if eos_id is None else int(eos_id), slots=slots)
    out_BM, logp_BM = _on_host(out_BM), _on_host(logp_BM)
    return SampleOutput(out_BM, logp_BM, _lengths(out_BM, eos_id, pad_id))


def unique_prompts(prompts: list[list[int]]) -> tuple[list[list[int]], np.ndarray]:
    """(distinct prompts, row -> index into them): each distinct prompt is prefilled once and
    its cache shared by the rows that repeat it (rollouts of one prompt, a group in RL).

    The distinct list is padded, by repeating its first prompt, to a power of two capped at
    the batch, so a sampler call compiles once per few distinct-prompt counts.
    """
    index: dict[tuple[int, ...], int] = {}
    rows_B = np.array([index.setdefault(tuple(p), len(index)) for p in prompts], np.int32)
    unique = [list(p) for p in index]
    U = min(len(prompts), 1 << (len(unique) - 1).bit_length())
    return unique + [unique[0]] * (U - len(unique)), rows_B


def _take_rows(cache: dict, rows_B: jax.Array) -> dict:
    """The cache of prefilled distinct prompts, one row per sampled row."""
    layers = [{name: jnp.take(kv, rows_B, axis=0) for name, kv in layer.items()}
              for layer in cache["layers"]]
    return {**cache, "layers": layers, "start": jnp.take(cache["start"], rows_B, axis=0)}


def _on_host(x: jax.Array) -> np.ndarray:
    """The whole array on this host: rows sharded over several processes (a multi-process mesh
    under `jax.set_mesh`) are all-gathered, so every process gets every row."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _lengths(out_BM: np.ndarray, eos_id: int | None, pad_id: int) -> np.ndarray:
    M = out_BM.shape[1]
    if eos_id is None:
        return np.full(out_BM.shape[0], M, np.int32)
    hit_BM = out_BM == eos_id
    first_B = np.where(hit_BM.any(1), hit_BM.argmax(1) + 1, M)
    return first_B.astype(np.int32)


def pack_sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int = 0,
                   width: int | None = None):
    """Right-padded prompt+completion rows for teacher-forced scoring.

    Returns tokens [B, W], targets [B, W] (next tokens), a mask [B, W] that is 1 exactly at the
    positions whose target is a completion token (F3: position t-1 predicts token t).
    """
    lens = [len(p) + len(c) for p, c in zip(prompts, completions)]
    W = width or bucket(max(lens))
    toks = np.full((len(prompts), W + 1), pad_id, np.int32)
    mask = np.zeros((len(prompts), W), np.float32)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        seq = list(p) + list(c)
        if len(seq) > W + 1:
            raise ValueError(f"row {b}: prompt+completion length {len(seq)} exceeds width {W + 1}")
        toks[b, :len(seq)] = seq
        mask[b, len(p) - 1:len(seq) - 1] = 1.0
    return toks[:, :-1], toks[:, 1:], mask
