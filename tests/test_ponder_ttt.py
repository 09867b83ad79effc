"""PonderTTT fast weights: dual form == per-token gradient loop, causality, SKIP computes no update."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxttt.config import ModelConfig, MHCConfig
from jaxttt.model.transformer import Transformer
from jaxttt.ponder.config import TTTConfig
from jaxttt.ponder.model import TTT_PARAMS, attach
from jaxttt.ponder.ttt import TTTLinear, layer_norm


def _layer(seed=0, D=16, H=2, K=8, M=4):
    layer = TTTLinear(D, H, K, mini_batch=M, base_lr=1.0, rngs=nnx.Rngs(seed))
    r = np.random.default_rng(seed)
    # non-trivial values for everything the default init sets to 0/1, and a large enough
    # projection scale that the fast weights really move
    for name, scale, shift in (("wq", 0.3, 0), ("wk", 0.3, 0), ("wv", 0.3, 0),
                               ("lr_b", 1.0, 0), ("token_idx_offset", 0.1, 0), ("b0", 0.2, 0),
                               ("ttt_scale", 0.2, 1.0), ("ttt_bias", 0.2, 0), ("w0", 0.2, 0)):
        var = getattr(layer, name)
        var[...] = jnp.asarray(shift + scale * r.standard_normal(var.shape), jnp.float32)
    return layer


def _explicit(layer, x_BTD, steps):
    """Primal TTT: for every token, autodiff of its eta-weighted prefix loss at the mini-batch
    start weights; then `steps` end-of-mini-batch updates carried forward."""
    q, k, v, eta = (np.asarray(a) for a in layer.projections(x_BTD))
    B, H, J, M, K = q.shape
    scale, bias = np.asarray(layer.ttt_scale[...]), np.asarray(layer.ttt_bias[...])
    out = np.zeros((B, H, J, M, K), np.float32)

    @jax.jit
    @jax.grad
    def grad(Wb, k_MK, v_MK, scale_K, bias_K, weights_M):
        W, c = Wb
        pred = layer_norm(k_MK @ W + c, scale_K, bias_K)
        l_M = 0.5 * jnp.sum((pred - (v_MK - k_MK)) ** 2, axis=-1)
        return jnp.sum(weights_M * l_M)

    for b in range(B):
        for h in range(H):
            Wb = (jnp.asarray(layer.w0[...][h]), jnp.asarray(layer.b0[...][h]))
            for j in range(J):
                data = (k[b, h, j], v[b, h, j], scale[h], bias[h])
                for i in range(M):
                    g = grad(Wb, *data, eta[b, h, j, i] * (np.arange(M) <= i))
                    Wi, ci = Wb[0] - g[0], Wb[1] - g[1]
                    out[b, h, j, i] = q[b, h, j, i] + layer_norm(q[b, h, j, i] @ Wi + ci,
                                                                 scale[h], bias[h])
                for _ in range(steps):
                    g = grad(Wb, *data, eta[b, h, j, M - 1])
                    Wb = (Wb[0] - g[0], Wb[1] - g[1])
    return out.transpose(0, 2, 3, 1, 4).reshape(B, J * M, H * K)


@pytest.mark.parametrize("steps", [1, 2])
def test_dual_form_equals_explicit_per_token_gradient_loop(steps):
    layer = _layer()
    x = jax.random.normal(jax.random.key(1), (1, 12, 16))
    z, recon = jax.jit(lambda x_: layer.fast(x_, steps))(x)
    want = _explicit(layer, x, steps)
    np.testing.assert_allclose(np.asarray(z), want, rtol=2e-4, atol=2e-5)
    assert recon.shape == (1, 12) and np.all(np.asarray(recon) > 0)
    # the update must matter: the fast weights moved the outputs away from the SKIP read-out
    z0, _ = layer.fast(x, 0)
    assert float(jnp.max(jnp.abs(z - z0))) > 1e-2


def test_eta_follows_the_reference_schedule():
    layer = TTTLinear(16, 2, 8, mini_batch=4, base_lr=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 8, 16))
    _, _, _, eta = layer.projections(x)
    gate_BTH = jax.nn.sigmoid(x @ layer.lr_w[...] + layer.lr_b[...])
    # eta[b,h,j,i,jj] = base_lr / (i+1) * sigmoid(x_jj w_h + c_h) / K
    want = 0.5 / (np.arange(4) + 1)[:, None] * np.asarray(gate_BTH)[0, 4:8, 1][None, :] / 8
    np.testing.assert_allclose(np.asarray(eta[0, 1, 1]), want, rtol=1e-6)


def _tiny_trunk(mode="none"):
    cfg = ModelConfig(vocab_size=64, n_layers=1, d_model=32, n_heads=2, d_head=16, d_ff=64,
                      max_seq_len=64, mhc=MHCConfig(mode=mode, n_streams=2))
    return Transformer(cfg, rngs=nnx.Rngs(0))


def test_prediction_at_t_never_depends_on_later_tokens():
    steps = 2
    model = attach(_tiny_trunk("none"), TTTConfig(n_heads=2, mini_batch=4))
    layer = model.ttt
    layer.wo[...] = layer.wo[...] * 20.0  # make the TTT path visible in the logits
    x_BTD = jax.random.normal(jax.random.key(0), (1, 16, 32))
    t = 6  # inside the second mini-batch, so earlier mini-batches' updates are involved too

    @jax.jit
    def grad_at(x):
        return jax.grad(lambda x_: model.from_embeddings(x_, steps)[0, t].sum())(x)

    g_TD = np.abs(np.asarray(grad_at(x_BTD))[0]).sum(-1)
    assert np.all(g_TD[t + 1:] == 0.0), g_TD
    assert np.all(g_TD[:t + 1] > 0.0)


def _eqns(jaxpr):
    """Every equation of `jaxpr`, recursing into sub-programs (scan bodies, pjit, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for item in v if isinstance(v, (tuple, list)) else (v,):
                if isinstance(item, jax.extend.core.ClosedJaxpr):
                    yield from _eqns(item.jaxpr)
                elif isinstance(item, jax.extend.core.Jaxpr):
                    yield from _eqns(item)


def _count_ops(jaxpr, name):
    return sum(e.primitive.name == name for e in _eqns(jaxpr))


def _count_all_ops(jaxpr):
    return sum(1 for _ in _eqns(jaxpr))


def test_skip_computes_no_update():
    layer = _layer(M=4)
    x = jnp.ones((2, 8, 16))
    progs = {s: jax.make_jaxpr(lambda x_: layer(x_, s))(x).jaxpr for s in (0, 1, 2, 4)}
    dots = {s: _count_ops(p, "dot_general") for s, p in progs.items()}
    # SKIP: the q/k/v/o projections, the lr gate and q W0 only; no scan over mini-batches
    assert _count_ops(progs[0], "scan") == 0
    assert all(_count_ops(progs[s], "scan") == 1 for s in (1, 2, 4))
    # every extra inner step adds the same update ops (k W, its LN backward, two outer products)
    per_step = dots[2] - dots[1]
    assert per_step > 0 and dots[4] - dots[2] == 2 * per_step
    assert dots[1] > dots[0] + per_step  # the causal dual-form step also builds the [M,M] matrix
    assert _count_all_ops(progs[0]) < _count_all_ops(progs[1]) / 2


def test_a_zero_out_layer_starts_as_the_trunk_and_can_learn():
    trunk = _tiny_trunk("mhc")
    model = attach(trunk, TTTConfig(n_heads=2, mini_batch=4, zero_out=True))
    tok_BT = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    base_BTV = np.asarray(trunk(tok_BT, use_lora=False))
    for steps in (0, 1, 4):  # SKIP and updates alike: y = z @ wo = 0 exactly
        np.testing.assert_array_equal(np.asarray(model(tok_BT, steps)[0]), base_BTV)

    def loss(ttt):
        logits_BTV = model.trunk.unembed(model.hidden(tok_BT) + ttt(model.hidden(tok_BT), 2)[0])
        return -jnp.mean(jax.nn.log_softmax(logits_BTV)[:, :-1].max(-1))

    g = nnx.grad(loss)(model.ttt)
    assert np.abs(np.asarray(g.wo[...])).sum() > 0  # the output learns first
    normal = attach(_tiny_trunk("mhc"), TTTConfig(n_heads=2, mini_batch=4))
    assert not np.array_equal(np.asarray(normal(tok_BT, 1)[0]), base_BTV)


def test_only_the_ttt_layer_is_trainable():
    model = attach(_tiny_trunk(), TTTConfig(n_heads=2, mini_batch=4))
    trainable = nnx.state(model, TTT_PARAMS)
    paths = [p for p, _ in nnx.to_flat_state(trainable)]
    assert paths and all(p[0] == "ttt" for p in paths)
    n_all = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    n_ttt = sum(x.size for x in jax.tree.leaves(trainable))
    assert 0 < n_ttt < n_all


def test_score_from_one_trunk_pass_equals_the_per_action_programs():
    """ChunkRunner.score runs the trunk once per chunk; its [C, A] table, gate signal and
    features equal those of the whole-chunk programs that `run` executes."""
    from jaxttt.ponder.actions import N_STATIC, SIGNAL_FEATURE, ChunkRunner
    from jaxttt.ponder.config import ACTIONS
    model = attach(_tiny_trunk("mhc"), TTTConfig(n_heads=2, mini_batch=4))
    model.ttt.wo[...] = model.ttt.wo[...] * 20.0  # actions must differ visibly
    runner = ChunkRunner(model)
    x_CT = np.asarray(jax.random.randint(jax.random.key(2), (5, 16), 0, 64))
    y_CT = np.roll(x_CT, -1, axis=1)
    losses_CA, signal_C, feats_CF = runner.score(x_CT, y_CT, 2, vocab=64, eos_id=0)
    assert losses_CA.shape == (5, len(ACTIONS)) and feats_CF.shape == (5, N_STATIC)
    whole_CA = np.stack([runner.run(x_CT, y_CT, np.full(5, a)) for a in range(len(ACTIONS))], -1)
    np.testing.assert_allclose(losses_CA, whole_CA, rtol=1e-5, atol=1e-5)
    assert np.ptp(losses_CA, axis=1).min() > 1e-4  # the check compares different numbers
    recon_C = np.asarray(model.ttt.recon_signal(model.hidden(jnp.asarray(x_CT))).mean(-1))
    np.testing.assert_allclose(signal_C, recon_C, rtol=1e-5)
    np.testing.assert_allclose(feats_CF[:, SIGNAL_FEATURE], recon_C, rtol=1e-5)
