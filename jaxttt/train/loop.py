"""Pretraining loop (handoff Phase 5-6, K2): data -> compiled step -> checkpoints + metrics.

A run directory is never overwritten: a directory holding checkpoints is resumed from its latest
one (params, optimizer, data position; the loss curve continues bitwise), any other non-empty
directory is an error. SIGTERM (preemption) saves at the end of the current step and returns
normally; a non-finite loss or gradient stops the run without saving that state.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from jaxttt import config as C
from jaxttt import sharding
from jaxttt.data import loader as data_loader
from jaxttt.data.packing import ensure_default_data, read_meta
from jaxttt.data.tokenizer import Tokenizer
from jaxttt.eval.perplexity import perplexity
from jaxttt.train import metrics as M
from jaxttt.train.checkpoint import (CKPT_DIR, MODEL_YAML, Checkpointer, RunDirError,  # noqa: F401
                                     save_model_config)
from jaxttt.train.step import TrainStep, make_train_step

CONFIG_YAML = "config.yaml"


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf; the message names the step and checkpoint."""


# --------------------------------------------------------------------------------------------
# Set-up: caches, data, run directory
# --------------------------------------------------------------------------------------------
def cache_root() -> Path:
    """$JAXTTT_CACHE, else ~/.cache/jaxttt (default corpus, compiled programs)."""
    return Path(os.environ.get("JAXTTT_CACHE", "~/.cache/jaxttt")).expanduser()


def enable_compile_cache() -> None:
    """Persist compiled XLA programs under cache_root()/xla: a resumed run starts in seconds."""
    jax.config.update("jax_compilation_cache_dir", str(cache_root() / "xla"))


@dataclasses.dataclass(frozen=True)
class DataFiles:
    train: Path
    val: Path | None  # None: no validation set
    tokenizer: Path


def resolve_data(cfg: C.PretrainConfig) -> tuple[C.PretrainConfig, DataFiles]:
    """Data files for `cfg` and the config with model.vocab_size / data paths filled in."""
    if cfg.data.train:
        return cfg, _user_data(cfg)
    paths = ensure_default_data(cache_root() / "data", cfg.data.vocab_size,
                                max_bytes=cfg.data.max_bytes, progress=_is_main())
    vocab = Tokenizer(paths["tokenizer"]).vocab_size
    if vocab != cfg.model.vocab_size:
        _say(f"data: model.vocab_size set to {vocab}, the vocabulary of {paths['tokenizer']}")
    data = dataclasses.replace(cfg.data, train=str(paths["train"]), val=str(paths["val"]),
                               tokenizer=str(paths["tokenizer"]))
    cfg = dataclasses.replace(cfg, data=data,
                              model=dataclasses.replace(cfg.model, vocab_size=vocab))
    return cfg, DataFiles(paths["train"], paths["val"], paths["tokenizer"])


def _user_data(cfg: C.PretrainConfig) -> DataFiles:
    """Check user-supplied packed data: tokenizer, data and model must share one vocabulary."""
    train = Path(cfg.data.train)
    meta = read_meta(train)
    tok_path = Path(cfg.data.tokenizer or meta.get("tokenizer", ""))
    vocab = Tokenizer(tok_path).vocab_size
    if meta["vocab_size"] != vocab:
        raise C.ConfigError(f"{train}: packed with vocab {meta['vocab_size']}, but tokenizer "
                            f"{tok_path} has {vocab} pieces")
    if cfg.model.vocab_size != vocab:
        raise C.ConfigError(f"tokenizer/model vocab mismatch: tokenizer {tok_path} (data {train}) "
                            f"has {vocab} pieces, config key 'model.vocab_size' is "
                            f"{cfg.model.vocab_size}")
    if not cfg.data.val:
        _say("data: no data.val given: no validation loss")
    return DataFiles(train, Path(cfg.data.val) if cfg.data.val else None, tok_path)


def open_run_dir(cfg: C.PretrainConfig) -> tuple[Path, int | None]:
    """(run directory, step to resume from or None); refuses to overwrite anything."""
    run_dir = Path(cfg.run_dir or _default_run_dir()).absolute()
    ckpts = epath.Path(cfg.ckpt_dir) if cfg.ckpt_dir else epath.Path(run_dir / CKPT_DIR)
    steps = sorted(int(p.name) for p in ckpts.glob("*") if p.name.isdigit()) \
        if ckpts.exists() else []
    if steps:
        _check_same_model(run_dir, cfg.model)
        _say(f"run: resuming {run_dir} from its latest checkpoint, step {steps[-1]}")
        return run_dir, steps[-1]
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise RunDirError(f"{run_dir}: exists and holds no checkpoint to resume from; refusing to "
                          "overwrite it (choose another run_dir or remove it)")
    _say(f"run: new run in {run_dir}")
    return run_dir, None


