"""Entropic objective pieces (handoff §2-§6, A3, A4, F5, F6), jit-compiled.

Per group of N rollouts from one start state:
  beta   : KL(q_beta || uniform) = gamma, q_beta(n) ∝ exp(beta r_n)          (adaptive beta)
  A_n    : w_n / Z_{-n} - 1, w_n = exp(beta (r_n - r_max)),
           Z_{-n} = (sum_m w_m - w_n) / (N - 1)                          (leave-one-out)
  shaped : A_n - lambda (log pi_theta(a_n) - log pi_theta0(a_n))          (KL shaping)
  loss   : -mean_n(stop_gradient(A_n) * log pi_theta(a_n))                (REINFORCE)
Grouped versions take rewards [G, N]. Groups whose rewards are all equal carry no preference
signal (their LOO advantage is exactly 0); like the official code we drop them from the loss
entirely (KL term included) unless told otherwise.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


def kl_to_uniform(rewards_N: jax.Array, beta: jax.Array) -> jax.Array:
    """KL(q_beta || u) = sum_n q_n (log q_n + log N) = log N - H(q_beta)."""
    logits_N = beta * (rewards_N - jnp.max(rewards_N))
    logq_N = jax.nn.log_softmax(logits_N)
    return jnp.sum(jnp.exp(logq_N) * (logq_N + jnp.log(rewards_N.shape[-1])))


BETA_MAX = 1e6  # the official code's cap: beta ~ 1/spread, so 1e3 capped spreads below ~1e-3


@functools.partial(jax.jit, static_argnames=("iters",))
def solve_beta(rewards_N: jax.Array, gamma: float, *, beta_max: float = BETA_MAX,
               iters: int = 60) -> jax.Array:
    """beta with KL(q_beta || u) = gamma (KL is increasing in beta), as the official code:
    a bracket [hi/2, hi] found by doubling hi from 1 (capped at beta_max), then bisection in it
    (relative precision 2^-iters at any scale, where bisection on [0, beta_max] loses the
    small betas of large reward spreads).

    All rewards equal: 0 (no beta reaches gamma and none is needed). gamma above the reachable
    sup (log N minus the log of the number of tied best rewards): beta_max.
    """
    rewards_N = jnp.asarray(rewards_N, jnp.float32)
    beta_max = jnp.float32(beta_max)

    def too_small(beta):
        return kl_to_uniform(rewards_N, beta) < gamma

    def grow(hi):
        return jnp.minimum(2.0 * hi, beta_max)

    hi = jax.lax.while_loop(lambda hi: too_small(hi) & (hi < beta_max), grow,
                            jnp.minimum(jnp.float32(1.0), beta_max))
    lo = jnp.where(hi > 1.0, 0.5 * hi, 0.0)  # KL(lo) < gamma <= KL(hi) unless capped

    def body(_, lo_hi):
        lo, hi = lo_hi
        mid = 0.5 * (lo + hi)
        below = too_small(mid)
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, body, (lo, hi))
    beta = 0.5 * (lo + hi)
    beta = jnp.where(too_small(beta_max), beta_max, beta)
    all_equal = jnp.max(rewards_N) == jnp.min(rewards_N)
    return jnp.where(all_equal, jnp.float32(0.0), beta)


@functools.partial(jax.jit, static_argnames=("max_ratio",))
def loo_advantages(rewards_N: jax.Array, beta: jax.Array, *, max_ratio: float = 1e6) -> jax.Array:
    """A_n = w_n / Z_{-n} - 1 (handoff §6). Z_{-n} is summed over m != n directly (no
    cancellation in sum(w) - w_n). All-equal rewards give exactly 0. `max_ratio` caps
    w_n / Z_{-n} when every other weight underflows (only with a clamped, huge beta)."""
    rewards_N = jnp.asarray(rewards_N, jnp.float32)
    N = rewards_N.shape[-1]
    if N < 2:
        return jnp.zeros_like(rewards_N)
    w_N = jnp.exp(beta * (rewards_N - jnp.max(rewards_N)))
    # Elementwise sum rather than a matmul: TPU matmuls default to bf16 inputs.
    others_NN = jnp.where(jnp.eye(N, dtype=bool), 0.0, w_N[None, :])
    z_N = jnp.sum(others_NN, axis=1) / (N - 1)
    return jnp.minimum(w_N / z_N, max_ratio) - 1.0


def shaped_advantages(A_N: jax.Array, logp_theta_N: jax.Array, logp_base_N: jax.Array,
                      kl_lambda: float) -> jax.Array:
    """A_n - lambda (log pi_theta - log pi_theta0), a constant weight for the gradient step."""
    log_ratio_N = jax.lax.stop_gradient(logp_theta_N - logp_base_N)
    return jax.lax.stop_gradient(A_N) - kl_lambda * log_ratio_N


def reinforce_loss(logp_theta_N: jax.Array, advantages_N: jax.Array) -> jax.Array:
    """-mean(stop_gradient(A) * log pi_theta)."""
    return -jnp.mean(jax.lax.stop_gradient(advantages_N) * logp_theta_N)


class GroupAdvantages(NamedTuple):
    A_GN: jax.Array  # leave-one-out entropic advantages (before KL shaping)
    beta_G: jax.Array
    valid_G: jax.Array  # bool: the group has a reward spread (or drop_equal is off)


@functools.partial(jax.jit, static_argnames=("iters", "drop_equal", "max_ratio"))
def group_advantages(rewards_GN: jax.Array, gamma: float, *, beta: float | None = None,
                     beta_max: float = BETA_MAX, iters: int = 60, drop_equal: bool = True,
                     max_ratio: float = 1e6) -> GroupAdvantages:
    """Per-group beta (adaptive, or the fixed `beta`) and LOO advantages for rewards [G, N]."""
    rewards_GN = jnp.asarray(rewards_GN, jnp.float32)
    if beta is None:
        beta_G = jax.vmap(lambda r_N: solve_beta(r_N, gamma, beta_max=beta_max, iters=iters))(rewards_GN)
    else:
        beta_G = jnp.full(rewards_GN.shape[:1], beta, jnp.float32)
    A_GN = jax.vmap(lambda r_N, b: loo_advantages(r_N, b, max_ratio=max_ratio))(rewards_GN, beta_G)
    spread_G = jnp.max(rewards_GN, axis=1) > jnp.min(rewards_GN, axis=1)
    valid_G = spread_G if drop_equal else jnp.ones_like(spread_G)
    return GroupAdvantages(A_GN, beta_G, valid_G)


def grouped_reinforce_loss(logp_theta_GN: jax.Array, logp_base_GN: jax.Array, A_GN: jax.Array,
                           valid_G: jax.Array, kl_lambda: float) -> jax.Array:
    """Mean over valid groups of the per-group REINFORCE loss with KL-shaped advantages;
    0 (with zero gradient) when no group is valid."""
    shaped_GN = jax.vmap(shaped_advantages, in_axes=(0, 0, 0, None))(A_GN, logp_theta_GN,
                                                                     logp_base_GN, kl_lambda)
    loss_G = jax.vmap(reinforce_loss)(logp_theta_GN, shaped_GN)
    mask_G = valid_G.astype(loss_G.dtype)
    return jnp.sum(jnp.where(valid_G, loss_G, 0.0)) / jnp.maximum(jnp.sum(mask_G), 1.0)
