"""The pretraining update: AdamW (handoff E2) + gradient accumulation, one jitted program.

    trainer = make_train_step(model_cfg, optim_cfg, mesh, grad_accum=A, total_steps=S)
    params, opt = trainer.init(seed)                 # created sharded on `mesh`
    step = trainer.compile(batch_size=B, seq_len=T)  # AOT-compiled; prints memory use
    params, opt, m = step(params, opt, x_BAT, y_BAT)  # m: loss, grad_norm, lr (scalars)

`x_BAT`/`y_BAT` hold A micro-batches of B sequences (batch-major so the batch axis carries
the `batch_sharding`); the step scans over them, averages the gradients and applies ONE
optimizer update. Params and optimizer state are donated: after a call, only the returned
ones are valid. The learning rate depends only on the optimizer's update count (the global
step), so a resumed run follows the same schedule as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxttt import sharding
from jaxttt.config import ModelConfig, OptimConfig
from jaxttt.model.transformer import Transformer, build, cross_entropy

# Parameter names that get no weight decay: norm scales, mHC gates (alpha) and mHC biases.
NO_DECAY = frozenset({"scale", "alpha", "b_pre", "b_post", "b_res"})

StepFn = Callable[[nnx.State, Any, jax.Array, jax.Array], tuple[nnx.State, Any, dict]]


# --------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------
def warmup_steps(optim: OptimConfig, total_steps: int) -> int:
    """E2 warmup, clipped to 10% of the run when the run is short."""
    return max(0, min(optim.warmup_steps, total_steps // 10))


def lr_schedule(optim: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup (update 0 already gets lr/warmup), then cosine to min_lr_ratio*lr or flat."""
    if optim.schedule not in ("cosine", "constant"):
        raise ValueError(f"config key 'optim.schedule': expected cosine|constant, got "
                         f"{optim.schedule!r}")
    warm = warmup_steps(optim, total_steps)
    decay = max(total_steps - warm, 1)

    def schedule(count):
        s = jnp.asarray(count, jnp.float32)
        ramp = jnp.minimum((s + 1.0) / max(warm, 1), 1.0)
        if optim.schedule == "constant":
            return optim.lr * ramp
        progress = jnp.clip((s - warm) / decay, 0.0, 1.0)
        cosine = 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return optim.lr * ramp * (optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine)

    return schedule


def decay_mask(params) -> Any:
    """True for the matrices that AdamW decays; norms, mHC alphas/biases and vectors are not."""
    def decays(path, var) -> bool:
        return var.ndim >= 2 and getattr(path[-1], "key", None) not in NO_DECAY

    return jax.tree_util.tree_map_with_path(decays, params,
                                            is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(optim: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                   optax.Schedule]:
    """Global-norm clip, then AdamW with the masked weight decay; returns (tx, schedule)."""
    schedule = lr_schedule(optim, total_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(optim.grad_clip),
        optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay,
                    mask=decay_mask))
    return tx, schedule


def update_count(opt_state) -> jax.Array:
    """Updates applied so far (every counting part of the chain holds the same number)."""
    return optax.tree_utils.tree_get_all_with_path(opt_state, "count")[0][1]


# --------------------------------------------------------------------------------------------
# Loss and gradients
# --------------------------------------------------------------------------------------------
def _loss(graphdef: nnx.GraphDef, params: nnx.State, x_BT: jax.Array, y_BT: jax.Array):
    return cross_entropy(nnx.merge(graphdef, params)(x_BT), y_BT)


def accumulated_grads(graphdef: nnx.GraphDef, params: nnx.State, x_BAT: jax.Array,
                      y_BAT: jax.Array, param_shardings) -> tuple[jax.Array, nnx.State]:
    """(mean loss, mean gradient) over the A micro-batches of x_BAT, one at a time."""
    grad_fn = jax.value_and_grad(_loss, argnums=1)
    A = x_BAT.shape[1]
    if A == 1:
        return grad_fn(graphdef, params, x_BAT[:, 0], y_BAT[:, 0])

    def micro(carry, xy_BT):
        loss, g = grad_fn(graphdef, params, *xy_BT)
        acc = jax.tree.map(jnp.add, carry, (loss, g))
        return (acc[0], jax.lax.with_sharding_constraint(acc[1], param_shardings)), None

    zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    xy_ABT = (jnp.swapaxes(x_BAT, 0, 1), jnp.swapaxes(y_BAT, 0, 1))
    (loss, grads), _ = jax.lax.scan(micro, zero, xy_ABT)
    return loss / A, jax.tree.map(lambda g: g / A, grads)


