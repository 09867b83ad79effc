"""Orbax checkpoints: one manager for every loop (pretraining, SDFT, TTT-Discover).

A run directory looks like
    RUN/config.yaml          the run's config (human-readable)
    RUN/model.yaml           the ModelConfig alone (what `load_model` needs)
    RUN/checkpoints/<step>/  orbax: params (nnx State), opt (optimizer state), meta (JSON:
                             step, data-iterator state, replay state, tokenizer, ...)
Saves are asynchronous, atomic (orbax writes to a temporary name and renames) and keep the
newest `keep`. Restores place every array directly with the target mesh's shardings, so a
checkpoint written on 8 devices restores on 1 and vice versa.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

import yaml
from etils import epath

from jaxttt import config as C
from jaxttt import sharding

CKPT_DIR = "checkpoints"
MODEL_YAML = "model.yaml"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable; the message names the path."""


class RunDirError(FileExistsError):
    """A run directory cannot be used: it would be overwritten, or does not match the config."""


def fresh_run_dir(path: str | Path, *, keep: tuple[str, ...] | list[str] = ()) -> Path:
    """Create `path` (absolute) for a new run; refuse one holding anything but `keep` names.

    Every loop that writes a new run directory goes through here, so none overwrites a run.
    """
    out = Path(path).absolute()
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out}: exists and is not a directory")
    stray = sorted(p.name for p in out.iterdir() if p.name not in set(keep)) if out.is_dir() else []
    if stray:
        raise RunDirError(f"{out}: output directory is not empty ({', '.join(stray[:5])}); "
                          "runs are never overwritten, choose a new output directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _abstract(state, mesh):
    """ShapeDtypeStructs carrying the target shardings (restore straight onto `mesh`)."""
    shardings = sharding.state_shardings(state, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with the items params / opt / meta."""

    def __init__(self, run_dir: str | Path, *, keep: int = 3, async_save: bool = True,
                 ckpt_dir: str | Path | None = None):
        self.dir = _abs(ckpt_dir) if ckpt_dir else _abs(run_dir) / CKPT_DIR
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.dir, options=opts)

    def save(self, step: int, params, opt=None, meta: dict | None = None, *, force=False) -> bool:
        items = {"params": ocp.args.StandardSave(params),
                 "meta": ocp.args.JsonSave({**(meta or {}), "step": int(step)})}
        if opt is not None:
            items["opt"] = ocp.args.StandardSave(opt)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def restore(self, params_like, opt_like=None, *, mesh, step: int | None = None):
        """(params, opt or None, meta) at `step` (default latest), placed on `mesh`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.dir}: no checkpoint found")
        items = {"params": ocp.args.StandardRestore(_abstract(params_like, mesh)),
                 "meta": ocp.args.JsonRestore()}
        if opt_like is not None:
            items["opt"] = ocp.args.StandardRestore(_abstract(opt_like, mesh))
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many types; name the path and the cause
            raise CheckpointError(f"{self.dir / str(step)}: cannot restore checkpoint ({e})") from e
        return out["params"], out.get("opt") if opt_like is not None else None, out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _abs(path: str | Path) -> epath.Path:
    """Absolute local path, or a remote one (gs://...) that orbax writes through epath."""
    p = str(path)
    return epath.Path(p) if "://" in p else epath.Path(Path(p).absolute())


def checkpoint_dir(run_dir: str | Path) -> str | None:
    """The run's `ckpt_dir` setting from its config.yaml (None = RUN/checkpoints)."""
    cfg_file = Path(run_dir) / "config.yaml"
    if not cfg_file.is_file():
        return None
    return (yaml.safe_load(cfg_file.read_text()) or {}).get("ckpt_dir") or None


def save_model_config(run_dir: str | Path, model_cfg: C.ModelConfig) -> None:
    C.save_yaml(model_cfg, Path(run_dir) / MODEL_YAML)


def find_run_dir(path: str | Path) -> tuple[Path, int | None]:
    """Accept a run directory, its checkpoints/ folder, or one step folder inside it."""
    p = _abs(path)
    if (p / MODEL_YAML).is_file():
        return p, None
    if p.name == CKPT_DIR and (p.parent / MODEL_YAML).is_file():
        return p.parent, None
    if p.parent.name == CKPT_DIR and (p.parent.parent / MODEL_YAML).is_file() and p.name.isdigit():
        return p.parent.parent, int(p.name)
    raise CheckpointError(f"{path}: not a run directory (expected {MODEL_YAML} and {CKPT_DIR}/)")


def load_model(path: str | Path, *, mesh=None, step: int | None = None,
               overrides: tuple[str, ...] = ()) -> tuple[Any, dict]:
    """Restore a Transformer from a run (latest step unless given), sharded on `mesh`.

    Returns (model, meta); meta holds what the run saved (step, tokenizer path, ...).
    `overrides` adjust the ModelConfig (e.g. `dtype=bfloat16`), never its shapes.
    """
    from jaxttt.model.transformer import Transformer

    run_dir, dir_step = find_run_dir(path)
    step = step if step is not None else dir_step
    model_cfg = C.load(C.ModelConfig, run_dir / MODEL_YAML, list(overrides))
    mesh = mesh or sharding.single_device_mesh()
    abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, abs_params, rest = nnx.split(abstract, nnx.Param, ...)
    ckpt = Checkpointer(run_dir, async_save=False, ckpt_dir=checkpoint_dir(run_dir))
    try:
        params, _, meta = ckpt.restore(abs_params, mesh=mesh, step=step)
    finally:
        ckpt.close()
    return nnx.merge(graphdef, params, rest), meta
