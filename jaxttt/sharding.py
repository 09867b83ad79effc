"""The one mesh/sharding utility used by every loop.

Parameters carry *logical* axis names (metadata `logical_axes` on each `nnx.Variable`).
`RULES` maps them to the mesh axes `data`, `fsdp`, `tensor`; nothing else in the code base
names a mesh axis. Activations use the same table through `constrain`.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),  # activations' batch dimension
    "seq": None,
    "embed": "fsdp",  # parameters' model dimension: FSDP shards it, activations keep it whole
    "act_embed": None,
    "vocab": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "streams": None,
    "mhc_in": "fsdp",  # flattened n*C input of the mHC projections
    "mhc_out": None,
    "lora_rank": None,
    "norm": None,
}


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
    """PartitionSpec for logical `axes`; a dimension the mesh axis does not divide stays whole."""
    out = []
    for i, name in enumerate(axes):
        target = RULES.get(name) if name is not None else None
        if name is not None and name not in RULES:
            raise KeyError(f"logical axis {name!r} has no rule in jaxttt.sharding.RULES")
        if target is not None and shape is not None and mesh is not None:
            size = math.prod(mesh.shape[a] for a in _as_tuple(target))
            if shape[i] % size:
                target = None
        out.append(target)
    return P(*out)


def _as_tuple(t) -> tuple[str, ...]:
    return t if isinstance(t, tuple) else (t,)


# --------------------------------------------------------------------------------------------
# Meshes
# --------------------------------------------------------------------------------------------
def make_mesh(cfg=None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh with axes (data, fsdp, tensor) from a MeshConfig (data=-1 takes the rest)."""
    devices = list(devices if devices is not None else jax.devices())
    fsdp = getattr(cfg, "fsdp", 1)
    tensor = getattr(cfg, "tensor", 1)
    data = getattr(cfg, "data", -1)
    if data == -1:
        if len(devices) % (fsdp * tensor):
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by fsdp*tensor="
                             f"{fsdp * tensor}")
        data = len(devices) // (fsdp * tensor)
    if data * fsdp * tensor != len(devices):
        raise ValueError(f"mesh: data*fsdp*tensor = {data}*{fsdp}*{tensor} != {len(devices)} devices")
    arr = np.asarray(devices).reshape(data, fsdp, tensor)
    return Mesh(arr, MESH_AXES)


def single_device_mesh() -> Mesh:
    return make_mesh(None, jax.devices()[:1])


def current_mesh() -> Mesh | None:
    """The mesh set with `jax.set_mesh`, or None."""
    m = jax.sharding.get_abstract_mesh()
    return None if m is None or m.empty else m


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------
def _var_spec(var: nnx.Variable, mesh: Mesh) -> P:
    axes = var.get_metadata().get("logical_axes")
    value = var.get_value()
    if axes is None or not hasattr(value, "shape"):
        return P()
    if len(axes) != len(value.shape):
        raise ValueError(f"logical axes {axes} do not match shape {value.shape}")
    return logical_to_spec(axes, value.shape, mesh)


def state_shardings(state, mesh: Mesh):
    """NamedSharding for every leaf of an nnx State (from its variables' logical axes)."""
    return jax.tree.map(
        lambda v: v.replace(NamedSharding(mesh, _var_spec(v, mesh))) if isinstance(v, nnx.Variable)
        else NamedSharding(mesh, P()),
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(factory: Callable[[], nnx.Module], mesh: Mesh) -> nnx.Module:
    """Build `factory()` directly sharded on `mesh`: no device ever holds a full replica."""
    abstract = nnx.eval_shape(factory)
    graphdef, abs_state = nnx.split(abstract)
    shardings = state_shardings(abs_state, mesh)

    def init():
        return nnx.state(factory())

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_state(state, mesh: Mesh):
    """Place an existing state (e.g. restored from a checkpoint) onto `mesh`."""
    return jax.device_put(state, state_shardings(state, mesh))


def describe(model: nnx.Module, mesh: Mesh, limit: int = 6) -> str:
    """A short report of how parameters are laid out (printed at start-up)."""
    state = nnx.state(model, nnx.Param)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    n_sharded = sum(1 for _, x in leaves if not x.sharding.is_fully_replicated)
    total = sum(x.size for _, x in leaves)
    lines = [f"mesh {dict(mesh.shape)}: {len(leaves)} parameter arrays, {n_sharded} sharded, "
             f"{total / 1e6:.2f}M values"]
    for path, x in leaves[:limit]:
        lines.append(f"  {jax.tree_util.keystr(path)} {x.shape} {x.sharding.spec}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Activations and batches
# --------------------------------------------------------------------------------------------
def constrain(x: jax.Array, *axes: str | None) -> jax.Array:
    """Sharding constraint by logical axes under the current mesh; a no-op without one."""
    mesh = current_mesh()
    if mesh is None or math.prod(mesh.shape.values()) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def batch_shards(mesh: Mesh) -> int:
    """How many pieces the batch dimension is split into (batch sizes must divide by it)."""
    return math.prod(mesh.shape[a] for a in _as_tuple(RULES["batch"]))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of an input batch [B, ...]: batch over data and fsdp."""
    return NamedSharding(mesh, P(RULES["batch"], *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def place_batch(x: np.ndarray, mesh: Mesh, *, local: bool = False) -> jax.Array:
    """The one way a host batch [B, ...] reaches the devices: rows over the batch axes.

    local=False: `x` is the whole global batch, identical on every process (each process
    hands its devices their rows). local=True: `x` holds only this process's rows (a
    per-process data loader); the global batch is their concatenation in process order.
    """
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("place_batch: a batch array needs a row axis, got a scalar")
    sh = batch_sharding(mesh, x.ndim)
    if local:
        return jax.make_array_from_process_local_data(sh, x)
    return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])



# --------------------------------------------------------------------------------------------
# Multi-host
# --------------------------------------------------------------------------------------------
ENV_COORDINATOR = "JAXTTT_COORDINATOR"  # host:port of process 0
ENV_NUM_PROCESSES = "JAXTTT_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXTTT_PROCESS_ID"


def init_distributed() -> None:
    """Initialise `jax.distributed` once, if this is a multi-process run.

    Local multi-process runs (launch/local.py, tests) set JAXTTT_COORDINATOR,
    JAXTTT_NUM_PROCESSES and JAXTTT_PROCESS_ID and use gloo CPU collectives; on a TPU VM slice
    JAXTTT_COORDINATOR=auto lets JAX discover the topology itself.
    """
    coord = os.environ.get(ENV_COORDINATOR)
    if not coord or jax.distributed.is_initialized():
        return
    if coord == "auto":
        jax.distributed.initialize()
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coord,
                               num_processes=int(os.environ[ENV_NUM_PROCESSES]),
                               process_id=int(os.environ[ENV_PROCESS_ID]))
