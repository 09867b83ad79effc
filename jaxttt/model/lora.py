"""LoRA adapter trees on the decoder's projections.

Adapters are `nnx.LoRAParam` values (a `Param` subclass) on `Linear` modules whose `tag` is in
`LoRAConfig.targets`: y = x W + dropout(x) A B · alpha/rank, with B = 0 at creation so the
adapted model starts equal to the base. Select adapters with `wrt=nnx.LoRAParam`; run the base
model (π_θ0) with `model(..., use_lora=False)` — no second copy of the weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from jaxttt.config import LoRAConfig
from jaxttt.model.layers import Linear

META_FILE = "lora.json"


def _targets(model: nnx.Module, targets) -> list[Linear]:
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, Linear) and m.tag in targets]


def add_lora(model: nnx.Module, cfg: LoRAConfig, *, seed: int = 0, mesh=None) -> nnx.Module:
    """Attach fresh adapters (in place) to every targeted projection; returns the model."""
    cfg.validate()
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    a_init = peft_a_init()
    for lin in _targets(model, cfg.targets):
        d_in, d_out = lin.kernel.shape
        lin.lora_a = nnx.LoRAParam(a_init(rngs.params(), (d_in, cfg.rank), jnp.float32),
                                   logical_axes=(lin.axes[0], "lora_rank"))
        lin.lora_b = nnx.LoRAParam(jnp.zeros((cfg.rank, d_out), jnp.float32),
                                   logical_axes=("lora_rank", lin.axes[1]))
        lin.lora_scale = cfg.alpha / cfg.rank
        lin.lora_dropout = nnx.Dropout(cfg.dropout, rngs=rngs) if cfg.dropout > 0 else None
    model.lora_config = cfg
    if mesh is not None:
        from jaxttt.sharding import shard_state
        nnx.update(model, shard_state(nnx.state(model, nnx.LoRAParam), mesh))
    return model


def peft_a_init():
    """A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)): peft's kaiming_uniform_(a=sqrt(5)) on its [r, d_in]
    weight (gain sqrt(2 / (1 + 5)), bound gain * sqrt(3 / d_in)), here on A [d_in, r]."""
    return jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=-2,
                                                out_axis=-1)


def has_lora(model: nnx.Module) -> bool:
    return getattr(model, "lora_config", None) is not None


def lora_state(model: nnx.Module) -> nnx.State:
    return nnx.state(model, nnx.LoRAParam)


def reset(model: nnx.Module) -> None:
    """Zero every B matrix: the adapted model equals the base model again."""
    for lin in _targets(model, model.lora_config.targets):
        lin.lora_b[...] = jnp.zeros_like(lin.lora_b[...])


def merge(model: nnx.Module) -> None:
    """Fold A B · scale into the base kernels and remove the adapters."""
    for lin in _targets(model, model.lora_config.targets):
        delta = (lin.lora_a[...] @ lin.lora_b[...]) * lin.lora_scale
        lin.kernel[...] = lin.kernel[...] + delta.astype(lin.kernel[...].dtype)
        lin.lora_a = lin.lora_b = lin.lora_dropout = None
        lin.lora_scale = 0.0
    model.lora_config = None


def save_adapters(model: nnx.Module, path: str | Path) -> Path:
    """Write the adapter tree only (orbax) plus its LoRAConfig as `lora.json`."""
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / "adapters", nnx.to_pure_dict(lora_state(model)), force=True)
    cfg = model.lora_config
    (path / META_FILE).write_text(json.dumps({"rank": cfg.rank, "alpha": cfg.alpha,
                                              "dropout": cfg.dropout, "targets": list(cfg.targets)}))
    return path


def load_adapters(model: nnx.Module, path: str | Path, *, mesh=None) -> nnx.Module:
    """Restore adapters saved by `save_adapters` (attaching them first if the model has none)."""
    path = Path(path).absolute()
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file}: no LoRA adapter metadata (expected a directory "
                                f"written by save_adapters)")
    meta = json.loads(meta_file.read_text())
    cfg = LoRAConfig(rank=meta["rank"], alpha=meta["alpha"], dropout=meta["dropout"],
                     targets=tuple(meta["targets"]))
    if not has_lora(model) or model.lora_config != cfg:
        if has_lora(model):
            raise ValueError(f"{path}: adapters were saved with {cfg}, model has {model.lora_config}")
        add_lora(model, cfg, mesh=mesh)
    state = lora_state(model)
    target = nnx.to_pure_dict(state)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(path / "adapters", target)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model
