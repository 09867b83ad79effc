"""Decoder: causality, KV cache, sharding, presets, modes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxttt import config as C
from jaxttt import sharding
from jaxttt.model.transformer import Transformer, build, count_params, init_cache


def tiny(**over):
    cfg = C.load(C.ModelConfig, "model/tiny.yaml", [f"{k}={v}" for k, v in over.items()])
    return cfg, Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("mode", ["mhc", "hc", "none"])
def test_causality_zero_gradient_from_future(mode):
    cfg, m = tiny(**{"mhc.mode": mode})
    x = 0.02 * jax.random.normal(jax.random.key(0), (1, 8, cfg.d_model))
    t = 3
    jac = jax.jit(jax.jacrev(lambda x_: m.from_embeddings(x_)[0, t].sum()))(x)  # d logits[t] / d x
    assert float(jnp.abs(jac[0, t + 1:]).max()) == 0.0
    assert float(jnp.abs(jac[0, :t + 1]).max()) > 0.0


@pytest.mark.parametrize("over", [{}, {"n_kv_heads": 2, "rope_fraction": 0.5}, {"mhc.mode": "none"}])
def test_kv_cache_decode_equals_full_forward(over):
    cfg, m = tiny(**over)
    toks = jax.random.randint(jax.random.key(1), (2, 12), 4, cfg.vocab_size)
    full = nnx.jit(lambda m_, t: m_(t))(m, toks)
    decode = nnx.jit(lambda m_, t, p, c: m_.decode(t, p, c))
    cache = init_cache(cfg, 2, 16)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    logits_pre, cache = decode(m, toks[:, :7], pos[:, :7], cache)  # prefill 7, then step by step
    outs = [logits_pre]
    for t in range(7, 12):
        lg, cache = decode(m, toks[:, t:t + 1], pos[:, t:t + 1], cache)
        outs.append(lg)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5, rtol=0)


def test_gqa_and_partial_rope_validate():
    with pytest.raises(C.ConfigError, match="n_kv_heads"):
        C.load(C.ModelConfig, "model/tiny.yaml", ["n_kv_heads=3"])
    cfg, m = tiny(n_kv_heads=1)
    assert m.blocks[0].attn.k.kernel.shape == (cfg.d_model, cfg.d_head)


def test_sharded_forward_equals_single_device():
    cfg = C.load(C.ModelConfig, "model/tiny.yaml")
    toks = jax.random.randint(jax.random.key(2), (8, 16), 0, cfg.vocab_size)
    ref = build(cfg, sharding.single_device_mesh())(toks)
    mesh = sharding.make_mesh(C.MeshConfig(data=2, fsdp=2, tensor=2))
    m8 = build(cfg, mesh)
    kernel = m8.blocks[0].mlp.up.kernel[...]
    assert not kernel.sharding.is_fully_replicated  # really sharded, not a replica
    assert kernel.addressable_shards[0].data.shape == (cfg.d_model // 2, cfg.d_ff // 2)
    with jax.set_mesh(mesh):
        out = nnx.jit(lambda m, t: m(t))(m8, jax.device_put(toks, sharding.batch_sharding(mesh)))
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("preset,lo,hi", [("120m", 100e6, 180e6), ("350m", 300e6, 450e6),
                                          ("900m", 800e6, 1200e6)])
def test_preset_shapes_without_allocation(preset, lo, hi):
    cfg = C.load(C.ModelConfig, f"model/{preset}.yaml")
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    n = count_params(abstract)
    D, F, V, L, N = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layers, cfg.mhc.n_streams
    attn = D * cfg.n_heads * cfg.d_head * 2 + D * cfg.kv_heads * cfg.d_head * 2
    mhc_map = N * D + N * D * (2 * N + N * N) + 3 + 2 * N + N * N
    expected = V * D + N * D + L * (attn + 3 * D * F + 2 * D + 2 * mhc_map) + D
    assert n == expected and lo < n < hi
    logits = jax.eval_shape(lambda m: m(jnp.zeros((2, 64), jnp.int32)), abstract)
    assert logits.shape == (2, 64, V) and logits.dtype == jnp.float32


def test_bf16_compute_keeps_float32_params_and_finite_logits():
    cfg, m = tiny(dtype="bfloat16")
    assert m.blocks[0].attn.q.kernel[...].dtype == jnp.float32
    logits = nnx.jit(lambda m_, t: m_(t))(m, jnp.ones((1, 8), jnp.int32))
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_remat_same_gradients():
    cfg, m = tiny()
    _, mr = tiny(remat=True)
    toks = jnp.arange(16).reshape(1, 16) % cfg.vocab_size
    grad = nnx.jit(nnx.grad(lambda mod: jnp.mean(mod(toks) ** 2)))
    g1 = grad(m)
    g2 = grad(mr)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-6)