# --------------------------------------------------------------------------------------------
# The compiled step
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainStep:
    """One model/optimizer/mesh combination; see the module docstring for the call pattern."""
    model_cfg: ModelConfig
    mesh: Mesh
    grad_accum: int
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    param_shardings: Any
    opt_shardings: Any
    jitted: Any  # jax.jit(update, donate params and opt state), shardings explicit

    def init(self, seed: int = 0) -> tuple[nnx.State, Any]:
        """Fresh (params, opt_state), created directly sharded on the mesh."""
        _, params = nnx.split(build(self.model_cfg, self.mesh, seed=seed), nnx.Param)
        opt = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)
        return params, opt

    def abstract(self) -> tuple[nnx.State, Any]:
        """Shape/dtype-only (params, opt_state): targets for `Checkpointer.restore`."""
        params = _abstract_model(self.model_cfg)[1]
        return params, jax.eval_shape(self.tx.init, params)

    def model(self, params: nnx.State) -> Transformer:
        """A module view of `params` (for evaluation and sampling; shares the arrays)."""
        return nnx.merge(self.graphdef, params)

    def batch_spec(self, batch_size: int, seq_len: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((batch_size, self.grad_accum, seq_len), jnp.int32,
                                    sharding=sharding.batch_sharding(self.mesh, 3))

    def compile(self, batch_size: int, seq_len: int, *, verbose: bool = True) -> StepFn:
        """AOT-compile for a global batch [B, A, T] (before step 0); print its memory use."""
        params, opt = self.abstract()
        specs = (_with_shardings(params, self.param_shardings),
                 _with_shardings(opt, self.opt_shardings))
        batch = self.batch_spec(batch_size, seq_len)
        with jax.set_mesh(self.mesh):
            compiled = self.jitted.lower(*specs, batch, batch).compile()
        if verbose:
            print(memory_report(compiled), flush=True)
        return compiled


def make_train_step(model_cfg: ModelConfig, optim_cfg: OptimConfig, mesh: Mesh, *,
                    grad_accum: int = 1, total_steps: int) -> TrainStep:
    """Build the jitted pretraining update (the same one `jaxttt bench` times)."""
    tx, schedule = make_optimizer(optim_cfg, total_steps)
    graphdef, abs_params = _abstract_model(model_cfg)
    p_sh = sharding.state_shardings(abs_params, mesh)
    o_sh = sharding.state_shardings(jax.eval_shape(tx.init, abs_params), mesh)

    def update(params, opt, x_BAT, y_BAT):
        loss, grads = accumulated_grads(graphdef, params, x_BAT, y_BAT, p_sh)
        lr = schedule(update_count(opt))
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
        return params, opt, {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr}

    b_sh = sharding.batch_sharding(mesh, 3)
    jitted = jax.jit(update, in_shardings=(p_sh, o_sh, b_sh, b_sh),
                     out_shardings=(p_sh, o_sh, sharding.replicated(mesh)), donate_argnums=(0, 1))
    return TrainStep(model_cfg, mesh, grad_accum, graphdef, tx, schedule, p_sh, o_sh, jitted)


def _abstract_model(model_cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, shape-only params); the model has no state other than nnx.Param."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def memory_report(compiled) -> str:
    """One line: per-device argument / temporary / output bytes of a compiled program."""
    m = compiled.memory_analysis()
    if m is None:
        return "compiled train step: memory analysis unavailable on this backend"
    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    return (f"compiled train step (per device): arguments {mib(m.argument_size_in_bytes)}, "
            f"temporaries {mib(m.temp_size_in_bytes)}, outputs {mib(m.output_size_in_bytes)}, "
            f"donated/aliased {mib(m.alias_size_in_bytes)}")
