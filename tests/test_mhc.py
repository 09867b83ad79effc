"""mHC maths properties (handoff "mHC: mathematical specification", Phase 4)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxttt.config import MHCConfig
from jaxttt.model import mhc


def _random_htilde(seed, shape=(64, 4, 4), scale=3.0):
    return scale * jax.random.normal(jax.random.key(seed), shape)


INIT_BIAS = 4.0 * jnp.eye(4) - 2.0  # b_res: diag +2, off -2


@pytest.mark.parametrize("center,scale,col_tol", [(0.0, 0.5, 1e-4), (0.0, 1.0, 1e-3),
                                                  (INIT_BIAS, 0.3, 1e-2)])
def test_sinkhorn_doubly_stochastic_and_nonnegative(center, scale, col_tol):
    """t_max = 20 (the spec): rows sum to 1 exactly, columns to within the Sinkhorn residual."""
    h = mhc.sinkhorn(center + _random_htilde(0, scale=scale), iters=20)
    assert h.dtype == jnp.float32
    assert bool(jnp.all(h >= 0))
    np.testing.assert_allclose(h.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(h.sum(-2), 1.0, atol=col_tol)


def test_sinkhorn_float32_for_bf16_input_and_converges():
    h_bf16 = mhc.sinkhorn(_random_htilde(1).astype(jnp.bfloat16))
    assert h_bf16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(h_bf16)))
    err = [float(jnp.abs(mhc.sinkhorn(_random_htilde(1), iters=t).sum(-2) - 1).max()) for t in (2, 5, 20)]
    assert err[0] > err[1] > err[2]


def test_sinkhorn_clamp_prevents_overflow():
    h = mhc.sinkhorn(jnp.array([[1e4, -1e4], [-1e4, 1e4]]))
    assert bool(jnp.all(jnp.isfinite(h)))
    np.testing.assert_allclose(h, jnp.eye(2), atol=1e-5)


def _mapping(mode="mhc", n=4, d=8, alpha=0.01, seed=0):
    return mhc.MHCMapping(d, MHCConfig(mode=mode, n_streams=n, alpha_init=alpha), norm_eps=1e-6,
                          rngs=nnx.Rngs(seed))


def test_mapping_ranges_and_mean_preservation():
    m = _mapping(alpha=1.0)  # large gate: strongly input-dependent mappings
    x = 3.0 * jax.random.normal(jax.random.key(2), (2, 5, 4, 8))
    h_pre, h_post, h_res = m(x)
    assert bool(jnp.all((h_pre > 0) & (h_pre < 1)))
    assert bool(jnp.all((h_post > 0) & (h_post < 2)))
    mixed = jnp.einsum("btnm,btmd->btnd", h_res, x)
    np.testing.assert_allclose(mixed.mean(2), x.mean(2), atol=2e-2)  # i(H_res X) = i(X)


def test_init_biases_match_spec():
    n = 4
    m = _mapping(alpha=0.0, n=n)  # alpha 0: mappings are exactly the static biases
    x = jax.random.normal(jax.random.key(3), (1, 2, n, 8))
    h_pre, h_post, h_res = m(x)
    np.testing.assert_allclose(h_pre, 1.0 / n, rtol=1e-6)
    np.testing.assert_allclose(h_post, 1.0 / n, rtol=1e-6)  # 2·sigmoid(logit(1/2n)) = 1/n
    assert float(jnp.min(jnp.diagonal(h_res, axis1=-2, axis2=-1))) > 0.9
    np.testing.assert_allclose(m.alpha[...], 0.0)
    np.testing.assert_allclose(_mapping().alpha[...], 0.01)


def test_block_at_init_is_static_identity_plus_sublayer():
    """With alpha = 0.01, X' ≈ S X + (1/n) 1 F(mean-weighted X), S = Sinkhorn(b_res) ≈ I."""
    n, d = 4, 8
    res = mhc.MHCResidual(d, MHCConfig(n_streams=n), norm_eps=1e-6, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (2, 3, n, d))
    w = jax.random.normal(jax.random.key(5), (d, d)) / np.sqrt(d)
    f = lambda h: (jnp.tanh(h @ w), None)  # noqa: E731
    out, _ = res(x, f)
    s = mhc.sinkhorn(res.mapping.b_res[...])
    ref = jnp.einsum("nm,btmd->btnd", s, x) + f(x.mean(2))[0][:, :, None, :] / n
    assert float(jnp.abs(out - ref).max()) < 0.05
    np.testing.assert_allclose(jnp.diag(s), jnp.diag(s)[0], rtol=1e-6)
    assert float(jnp.abs(s - jnp.eye(n)).max()) < 0.06


def test_hc_mode_is_unconstrained():
    m = _mapping(mode="hc", alpha=1.0)
    _, _, h_res = m(3.0 * jax.random.normal(jax.random.key(6), (1, 4, 4, 8)))
    assert float(jnp.abs(h_res.sum(-1) - 1).max()) > 1e-2  # not projected
    np.testing.assert_allclose(_mapping(mode="hc", alpha=0.0)(jnp.ones((1, 1, 4, 8)))[2][0, 0], jnp.eye(4))


def test_sinkhorn_gradients_finite():
    g = jax.grad(lambda h: jnp.sum(mhc.sinkhorn(h) ** 2))(_random_htilde(7))
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
