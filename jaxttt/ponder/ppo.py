"""The seeds' budgeted policy: PPO with a PID-Lagrangian cost multiplier over 32-D chunk features.

Environment: an episode is L consecutive chunks of a stream with a budget of `budget * L`
nominal cost. The state of chunk c holds its 26 label-free features, 2 position features and
4 history features (EMAs of the signal, realised loss and cost; remaining budget). Actions
that would leave too little budget to SKIP every remaining chunk are masked (hard budget).
Reward = reward_scale * (loss_SKIP - loss_action) - lambda * cost, where lambda is the PID
output on (mean cost per chunk - budget) of the last iteration's episodes, clipped at 0.
Because chunks are independent fast-weight episodes, the per-chunk losses of all actions are
precomputed (ChunkRunner.score) and rollouts are table look-ups.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxttt.ponder.actions import N_STATIC, SIGNAL_FEATURE
from jaxttt.ponder.config import NOMINAL_COST, PonderEvalConfig
from jaxttt.ponder.policies import PID

N_FEATURES = N_STATIC + 6  # = 32
COST_A = np.asarray(NOMINAL_COST, np.float32)
HIST_EMA = 0.1


# --------------------------------------------------------------------------------------------
# Maths: GAE and the clipped objective
# --------------------------------------------------------------------------------------------
def gae(rewards_ET: np.ndarray, values_ET: np.ndarray, gamma: float, lam: float):
    """(advantages, returns) [E,T] for episodes that end after T steps (bootstrap value 0)."""
    E, T = rewards_ET.shape
    adv = np.zeros((E, T), np.float32)
    last = np.zeros(E, np.float32)
    for t in reversed(range(T)):
        next_v = values_ET[:, t + 1] if t + 1 < T else 0.0
        delta = rewards_ET[:, t] + gamma * next_v - values_ET[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    return adv, adv + values_ET


def ppo_loss(logp_new, logp_old, adv, values, returns, entropy, *, clip: float,
             value_coef: float, entropy_coef: float):
    """(total, (policy, value, entropy)): -E[min(r A, clip(r) A)] + c_v E[(V-R)^2] - c_e E[H]."""
    ratio = jnp.exp(logp_new - logp_old)
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - clip, 1 + clip) * adv)
    policy = -jnp.mean(surrogate)
    value = jnp.mean(jnp.square(values - returns))
    ent = jnp.mean(entropy)
    return policy + value_coef * value - entropy_coef * ent, (policy, value, ent)


# --------------------------------------------------------------------------------------------
# Network (plain pytrees: a 2-layer tanh MLP with policy and value heads)
# --------------------------------------------------------------------------------------------
def init_net(key, n_in: int, hidden: int, n_actions: int) -> dict:
    k = jax.random.split(key, 4)
    dense = lambda kk, i, o, s: (jax.random.normal(kk, (i, o)) * s / np.sqrt(i),  # noqa: E731
                                 jnp.zeros(o))
    return {"l1": dense(k[0], n_in, hidden, 1.0), "l2": dense(k[1], hidden, hidden, 1.0),
            "pi": dense(k[2], hidden, n_actions, 0.01), "v": dense(k[3], hidden, 1, 1.0)}


def forward(net: dict, s_NF, mask_NA):
    """(masked log-probs [N,A], value [N])."""
    h = jnp.tanh(s_NF @ net["l1"][0] + net["l1"][1])
    h = jnp.tanh(h @ net["l2"][0] + net["l2"][1])
    logits = jnp.where(mask_NA, h @ net["pi"][0] + net["pi"][1], -1e9)
    return jax.nn.log_softmax(logits), (h @ net["v"][0] + net["v"][1])[:, 0]


_forward = jax.jit(forward)


@functools.partial(jax.jit, static_argnames=("tx", "clip", "value_coef", "entropy_coef"))
def _update(net, opt, batch, *, tx, clip, value_coef, entropy_coef):
    def loss_fn(net_):
        logp, v = forward(net_, batch["s"], batch["mask"])
        logp_a = jnp.take_along_axis(logp, batch["a"][:, None], 1)[:, 0]
        ent = -jnp.sum(jnp.where(batch["mask"], jnp.exp(logp) * logp, 0.0), -1)
        return ppo_loss(logp_a, batch["logp"], batch["adv"], v, batch["ret"], ent, clip=clip,
                        value_coef=value_coef, entropy_coef=entropy_coef)

    (loss, parts), g = jax.value_and_grad(loss_fn, has_aux=True)(net)
    upd, opt = tx.update(g, opt, net)
    return optax.apply_updates(net, upd), opt, loss


# --------------------------------------------------------------------------------------------
# Environment over a table of chunks
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ChunkTable:
    losses_CA: np.ndarray  # NLL of each chunk under each action
    features_CF: np.ndarray  # [C, N_STATIC] label-free features (normalised by `normalise`)
    signal_C: np.ndarray  # reconstruction signal (also in features; kept for the history EMA)


def normalise(train: np.ndarray, *others: np.ndarray):
    mu, sd = train.mean(0), train.std(0) + 1e-6
    return [(x - mu) / sd for x in (train, *others)]


class Episodes:
    """E parallel episodes of L consecutive chunks starting at `starts` (vectorised numpy)."""

    def __init__(self, table: ChunkTable, starts: np.ndarray, L: int, budget: float):
        self.t, self.idx0, self.L, self.E = table, np.asarray(starts), L, len(starts)
        self.step, self.remaining = 0, np.full(self.E, budget * L, np.float32)
        self.ema_sig = np.zeros(self.E, np.float32)
        self.ema_loss = np.zeros(self.E, np.float32)
        self.ema_cost = np.ones(self.E, np.float32)
        self.total = budget * L

    def chunks(self) -> np.ndarray:
        return self.idx0 + self.step

    def state(self, lag: int = 0) -> tuple[np.ndarray, np.ndarray]:
        c = self.chunks() - lag  # lag 1: only the previous chunk of the stream (zeros before it)
        feats = np.where((c >= 0)[:, None], self.t.features_CF[np.maximum(c, 0)], 0.0)
        pos = np.full(self.E, self.step / self.L, np.float32)
        hist = np.stack([self.ema_sig, self.ema_loss, self.ema_cost / COST_A[-1],
                         self.remaining / self.total], -1)
        s = np.concatenate([feats, pos[:, None], 1.0 - pos[:, None], hist], -1)  # 26 + 2 + 4
        left_after = self.L - self.step - 1  # chunks after this one, each costs >= SKIP
        mask = (COST_A[None, :] + left_after * COST_A[0]) <= self.remaining[:, None] + 1e-6
        return s.astype(np.float32), mask

    def act(self, a_E: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(gain [E] = loss_SKIP - loss_a, cost [E]); advances every episode one chunk."""
        c = self.chunks()
        loss = self.t.losses_CA[c, a_E]
        gain = self.t.losses_CA[c, 0] - loss
        cost = COST_A[a_E]
        self.remaining -= cost
        k = HIST_EMA
        self.ema_sig = (1 - k) * self.ema_sig + k * self.t.features_CF[c, SIGNAL_FEATURE]
        self.ema_loss = (1 - k) * self.ema_loss + k * loss
        self.ema_cost = (1 - k) * self.ema_cost + k * cost
        self.step += 1
        return gain, cost


