"""One SDFT update (handoff SDFT §2-6, A1-A2, F4, K3) and the SFT baseline, over the trainer core.

Per optimiser step, for examples (x, c):
  1. the student samples y ~ π_θ(·|x) on-policy (`sampling.generate`, EOS stops a row);
  2. student context `[EOS] x` and teacher context `[EOS] template(x, c)` are each followed
     by y; one forward pass each gives final hidden states;
  3. the per-token full-vocabulary KL (float32, `kl_direction`) along y is computed from the
     F4-aligned hidden states chunk by chunk (`aligned_kl_from_hidden`: no [B, T, V] logits);
     the first `skip_loss_tokens` generated tokens of every row carry no loss;
  4. loss = kl_coef · Σ KL / Σ tokens over all micro-batches (`SDFTLoss`, a token-sum loss:
     the trainer divides by the step's token count); AdamW from `cfg.optim`;
  5. teacher ← τ·teacher + (1 − τ)·student (EMA of the trainable state), unless skipped.
Steps 2-4 are the trainer's one jitted update (the teacher enters as its `context`).

Trainable state: every base `nnx.Param` (full-parameter student) or only the `nnx.LoRAParam`
adapters when the model carries LoRA. The teacher is an EMA of that trainable state and
shares everything else (for LoRA: the frozen base), so for a LoRA student the teacher is
base + EMA(A), EMA(B) — the simple approximation of an EMA of the effective weights.

Empty generations (EOS as the first token) contribute no KL; a row that generated text
keeps the position that predicted its EOS (where to stop is part of the distillation). A
step with no real position, or a non-finite loss or gradient, is skipped by the trainer:
weights, optimiser state and teacher unchanged (`skipped` = 1 in the metrics).

`objective="sft"` is the plain supervised baseline: cross-entropy on the demonstration
(plus EOS) given the student context, no sampling and no teacher.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxttt import sharding
from jaxttt.config import SDFTConfig
from jaxttt.data.tokenizer import Tokenizer
from jaxttt.data.chat_prompts import use_chat
from jaxttt.model.lora import has_lora
from jaxttt.model.transformer import token_logprobs
from jaxttt.sampling import bucket, generate, pack_sequences
from jaxttt.sdft.data import Example, encode_contexts
from jaxttt.sdft.ema import ema_init, ema_update
from jaxttt.sdft.kl import aligned_kl_from_hidden
from jaxttt.train.trainer import ADAPTERS, BASE_PARAMS, Trainer

Batch = dict[str, np.ndarray]
OBJECTIVES = ("sdft", "sft")


# ---------------------------------------------------------------------------------------------
# Losses (hashable by value: the compiled update is shared by trainers with equal settings)
# ---------------------------------------------------------------------------------------------
def with_weights(model: nnx.Module, weights: nnx.State) -> nnx.Module:
    """A copy of `model` whose variables in `weights` are replaced (the teacher). A copy, not
    `nnx.merge(*nnx.split(model))`: that shares the Variable objects, so the update would
    overwrite the student's own weights."""
    view = nnx.clone(model)
    nnx.update(view, weights)
    return view


@dataclasses.dataclass(frozen=True)
class SDFTLoss:
    """kl_coef · Σ per-token KL over the real generated positions (a token sum, see step 4)."""
    l_max: int  # generated tokens per row (sampling.max_new_tokens)
    direction: str
    chunk: int
    kl_coef: float
    skip_tokens: int = 0  # the first generated tokens of each row that carry no loss

    def __call__(self, student: nnx.Module, mb: Batch, teacher_weights: nnx.State):
        teacher = with_weights(student, jax.lax.stop_gradient(teacher_weights))
        h_s_BTD = student.hidden(mb["s_tok"])
        h_t_BTD = jax.lax.stop_gradient(teacher.hidden(mb["t_tok"]))
        kl_BL, mask_BL = aligned_kl_from_hidden(
            h_s_BTD, h_t_BTD, student.unembed_matrix(), mb["s_ctx"], mb["t_ctx"], mb["kl_len"],
            self.l_max, self.direction, self.chunk, w_teacher_DV=teacher.unembed_matrix())
        keep_BL = mask_BL & (jnp.arange(self.l_max)[None, :] >= self.skip_tokens)
        kl = jnp.sum(jnp.where(keep_BL, kl_BL, 0.0))
        return self.kl_coef * kl, {"kl": kl, "n_tokens": jnp.sum(keep_BL.astype(jnp.float32))}


