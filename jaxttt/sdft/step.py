"""One SDFT update (handoff SDFT §2-6, A1-A2, F4, K3) and the SFT baseline.

Per optimiser step, for examples (x, c):
  1. the student samples y ~ π_θ(·|x) on-policy (`sampling.generate`, EOS stops a row);
  2. student context `[EOS] x` and teacher context `[EOS] template(x, c)` are each followed
     by y; one forward pass each gives final hidden states;
  3. the per-token full-vocabulary KL (float32, `kl_direction`) along y is computed from the
     F4-aligned hidden states chunk by chunk (`aligned_kl_from_hidden`: no [B, T, V] logits);
  4. loss = kl_coef · Σ KL / Σ tokens over all micro-batches; AdamW (E4) with clipping;
  5. teacher ← τ·teacher + (1 − τ)·student (EMA of the trainable state).
Steps 2-5 are one jitted function; micro-batches are scanned (gradient accumulation).

Trainable state: every `nnx.Param` (full-parameter student) or only the `nnx.LoRAParam`
adapters when the model carries LoRA. The teacher is an EMA of that trainable state and
shares everything else (for LoRA: the frozen base), so for a LoRA student the teacher is
base + EMA(A), EMA(B) — the simple approximation of an EMA of the effective weights.

Empty generations (EOS as the first token) contribute no KL; a row that generated text
keeps the position that predicted its EOS (where to stop is part of the distillation). If
no position of a step is real, the update is skipped: loss 0, gradient 0, weights, optimiser
state and teacher unchanged.

`objective="sft"` is the plain supervised baseline: cross-entropy on the demonstration
(plus EOS) given the student context, no sampling and no teacher.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxttt import sharding
from jaxttt.config import SDFTConfig
from jaxttt.data.tokenizer import Tokenizer
from jaxttt.eval.report import encode_prompt
from jaxttt.model.lora import has_lora
from jaxttt.model.transformer import token_logprobs
from jaxttt.sampling import bucket, generate, pack_sequences
from jaxttt.sdft.data import Example, student_prompt, teacher_prompt
from jaxttt.sdft.ema import ema_init, ema_update
from jaxttt.sdft.kl import aligned_kl_from_hidden

Batch = dict[str, np.ndarray]
OBJECTIVES = ("sdft", "sft")


# ---------------------------------------------------------------------------------------------
# Static description of the compiled update
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class UpdateSpec:
    """Everything static about the jitted update (hashable: one compile per distinct spec).

    Numeric hyperparameters (lr, weight decay, clip norm, kl_coef, τ) are traced arguments
    instead (`hyperparams`), so changing them does not recompile.
    """
    graphdef: Any
    objective: str  # sdft | sft
    l_max: int  # generated tokens per row (sampling.max_new_tokens)
    direction: str
    chunk: int
    grad_accum: int
    clip: bool  # global-norm clipping on (grad_clip > 0)

    @classmethod
    def from_config(cls, graphdef, cfg: SDFTConfig) -> UpdateSpec:
        return cls(graphdef, cfg.objective, cfg.sampling.max_new_tokens, cfg.kl_direction,
                   cfg.kl_chunk, cfg.grad_accum, cfg.grad_clip > 0)


def hyperparams(cfg: SDFTConfig) -> dict[str, jax.Array]:
    """The traced scalars of the update."""
    return {k: jnp.float32(getattr(cfg, k))
            for k in ("lr", "weight_decay", "grad_clip", "kl_coef", "ema_decay")}


def make_optimizer(lr, weight_decay, grad_clip, clip: bool = True) -> optax.GradientTransformation:
    """AdamW (handoff E4: lr 1e-5), after global-norm clipping when `clip`."""
    adamw = optax.adamw(lr, weight_decay=weight_decay)
    return optax.chain(optax.clip_by_global_norm(grad_clip), adamw) if clip else adamw


# ---------------------------------------------------------------------------------------------
# Losses: (trainable, frozen, teacher, micro-batch) -> (summed loss, aux sums)
# ---------------------------------------------------------------------------------------------
def sdft_loss(spec: UpdateSpec, kl_coef, trainable, frozen, teacher, mb: Batch):
    """kl_coef · Σ per-token KL over the micro-batch's real generated positions (a sum)."""
    student = nnx.merge(spec.graphdef, trainable, frozen)
    teach = nnx.merge(spec.graphdef, jax.lax.stop_gradient(teacher), frozen)
    h_s_BTD = student.hidden(mb["s_tok"])
    h_t_BTD = jax.lax.stop_gradient(teach.hidden(mb["t_tok"]))
    kl_BL, mask_BL = aligned_kl_from_hidden(
        h_s_BTD, h_t_BTD, student.unembed_matrix(), mb["s_ctx"], mb["t_ctx"], mb["kl_len"],
        spec.l_max, spec.direction, spec.chunk, w_teacher_DV=teach.unembed_matrix())
    obj = jnp.sum(kl_BL)
    return kl_coef * obj, {"obj": obj, "tokens": jnp.sum(mask_BL.astype(jnp.float32))}


