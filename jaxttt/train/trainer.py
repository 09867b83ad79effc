"""The one trainer core: every loop is a loss function and a batch builder over `Trainer`.

    trainer = Trainer(model, loss_fn, optim_cfg, mesh=mesh, total_steps=S,
                      wrt=nnx.Param, grad_accum=1)
    trainer.compile(example_batch)     # optional AOT compile before step 0 (prints memory use)
    trainer.precompile(example_batch)  # or: compile it in the background while the host samples
    metrics = trainer.step(batch)      # python floats: loss, grad_norm, lr, skipped (0/1), + aux
    trainer.skipped, trainer.opt_state, trainer.reset()

`loss_fn(model, batch) -> (loss, aux)` (or `loss_fn(model, batch, context)` when `step` is
given a `context`: arrays the loss reads but does not train, e.g. an EMA teacher). `batch`
is a dict of arrays with the batch on axis 0: numpy arrays hold the GLOBAL batch (identical on
every process) and are placed by `sharding.place_batch`; a loop whose processes each hold only
their own rows places them itself (`place_batch(..., local=True)`) and passes jax.Arrays.
With `grad_accum = A`, the B·A rows are split into A micro-batches (micro-batch a = rows
a, a+A, a+2A, ...: each keeps the batch sharding), scanned, and ONE optimizer update follows.

`reduction="mean"`: the loss is a mean; loss, gradient and aux are averaged over micro-batches.
`reduction="sum"`: the loss and aux are sums over tokens and aux carries `n_tokens`; loss,
gradient and aux are divided by the total token count of the whole step (so accumulation is
exact for token-weighted losses). A step with no tokens (`n_tokens` from aux, or the sum of a
per-row batch["n_tokens"]) or a non-finite loss or gradient norm is SKIPPED: weights and
optimizer state stay bitwise unchanged, `skipped` is 1 and `trainer.skipped` counts it.

`wrt` selects what is trainable. `nnx.LoRAParam` is a subclass of `nnx.Param`, so
`wrt=nnx.Param` trains adapters too; use `BASE_PARAMS` to train every parameter except the
adapters and `ADAPTERS` (= nnx.LoRAParam) to train only them. Everything else is frozen.

The update is one jitted program per (model structure, loss, optimizer, mesh, ...), shared by
every Trainer in the process; trainable weights and optimizer state are donated, shardings come
from the variables' logical axes (`sharding.state_shardings`), and it runs under
`jax.set_mesh(mesh)`, so the model's activation constraints are live.

The optimizer is one `OptimConfig`: global-norm clipping (grad_clip <= 0: off), then AdamW
(b1, b2, decoupled weight decay on matrices only: norms, mHC gates and biases are not decayed)
with a linear warm-up and a cosine | linear | constant schedule. The learning rate depends only
on the optimizer's update count, so a resumed run follows an uninterrupted one's schedule and a
skipped update does not advance it.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxttt import sharding
from jaxttt.config import OptimConfig

# Parameter names that get no weight decay: norm scales, mHC gates (alpha) and mHC biases.
NO_DECAY = frozenset({"scale", "alpha", "b_pre", "b_post", "b_res"})
SCHEDULES = ("cosine", "linear", "constant")
REDUCTIONS = ("mean", "sum")
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # every parameter but the adapters
ADAPTERS = nnx.LoRAParam

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


# --------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------
def warmup_steps(optim: OptimConfig, total_steps: int) -> int:
    """Warm-up updates: warmup_steps (-1: no step cap), at most warmup_frac of the run."""
    cap = int(optim.warmup_frac * total_steps)
    return max(0, cap if optim.warmup_steps < 0 else min(optim.warmup_steps, cap))


def lr_schedule(optim: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up (update 0 already gets lr/warmup), then cosine or linear decay to
    min_lr_ratio·lr at total_steps, or flat."""
    if optim.schedule not in SCHEDULES:
        raise ValueError(f"config key 'optim.schedule': expected one of {'|'.join(SCHEDULES)}, "
                         f"got {optim.schedule!r}")
    warm = warmup_steps(optim, total_steps)
    decay = max(total_steps - warm, 1)

    def schedule(count):
        s = jnp.asarray(count, jnp.float32)
        ramp = jnp.minimum((s + 1.0) / max(warm, 1), 1.0)
        if optim.schedule == "constant":
            return optim.lr * ramp
        progress = jnp.clip((s - warm) / decay, 0.0, 1.0)
        if optim.schedule == "cosine":
            shape = 0.5 * (1.0 + jnp.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return optim.lr * ramp * (optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * shape)

    return schedule


def decay_mask(params) -> Any:
    """True for the matrices that AdamW decays; norms, mHC alphas/biases and vectors are not."""
    def decays(path, var) -> bool:
        return var.ndim >= 2 and getattr(path[-1], "key", None) not in NO_DECAY

    return jax.tree_util.tree_map_with_path(decays, params,
                                            is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(optim: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                   optax.Schedule]:
    """Global-norm clip (grad_clip <= 0: none), then AdamW with the masked weight decay."""
    schedule = lr_schedule(optim, total_steps)
    adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay,
                        mask=decay_mask)
    clip = optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw), schedule