@dataclasses.dataclass(frozen=True)
class SFTLoss:
    """Σ next-token NLL of the demonstration tokens (a token sum)."""

    def __call__(self, student: nnx.Module, mb: Batch):
        nll_BT = -token_logprobs(student(mb["tok"]), mb["tgt"])
        nll = jnp.sum(nll_BT * mb["mask"])
        return nll, {"nll": nll, "n_tokens": jnp.sum(mb["mask"])}


def make_loss(cfg: SDFTConfig):
    if cfg.objective == "sft":
        return SFTLoss()
    return SDFTLoss(cfg.sampling.max_new_tokens, cfg.kl_direction, cfg.kl_chunk,
                    float(cfg.kl_coef), cfg.skip_loss_tokens)


@jax.jit
def mean_abs_gap(a, b) -> jax.Array:
    """Mean |a − b| over every element of two same-structured trees (0 for empty trees)."""
    leaves = [jnp.sum(jnp.abs(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    n = sum(x.size for x in jax.tree.leaves(a))
    return sum(leaves) / max(n, 1) if leaves else jnp.float32(0)


# ---------------------------------------------------------------------------------------------
# Host side: batches
# ---------------------------------------------------------------------------------------------
def content_lengths(completions: Sequence[Sequence[int]], eos_id: int) -> np.ndarray:
    """KL length per row: generated tokens (EOS included), 0 for an empty generation."""
    return np.asarray([0 if (len(c) == 0 or (len(c) == 1 and c[0] == eos_id)) else len(c)
                       for c in completions], np.int32)


def right_pad(rows: Sequence[Sequence[int]], pad_id: int, width: int) -> np.ndarray:
    out = np.full((len(rows), width), pad_id, np.int32)
    for b, r in enumerate(rows):
        out[b, :len(r)] = r
    return out


def pad_rows(batch: Batch, multiple: int, zero_keys: Sequence[str]) -> Batch:
    """Pad the row count to a multiple of `multiple` with copies of row 0 whose `zero_keys` are 0.

    Padded rows are fully masked (their lengths are 0), so any batch fits any mesh.
    """
    n = next(iter(batch.values())).shape[0]
    extra = (-n) % multiple
    if extra == 0:
        return batch
    out = {k: np.concatenate([v, np.repeat(v[:1], extra, axis=0)]) for k, v in batch.items()}
    for k in zero_keys:
        out[k][n:] = 0
    return out


def interleave(batch: Batch, grad_accum: int) -> Batch:
    """Rows in micro-batch order [a0 j0, a1 j0, ...] -> row r = j·A + a (the trainer's
    micro-batch a is rows a, a+A, ...: `jaxttt.train.trainer.micro_batches`)."""
    def perm(x):
        return np.swapaxes(x.reshape(grad_accum, -1, *x.shape[1:]), 0, 1).reshape(x.shape)
    return {k: perm(v) for k, v in batch.items()}


@dataclasses.dataclass
class Snapshot:
    """Copies (own buffers) of everything an update changes: restoring is bitwise exact.

    `n_steps` is not rolled back: it counts updates run, reverted ones included, so every
    checkpoint step number stays unique.
    """
    trainable: Any
    opt_state: Any
    teacher: Any


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------
class SDFTTrainer:
    """SDFT state: the core `Trainer` (student, optimiser) plus the EMA teacher.

    `step(examples, key)` = `rollout` (sampling, host) + `update` (one jitted call).
    `model()` is the current student as an nnx module (sampling, evaluation).
    Examples per update: batch_size × grad_accum (grad_accum micro-batches of batch_size);
    rows are padded with masked copies to a multiple of the mesh's batch axes.
    The trainer takes over the model's trainable buffers (updates donate them): use
    `trainer.model()` afterwards, not arrays taken from the module before.
    """

    def __init__(self, model: nnx.Module, tokenizer: Tokenizer, cfg: SDFTConfig, mesh):
        _check_trainable(model, cfg)
        self.cfg, self.tok, self.mesh = cfg, tokenizer, mesh
        self.model_cfg = model.cfg
        self.lora = has_lora(model)
        self.core = Trainer(model, make_loss(cfg), cfg.optim, mesh=mesh,
                            total_steps=cfg.blocks * cfg.steps_per_block,
                            wrt=ADAPTERS if self.lora else BASE_PARAMS,
                            grad_accum=cfg.grad_accum, reduction="sum")
        self.teacher = ema_init(self.core.params) if cfg.objective == "sdft" else None
        self.n_steps = 0

    @property
    def trainable(self) -> nnx.State:
        return self.core.params

    @property
    def frozen(self) -> nnx.State:
        return self.core.rest

    @property
    def opt_state(self):
        return self.core.opt_state

    @property
    def rows_multiple(self) -> int:
        return sharding.batch_shards(self.mesh)

    def model(self) -> nnx.Module:
        return self.core.model

    def teacher_model(self) -> nnx.Module:
        if self.teacher is None:
            raise ValueError("objective 'sft' has no teacher")
        return with_weights(self.core.model, self.teacher)

    # ------------------------------------------------------------------ batches
    def contexts(self, examples: Sequence[Example]) -> tuple[list[list[int]], list[list[int]]]:
        """Student contexts `[EOS] x` and teacher contexts `[EOS] template(x, c)` (left-truncated;
        for an instruct model each a user turn of its chat template, `cfg.chat`)."""
        room = self.model_cfg.max_seq_len - self.cfg.sampling.max_new_tokens
        s_len = min(self.cfg.max_prompt_len, room)
        chat = use_chat(self.tok, self.cfg.chat)
        pairs = [encode_contexts(self.tok, ex, s_len, room, chat) for ex in examples]
        return [s for s, _ in pairs], [t for _, t in pairs]

    def rollout(self, examples: Sequence[Example], key: jax.Array) -> tuple[Batch, dict]:
        """Sample y from the student and build the update batch; returns (batch, host stats)."""
        if self.cfg.objective == "sft":
            return self._sft_batch(examples), {}
        s_ctx, t_ctx = self.contexts(examples)
        # the update's shapes depend on the contexts only: it compiles while the student samples
        self.core.precompile(self.finish(self.sdft_batch(s_ctx, t_ctx, [[]] * len(s_ctx)),
                                         ("kl_len",)), context=self.teacher)
        sc = self.cfg.sampling
        with jax.set_mesh(self.mesh):
            out = generate(self.model(), s_ctx, key, max_new_tokens=sc.max_new_tokens,
                           temperature=sc.temperature, top_p=sc.top_p, top_k=sc.top_k,
                           greedy=sc.greedy, eos_id=self.tok.eos_id, pad_id=self.tok.pad_id)
        ys = out.completions()
        batch = self.sdft_batch(s_ctx, t_ctx, ys)
        lens = np.asarray([len(y) for y in ys])
        stats = {"gen_len_mean": float(lens.mean()), "gen_len_min": int(lens.min()),
                 "gen_len_max": int(lens.max()),
                 "empty_frac": float(np.mean(batch["kl_len"][:len(ys)] == 0))}
        return self.finish(batch, ("kl_len",)), stats

    def sdft_batch(self, s_ctx, t_ctx, ys) -> Batch:
        """Unpadded update rows: `ctx + y` for student and teacher, context and KL lengths."""
        l_max = self.cfg.sampling.max_new_tokens
        ws = bucket(max(map(len, s_ctx)) + l_max)
        wt = bucket(max(map(len, t_ctx)) + l_max)
        return {"s_tok": right_pad([s + y for s, y in zip(s_ctx, ys)], self.tok.pad_id, ws),
                "t_tok": right_pad([t + y for t, y in zip(t_ctx, ys)], self.tok.pad_id, wt),
                "s_ctx": np.asarray([len(s) for s in s_ctx], np.int32),
                "t_ctx": np.asarray([len(t) for t in t_ctx], np.int32),
                "kl_len": content_lengths(ys, self.tok.eos_id)}

    def _sft_batch(self, examples: Sequence[Example]) -> Batch:
        s_ctx, _ = self.contexts(examples)
        demos = [self.tok.encode(ex.demonstration) + [self.tok.eos_id] for ex in examples]
        room = self.model_cfg.max_seq_len
        demos = [d[:room - len(s)] for s, d in zip(s_ctx, demos)]
        tok, tgt, mask = pack_sequences(s_ctx, demos, self.tok.pad_id)
        return self.finish({"tok": tok, "tgt": tgt, "mask": mask}, ("mask",))

    def finish(self, batch: Batch, zero_keys: Sequence[str]) -> Batch:
        """Pad rows for the mesh and the accumulation split, interleave micro-batches."""
        a = self.cfg.grad_accum
        n = next(iter(batch.values())).shape[0]
        if n % a:
            raise ValueError(f"{n} examples do not split into grad_accum={a} micro-batches")
        parts = [{k: v[i::a] for k, v in batch.items()} for i in range(a)]
        parts = [pad_rows(p, self.rows_multiple, zero_keys) for p in parts]
        stacked = {k: np.concatenate([p[k] for p in parts]) for k in batch}
        return interleave(stacked, a)

    # ------------------------------------------------------------------ updates
    def update(self, batch: Batch) -> dict[str, float]:
        """One optimiser step (the core's jitted update) and the teacher's EMA; float metrics."""
        gap = 0.0 if self.teacher is None else float(mean_abs_gap(self.teacher, self.trainable))
        m = self.core.step(batch, context=self.teacher)
        if self.teacher is not None and not m["skipped"]:
            self.teacher = ema_update(self.teacher, self.trainable, self.cfg.ema_decay)
        self.n_steps += 1
        m["tokens"] = m.pop("n_tokens")
        return {**m, "teacher_gap": gap}

    def step(self, examples: Sequence[Example], key: jax.Array) -> dict[str, float]:
        batch, stats = self.rollout(examples, key)
        return {**self.update(batch), **stats}

    # ------------------------------------------------------------------ snapshots
    def snapshot(self) -> Snapshot:
        copy = functools.partial(jax.tree.map, jnp.copy)
        return Snapshot(copy(self.trainable), copy(self.opt_state),
                        None if self.teacher is None else copy(self.teacher))

    def restore(self, snap: Snapshot) -> None:
        """Back to `snap` exactly (fresh copies: the snapshot stays valid after donation)."""
        copy = functools.partial(jax.tree.map, jnp.copy)
        self.core.set_state(copy(snap.trainable), copy(snap.opt_state))
        self.teacher = None if snap.teacher is None else copy(snap.teacher)

    def effective_params(self) -> nnx.State:
        """Full-model `nnx.Param` state with adapters folded in: what `load_model` restores."""
        from jaxttt.model import lora

        if not self.lora:
            return jax.tree.map(jnp.copy, nnx.state(self.model(), nnx.Param))
        merged = nnx.clone(self.model())
        lora.merge(merged)
        return nnx.state(merged, nnx.Param)


def _check_trainable(model: nnx.Module, cfg: SDFTConfig) -> None:
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"config key 'objective': expected one of {OBJECTIVES}, got {cfg.objective!r}")
    if has_lora(model) and model.lora_config.dropout > 0:
        raise ValueError("config key 'lora.dropout': SDFT needs 0 (student and EMA teacher share "
                         "one graph; dropout would also randomise the teacher)")
    if cfg.sampling.max_new_tokens >= model.cfg.max_seq_len:
        raise ValueError(f"config key 'sampling.max_new_tokens': {cfg.sampling.max_new_tokens} "
                         f"leaves no room for a prompt in max_seq_len={model.cfg.max_seq_len}")
