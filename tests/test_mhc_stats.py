import jax
import numpy as np
import pytest
from flax import nnx

from jaxttt import config as C
from jaxttt.eval import mhc_stats
from jaxttt.model import mhc
from jaxttt.model.transformer import Transformer


def test_h_res_by_layer_at_init_matches_static_sinkhorn():
    cfg = C.load(C.ModelConfig, "model/tiny.yaml", ["n_layers=2", "mhc.alpha_init=0.0"])
    m = Transformer(cfg, rngs=nnx.Rngs(0))
    toks = jax.random.randint(jax.random.key(0), (2, 8), 4, cfg.vocab_size)
    h = mhc_stats.h_res_by_layer(m, toks)
    assert h.shape == (2 * cfg.n_layers, 4, 4)
    np.testing.assert_allclose(h, np.broadcast_to(mhc.sinkhorn(m.blocks[0].attn_res.mapping.b_res[...]), h.shape), atol=1e-6)
    d = mhc_stats.identity_distance(h)
    assert d.shape == (4,) and np.all(d > 0) and np.all(d < 0.2)
    np.testing.assert_allclose(mhc_stats.identity_distance(np.eye(4)[None]), [0.0])


def test_h_res_by_layer_rejects_plain_model():
    cfg = C.load(C.ModelConfig, "model/tiny.yaml", ["n_layers=1", "mhc.mode=none"])
    with pytest.raises(ValueError, match="mhc.mode=none"):
        mhc_stats.h_res_by_layer(Transformer(cfg, rngs=nnx.Rngs(0)), np.ones((1, 4), np.int32))