# --------------------------------------------------------------------------------------------
# Training and deployment
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PPOPolicy:
    net: dict
    lag: int
    history: list  # per iteration: mean reward, mean cost, lambda, loss


@functools.lru_cache(maxsize=None)
def _optimizer(lr: float) -> optax.GradientTransformation:
    """One object per lr, so the jitted update (static on it) compiles once per process."""
    return optax.chain(optax.clip_by_global_norm(0.5), optax.adam(lr))


def train_ppo(table: ChunkTable, cfg: PonderEvalConfig, *, seed: int, lag: int = 0) -> PPOPolicy:
    rng = np.random.default_rng(seed)
    L, E = cfg.episode_len, cfg.ppo_episodes
    n_actions = table.losses_CA.shape[1]
    net = init_net(jax.random.key(seed), N_FEATURES, cfg.ppo_hidden, n_actions)
    tx = _optimizer(cfg.ppo_lr)
    opt = tx.init(net)
    pid, lam, history = PID(cfg.kp, cfg.ki, cfg.kd), 0.0, []
    for _ in range(cfg.ppo_iters):
        env = Episodes(table, rng.integers(0, len(table.losses_CA) - L + 1, E), L, cfg.budget)
        buf = {k: [] for k in ("s", "mask", "a", "logp", "v", "r", "cost")}
        for _ in range(L):
            s, mask = env.state(lag)
            logp, v = (np.asarray(x) for x in _forward(net, s, mask))
            p = np.exp(logp)
            a = np.array([rng.choice(n_actions, p=pi / pi.sum()) for pi in p])
            gain, cost = env.act(a)
            for k_, x in zip(buf, (s, mask, a, logp[np.arange(E), a], v,
                                   cfg.reward_scale * gain - lam * cost, cost)):
                buf[k_].append(x)
        r_ET, v_ET = np.stack(buf["r"], 1), np.stack(buf["v"], 1)
        adv, ret = gae(r_ET, v_ET, cfg.gamma, cfg.gae_lambda)
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        flat = lambda k_: np.stack(buf[k_], 1).reshape(E * L, *np.shape(buf[k_][0])[1:])  # noqa: E731
        batch = {"s": flat("s"), "mask": flat("mask"), "a": flat("a").astype(np.int32),
                 "logp": flat("logp"), "adv": adv.reshape(-1), "ret": ret.reshape(-1)}
        for _ in range(cfg.ppo_epochs):
            for mb in np.array_split(rng.permutation(E * L), 4):
                net, opt, loss = _update(net, opt, {k_: jnp.asarray(x[mb]) for k_, x in batch.items()},
                                         tx=tx, clip=cfg.clip, value_coef=cfg.value_coef,
                                         entropy_coef=cfg.entropy_coef)
        mean_cost = float(np.mean(buf["cost"]))
        lam = max(0.0, pid(mean_cost - cfg.budget))  # PID-Lagrangian multiplier update
        history.append({"reward": float(np.mean(r_ET)), "cost": mean_cost, "lambda": lam,
                        "loss": float(loss)})
    return PPOPolicy(net, lag, history)


def run_ppo(policy: PPOPolicy, table: ChunkTable, cfg: PonderEvalConfig) -> np.ndarray:
    """Greedy actions over consecutive episodes of L chunks covering the table (budget held)."""
    L, C = cfg.episode_len, len(table.losses_CA)
    if C % L:
        raise ValueError(f"{C} chunks are not a whole number of episodes of {L}")
    starts = np.arange(0, C - L + 1, L)
    env = Episodes(table, starts, L, cfg.budget)
    actions = np.zeros(C, np.int64)
    for _ in range(L):
        s, mask = env.state(policy.lag)
        logp, _ = _forward(policy.net, s, mask)
        a = np.asarray(jnp.argmax(logp, -1))
        actions[env.chunks()] = a
        env.act(a)
    return actions