def update_count(opt_state) -> jax.Array:
    """Updates applied so far (every counting part of the chain holds the same number)."""
    return optax.tree_utils.tree_get_all_with_path(opt_state, "count")[0][1]


# --------------------------------------------------------------------------------------------
# Gradients over micro-batches
# --------------------------------------------------------------------------------------------
def micro_batches(batch: dict, grad_accum: int) -> dict:
    """[B·A, ...] -> [A, B, ...]; micro-batch a = rows a, a+A, ... (each keeps the row sharding)."""
    def split(x):
        x = jnp.swapaxes(x.reshape(-1, grad_accum, *x.shape[1:]), 0, 1)
        return sharding.constrain(x, None, "batch", *([None] * (x.ndim - 2)))
    return jax.tree.map(split, batch)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one compiled update (hashable: the key of the jit cache)."""
    graphdef: Any
    loss_fn: LossFn
    optim: OptimConfig
    total_steps: int
    grad_accum: int
    reduction: str
    has_context: bool
    mesh: Mesh


def _loss_and_grads(st: _Static, params, rest, context, batch):
    """(loss, grads, aux, n_tokens or None) over the step's micro-batches."""
    def loss_of(p, mb):
        model = nnx.merge(st.graphdef, p, rest)
        loss, aux = st.loss_fn(model, mb, context) if st.has_context else st.loss_fn(model, mb)
        return jnp.asarray(loss, jnp.float32), {k: jnp.asarray(v, jnp.float32)
                                                for k, v in aux.items()}

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)
    if st.grad_accum == 1:
        (loss, aux), grads = grad_fn(params, batch)
    else:
        g_sh = sharding.state_shardings(params, st.mesh)

        def body(acc, mb):
            (loss, aux), grads = jax.tree.map(jnp.add, acc, grad_fn(params, mb))
            return ((loss, aux), jax.lax.with_sharding_constraint(grads, g_sh)), None

        micro = micro_batches(batch, st.grad_accum)
        shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        ((loss, aux), grads), _ = jax.lax.scan(body, zero, micro)
    n_tokens = aux.get("n_tokens")
    if n_tokens is None and "n_tokens" in batch:
        n_tokens = jnp.sum(batch["n_tokens"].astype(jnp.float32))
    if st.reduction == "sum":
        if n_tokens is None:
            raise ValueError("Trainer(reduction='sum'): the loss must return aux['n_tokens'] "
                             "(or the batch carry a per-row 'n_tokens')")
        denom = jnp.maximum(n_tokens, 1.0)
    else:
        denom = jnp.float32(st.grad_accum)
    aux = {k: (v if k == "n_tokens" else v / denom) for k, v in aux.items()}
    grads = jax.tree.map(lambda g: g / denom, grads)
    return loss / denom, grads, aux, n_tokens


def _update(params, opt_state, skipped, rest, context, batch, *, st: _Static):
    """One optimizer step, or a bitwise no-op when the step has no tokens or is non-finite."""
    tx, schedule = make_optimizer(st.optim, st.total_steps)
    loss, grads, aux, n_tokens = _loss_and_grads(st, params, rest, context, batch)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if n_tokens is not None:
        ok &= n_tokens > 0
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
    out = (keep(new_params, params), keep(new_opt, opt_state))
    out = jax.lax.with_sharding_constraint(out, sharding.state_shardings(out, st.mesh))
    metrics = {**aux, "loss": loss, "grad_norm": grad_norm,
               "lr": schedule(update_count(opt_state)), "skipped": 1.0 - ok.astype(jnp.float32)}
    metrics = jax.lax.with_sharding_constraint(metrics, sharding.replicated(st.mesh))
    return (*out, skipped + 1 - ok.astype(jnp.int32), metrics)


