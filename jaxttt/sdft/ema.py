"""EMA teacher (handoff SDFT §4): θ_ema ← τ·θ_ema + (1 − τ)·θ.

The teacher is a separate pytree of parameters (an `nnx.State` split from a copy of the
student, or just the LoRA state when only adapters train). It never receives gradients:
the SDFT loss takes the teacher state as a plain argument, merges it into the model graph
for a forward pass and wraps its output in `stop_gradient`, while `nnx.grad` / `nnx.value_and_grad`
differentiates only the student (`wrt=nnx.Param`, or `nnx.LoRAParam` for adapters). After
each optimiser step the loop calls `ema_update(teacher, student_params, tau)`.

Keep teacher parameters in float32: with τ = 0.999 one update moves a weight by 0.1% of
the gap, below bfloat16's resolution, so a bf16 teacher would never move.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def ema_init(student_params: PyTree) -> PyTree:
    """A teacher that starts equal to the student (θ_ema = θ), in its own buffers."""
    return jax.tree.map(jnp.copy, student_params)


@partial(jax.jit, donate_argnums=0)
def ema_update(teacher_params: PyTree, student_params: PyTree, tau: float | jax.Array) -> PyTree:
    """New teacher = τ·teacher + (1 − τ)·student, leaf by leaf, in the teacher's dtype.

    Both pytrees must have the same structure (e.g. `nnx.state(model, nnx.Param)` of the
    student and of the teacher copy). The old teacher buffers are donated: do not reuse the
    argument after the call. `tau` is traced, so changing it does not recompile.
    """
    tau = jnp.asarray(tau, jnp.float32)

    def mix(t, s):
        new = tau * t.astype(jnp.float32) + (1.0 - tau) * s.astype(jnp.float32)
        return new.astype(t.dtype)

    return jax.tree.map(mix, teacher_params, student_params)
