"""`ponder train`: the outer loop. Only the TTT layer learns (trainer core, wrt=TTT_PARAMS).

Each step draws one chunk batch and one inner-step count from `train_actions` (a function of
(seed, step) alone, so a resumed run draws the same ones) and minimises next-token NLL with
that many fast-weight updates per mini-batch; the compiled update holds every allowed count as
a branch of one `lax.switch`, only the drawn one runs. A run directory holds config.yaml,
metrics.jsonl and checkpoints/ (TTT weights, optimizer state, data position). Re-running on
a directory with checkpoints resumes it exactly; a directory with anything else is refused.
"""
from __future__ import annotations

import dataclasses
import functools
from contextlib import closing
from pathlib import Path

import jax
import numpy as np
import yaml
from flax import nnx

from jaxttt import config as C
from jaxttt import sharding
from jaxttt.data import loader as data_loader
from jaxttt.model.transformer import token_logprobs
from jaxttt.ponder.config import STEPS, PonderTrainConfig
from jaxttt.ponder.data import default_bin
from jaxttt.ponder.model import TTT_PARAMS, PonderModel, attach
from jaxttt.runs import (CONFIG_YAML, JsonlWriter, RunDirError, fresh_run_dir, load_run,
                         resolve_named, save_run_config)
from jaxttt.train.checkpoint import Checkpointer
from jaxttt.train.trainer import Trainer

METRICS = "metrics.jsonl"


def ponder_loss(model: PonderModel, batch: dict, context: dict, *, options: tuple[int, ...]):
    """Mean NLL of the chunks with options[context['option']] inner steps (one switch branch)."""
    h_BTD = model.hidden(batch["x"])
    branches = [functools.partial(lambda h, s: model.logits_from_hidden(h, s)[0], s=s)
                for s in options]
    logits_BTV = jax.lax.switch(context["option"], branches, h_BTD)
    return -token_logprobs(logits_BTV, batch["y"]).mean(), {}


@functools.lru_cache(maxsize=None)
def loss_for(options: tuple[int, ...]):
    """One loss object per option set: trainers of equal models share one compiled update."""
    return functools.partial(ponder_loss, options=options)


def option_for_step(cfg: PonderTrainConfig, step: int) -> int:
    """Index into cfg.train_actions drawn for `step` (depends only on seed and step)."""
    return int(np.random.default_rng([cfg.seed, step]).integers(len(cfg.train_actions)))


def load_ponder(run: str | Path, *, mesh=None, step: int | None = None):
    """(PonderModel with trained TTT weights, tokenizer, train config, checkpoint meta)."""
    run_dir = Path(run).absolute()
    try:
        saved = yaml.safe_load((run_dir / CONFIG_YAML).read_text())
    except (OSError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, dict) or not {"base", "ttt"} <= set(saved):
        raise RunDirError(f"{run_dir}: not a `ponder train` run (expected its {CONFIG_YAML} with "
                          "'base' and 'ttt'); pass the --out directory of `jaxttt ponder train`")
    cfg = C.load(PonderTrainConfig, run_dir / CONFIG_YAML)
    mesh = mesh or sharding.single_device_mesh()
    trunk, tok, _ = load_run(cfg.base, mesh=mesh)
    model = attach(trunk, cfg.ttt, seed=cfg.seed)
    ckpt = Checkpointer(run_dir, async_save=False)
    try:
        params, _, meta = ckpt.restore(nnx.state(model, TTT_PARAMS), mesh=mesh, step=step)
    finally:
        ckpt.close()
    nnx.update(model, params)
    return model, tok, cfg, meta


def _open(cfg: PonderTrainConfig, run_dir: Path) -> int | None:
    """Latest checkpoint step to resume from (config must match), or None for a new run."""
    ckpts = run_dir / "checkpoints"
    steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []
    if not steps:
        fresh_run_dir(run_dir)
        save_run_config(cfg, run_dir)
        return None
    saved = C.to_dict(C.load(PonderTrainConfig, run_dir / CONFIG_YAML))
    diff = [k for k, v in C.to_dict(cfg).items() if saved.get(k) != v]
    if diff:
        raise RunDirError(f"{run_dir / CONFIG_YAML}: the run was started with different "
                          f"settings ({', '.join(diff)}); resume with the same ones or use a new "
                          "output directory")
    return steps[-1]


def train(cfg: PonderTrainConfig, run_dir: str | Path, *, stop_after: int | None = None,
          say=print) -> Path:
    """Train (or resume) the TTT layer on the frozen trunk `cfg.base`; returns the run dir.

    `stop_after` ends the run early at that step (after saving), as a preemption would.
    """
    cfg = dataclasses.replace(cfg, base=str(Path(resolve_named(cfg.base)).absolute()))
    cfg.validate()
    run_dir = Path(run_dir).absolute()
    mesh = sharding.make_mesh(cfg.mesh)
    if cfg.batch_size % sharding.batch_shards(mesh):
        raise C.ConfigError(f"config key 'batch_size': {cfg.batch_size} is not divisible by the "
                            f"mesh's {sharding.batch_shards(mesh)} batch shards")
    trunk, tok, _ = load_run(cfg.base, mesh=mesh)  # checks the base before touching run_dir
    resume = _open(cfg, run_dir)
    model = attach(trunk, cfg.ttt, seed=cfg.seed)
    train_bin = cfg.train or str(default_bin(tok, "train"))
    loader = data_loader.make_loader(train_bin, seq_len=cfg.chunk_len, global_batch=cfg.batch_size,
                                     seed=cfg.seed, expect_vocab=trunk.cfg.vocab_size)
    trainer = Trainer(model, loss_for(tuple(cfg.train_actions)), cfg.optim, mesh=mesh, total_steps=cfg.steps, wrt=TTT_PARAMS)
    step = 0
    with closing(Checkpointer(run_dir, keep=cfg.keep, async_save=False)) as ckpt:
        if resume is not None:
            params, opt, meta = ckpt.restore(*trainer.abstract_state(), mesh=mesh, step=resume)
            trainer.set_state(params, opt)
            data_loader.set_state(loader, meta["data"])
            step = int(meta["step"])
            say(f"ponder train: resuming {run_dir} at step {step}")
        with JsonlWriter(run_dir / METRICS, resume_step=step) as log:
            while step < cfg.steps and (stop_after is None or step < stop_after):
                batch = next(loader)
                option = option_for_step(cfg, step)
                m = trainer.step({"x": batch["x"], "y": batch["y"]},
                                 context={"option": np.int32(option)})
                step += 1
                log.write({"step": step, "steps_inner": cfg.train_actions[option], **m})
                if step % cfg.log_every == 0 or step == cfg.steps:
                    say(f"step {step}: loss {m['loss']:.4f} (inner steps "
                        f"{cfg.train_actions[option]}) grad_norm {m['grad_norm']:.3f}")
                if (step == cfg.steps or step == stop_after
                        or (cfg.save_every and step % cfg.save_every == 0)):
                    ckpt.save(step, trainer.params, trainer.opt_state,
                              {"data": data_loader.get_state(loader), "tokenizer": str(tok.path),
                               "steps_allowed": list(STEPS)}, force=True)
    return run_dir
