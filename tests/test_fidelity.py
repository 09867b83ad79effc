"""Settings of the official TTT-Discover / SDFT code: beta search up to 1e6 by bracket doubling,
the official PUCT variant (hand-computed scores), peft's LoRA A initialisation, and the
official presets."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxttt import config as C
from jaxttt.discover.archive import Archive
from jaxttt.discover.objective import group_advantages, kl_to_uniform, solve_beta
from jaxttt.model.lora import peft_a_init

# N = 2 rewards {0, d}: q_beta = (1 - p, p) with p = sigmoid(beta d). Choosing p = 0.9 gives
# gamma = log 2 - H(0.9, 0.1) and beta d = log 9 exactly.
GAMMA_09 = math.log(2.0) + 0.9 * math.log(0.9) + 0.1 * math.log(0.1)


@pytest.mark.parametrize("spread", [100.0, 1.0, 1e-2, 1e-4])
def test_beta_matches_the_closed_form_at_every_scale(spread):
    beta = float(solve_beta(jnp.array([0.0, spread]), GAMMA_09))
    assert beta == pytest.approx(math.log(9.0) / spread, rel=1e-5)


def test_beta_above_the_old_cap_and_capped_at_beta_max():
    beta = float(solve_beta(jnp.array([0.0, 1e-4]), GAMMA_09))
    assert beta > 1e3  # the old [0, 1e3] bisection returned 1e3 here: q far flatter than asked
    assert float(kl_to_uniform(jnp.array([0.0, 1e-4]), beta)) == pytest.approx(GAMMA_09, rel=1e-4)
    assert float(solve_beta(jnp.array([0.0, 1e-9]), GAMMA_09)) == 1e6  # needs 2.2e9: capped
    assert float(solve_beta(jnp.array([0.0, 1e-4]), GAMMA_09, beta_max=5e3)) == 5e3
    assert float(solve_beta(jnp.array([0.0, 1.0, 1.0]), 5.0)) == 1e6  # gamma > log 3 - log 2
    assert float(solve_beta(jnp.array([0.5, 0.5, 0.5]), GAMMA_09)) == 0.0
    g = group_advantages(jnp.array([[0.0, 1e-4], [0.0, 1.0]]), GAMMA_09)
    np.testing.assert_allclose(np.asarray(g.beta_G), [math.log(9) * 1e4, math.log(9)], rtol=1e-5)


def _tree(variant: str) -> tuple[Archive, dict[str, int]]:
    """s0 (R 0) expanded by rollouts [0.2, 0.5, failed]; children a (0.5), b (0.2); a expanded
    by [0.9, 0.1]; grandchild c (0.9) under a."""
    arc = Archive(10, variant=variant)
    s0 = arc.add_seed("s0", 0.0)
    arc.update_after_expand(s0, [0.2, 0.5, 0.0], failed=[False, False, True])
    a = arc.add_child(s0, "a", 0.5, step=1)
    b = arc.add_child(s0, "b", 0.2, step=1)
    arc.update_after_expand(a, [0.9, 0.1], failed=[False, False])
    c = arc.add_child(a, "c", 0.9, step=2)
    return arc, {"s0": s0, "a": a, "b": b, "c": c}


def test_official_puct_counts_rollouts_and_updates_the_direct_parent_only():
    arc, ids = _tree("official")
    node = {k: arc.get(v) for k, v in ids.items()}
    assert arc.total_expansions == 5  # 3 + 2 rollouts (the failed one counted)
    assert (node["s0"].n, node["a"].n, node["b"].n, node["c"].n) == (5, 2, 0, 0)
    assert node["s0"].m == 0.5 and node["a"].m == 0.9  # 0.9 did not propagate to s0
    # scale over non-initial states: 0.9 - 0.2; P = (4 - rank) / 10: c .4, a .3, b .2, s0 .1
    r6 = math.sqrt(6.0)
    want = {"s0": 0.5 + 0.7 * 0.1 * r6 / 6, "a": 0.9 + 0.7 * 0.3 * r6 / 3,
            "b": 0.2 + 0.7 * 0.2 * r6, "c": 0.9 + 0.7 * 0.4 * r6}
    scores = arc.scores(1.0)
    for k, v in want.items():
        assert scores[ids[k]] == pytest.approx(v, rel=1e-12), k
    assert arc.select(1.0).id == ids["c"]


def test_official_failed_rollouts_only_add_visits():
    arc, ids = _tree("official")
    arc.update_after_expand(ids["b"], [0.0, 0.0], failed=[True, True])
    b, s0 = arc.get(ids["b"]), arc.get(ids["s0"])
    assert (b.n, b.m, b.q, s0.n, arc.total_expansions) == (2, None, 0.2, 7, 7)


def test_handoff_puct_unchanged():
    arc, ids = _tree("handoff")
    s0, a = arc.get(ids["s0"]), arc.get(ids["a"])
    assert arc.total_expansions == 2 and (s0.n, a.n) == (2, 1)
    assert s0.m == 0.9 and a.m == 0.9  # best child reward on every ancestor
    scale, T = 0.9 - 0.0, 2  # over all states
    assert arc.scores(1.0)[ids["b"]] == pytest.approx(0.2 + scale * 0.2 * math.sqrt(1 + T))


def test_archive_variant_round_trips_and_is_checked():
    arc, _ = _tree("official")
    again = Archive.from_json(arc.to_json())
    assert again.variant == "official" and again.scores(1.0) == arc.scores(1.0)
    with pytest.raises(ValueError, match="handoff|official"):
        Archive(3, variant="alphazero")
    with pytest.raises(C.ConfigError, match="puct_variant"):
        C.load(C.DiscoverConfig, None, ["puct_variant=alphazero"])


def test_lora_a_like_peft():
    """kaiming_uniform(a=sqrt(5)) on [r, d_in] = U(-1/sqrt(d_in), 1/sqrt(d_in)), var 1/(3 d_in)."""
    d_in, r = 512, 64
    a = np.asarray(peft_a_init()(jax.random.key(0), (d_in, r), jnp.float32))
    bound = 1.0 / math.sqrt(d_in)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
    assert a.var() == pytest.approx(1.0 / (3 * d_in), rel=0.03)
    assert abs(a.mean()) < 0.01 * bound


def test_official_presets_load():
    d = C.load(C.DiscoverConfig, "discover/official.yaml")
    assert (d.lora.rank, d.rollouts, d.optim.lr, d.optim.b2, d.kl_lambda, d.puct_c) == \
        (32, 8, 4e-5, 0.95, 0.0, 1.0)
    assert (d.puct_variant, d.beta_max, d.kl_shaping, d.rollout_policy) == \
        ("official", 1e6, "per_token_centered", "untruncated")
    s = C.load(C.SDFTConfig, "sdft/paper_code.yaml")
    assert (s.kl_direction, s.ema_decay, s.skip_loss_tokens) == ("forward", 0.99, 3)
    assert (s.optim.lr, s.optim.schedule, s.optim.warmup_steps, s.optim.warmup_frac) == \
        (2e-5, "cosine", -1, 0.1)
    for name in ("discover/default.yaml", "discover/tiny.yaml"):
        assert C.load(C.DiscoverConfig, name).puct_variant == "handoff"  # the handoff's stay
    for name in ("sdft/default.yaml", "sdft/tiny.yaml"):
        assert C.load(C.SDFTConfig, name).kl_direction == "reverse"
