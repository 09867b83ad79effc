"""TTT-Discover maths and bookkeeping: adaptive beta, LOO advantages, REINFORCE loss, PUCT
archive (handoff §5-§7, A4, F5, F6)."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxttt.discover.archive import Archive
from jaxttt.discover.objective import (BETA_MAX, group_advantages, grouped_reinforce_loss, kl_to_uniform,
                                       loo_advantages, reinforce_loss, shaped_advantages,
                                       solve_beta)
from jaxttt.discover.step import row_weights, sampler_logprobs, shaped_reinforce_loss

LN2 = math.log(2.0)
REWARDS = np.array([0.1, 0.5, 0.3, 0.9, 0.2, 0.2, 0.7, 0.4], np.float32)


def kl_f64(rewards, beta) -> float:
    """KL(q_beta || uniform) in float64 numpy, independent of the JAX code."""
    x = float(beta) * (np.asarray(rewards, np.float64) - np.max(rewards))
    logq = x - np.logaddexp.reduce(x)
    return float(np.sum(np.exp(logq) * (logq + np.log(len(x)))))


def loo_f64(rewards, beta) -> np.ndarray:
    """The handoff §6 formula, literally, in float64."""
    r = np.asarray(rewards, np.float64)
    w = np.exp(float(beta) * (r - r.max()))
    z = (w.sum() - w) / (len(r) - 1)
    return w / z - 1.0


# ---- adaptive beta ------------------------------------------------------------------------
def test_beta_zero_for_equal_rewards():
    assert float(solve_beta(np.full(8, 0.3, np.float32), LN2)) == 0.0
    assert float(solve_beta(np.zeros(4, np.float32), 0.1)) == 0.0


@pytest.mark.parametrize("gamma", [0.05, LN2, 1.5])
def test_beta_hits_target_kl(gamma):
    beta = float(solve_beta(REWARDS, gamma))
    assert 0.0 < beta < 1e3
    assert abs(kl_f64(REWARDS, beta) - gamma) < 1e-4


def test_beta_max_when_unreachable():
    # sup_beta KL(q_beta||u) = log N (a unique best reward): gamma above it cannot be reached.
    assert float(solve_beta(REWARDS, math.log(len(REWARDS)) + 0.1)) == pytest.approx(BETA_MAX)
    assert float(solve_beta(REWARDS, 10.0, beta_max=50.0)) == pytest.approx(50.0)


def test_kl_monotone_in_beta_and_beta_scales_with_spread():
    betas = np.linspace(0.0, 50.0, 101)
    kls = np.array([float(kl_to_uniform(jnp.asarray(REWARDS), b)) for b in betas])
    assert kls[0] == pytest.approx(0.0, abs=1e-6)  # F6: 0 at beta = 0
    assert np.all(np.diff(kls) > 0)  # F6: increasing
    assert kls[-1] < math.log(len(REWARDS)) and kls[-1] > 0.9 * math.log(len(REWARDS))
    # q_beta depends on beta * r only, so widening the spread k-fold divides beta by k: the
    # solver is monotone (decreasing) in the spread once there is one. (F6's "beta increases
    # with variance" holds going from zero spread, where beta = 0, to a positive one.)
    base = float(solve_beta(REWARDS, LN2))
    for k in (0.5, 2.0, 4.0):
        assert float(solve_beta(k * REWARDS, LN2)) == pytest.approx(base / k, rel=1e-4)
    tiny_spread = float(solve_beta(np.array([0.0, 0.0, 0.0, 1e-3], np.float32), LN2))
    assert tiny_spread > base


# ---- leave-one-out advantages -------------------------------------------------------------
def test_loo_equal_rewards_exactly_zero():
    for beta in (0.0, 1.0, 37.5, 1e3):
        A = np.asarray(loo_advantages(np.full(6, 0.42, np.float32), beta))
        assert np.all(A == 0.0)


def test_loo_hand_computed_case():
    # r = [0, 1, 2], beta = ln 2: w = [1/4, 1/2, 1]; Z_-n = [3/4, 5/8, 3/8]
    A = np.asarray(loo_advantages(np.array([0.0, 1.0, 2.0], np.float32), LN2))
    np.testing.assert_allclose(A, [1 / 3 - 1, 0.8 - 1, 8 / 3 - 1], rtol=1e-5)


def test_loo_matches_formula_and_f5_signs():
    beta = float(solve_beta(REWARDS, LN2))
    A = np.asarray(loo_advantages(REWARDS, beta))
    np.testing.assert_allclose(A, loo_f64(REWARDS, beta), rtol=1e-4, atol=1e-5)
    assert A[np.argmax(REWARDS)] > 0 and A[np.argmin(REWARDS)] < 0  # F5
    assert np.all(np.diff(A[np.argsort(REWARDS)]) >= 0)  # ordered like the rewards


def test_loo_stays_finite_when_others_underflow():
    A = np.asarray(loo_advantages(np.array([0.0, 0.0, 1.0], np.float32), 1e3, max_ratio=1e4))
    assert np.all(np.isfinite(A)) and A[2] == pytest.approx(1e4 - 1.0) and A[0] == -1.0


# ---- loss ---------------------------------------------------------------------------------
def _logp(params, feats_N):
    return jax.nn.log_sigmoid(feats_N @ params)  # a stand-in "sequence log-prob" per rollout


def test_all_equal_group_gives_zero_gradient():
    feats_N = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32)
    params = jnp.ones(3)
    A_N = loo_advantages(jnp.full(6, 0.7), solve_beta(jnp.full(6, 0.7), LN2))
    grad = jax.grad(lambda p: reinforce_loss(_logp(p, feats_N), A_N))(params)
    assert np.all(np.asarray(grad) == 0.0)


def test_reinforce_gradient_is_weighted_logprob_gradient():
    feats_N = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)), jnp.float32)
    params = jnp.array([0.3, -0.2, 0.1])
    A_N = jnp.array([1.0, -0.5, 0.0, 2.0, -1.0])
    grad = jax.grad(lambda p: reinforce_loss(_logp(p, feats_N), A_N))(params)
    per_N = jax.vmap(lambda f: jax.grad(lambda p: _logp(p, f[None])[0])(params))(feats_N)
    np.testing.assert_allclose(grad, -(A_N[:, None] * per_N).mean(0), rtol=1e-5, atol=1e-6)
    # advantages are weights: no gradient flows through them
    g_A = jax.grad(lambda a: reinforce_loss(_logp(params, feats_N), a))(A_N)
    assert np.all(np.asarray(g_A) == 0.0)


def test_shaped_advantages():
    A = shaped_advantages(jnp.array([1.0, -1.0]), jnp.array([-2.0, -3.0]), jnp.array([-2.5, -1.0]), 0.1)
    np.testing.assert_allclose(A, [1.0 - 0.05, -1.0 + 0.2], rtol=1e-6)


def test_grouped_drops_equal_groups_and_matches_single_group():
    rewards_GN = np.stack([REWARDS, np.full(8, 0.5, np.float32), REWARDS[::-1]])
    out = group_advantages(rewards_GN, LN2)
    assert out.valid_G.tolist() == [True, False, True]
    assert float(out.beta_G[1]) == 0.0
    np.testing.assert_allclose(out.A_GN[0], loo_advantages(REWARDS, solve_beta(REWARDS, LN2)), rtol=1e-6)
    assert np.all(np.asarray(out.A_GN[1]) == 0.0)
    fixed = group_advantages(rewards_GN, LN2, beta=2.0, drop_equal=False)
    assert np.all(np.asarray(fixed.beta_G) == 2.0) and bool(fixed.valid_G.all())

    feats_GN3 = jnp.asarray(np.random.default_rng(2).normal(size=(3, 8, 3)), jnp.float32)
    base_GN = jnp.zeros((3, 8)) - 1.0

    def loss(p, valid_G):
        logp_GN = jax.vmap(lambda f: _logp(p, f))(feats_GN3)
        return grouped_reinforce_loss(logp_GN, base_GN, out.A_GN, valid_G, 0.1)

    p0 = jnp.array([0.2, 0.1, -0.3])
    # the dropped group contributes nothing, not even through the KL term
    only_valid = loss(p0, out.valid_G)
    two_groups = jnp.mean(jnp.stack([
        reinforce_loss(_logp(p0, feats_GN3[g]),
                       shaped_advantages(out.A_GN[g], _logp(p0, feats_GN3[g]), base_GN[g], 0.1))
        for g in (0, 2)]))
    np.testing.assert_allclose(only_valid, two_groups, rtol=1e-5)
    none_valid = jnp.zeros(3, bool)
    assert float(loss(p0, none_valid)) == 0.0
    assert np.all(np.asarray(jax.grad(loss)(p0, none_valid)) == 0.0)


# ---- the update's per-row, per-token loss ----------------------------------------------------
def _token_case(seed=3):
    """G=2 groups x N=3 actions of ragged lengths, plus 2 mesh-padding rows; per-token logp."""
    rng = np.random.default_rng(seed)
    R, W = 8, 5
    mask_RW = (np.arange(W)[None, :] < np.array([2, 5, 3, 1, 4, 2, 0, 0])[:, None]).astype(np.float32)
    theta_RW = jnp.asarray(-rng.random((R, W)) * 3, jnp.float32)
    base_RW = jnp.asarray(-rng.random((R, W)) * 3, jnp.float32)
    rewards_GN = jnp.asarray(rng.random((2, 3)), jnp.float32)
    adv = group_advantages(rewards_GN, LN2)
    rows = row_weights(adv, R)
    return theta_RW, base_RW, jnp.asarray(mask_RW), adv, rows


def test_sequence_shaping_equals_the_grouped_reinforce_loss():
    """Per-row weights 1/(G·N) with sequence shaping == grouped_reinforce_loss, value and gradient."""
    theta_RW, base_RW, mask_RW, adv, rows = _token_case()

    def per_row(t):
        return shaped_reinforce_loss(t, base_RW, mask_RW, rows["adv"], rows["weight"], 0.3)[0]

    def grouped(t):
        seq_GN = jnp.sum(t * mask_RW, -1)[:6].reshape(2, 3)
        base_GN = jnp.sum(base_RW * mask_RW, -1)[:6].reshape(2, 3)
        return grouped_reinforce_loss(seq_GN, base_GN, adv.A_GN, adv.valid_G, 0.3)

    np.testing.assert_allclose(per_row(theta_RW), grouped(theta_RW), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(per_row)(theta_RW), jax.grad(grouped)(theta_RW),
                               rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(jax.grad(per_row)(theta_RW))[6:] == 0.0)  # padding rows


def test_per_token_centered_shaping():
    """Token t's weight is A − λ(r_t − r̄): λ = 0 gives the sequence loss; a log-ratio shifted by
    the same constant on every token changes nothing; the gradient is Σ_t Â_t ∇ log π_t."""
    theta_RW, base_RW, mask_RW, _, rows = _token_case()

    def loss(t, base, lam, shaping):
        return shaped_reinforce_loss(t, base, mask_RW, rows["adv"], rows["weight"], lam, shaping)[0]

    np.testing.assert_allclose(loss(theta_RW, base_RW, 0.0, "per_token_centered"),
                               loss(theta_RW, base_RW, 0.0, "sequence"), rtol=1e-6)
    np.testing.assert_allclose(loss(theta_RW, base_RW, 0.5, "per_token_centered"),
                               loss(theta_RW, base_RW + 0.7, 0.5, "per_token_centered"), rtol=1e-5)
    g = jax.grad(loss)(theta_RW, base_RW, 0.5, "per_token_centered")
    r_RW = np.asarray((theta_RW - base_RW) * mask_RW)
    live = np.asarray(mask_RW) * (rows["weight"] > 0)[:, None]
    r_bar = (r_RW * live).sum() / live.sum()
    want = -rows["weight"][:, None] * (rows["adv"][:, None] - 0.5 * (r_RW - r_bar)) * np.asarray(mask_RW)
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)


def test_importance_weights_are_truncated_ratios():
    theta_RW, base_RW, mask_RW, _, rows = _token_case()

    def loss(log_q):
        return shaped_reinforce_loss(theta_RW, base_RW, mask_RW, rows["adv"], rows["weight"], 0.0,
                                     log_q_BW=log_q)[0]

    plain = shaped_reinforce_loss(theta_RW, base_RW, mask_RW, rows["adv"], rows["weight"], 0.0)[0]
    np.testing.assert_allclose(loss(theta_RW), plain, rtol=1e-6)  # q = π: weight 1
    half = loss(theta_RW + jnp.log(2.0) / mask_RW.sum(-1, keepdims=True).clip(1))  # q(a) = 2π(a)
    np.testing.assert_allclose(half, 0.5 * plain, rtol=1e-5)
    np.testing.assert_allclose(loss(theta_RW - 5.0), plain, rtol=1e-6)  # π/q > 1 is clipped at 1
    # the truncated sampler's log q: tokens outside the nucleus are never drawn (log q ~ -69)
    logits = jnp.log(jnp.asarray([[[0.6, 0.3, 0.1]]]))
    lq = sampler_logprobs(logits, jnp.asarray([[0]]), 1.0, 0.8, 0)
    np.testing.assert_allclose(lq, np.log(0.6 / 0.9), rtol=1e-5)
    assert float(sampler_logprobs(logits, jnp.asarray([[2]]), 1.0, 0.8, 0)[0, 0]) < -60


# ---- archive + PUCT ----------------------------------------------------------------------
def puct(archive: Archive, node_id: int, c: float) -> float:
    """The handoff score, written out independently."""
    nodes = list(archive)
    rewards = [n.reward for n in nodes]
    size = len(nodes)
    ranks = {n.id: sum(r > n.reward for r in rewards) for n in nodes}
    total = sum(size - ranks[n.id] for n in nodes)
    node = archive.get(node_id)
    q = node.m if node.n > 0 else node.reward
    scale = max(max(rewards) - min(rewards), 1e-6)
    prior = (size - ranks[node_id]) / total
    return q + c * scale * prior * math.sqrt(1 + archive.total_expansions / (1 + node.n))


def test_puct_prefers_higher_reward_without_expansions():
    arc = Archive()
    a = arc.add_seed("a", 0.5)
    b = arc.add_seed("b", 0.4)
    assert arc.priors() == pytest.approx({a: 2 / 3, b: 1 / 3})
    assert arc.select(c=1.0).id == a


def test_puct_explored_good_child_vs_unexplored_high_prior():
    arc = Archive()
    a = arc.add_seed("a", 0.5)
    b = arc.add_seed("b", 0.6)
    arc.update_after_expand(a, [0.95, 0.2])  # a's rollouts found 0.95 (not archived)
    assert arc.get(a).q == 0.95 and arc.total_expansions == 1
    # small c: exploitation of a's good child wins
    assert arc.select(c=1.0).id == a
    # large c: the unexplored, higher-prior b wins
    assert arc.select(c=20.0).id == b
    for c in (1.0, 5.0, 20.0):
        scores = arc.scores(c)
        for node in arc:
            assert scores[node.id] == pytest.approx(puct(arc, node.id, c))


def test_puct_expanded_with_bad_children_loses():
    arc = Archive()
    a = arc.add_seed("a", 0.9)
    b = arc.add_seed("b", 0.5)
    arc.update_after_expand(a, [0.1, 0.05])
    assert arc.select(c=0.0).id == b


def test_update_propagates_to_ancestors():
    arc = Archive()
    s0 = arc.add_seed("s0", 0.1)
    c1 = arc.add_child(s0, "c1", 0.3, step=1)
    c2 = arc.add_child(c1, "c2", 0.5, step=2)
    other = arc.add_seed("other", 0.0)
    arc.update_after_expand(c2, [0.2, 0.7])
    assert [arc.get(i).n for i in (s0, c1, c2, other)] == [1, 1, 1, 0]
    assert [arc.get(i).m for i in (s0, c1, c2)] == [0.7, 0.7, 0.7] and arc.get(other).m is None
    arc.update_after_expand(c1, [0.4])
    assert [arc.get(i).n for i in (s0, c1, c2)] == [2, 2, 1]
    assert arc.get(c1).m == 0.7  # m is a running max
    assert arc.total_expansions == 2
    assert arc.get(s0).children == [c1] and arc.get(c1).children == [c2]
    with pytest.raises(KeyError):
        arc.update_after_expand(999, [1.0])


def test_eviction_keeps_seeds_and_internal_nodes():
    arc = Archive(max_size=4)
    s0 = arc.add_seed("s0", 0.0)
    s1 = arc.add_seed("s1", -1.0)
    low = arc.add_child(s0, "low", 0.1, step=1)
    arc.add_child(low, "kid", 0.8, step=2)  # `low` is now internal
    mid = arc.add_child(s0, "mid", 0.5, step=3)  # 5 nodes: the lowest non-seed leaf is `mid`
    assert mid not in arc and len(arc) == 4
    assert {s0, s1, low} <= {n.id for n in arc}
    hi = arc.add_child(s0, "hi", 0.9, step=4)  # evicts `kid` (0.8): `low` is a leaf again
    assert hi in arc and arc.lookup("kid") is None and arc.get(low).children == []
    assert arc.best().id == hi
    # only seeds can remain when the archive is tiny
    tiny = Archive(max_size=1)
    a = tiny.add_seed("a", 0.0)
    b = tiny.add_seed("b", 0.0)
    tiny.add_child(a, "c", 1.0, step=1)
    assert {n.id for n in tiny} == {a, b}


def test_add_top_children_dedupes_and_keeps_top_k():
    arc = Archive()
    s0 = arc.add_seed("s0", 0.0)
    states = ["x", "y", "x", "", "z", "s0", "w"]
    rewards = [0.5, 0.9, 0.5, 1.0, 0.2, 0.99, 0.7]
    ids = arc.add_top_children(s0, states, rewards, k=2, step=1)
    assert [arc.get(i).state for i in ids] == ["y", "w"]
    assert all(arc.get(i).parent == s0 and arc.get(i).step == 1 for i in ids)
    again = arc.add_top_children(s0, ["y", "v"], [0.9, 0.1], k=2, step=2)
    assert [arc.get(i).state for i in again] == ["v"]


def test_archive_json_round_trip():
    arc = Archive(max_size=10)
    s0 = arc.add_seed("seed", 0.2)
    kids = arc.add_top_children(s0, ["p", "q", "r"], [0.3, 0.6, 0.1], k=3, step=1)
    arc.update_after_expand(s0, [0.3, 0.6, 0.1])
    arc.update_after_expand(kids[0], [0.8])
    text = json.dumps(arc.to_json())
    back = Archive.from_json(json.loads(text))
    assert back.to_json() == arc.to_json()
    assert back.select(c=2.0).id == arc.select(c=2.0).id
    assert back.lookup("q").id == arc.lookup("q").id
    new = back.add_child(s0, "s", 0.5, step=2)
    assert new == max(n.id for n in arc) + 1  # ids keep counting after a reload
    assert Archive.from_json(text).to_json() == arc.to_json()