# XLA:CPU (jaxlib 0.10) rebuilds each YNNPACK fusion thunk of a cached program with a scan over
# the module's instructions, so loading an update with thousands of dots from the compile cache
# is quadratic: SmolLM2's discover update (3100 YNN fusions) loaded in 22-24 s, no faster than
# compiling it; without YNN fusions it loads in 10-14 s and runs as fast. Sampling keeps YNN
# (the bench model samples ~28% slower without it). Keyed by jax (major, minor): another
# version may not know the option.
CPU_UPDATE_OPTIONS = {(0, 10): {"xla_cpu_experimental_ynn_fusion_type": ""}}


def update_compiler_options() -> dict[str, str] | None:
    """XLA options for the update program on this backend (None: the defaults)."""
    if jax.default_backend() != "cpu":
        return None
    return CPU_UPDATE_OPTIONS.get(tuple(int(x) for x in jax.__version__.split(".")[:2]))


@functools.lru_cache(maxsize=1)
def _compiler() -> concurrent.futures.ThreadPoolExecutor:
    """The background compile thread (one: XLA:CPU compiles a program on one core)."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxttt-compile")


@functools.lru_cache(maxsize=64)
def _jitted(st: _Static) -> Callable:
    """The jitted update for `st` (cached: trainers on one model structure share compiles).
    Donates the trainable state, the optimizer state and the skip counter (arguments 0-2)."""
    return jax.jit(functools.partial(_update, st=st), donate_argnums=(0, 1, 2),
                   compiler_options=update_compiler_options())


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------
class Trainer:
    """One model, one loss, one optimizer on one mesh; see the module docstring.

    The trainer places the model's weights on `mesh` and owns the trainable ones: every step
    donates them and writes the new ones back into `model`, so use `trainer.model` (the same
    module) and not arrays taken from it before a step.
    """

    def __init__(self, model: nnx.Module, loss_fn: LossFn, optim_cfg: OptimConfig, *,
                 mesh: Mesh, total_steps: int, wrt: Any = nnx.Param, grad_accum: int = 1,
                 reduction: str = "mean"):
        if reduction not in REDUCTIONS:
            raise ValueError(f"Trainer: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if grad_accum < 1:
            raise ValueError(f"Trainer: grad_accum must be >= 1, got {grad_accum}")
        self.model, self.mesh, self.wrt = model, mesh, wrt
        self.loss_fn, self.optim, self.total_steps = loss_fn, optim_cfg, max(int(total_steps), 1)
        self.grad_accum, self.reduction = grad_accum, reduction
        self.graphdef, params, rest = nnx.split(model, wrt, ...)
        if not jax.tree.leaves(params):
            raise ValueError(f"Trainer: the model has no variables selected by wrt={wrt!r}")
        self.params = sharding.shard_state(params, mesh)
        self.rest = sharding.shard_state(rest, mesh)
        nnx.update(model, self.params, self.rest)
        self.tx, self.schedule = make_optimizer(optim_cfg, self.total_steps)
        self.opt_state = self._init_opt(self.params)
        self._skipped = self._counter(0)
        self._aot: dict[tuple, Any] = {}
        self._pending: dict[tuple, concurrent.futures.Future] = {}

    # ------------------------------------------------------------------ state
    def _init_opt(self, params):
        shardings = sharding.state_shardings(jax.eval_shape(self.tx.init, params), self.mesh)
        return jax.jit(self.tx.init, out_shardings=shardings)(params)

    def _counter(self, n: int) -> jax.Array:
        return jax.device_put(np.int32(n), sharding.replicated(self.mesh))

    @property
    def skipped(self) -> int:
        """Updates skipped so far (no tokens, or a non-finite loss or gradient)."""
        return int(self._skipped)

    @property
    def update_count(self) -> int:
        """Optimizer updates applied (skipped ones excluded): what the schedule follows."""
        return int(update_count(self.opt_state))

    def skip(self) -> None:
        """Count an update the caller decided not to run (weights and optimizer untouched)."""
        self._skipped = self._counter(self.skipped + 1)

    def current_lr(self) -> float:
        """The learning rate the next applied update would use."""
        return float(lr_schedule(self.optim, self.total_steps)(update_count(self.opt_state)))

    def reset(self) -> None:
        """A fresh optimizer state (update count 0); the weights are left as they are."""
        self.opt_state = self._init_opt(self.params)

    def abstract_state(self) -> tuple[Any, Any]:
        """Shape/dtype-only (trainable params, optimizer state): restore targets."""
        params = jax.eval_shape(lambda: self.params)
        return params, jax.eval_shape(self.tx.init, params)

    def set_state(self, params, opt_state=None) -> None:
        """Install trainable `params` (and optimizer state, if given), placed on the mesh."""
        self.params = sharding.shard_state(params, self.mesh)
        nnx.update(self.model, self.params)
        if opt_state is not None:
            self.opt_state = sharding.shard_state(opt_state, self.mesh)

    # ------------------------------------------------------------------ steps
    def _static(self, context) -> _Static:
        return _Static(self.graphdef, self.loss_fn, self.optim, self.total_steps,
                       self.grad_accum, self.reduction, context is not None, self.mesh)

    def _place(self, batch: dict) -> dict:
        for k, v in batch.items():
            if np.ndim(v) == 0 or v.shape[0] % self.grad_accum:
                raise ValueError(f"Trainer: batch[{k!r}] has shape {np.shape(v)}; every entry "
                                 f"needs rows on axis 0, a multiple of grad_accum={self.grad_accum}")
        return {k: v if isinstance(v, jax.Array) else sharding.place_batch(v, self.mesh)
                for k, v in batch.items()}

    def _key(self, batch, context) -> tuple:
        shapes = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(batch.items()))
        return shapes, context is not None

    def _abstract_args(self, batch: dict, context) -> tuple:
        """The update's arguments as shapes, dtypes and shardings (batch already placed)."""
        def spec(x):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

        return jax.tree.map(spec, (self.params, self.opt_state, self._skipped, self.rest,
                                   context, batch))

    def lower(self, example_batch: dict, *, context=None) -> jax.stages.Lowered:
        """The update traced and lowered for batches shaped like `example_batch`."""
        return self._lowered(self._abstract_args(self._place(example_batch), context),
                             self._static(context))

    def _lowered(self, args: tuple, st: _Static) -> jax.stages.Lowered:
        with jax.set_mesh(self.mesh):
            return _jitted(st).lower(*args)

    def _compiled(self, args: tuple, st: _Static):
        return self._lowered(args, st).compile()

    def compile(self, example_batch: dict, *, context=None, verbose: bool = True):
        """AOT-compile the update for batches shaped like `example_batch` (before step 0) and
        print its per-device memory use; later steps of that shape run this executable."""
        batch = self._place(example_batch)
        compiled = self._compiled(self._abstract_args(batch, context), self._static(context))
        self._aot[self._key(batch, context)] = compiled
        if verbose:
            print(memory_report(compiled), flush=True)
        return compiled

    def precompile(self, example_batch: dict, *, context=None) -> None:
        """Start compiling the update for batches shaped like `example_batch` in a background
        thread, so that it runs beside host-side work before the step (sampling the batch);
        the first step of that shape waits for it. A no-op when that shape is compiled or
        under way. Only shapes and shardings are read here: the weights may change meanwhile."""
        batch = self._place(example_batch)
        key = self._key(batch, context)
        if key in self._aot or key in self._pending:
            return
        args, st = self._abstract_args(batch, context), self._static(context)
        self._pending[key] = _compiler().submit(self._compiled, args, st)

    def _executable(self, batch: dict, context) -> Callable:
        """The compiled update for this batch's shapes: AOT, from the background, or the jit."""
        key = self._key(batch, context)
        if key in self._pending:
            self._aot[key] = self._pending.pop(key).result()
        return self._aot.get(key) or _jitted(self._static(context))

    def step_async(self, batch: dict, *, context=None) -> dict[str, jax.Array]:
        """One update; returns the device metrics without waiting for them."""
        batch = self._place(batch)
        fn = self._executable(batch, context)
        with jax.set_mesh(self.mesh):
            self.params, self.opt_state, self._skipped, m = fn(
                self.params, self.opt_state, self._skipped, self.rest, context, batch)
        nnx.update(self.model, self.params)
        return m

    def step(self, batch: dict, *, context=None) -> dict[str, float]:
        """One update; returns python float metrics (loss, grad_norm, lr, skipped, + aux)."""
        return {k: float(v) for k, v in jax.device_get(self.step_async(batch, context=context)).items()}


def memory_report(compiled) -> str:
    """One line: per-device argument / temporary / output bytes of a compiled program."""
    m = compiled.memory_analysis()
    if m is None:
        return "compiled train step: memory analysis unavailable on this backend"
    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    return (f"compiled train step (per device): arguments {mib(m.argument_size_in_bytes)}, "
            f"temporaries {mib(m.temp_size_in_bytes)}, outputs {mib(m.output_size_in_bytes)}, "
            f"donated/aliased {mib(m.alias_size_in_bytes)}")
