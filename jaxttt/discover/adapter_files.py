"""LoRA adapters as peft-style safetensors files (`step_0000_adapters.safetensors`, ...).

Keys follow peft's `adapter_model.safetensors` for a Llama-family model:
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, d_in] and
`...lora_B.weight` [d_out, r] (torch's [out, in] layout: our A [d_in, r] and B [r, d_out]
transposed); the scaling alpha / r is peft's `lora_alpha / r` (`peft_config`). The orbax
adapter tree (`lora.save_adapters`) stays the stack's own format; these files are how the
adapters leave it. A model converted with a Q/K row permutation needs the same permutation on
q/k `lora_B` for a Hugging Face model (the converter's export owns that).
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxttt.model import safetensors_io

PEFT_PREFIX = "base_model.model.model"
HF_PARENT = {"attn": "self_attn", "mlp": "mlp"}
HF_PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
           "up": "up_proj", "down": "down_proj"}


def _hf_name(path: tuple) -> str:
    """('blocks', 3, 'attn', 'q') -> base_model.model.model.layers.3.self_attn.q_proj."""
    parts = []
    for i, part in enumerate(path):
        if part == "blocks" and i + 1 < len(path) and isinstance(path[i + 1], int):
            parts.append("layers")
        elif i == len(path) - 1:
            parts.append(HF_PROJ.get(str(part), str(part)))
        else:
            parts.append(HF_PARENT.get(str(part), str(part)))
    return ".".join([PEFT_PREFIX, *parts])


def _adapted(model: nnx.Module):
    for path, module in nnx.iter_modules(model):
        if getattr(module, "lora_a", None) is not None:
            yield _hf_name(path), module


def peft_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """{peft key: float32 array} for every adapted projection."""
    out = {}
    for name, lin in _adapted(model):
        out[f"{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(jax.device_get(lin.lora_a[...]), np.float32).T)
        out[f"{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(jax.device_get(lin.lora_b[...]), np.float32).T)
    return out


def peft_config(model: nnx.Module) -> dict:
    """peft's `adapter_config.json` for the model's adapters."""
    cfg = model.lora_config
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout, "bias": "none", "fan_in_fan_out": False,
            "target_modules": sorted(HF_PROJ[t] for t in cfg.targets), "inference_mode": True}


def save_safetensors(model: nnx.Module, path: str | Path) -> Path:
    """Write the adapters to `path` (safetensors, peft keys); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    safetensors_io.write(tmp, peft_tensors(model), metadata={"format": "pt"})
    tmp.replace(path)  # never a torn file under the final name
    return path


def write_peft_config(model: nnx.Module, directory: str | Path) -> Path:
    path = Path(directory) / "adapter_config.json"
    path.write_text(json.dumps(peft_config(model), indent=2))
    return path


def load_safetensors(model: nnx.Module, path: str | Path) -> nnx.Module:
    """Set the model's adapters (already attached, same rank and targets) from a file written
    by `save_safetensors`; a missing, extra or mis-shaped tensor is an error naming it."""
    tensors = {name: ref.array() for name, ref in safetensors_io.read_index(path).items()}
    expected = set()
    for name, lin in _adapted(model):
        for key, var in ((f"{name}.lora_A.weight", lin.lora_a), (f"{name}.lora_B.weight", lin.lora_b)):
            expected.add(key)
            if key not in tensors:
                raise ValueError(f"{path}: missing tensor {key}")
            value = tensors[key].T
            if value.shape != var[...].shape:
                raise ValueError(f"{path}: tensor {key} has shape {tensors[key].shape}, expected "
                                 f"{var[...].shape[::-1]}")
            var[...] = jax.device_put(value.astype(var[...].dtype), var[...].sharding)
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ValueError(f"{path}: unexpected tensor {extra[0]} (and {len(extra) - 1} more)")
    return model
