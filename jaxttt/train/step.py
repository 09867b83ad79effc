"""Pretraining over the trainer core: the loss (next-token cross-entropy) and the batch builder.

    trainer = make_trainer(model_cfg, optim_cfg, mesh, grad_accum=A, total_steps=S, seed=0)
    trainer.compile(example_batch(B, T, A))               # AOT, before step 0: memory use
    m = trainer.step_async(next_batch(loader, A, mesh))   # one AdamW update (handoff E2)

A step consumes A loader batches of B sequences; row j·A + a of the placed batch is row j of
loader batch a, so the trainer's micro-batch a is exactly loader batch a (see
`jaxttt.train.trainer.micro_batches`). Each process contributes only its own rows.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from jaxttt import sharding
from jaxttt.config import ModelConfig, OptimConfig
from jaxttt.model.transformer import build, cross_entropy
from jaxttt.train.trainer import Trainer

Batch = dict[str, jax.Array]


def lm_loss(model, batch: Batch):
    """Mean next-token cross-entropy of x -> y."""
    return cross_entropy(model(batch["x"]), batch["y"]), {}


def make_trainer(model_cfg: ModelConfig, optim_cfg: OptimConfig, mesh: Mesh, *,
                 grad_accum: int = 1, total_steps: int, seed: int = 0) -> Trainer:
    """A fresh model (created sharded on `mesh`) and its pretraining trainer."""
    return Trainer(build(model_cfg, mesh, seed=seed), lm_loss, optim_cfg, mesh=mesh,
                   total_steps=total_steps, grad_accum=grad_accum)


def stack_micro(micro: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A loader batches [b, T] -> [b·A, T] with row j·A + a = row j of batch a."""
    return {k: np.stack([m[k] for m in micro], axis=1).reshape(-1, *micro[0][k].shape[1:])
            .astype(np.int32) for k in ("x", "y")}


def next_batch(loader, grad_accum: int, mesh: Mesh) -> Batch:
    """The next step's batch: A loader batches of this process's rows, placed on `mesh`."""
    rows = stack_micro([next(loader) for _ in range(grad_accum)])
    return {k: sharding.place_batch(v, mesh, local=True) for k, v in rows.items()}


def example_batch(batch_size: int, seq_len: int, grad_accum: int) -> dict[str, np.ndarray]:
    """A global batch of the step's shape (for `Trainer.compile`)."""
    zeros = np.zeros((batch_size * grad_accum, seq_len), np.int32)
    return {"x": zeros, "y": zeros}
