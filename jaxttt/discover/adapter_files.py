"""LoRA adapters per outer step as peft-keyed safetensors (`step_0000_adapters.safetensors`, ...).

The tensors and their names are `jaxttt.model.export.peft_tensors` (peft's
`adapter_model.safetensors` layout: `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
[r, d_in], `...lora_B.weight` [d_out, r]); `export.export_peft` writes the complete peft
directory (with `adapter_config.json`). This module only adds a per-step file name and the way
back in, so a step's file can be restored into the stack and checked.
"""
from __future__ import annotations

from pathlib import Path

import jax
from flax import nnx

from jaxttt.model import safetensors_io
from jaxttt.model.export import peft_tensors
from jaxttt.model.layers import Linear


def save_safetensors(model: nnx.Module, path: str | Path) -> Path:
    """Write the model's adapters to `path` (written to a temporary name, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    safetensors_io.write(tmp, peft_tensors(model), {"format": "pt"})
    tmp.replace(path)
    return path


def _adapted(model: nnx.Module) -> list[Linear]:
    """The adapted projections, in `peft_tensors`' order (one lora_A, lora_B pair each)."""
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, Linear) and m.lora_a is not None]


def load_safetensors(model: nnx.Module, path: str | Path) -> nnx.Module:
    """Set the adapters of `model` (attached, same rank and targets) from a file written by
    `save_safetensors`; a missing, extra or mis-shaped tensor is an error naming it."""
    tensors = {name: ref.array() for name, ref in safetensors_io.read_index(path).items()}
    names = list(peft_tensors(model))
    modules = _adapted(model)
    if len(names) != 2 * len(modules):
        raise ValueError(f"{path}: the model's adapters do not pair up with peft names")
    for i, lin in enumerate(modules):
        for key, var in ((names[2 * i], lin.lora_a), (names[2 * i + 1], lin.lora_b)):
            if key not in tensors:
                raise ValueError(f"{path}: missing tensor {key}")
            value = tensors[key].T
            if value.shape != var[...].shape:
                raise ValueError(f"{path}: tensor {key} has shape {tensors[key].shape}, expected "
                                 f"{var[...].shape[::-1]}")
            var[...] = jax.device_put(value.astype(var[...].dtype), var[...].sharding)
    extra = sorted(set(tensors) - set(names))
    if extra:
        raise ValueError(f"{path}: unexpected tensor {extra[0]} ({len(extra)} in all)")
    return model