def sft_loss(spec: UpdateSpec, kl_coef, trainable, frozen, teacher, mb: Batch):
    """Σ next-token NLL of the demonstration tokens (kl_coef and teacher unused)."""
    del kl_coef, teacher
    student = nnx.merge(spec.graphdef, trainable, frozen)
    nll_BT = -token_logprobs(student(mb["tok"]), mb["tgt"])
    mask_BT = mb["mask"]
    obj = jnp.sum(nll_BT * mask_BT)
    return obj, {"obj": obj, "tokens": jnp.sum(mask_BT)}


LOSSES: dict[str, Callable] = {"sdft": sdft_loss, "sft": sft_loss}


# ---------------------------------------------------------------------------------------------
# The jitted update
# ---------------------------------------------------------------------------------------------
def _to_micro(x: jax.Array, grad_accum: int) -> jax.Array:
    """[b·A, ...] (row r = j·A + a) -> [A, b, ...]: micro-batch a keeps the batch sharding."""
    return jnp.swapaxes(x.reshape(-1, grad_accum, *x.shape[1:]), 0, 1)


def _accumulate(spec: UpdateSpec, kl_coef, trainable, frozen, teacher, batch: Batch):
    """Summed gradients and aux sums over the micro-batches (lax.scan)."""
    loss_fn = functools.partial(LOSSES[spec.objective], spec, kl_coef)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    micro = jax.tree.map(lambda x: _to_micro(x, spec.grad_accum), batch)

    def body(carry, mb):
        g_acc, loss_acc, obj_acc, tok_acc = carry
        (loss, aux), g = grad_fn(trainable, frozen, teacher, mb)
        g_acc = jax.tree.map(jnp.add, g_acc, g)
        return (g_acc, loss_acc + loss, obj_acc + aux["obj"], tok_acc + aux["tokens"]), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0))
    (g_sum, loss_sum, obj_sum, tokens), _ = jax.lax.scan(body, init, micro)
    return g_sum, loss_sum, obj_sum, tokens


