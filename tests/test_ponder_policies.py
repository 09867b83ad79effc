"""PonderTTT policies and statistics: PID rate control, GAE, PPO's clipped objective, oracles."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxttt.ponder import policies as P
from jaxttt.ponder import stats
from jaxttt.ponder.ppo import gae, ppo_loss


def _drifting_signal(n=3000, seed=0):
    """Log-normal noise on a level that doubles and swings: a fixed threshold would miss."""
    rng = np.random.default_rng(seed)
    level = 1.0 + np.linspace(0, 1, n) + 0.5 * np.sin(np.linspace(0, 6 * np.pi, n))
    return level * np.exp(0.3 * rng.standard_normal(n))


@pytest.mark.parametrize("lag", [0, 1])
@pytest.mark.parametrize("target", [0.2, 0.5])
def test_pid_controller_drives_the_realised_rate_to_the_target(target, lag):
    s = _drifting_signal()
    actions, thr = P.ThresholdGate(target, calib=32, lag=lag).run(s)
    rate = (actions[500:] > 0).mean()
    assert abs(rate - target) < 0.03, rate
    # without the controller the calibrated threshold drifts away from the target
    frozen, _ = P.ThresholdGate(target, calib=32, kp=0, ki=0, kd=0, lag=lag).run(s)
    assert abs((frozen[500:] > 0).mean() - target) > 0.15
    assert np.all(np.isfinite(thr[1 + lag:]))


def test_lag1_gate_never_looks_at_the_current_chunk():
    s = _drifting_signal(400)
    a, _ = P.ThresholdGate(0.5, calib=16, lag=1).run(s)
    s2 = s.copy()
    s2[200] = 1e9  # only chunk 200's own signal changes
    b, _ = P.ThresholdGate(0.5, calib=16, lag=1).run(s2)
    assert np.array_equal(a[:201], b[:201]) and b[201] == 1


def test_pid_terms_by_hand():
    pid = P.PID(0.1, 0.01, 0.01)
    assert pid(2.0) == pytest.approx(0.1 * 2 + 0.01 * 2 + 0.0)
    assert pid(1.0) == pytest.approx(0.1 * 1 + 0.01 * 3 + 0.01 * (1 - 2))


def test_gae_against_hand_computation():
    r = np.array([[1.0, 0.0, 2.0]], np.float32)
    v = np.array([[0.5, 1.0, 0.0]], np.float32)
    g, lam = 0.9, 0.8
    d2 = 2.0 - 0.0
    d1 = 0.0 + g * 0.0 - 1.0
    d0 = 1.0 + g * 1.0 - 0.5
    a2, a1 = d2, d1 + g * lam * d2
    a0 = d0 + g * lam * a1
    adv, ret = gae(r, v, g, lam)
    np.testing.assert_allclose(adv[0], [a0, a1, a2], rtol=1e-6)
    np.testing.assert_allclose(ret[0], [a0 + 0.5, a1 + 1.0, a2], rtol=1e-6)
    # lambda = 1 gives discounted Monte-Carlo returns
    _, ret1 = gae(r, v, g, 1.0)
    np.testing.assert_allclose(ret1[0], [1 + g * 0 + g * g * 2, 0 + g * 2, 2], rtol=1e-6)


def test_ppo_clipped_objective_against_hand_cases():
    # ratios 1.5 (A>0: clipped to 1.2), 0.5 (A>0: unclipped 0.5), 1.5 (A<0: unclipped, -1.5),
    # 0.5 (A<0: clipped to 0.8 -> -0.8)
    ratio = np.array([1.5, 0.5, 1.5, 0.5])
    adv = jnp.array([1.0, 1.0, -1.0, -1.0])
    logp_old = jnp.zeros(4)
    logp_new = jnp.log(jnp.asarray(ratio))
    values, returns = jnp.array([0.0, 1.0, 2.0, 3.0]), jnp.array([1.0, 1.0, 0.0, 3.0])
    ent = jnp.array([0.5, 0.5, 0.5, 0.5])
    total, (pol, val, e) = ppo_loss(logp_new, logp_old, adv, values, returns, ent, clip=0.2,
                                    value_coef=0.5, entropy_coef=0.01)
    want_pol = -np.mean([1.2, 0.5, -1.5, -0.8])
    want_val = np.mean([1.0, 0.0, 4.0, 0.0])
    assert float(pol) == pytest.approx(want_pol, rel=1e-6)
    assert float(val) == pytest.approx(want_val, rel=1e-6)
    assert float(total) == pytest.approx(want_pol + 0.5 * want_val - 0.01 * 0.5, rel=1e-6)


def test_oracles_lower_bound_the_methods_on_the_same_chunks():
    rng = np.random.default_rng(0)
    C = 200
    skip = 2.0 + rng.random(C)
    losses = np.stack([skip, skip - rng.normal(0.05, 0.1, C), skip - rng.normal(0.08, 0.15, C),
                       skip - rng.normal(0.1, 0.2, C)], 1)
    pick = lambda a: losses[np.arange(C), a].mean()  # noqa: E731
    best = pick(P.oracle_best(losses))
    gate, _ = P.ThresholdGate(0.4, calib=8).run(rng.random(C))
    rate = (gate > 0).mean()
    methods = [P.fixed(C, a) for a in range(4)] + [gate, P.random_rate(C, rate, 1, 0)]
    for acts in methods:
        assert best <= pick(acts) + 1e-12
    top = pick(P.oracle_top(losses, rate, 1))
    for acts in (gate, P.random_rate(C, rate, 1, 1), P.random_rate(C, rate, 1, 2)):
        if (acts > 0).mean() <= rate:  # same action, no more updates than the oracle
            assert top <= pick(acts) + 1e-12
    assert top < pick(P.fixed(C, 0))  # and it does gain


def test_recovery_iqm_and_bootstrap():
    assert stats.recovery(2.324, 1.977, 1.935) == pytest.approx(0.892, abs=1e-3)
    assert stats.iqm([1, 2, 3, 4, 100, -100, 2.5, 2.5]) == pytest.approx(np.mean([2, 2.5, 2.5, 3]))
    rng = np.random.default_rng(0)
    data = [rng.normal(1.0, 1.0, 400) for _ in range(3)]
    lo, hi = stats.bootstrap_ci(data, n=500)
    assert lo < 1.0 < hi and hi - lo < 0.4
    assert stats.pareto_front([1, 2, 3, 2], [3, 2, 2.5, 4]) == [0, 1]


def test_episode_state_is_32d_and_the_budget_mask_is_hard():
    from jaxttt.ponder.ppo import N_FEATURES, ChunkTable, Episodes

    rng = np.random.default_rng(0)
    C, L = 40, 8
    table = ChunkTable(rng.random((C, 4)), rng.standard_normal((C, 26)).astype(np.float32), None)
    env = Episodes(table, np.array([0, 10, 20]), L, budget=2.0)
    spent = np.zeros(3)
    for _ in range(L):
        s, mask = env.state(lag=1)
        assert s.shape == (3, 32) == (3, N_FEATURES) and mask[:, 0].all()
        a = np.array([np.flatnonzero(m).max() for m in mask])  # greediest allowed action
        spent += env.act(a)[1]
    assert np.all(spent <= 2.0 * L + 1e-6) and np.all(spent >= 2.0 * L - 11)


def test_paired_bootstrap_is_tighter_than_unpaired_on_correlated_columns():
    rng = np.random.default_rng(1)
    base = [rng.normal(4.0, 1.0, 300) for _ in range(3)]
    cols = [np.stack([b, b - 0.02 + rng.normal(0, 0.01, b.shape)], -1) for b in base]
    lo, hi = stats.paired_bootstrap_ci(cols, lambda v: v[1] - v[0], n=400)
    assert lo < -0.02 < hi and hi - lo < 0.01
