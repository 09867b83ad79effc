"""Orbax checkpoints: one manager for every loop (pretraining, SDFT, TTT-Discover).

A run directory looks like
    RUN/config.yaml          the run's config (human-readable, portable: see runs.save_run_config)
    RUN/model.yaml           the ModelConfig alone (what `load_model` needs)
    RUN/checkpoints/<step>/  orbax: params (nnx State), opt (optimizer state), meta (JSON:
                             step, data-iterator state, replay state, tokenizer, ...), and
                             sha256.json (a checksum of every file, written once the save is done)
Saves are atomic (orbax writes to a temporary name and renames) and complete before `save`
returns: a failed save raises `CheckpointError` at that step, so no step is trained past it.
Only then are old steps deleted, keeping the newest `keep` (>= 1: never every checkpoint).
Restores verify the checksum; a corrupt newest step is reported and the newest good one is
restored instead. Arrays are placed directly with the target mesh's shardings, so a
checkpoint written on 8 devices restores on 1 and vice versa.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

import yaml
from etils import epath

from jaxttt import config as C
from jaxttt import sharding
from jaxttt.errors import UserError
from jaxttt.runs import RunDirError, fresh_run_dir, warn  # noqa: F401 (re-exported for loops)

CKPT_DIR = "checkpoints"
MODEL_YAML = "model.yaml"
MANIFEST = "sha256.json"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable, corrupt or could not be written; names the path."""


def _abstract(state, mesh):
    """ShapeDtypeStructs carrying the target shardings (restore straight onto `mesh`)."""
    shardings = sharding.state_shardings(state, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with the items params / opt / meta."""

    def __init__(self, run_dir: str | Path, *, keep: int | None = 3, async_save: bool = True,
                 ckpt_dir: str | Path | None = None):
        if keep is not None and keep < 1:
            raise C.ConfigError(f"config key 'keep': expected a positive integer (checkpoints "
                                f"kept; 0 would delete every checkpoint), got {keep}")
        self.keep = keep
        self._failed = False  # a save failed: close() must not raise that error a second time
        self.dir = _abs(ckpt_dir) if ckpt_dir else _abs(run_dir) / CKPT_DIR
        # old steps are deleted by `_gc`, only after a new step is complete and checksummed
        opts = ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.dir, options=opts)

    def save(self, step: int, params, opt=None, meta: dict | None = None, *, force=False) -> bool:
        """Write step `step` and wait until it is on disk; a failure raises CheckpointError."""
        items = {"params": ocp.args.StandardSave(params),
                 "meta": ocp.args.JsonSave({**(meta or {}), "step": int(step)})}
        if opt is not None:
            items["opt"] = ocp.args.StandardSave(opt)
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
            self.manager.wait_until_finished()
            if saved:
                self._seal(step)
                self._gc()
        except Exception as e:  # disk full, permissions, bucket errors: stop the run here
            self._failed = True
            last = self._last_good(before=step)
            kept = f"the last good checkpoint is step {last}" if last is not None else \
                "no earlier checkpoint exists"
            raise CheckpointError(f"{self.dir / str(step)}: saving the checkpoint failed "
                                  f"({type(e).__name__}: {_one_line(e)}); the run stopped at "
                                  f"step {step}, {kept}") from e
        return saved

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    # ---- integrity -------------------------------------------------------------------------
    def _local(self) -> Path | None:
        """The checkpoint folder as a local path; None for remote (gs://) ones: not hashed."""
        return None if "://" in str(self.dir) else Path(str(self.dir))

    def _seal(self, step: int) -> None:
        """Write the step's checksum manifest (process 0; the files are shared)."""
        root = self._local()
        if root is None or jax.process_index() != 0:
            return
        step_dir = root / str(step)
        tmp = step_dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(_digests(step_dir), indent=0, sort_keys=True))
        tmp.replace(step_dir / MANIFEST)

    def verify(self, step: int) -> None:
        """Raise CheckpointError naming the first file whose checksum differs (or is missing).
        A step without a manifest (older runs, remote folders) passes unverified."""
        root = self._local()
        if root is None:
            return
        step_dir = root / str(step)
        manifest = step_dir / MANIFEST
        if not manifest.is_file():
            return
        try:
            want = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{manifest}: unreadable checksum manifest ({e})") from None
        have = _digests(step_dir)
        for name, digest in sorted(want.items()):
            if name not in have:
                raise CheckpointError(f"{step_dir / name}: missing from the checkpoint")
            if have[name] != digest:
                raise CheckpointError(f"{step_dir / name}: checksum mismatch (corrupt file)")

    def _last_good(self, before: int) -> int | None:
        try:
            older = [s for s in self.all_steps() if s < before]
        except Exception:  # the folder itself may be what failed
            return None
        return older[-1] if older else None

    def _gc(self) -> None:
        """Delete all but the newest `keep` steps (never the one just written)."""
        if self.keep is None:
            return
        steps = self.all_steps()
        for old in steps[:max(0, len(steps) - self.keep)]:
            self.manager.delete(old)

    # ---- restore ---------------------------------------------------------------------------
    def restore(self, params_like, opt_like=None, *, mesh, step: int | None = None):
        """(params, opt or None, meta) at `step`, placed on `mesh`.

        `step` None (or the newest step): the newest step that verifies and restores; each
        corrupt one is reported naming it and the step used instead. An older explicit `step`
        is restored or refused, never replaced by another.
        """
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"{self.dir}: no checkpoint found")
        if step is not None and step not in steps:
            raise CheckpointError(f"{self.dir / str(step)}: no such checkpoint step (steps: "
                                  f"{', '.join(map(str, steps))})")
        candidates = steps[::-1] if step is None or step == steps[-1] else [step]
        bad: list[tuple[int, CheckpointError]] = []
        for s in candidates:
            try:
                out = self._restore_step(s, params_like, opt_like, mesh)
            except CheckpointError as e:
                bad.append((s, e))
                continue
            for b, err in bad:
                warn(f"checkpoint step {b} is corrupt ({err}); restored step {s} instead")
            return out
        if len(bad) == 1:
            raise bad[0][1]
        raise CheckpointError(f"{self.dir}: every checkpoint is corrupt (" +
                              "; ".join(f"step {b}: {err}" for b, err in bad) + ")")

    def _restore_step(self, step: int, params_like, opt_like, mesh):
        self.verify(step)
        items = {"params": ocp.args.StandardRestore(_abstract(params_like, mesh)),
                 "meta": ocp.args.JsonRestore()}
        if opt_like is not None:
            items["opt"] = ocp.args.StandardRestore(_abstract(opt_like, mesh))
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many types; name the path and the cause
            raise CheckpointError(f"{self.dir / str(step)}: cannot restore checkpoint "
                                  f"({type(e).__name__}: {_one_line(e)})") from e
        return out["params"], out.get("opt") if opt_like is not None else None, out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
            self.manager.close()
        except Exception:
            if not self._failed:  # after a failed save the error was already raised once
                raise