def _default_run_dir() -> str:
    stamp = int(multihost_utils.broadcast_one_to_all(np.int64(time.time())))  # same on all hosts
    return "runs/pretrain-" + time.strftime("%Y%m%d-%H%M%S", time.localtime(stamp))


def _check_same_model(run_dir: Path, model: C.ModelConfig) -> None:
    saved = C.load(C.ModelConfig, run_dir / MODEL_YAML)
    diff = [f"{k.name}: {getattr(saved, k.name)!r} there, {getattr(model, k.name)!r} here"
            for k in dataclasses.fields(model) if getattr(saved, k.name) != getattr(model, k.name)]
    if diff:
        raise RunDirError(f"{run_dir / MODEL_YAML}: the run's model differs from this config "
                          f"({'; '.join(diff)}); resume with the same model or use a new run_dir")


def _write_run_files(run_dir: Path, cfg: C.PretrainConfig) -> None:
    if _is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        C.save_yaml(cfg, run_dir / CONFIG_YAML)
        save_model_config(run_dir, cfg.model)


# --------------------------------------------------------------------------------------------
# Train state
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunState:
    params: nnx.State
    opt: Any  # optax state
    step: int  # optimizer updates applied
    loader: data_loader.Batches


def initial_state(cfg: C.PretrainConfig, trainer: TrainStep, ckpt: Checkpointer,
                  resume: int | None, loader: data_loader.Batches) -> RunState:
    """Fresh state, or the checkpoint at `resume` with the data iterator put back in place."""
    if resume is None:
        params, opt = trainer.init(cfg.seed)
        return RunState(params, opt, 0, loader)
    params, opt, meta = ckpt.restore(*trainer.abstract(), mesh=trainer.mesh, step=resume)
    data_loader.set_state(loader, meta["data"])
    return RunState(params, opt, int(meta["step"]), loader)


def next_batch(loader: data_loader.Batches, grad_accum: int, mesh) -> tuple[jax.Array, jax.Array]:
    """The next A loader batches as global x_BAT, y_BAT (this process's rows, assembled)."""
    micro = [next(loader) for _ in range(grad_accum)]
    x_bAT = np.stack([m["x"] for m in micro], axis=1)
    y_bAT = np.stack([m["y"] for m in micro], axis=1)
    return sharding.global_batch(x_bAT, mesh), sharding.global_batch(y_bAT, mesh)


def save(ckpt: Checkpointer, st: RunState, cfg: C.PretrainConfig) -> None:
    meta = {"data": data_loader.get_state(st.loader), "tokenizer": cfg.data.tokenizer,
            "seed": cfg.seed}
    ckpt.save(st.step, st.params, st.opt, meta, force=True)


# --------------------------------------------------------------------------------------------
# Preemption
# --------------------------------------------------------------------------------------------
class Preemption:
    """SIGTERM -> stop at a step boundary that every process agrees on.

    Multi-process runs use JAX's coordination service (it catches SIGTERM itself and picks a
    common step); a single process uses a Python handler, restored on exit.
    """

    def __enter__(self) -> Preemption:
        self.flag = False
        self._prev = None
        self._distributed = jax.distributed.is_initialized()
        if not self._distributed and threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum, frame) -> None:
        self.flag = True

    def requested(self, step: int) -> bool:
        if self._distributed:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.flag

    def __exit__(self, *exc) -> None:
        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def pretrain(cfg: C.PretrainConfig) -> Path:
    """Train (or resume) the run described by `cfg`; returns the run directory."""
    cfg.validate()
    cfg, files = resolve_data(cfg)
    loader = data_loader.make_loader(files.train, seq_len=cfg.data.seq_len,
                                     global_batch=cfg.data.batch_size, seed=cfg.seed,
                                     expect_vocab=cfg.model.vocab_size)
    mesh = sharding.make_mesh(cfg.mesh)
    _check_batch(cfg, mesh)
    run_dir, resume = open_run_dir(cfg)
    if resume is not None and resume >= cfg.steps:
        _say(f"run: already at step {resume} >= steps={cfg.steps}; nothing to do")
        return run_dir
    _barrier("run_dir")  # every process has looked before process 0 writes
    trainer = make_train_step(cfg.model, cfg.optim, mesh, grad_accum=cfg.grad_accum,
                              total_steps=cfg.steps)
    with closing(Checkpointer(run_dir, keep=cfg.keep, ckpt_dir=cfg.ckpt_dir or None)) as ckpt:  # close = wait for saves
        st = initial_state(cfg, trainer, ckpt, resume, loader)
        _write_run_files(run_dir, cfg)
        _say(sharding.describe(trainer.model(st.params), mesh))
        step_fn = trainer.compile(cfg.data.batch_size, cfg.data.seq_len, verbose=_is_main())
        with closing(M.MetricsLog(run_dir, total_steps=cfg.steps, start_step=st.step,
                                  log_every=cfg.log_every)) as log, Preemption() as preempt:
            train_steps(cfg, trainer, step_fn, st, ckpt, log, preempt, files)
    return run_dir