def _mean_abs_gap(a, b) -> jax.Array:
    """Mean |a − b| over every element of two same-structured trees (0 for empty trees)."""
    leaves = [jnp.sum(jnp.abs(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    n = sum(x.size for x in jax.tree.leaves(a))
    return sum(leaves) / max(n, 1) if leaves else jnp.float32(0)


def _update(trainable, opt_state, teacher, frozen, batch: Batch, hp: dict, *, spec: UpdateSpec,
            mesh):
    """One optimiser step. Returns (trainable, opt_state, teacher, metrics)."""
    gap = _mean_abs_gap(teacher, trainable) if teacher is not None else jnp.float32(0)
    g_sum, loss_sum, obj_sum, tokens = _accumulate(spec, hp["kl_coef"], trainable, frozen,
                                                   teacher, batch)
    n = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: g / n, g_sum)
    opt = make_optimizer(hp["lr"], hp["weight_decay"], hp["grad_clip"], spec.clip)
    updates, new_opt = opt.update(grads, opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    new_teacher = None if teacher is None else ema_update(teacher, new_trainable, hp["ema_decay"])
    ok = tokens > 0  # nothing real in the batch: skip the step entirely

    def pick(new, old):
        return jax.tree.map(lambda x, y: jnp.where(ok, x, y), new, old)

    out = (pick(new_trainable, trainable), pick(new_opt, opt_state),
           None if teacher is None else pick(new_teacher, teacher))
    out = jax.lax.with_sharding_constraint(out, sharding.state_shardings(out, mesh))
    metrics = {"loss": loss_sum / n, "obj": obj_sum / n, "tokens": tokens,
               "grad_norm": optax.tree.norm(grads), "teacher_gap": gap}
    return (*out, metrics)


@functools.lru_cache(maxsize=32)
def compiled_update(spec: UpdateSpec, mesh) -> Callable:
    """The jitted update for `spec` on `mesh` (cached: new trainers reuse the compile).

    Donates the trainable state, optimiser state and teacher (arguments 0-2).
    """
    return jax.jit(functools.partial(_update, spec=spec, mesh=mesh), donate_argnums=(0, 1, 2))


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
    """Rows in micro-batch order [a0 j0, a1 j0, ...] -> row r = j·A + a (see `_to_micro`)."""
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
    """Functional SDFT state (student trainable part, frozen rest, EMA teacher, optimiser).

    `step(examples, key)` = `rollout` (sampling, host) + `update` (one jitted call).
    `model()` is the current student as an nnx module (sampling, evaluation).
    Examples per update: batch_size × grad_accum (grad_accum micro-batches of batch_size);
    rows are padded with masked copies to a multiple of the mesh's batch axes.
    The trainer takes over the model's trainable buffers (updates donate them): use
    `trainer.model()` afterwards, not the module passed in.
    """

    def __init__(self, model: nnx.Module, tokenizer: Tokenizer, cfg: SDFTConfig, mesh):
        _check_trainable(model, cfg)
        self.cfg, self.tok, self.mesh = cfg, tokenizer, mesh
        self.model_cfg = model.cfg
        self.lora = has_lora(model)
        wrt = nnx.LoRAParam if self.lora else nnx.Param
        self.graphdef, trainable, self.frozen = nnx.split(model, wrt, ...)
        self.trainable = sharding.shard_state(trainable, mesh)
        self.teacher = ema_init(self.trainable) if cfg.objective == "sdft" else None
        opt = make_optimizer(cfg.lr, cfg.weight_decay, cfg.grad_clip, cfg.grad_clip > 0)
        self.opt_state = sharding.shard_state(opt.init(self.trainable), mesh)
        self.spec = UpdateSpec.from_config(self.graphdef, cfg)
        self.hp = hyperparams(cfg)
        self._update = compiled_update(self.spec, mesh)
        self.n_steps = 0

    @property
    def rows_multiple(self) -> int:
        return sharding.batch_shards(self.mesh)

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.trainable, self.frozen)

    def teacher_model(self) -> nnx.Module:
        if self.teacher is None:
            raise ValueError("objective 'sft' has no teacher")
        return nnx.merge(self.graphdef, self.teacher, self.frozen)

    # ------------------------------------------------------------------ batches
    def contexts(self, examples: Sequence[Example]) -> tuple[list[list[int]], list[list[int]]]:
        """Student contexts `[EOS] x` and teacher contexts `[EOS] template(x, c)` (left-truncated)."""
        room = self.model_cfg.max_seq_len - self.cfg.sampling.max_new_tokens
        s_len = min(self.cfg.max_prompt_len, room)
        s_ctx = [encode_prompt(self.tok, student_prompt(ex.prompt), s_len) for ex in examples]
        t_ctx = [encode_prompt(self.tok, teacher_prompt(ex.prompt, ex.demonstration), room)
                 for ex in examples]
        return s_ctx, t_ctx

    def rollout(self, examples: Sequence[Example], key: jax.Array) -> tuple[Batch, dict]:
        """Sample y from the student and build the update batch; returns (batch, host stats)."""
        if self.cfg.objective == "sft":
            return self._sft_batch(examples), {}
        s_ctx, t_ctx = self.contexts(examples)
        sc = self.cfg.sampling
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
        """One jitted optimiser step on a prepared batch; returns float metrics."""
        placed = {k: _place_rows(v, self.mesh) for k, v in batch.items()}
        self.trainable, self.opt_state, self.teacher, m = self._update(
            self.trainable, self.opt_state, self.teacher, self.frozen, placed, self.hp)
        self.n_steps += 1
        m = {k: float(v) for k, v in m.items()}
        m["kl" if self.cfg.objective == "sdft" else "nll"] = m.pop("obj")
        return m

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
        self.trainable, self.opt_state = copy(snap.trainable), copy(snap.opt_state)
        self.teacher = None if snap.teacher is None else copy(snap.teacher)

    def effective_params(self) -> nnx.State:
        """Full-model `nnx.Param` state with adapters folded in: what `load_model` restores."""
        from jaxttt.model import lora

        if not self.lora:
            return jax.tree.map(jnp.copy, self.trainable)
        merged = nnx.clone(self.model())
        lora.merge(merged)
        return nnx.state(merged, nnx.Param)


def _place_rows(x: np.ndarray, mesh) -> jax.Array:
    """A host batch (identical on every process) as a global array sharded over the batch axes."""
    return jax.make_array_from_callback(x.shape, sharding.batch_sharding(mesh, x.ndim),
                                        lambda idx: x[idx])


def _check_trainable(model: nnx.Module, cfg: SDFTConfig) -> None:
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"config key 'objective': expected one of {OBJECTIVES}, got {cfg.objective!r}")
    if has_lora(model) and model.lora_config.dropout > 0:
        raise ValueError("config key 'lora.dropout': SDFT needs 0 (student and EMA teacher share "
                         "one graph; dropout would also randomise the teacher)")
    if cfg.sampling.max_new_tokens >= model.cfg.max_seq_len:
        raise ValueError(f"config key 'sampling.max_new_tokens': {cfg.sampling.max_new_tokens} "
                         f"leaves no room for a prompt in max_seq_len={model.cfg.max_seq_len}")