def _digests(step_dir: Path) -> dict[str, str]:
    """sha256 of every file under `step_dir` except the manifest, by relative path."""
    out = {}
    for f in sorted(step_dir.rglob("*")):
        if f.is_file() and f.name not in (MANIFEST, MANIFEST + ".tmp"):
            h = hashlib.sha256()
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
            out[str(f.relative_to(step_dir))] = h.hexdigest()
    return out


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _abs(path: str | Path) -> epath.Path:
    """Absolute local path, or a remote one (gs://...) that orbax writes through epath."""
    p = str(path)
    return epath.Path(p) if "://" in p else epath.Path(Path(p).absolute())


def checkpoint_dir(run_dir: str | Path) -> str | None:
    """The run's `ckpt_dir` setting from its config.yaml (None = RUN/checkpoints)."""
    cfg_file = Path(run_dir) / "config.yaml"
    if not cfg_file.is_file():
        return None
    try:
        ckpt = (yaml.safe_load(cfg_file.read_text()) or {}).get("ckpt_dir") or None
    except yaml.YAMLError as e:
        raise CheckpointError(f"{cfg_file}: not valid YAML ({_one_line(e)})") from None
    if ckpt and "://" not in ckpt and not Path(ckpt).is_absolute():
        return str(Path(run_dir).absolute() / ckpt)  # portable runs record it relative
    return ckpt


def save_model_config(run_dir: str | Path, model_cfg: C.ModelConfig) -> None:
    C.save_yaml(model_cfg, Path(run_dir) / MODEL_YAML)


def find_run_dir(path: str | Path) -> tuple[Path, int | None]:
    """Accept a run directory, its checkpoints/ folder, or one step folder inside it."""
    if "://" not in str(path) and not Path(path).exists():
        raise CheckpointError(f"{path}: no such run directory")
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
    from jaxttt.model.transformer import abstract_model

    run_dir, dir_step = find_run_dir(path)
    step = step if step is not None else dir_step
    model_cfg = C.load(C.ModelConfig, run_dir / MODEL_YAML, list(overrides))
    mesh = mesh or sharding.single_device_mesh()
    graphdef, abs_params, rest = nnx.split(abstract_model(model_cfg), nnx.Param, ...)
    ckpt = Checkpointer(run_dir, async_save=False, ckpt_dir=checkpoint_dir(run_dir))
    try:
        params, _, meta = ckpt.restore(abs_params, mesh=mesh, step=step)
    finally:
        ckpt.close()
    return nnx.merge(graphdef, params, rest), meta
