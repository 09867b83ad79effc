"""Pretraining loop (handoff Phase 5-6, K2): data -> compiled step -> checkpoints + metrics.

A run directory is never overwritten: a directory holding checkpoints is resumed from its latest
one (params, optimizer, data position; the loss curve continues bitwise), any other non-empty
directory is an error. SIGTERM (preemption) saves at the end of the current step and returns
normally. An update with a non-finite loss or gradient is skipped by the trainer (weights and
optimizer state unchanged; the row says `skipped`); `max_skipped` consecutive ones stop the run.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from contextlib import closing
from pathlib import Path

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from jaxttt import config as C
from jaxttt import runs, sharding
from jaxttt.data import loader as data_loader
from jaxttt.data.packing import ensure_default_data, read_meta
from jaxttt.data.tokenizer import Tokenizer, load_tokenizer
from jaxttt.eval.perplexity import perplexity
from jaxttt.train import metrics as M
from jaxttt.train.checkpoint import (CKPT_DIR, MODEL_YAML, Checkpointer, RunDirError,  # noqa: F401
                                     save_model_config)
from jaxttt.train.step import example_batch, make_trainer, next_batch
from jaxttt.train.trainer import Trainer

CONFIG_YAML = "config.yaml"


class NonFiniteLossError(RuntimeError):
    """`max_skipped` updates in a row had a NaN/inf loss or gradient; the message names the
    step and the last good checkpoint."""


# --------------------------------------------------------------------------------------------
# Set-up: caches, data, run directory
# --------------------------------------------------------------------------------------------
def cache_root() -> Path:
    """$JAXTTT_CACHE, else ~/.cache/jaxttt (default corpus, compiled programs)."""
    return runs.cache_root()


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
    vocab = load_tokenizer(tok_path).vocab_size
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
    return runs.run_name("pretrain", stamp)


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
        runs.save_run_config(cfg, run_dir, CONFIG_YAML)  # portable: no run_dir inside
        save_model_config(run_dir, cfg.model)


# --------------------------------------------------------------------------------------------
# Train state
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunState:
    trainer: Trainer  # model, optimizer state (its update count drives the schedule)
    step: int  # steps taken (= checkpoint number; skipped updates included)
    loader: data_loader.Batches


def initial_state(cfg: C.PretrainConfig, trainer: Trainer, ckpt: Checkpointer,
                  resume: int | None, loader: data_loader.Batches) -> RunState:
    """Fresh state, or the checkpoint at `resume` with the data iterator put back in place."""
    if resume is None:
        return RunState(trainer, 0, loader)
    params, opt, meta = ckpt.restore(*trainer.abstract_state(), mesh=trainer.mesh, step=resume)
    trainer.set_state(params, opt)
    data_loader.set_state(loader, meta["data"])
    return RunState(trainer, int(meta["step"]), loader)


def save(ckpt: Checkpointer, st: RunState, cfg: C.PretrainConfig) -> None:
    meta = {"data": data_loader.get_state(st.loader), "tokenizer": cfg.data.tokenizer,
            "seed": cfg.seed}
    ckpt.save(st.step, st.trainer.params, st.trainer.opt_state, meta, force=True)


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
    trainer = make_trainer(cfg.model, cfg.optim, mesh, grad_accum=cfg.grad_accum,
                           total_steps=cfg.steps, seed=cfg.seed)
    with closing(Checkpointer(run_dir, keep=cfg.keep, ckpt_dir=cfg.ckpt_dir or None)) as ckpt:  # close = wait for saves
        st = initial_state(cfg, trainer, ckpt, resume, loader)
        _write_run_files(run_dir, cfg)
        _say(sharding.describe(trainer.model, mesh))
        trainer.compile(example_batch(cfg.data.batch_size, cfg.data.seq_len, cfg.grad_accum),
                        verbose=_is_main())
        with closing(M.MetricsLog(run_dir, total_steps=cfg.steps, start_step=st.step,
                                  log_every=cfg.log_every)) as log, Preemption() as preempt:
            train_steps(cfg, st, ckpt, log, preempt, files)
    return run_dir


def train_steps(cfg: C.PretrainConfig, st: RunState, ckpt: Checkpointer, log: M.MetricsLog,
                preempt: Preemption, files: DataFiles) -> None:
    """Run steps until cfg.steps or preemption. Metrics are read one step late (the device
    stays busy), except at eval/save/stop boundaries, which check their own step first."""
    meter = _Meter(cfg)
    pending = None
    while st.step < cfg.steps:
        m = st.trainer.step_async(next_batch(st.loader, cfg.grad_accum, st.trainer.mesh))
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
        _boundary(cfg, st, ckpt, log, files, stop)
        meter.restart()
        if stop:
            log.print(f"preempted: saved step {st.step} to {ckpt.dir}; rerun the same command "
                      "to resume")
            return


def _boundary(cfg, st: RunState, ckpt, log, files, stop: bool) -> None:
    last = st.step == cfg.steps
    if files.val is not None and cfg.eval_every > 0 and (last or _every(st.step, cfg.eval_every)):
        r = evaluate(st.trainer, files.val, cfg)
        log.val(st.step, r["loss"], r["perplexity"])
    if stop or last or _every(st.step, cfg.save_every):
        save(ckpt, st, cfg)


def evaluate(trainer: Trainer, val_bin: Path, cfg: C.PretrainConfig) -> dict:
    """Validation loss/perplexity on the first eval_batches * batch_size windows of val_bin."""
    B = cfg.data.batch_size
    with jax.set_mesh(trainer.mesh):
        return perplexity(trainer.model, val_bin, seq_len=cfg.data.seq_len,
                          batch_size=B, max_windows=cfg.eval_batches * B, mesh=trainer.mesh)


class _Meter:
    """Turns a step's device metrics into a logged row; stops after `max_skipped` skipped
    updates in a row."""

    def __init__(self, cfg: C.PretrainConfig):
        self.tokens_per_step = cfg.data.batch_size * cfg.grad_accum * cfg.data.seq_len
        self.flops_token = M.flops_per_token(cfg.model, cfg.data.seq_len)
        self.max_skipped, self.skipped_run = cfg.max_skipped, 0
        self.restart()

    def restart(self) -> None:
        self.t = time.perf_counter()

    def report(self, step: int, m: dict, log: M.MetricsLog, ckpt: Checkpointer) -> None:
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        self.skipped_run = self.skipped_run + 1 if m["skipped"] else 0
        if m["skipped"]:
            log.print(f"step {step}: update skipped (loss {m['loss']}, grad norm "
                      f"{m['grad_norm']}); weights and optimizer state unchanged")
        now = time.perf_counter()
        tok_s = self.tokens_per_step / max(now - self.t, 1e-9)
        self.t = now
        row = {k: v if math.isfinite(v) else None for k, v in m.items()}  # NaN: not written
        log.train(step, {**row, "tokens": step * self.tokens_per_step, "tokens_per_s": tok_s,
                         "mfu": M.mfu(tok_s, self.flops_token)})
        if self.skipped_run >= self.max_skipped:
            _raise_non_finite(step, m, self.skipped_run, ckpt)


def _raise_non_finite(step: int, m: dict, n: int, ckpt: Checkpointer) -> None:
    ckpt.wait()
    last = ckpt.latest_step()
    kept = (f"the last checkpoint is {ckpt.dir / str(last)} (step {last})" if last is not None
            else "no checkpoint was saved")
    raise NonFiniteLossError(
        f"step {step}: non-finite training loss {m['loss']} (grad norm {m['grad_norm']}) in "
        f"{n} updates in a row (max_skipped); stopped without saving this state; {kept}. "
        "Try a lower optim.lr (handoff D3)")


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
