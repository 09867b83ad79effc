"""Perplexity on a fixed held-out packed set (the same windows every time it is called)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxttt.data.loader import WindowSource
from jaxttt.model.transformer import cross_entropy


@nnx.jit
def _batch_nll(model, x_BT, y_BT):
    return cross_entropy(model(x_BT), y_BT)


def eval_windows(bin_path, seq_len: int, *, max_windows: int, expect_vocab: int | None = None):
    """The first `max_windows` non-overlapping windows (deterministic), as (x [B,T], y [B,T])."""
    src = WindowSource(bin_path, seq_len, expect_vocab=expect_vocab)
    n = min(len(src), max_windows)
    items = [src[i] for i in range(n)]
    return np.stack([it["x"] for it in items]), np.stack([it["y"] for it in items])


def perplexity(model, bin_path, *, seq_len: int, batch_size: int = 8, max_windows: int = 64,
               mesh=None) -> dict:
    """{'loss': mean next-token NLL, 'perplexity': exp(loss), 'tokens': n} on held-out windows."""
    x_BT, y_BT = eval_windows(bin_path, seq_len, max_windows=max_windows,
                              expect_vocab=model.cfg.vocab_size)
    losses = []
    for i in range(0, len(x_BT) - batch_size + 1, batch_size) or [0]:
        x, y = jnp.asarray(x_BT[i:i + batch_size]), jnp.asarray(y_BT[i:i + batch_size])
        if mesh is not None:
            from jaxttt.sharding import batch_sharding
            x, y = jax.device_put(x, batch_sharding(mesh)), jax.device_put(y, batch_sharding(mesh))
        losses.append(float(_batch_nll(model, x, y)))
    loss = float(np.mean(losses))
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "tokens": int(len(losses) * min(batch_size, len(x_BT)) * seq_len)}
