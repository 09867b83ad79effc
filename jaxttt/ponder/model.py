"""A frozen trunk of our model family with a TTT-Linear fast-weight layer on its last hidden states.

    logits = unembed(h + TTT(h, steps)),   h = trunk.hidden(tokens)  (final-normalised, [B,T,D])

Only the `ttt` sub-module is trainable (TTT_PARAMS); the trunk (plain or mHC residual, or a
converted pretrained model) is never updated.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxttt.model.transformer import Transformer, token_logprobs
from jaxttt.ponder.config import TTTConfig
from jaxttt.ponder.ttt import TTTLinear

TTT_PARAMS = nnx.All(nnx.Param, nnx.PathContains("ttt"))  # the outer loop's `wrt`


class PonderModel(nnx.Module):
    def __init__(self, trunk: Transformer, cfg: TTTConfig, *, rngs: nnx.Rngs):
        D = trunk.cfg.d_model
        K = cfg.d_head or D // cfg.n_heads
        self.trunk = trunk
        self.ttt = TTTLinear(D, cfg.n_heads, K, mini_batch=cfg.mini_batch, base_lr=cfg.base_lr,
                             zero_out=cfg.zero_out, rngs=rngs)

    def hidden(self, tokens_BT) -> jax.Array:
        return self.trunk.hidden(tokens_BT, use_lora=False).astype(jnp.float32)

    def logits_from_hidden(self, h_BTD, steps: int, *, unroll: bool = False):
        """(logits [B,T,V], recon [B,T] or None) with `steps` inner updates per mini-batch."""
        y_BTD, recon_BT = self.ttt(h_BTD, steps, unroll=unroll)
        return self.trunk.unembed(h_BTD + y_BTD), recon_BT

    def __call__(self, tokens_BT, steps: int, *, unroll: bool = False):
        return self.logits_from_hidden(self.hidden(tokens_BT), steps, unroll=unroll)

    def from_embeddings(self, x_BTD, steps: int):
        """Logits from input embeddings (gradient checks of causality through trunk and TTT)."""
        h_BTD, _ = self.trunk._run(x_BTD, None, None, False)
        return self.logits_from_hidden(h_BTD.astype(jnp.float32), steps)[0]


def token_nll(model: PonderModel, x_BT, y_BT, steps: int) -> jax.Array:
    """Per-token next-token NLL [B,T] of the chunk with `steps` inner updates."""
    logits_BTV, _ = model(x_BT, steps)
    return -token_logprobs(logits_BTV, y_BT)


def attach(trunk: Transformer, cfg: TTTConfig, *, seed: int = 0) -> PonderModel:
    """A PonderModel around `trunk` with a fresh TTT layer (seeded)."""
    return PonderModel(trunk, cfg, rngs=nnx.Rngs(seed))