def train_steps(cfg: C.PretrainConfig, trainer: TrainStep, step_fn, st: RunState,
                ckpt: Checkpointer, log: M.MetricsLog, preempt: Preemption,
                files: DataFiles) -> None:
    """Run steps until cfg.steps or preemption. Metrics are read one step late (the device
    stays busy), except at eval/save/stop boundaries, which check their own step first."""
    meter = _Meter(cfg)
    pending = None
    while st.step < cfg.steps:
        x_BAT, y_BAT = next_batch(st.loader, cfg.grad_accum, trainer.mesh)
        st.params, st.opt, m = step_fn(st.params, st.opt, x_BAT, y_BAT)
        st.step += 1
        if pending is not None:
            meter.report(*pending, log, ckpt)
        pending = (st.step, m)
        stop = preempt.requested(st.step)
        if not (stop or st.step == cfg.steps or _every(st.step, cfg.save_every)
                or _every(st.step, cfg.eval_every)):
            continue
        meter.report(*pending, log, ckpt)
        pending = None
        _boundary(cfg, trainer, st, ckpt, log, files, stop)
        meter.restart()
        if stop:
            log.print(f"preempted: saved step {st.step} to {ckpt.dir}; rerun the same command "
                      "to resume")
            return


def _boundary(cfg, trainer, st: RunState, ckpt, log, files, stop: bool) -> None:
    last = st.step == cfg.steps
    if files.val is not None and cfg.eval_every > 0 and (last or _every(st.step, cfg.eval_every)):
        r = evaluate(trainer, st.params, files.val, cfg)
        log.val(st.step, r["loss"], r["perplexity"])
    if stop or last or _every(st.step, cfg.save_every):
        save(ckpt, st, cfg)


def evaluate(trainer: TrainStep, params, val_bin: Path, cfg: C.PretrainConfig) -> dict:
    """Validation loss/perplexity on the first eval_batches * batch_size windows of val_bin."""
    B = cfg.data.batch_size
    with jax.set_mesh(trainer.mesh):
        return perplexity(trainer.model(params), val_bin, seq_len=cfg.data.seq_len,
                          batch_size=B, max_windows=cfg.eval_batches * B, mesh=trainer.mesh)


class _Meter:
    """Turns a step's device metrics into a logged row; stops on a non-finite value."""

    def __init__(self, cfg: C.PretrainConfig):
        self.tokens_per_step = cfg.data.batch_size * cfg.grad_accum * cfg.data.seq_len
        self.flops_token = M.flops_per_token(cfg.model, cfg.data.seq_len)
        self.restart()

    def restart(self) -> None:
        self.t = time.perf_counter()

    def report(self, step: int, m: dict, log: M.MetricsLog, ckpt: Checkpointer) -> None:
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            _raise_non_finite(step, m, ckpt)
        now = time.perf_counter()
        tok_s = self.tokens_per_step / max(now - self.t, 1e-9)
        self.t = now
        log.train(step, {**m, "tokens": step * self.tokens_per_step, "tokens_per_s": tok_s,
                         "mfu": M.mfu(tok_s, self.flops_token)})


def _raise_non_finite(step: int, m: dict, ckpt: Checkpointer) -> None:
    ckpt.wait()
    last = ckpt.latest_step()
    kept = (f"the last good checkpoint is {ckpt.dir / str(last)} (step {last})" if last is not None
            else "no checkpoint was saved")
    raise NonFiniteLossError(
        f"step {step}: non-finite training loss {m['loss']} (grad norm {m['grad_norm']}); "
        f"stopped without saving this state; {kept}. Try a lower optim.lr (handoff D3)")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _check_batch(cfg: C.PretrainConfig, mesh) -> None:
    shards = sharding.batch_shards(mesh)
    if cfg.data.batch_size % shards:
        raise C.ConfigError(f"config key 'data.batch_size': {cfg.data.batch_size} is not divisible "
                            f"by the mesh's data*fsdp = {shards} batch shards")


def _every(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


def _is_main() -> bool:
    return jax.process_index() == 0


def _say(msg: str) -> None:
    if _is_main():
        print(msg, flush=True)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"jaxttt:{name}")
