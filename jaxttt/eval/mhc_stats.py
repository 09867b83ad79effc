"""How far the learned mHC mixing drifts from the identity: H_res per layer and sublayer."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxttt.model import mhc


def h_res_by_layer(model, tokens_BT) -> np.ndarray:
    """Token-averaged H_res for every sublayer: [2L, N, N] (attention, MLP, attention, ...)."""
    if model.cfg.mhc.mode == "none":
        raise ValueError("model has mhc.mode=none: there is no H_res to inspect")
    x = mhc.expand_streams(model.embed_tokens(jnp.asarray(tokens_BT)), model.stream_emb[...])
    B, T = tokens_BT.shape
    pos_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    mats = []
    for block in model.blocks:
        mats.append(block.attn_res.mapping(x)[2].mean(axis=(0, 1)))
        x_mid, _ = block.attn_res(x, lambda h: block.attn(block.attn_norm(h), pos_BT))
        mats.append(block.mlp_res.mapping(x_mid)[2].mean(axis=(0, 1)))
        x, _ = block(x, pos_BT)
    return np.asarray(jnp.stack(mats))


def identity_distance(h_res_LNN: np.ndarray) -> np.ndarray:
    """Frobenius distance ||H_res - I|| per sublayer."""
    eye = np.eye(h_res_LNN.shape[-1])
    return np.sqrt(((h_res_LNN - eye) ** 2).sum(axis=(-2, -1)))
