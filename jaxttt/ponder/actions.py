"""Per-chunk actions SKIP / UPDATE_1 / UPDATE_2 / UPDATE_4 as separate compiled programs.

Each action is its own jitted function (the inner-step count is static), so a SKIP chunk runs a
program that contains no fast-weight update at all. `ChunkRunner.run` executes a batch of
chunks with per-chunk actions by grouping the rows by action; `score` scores every chunk under
every action (what the post-hoc oracle and the policies' training need) with the gate's signal
and the policy's features, all from one pass of the frozen trunk per chunk (its hidden states
do not depend on the action); `flops` reads the programs' own FLOP counts (XLA's
HLO cost analysis) next to the seeds' nominal costs.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxttt.model.transformer import token_logprobs
from jaxttt.ponder.config import ACTIONS, STEPS
from jaxttt.ponder.model import PonderModel

N_STATIC = 26  # label-free per-chunk features (see _features_h, token_features); + 6 from the episode
SIGNAL_FEATURE = 14  # column of the mean reconstruction signal


def _hidden(graphdef, state, x_BT):
    return nnx.merge(graphdef, state).hidden(x_BT)


def _nll_h(graphdef, state, h_BTD, y_BT, *, steps, unroll=False):
    """Mean NLL per chunk [B] from the trunk's hidden states with `steps` inner updates."""
    logits_BTV, _ = nnx.merge(graphdef, state).logits_from_hidden(h_BTD, steps, unroll=unroll)
    return -token_logprobs(logits_BTV, y_BT).mean(axis=-1)


def _nll(graphdef, state, x_BT, y_BT, *, steps, unroll=False):
    """The whole-chunk program of one action: trunk, fast-weight layer, loss."""
    return _nll_h(graphdef, state, _hidden(graphdef, state, x_BT), y_BT, steps=steps, unroll=unroll)


def _entropy_stats(p_BTV):
    logp = jnp.log(jnp.clip(p_BTV, 1e-30))
    ent_BT = -jnp.sum(p_BTV * logp, axis=-1)
    top2_BT2 = jax.lax.top_k(p_BTV, 2)[0]
    return [ent_BT.mean(-1), ent_BT.std(-1), top2_BT2[..., 0].mean(-1),
            (top2_BT2[..., 0] - top2_BT2[..., 1]).mean(-1)]


def _ttt_only(graphdef, state, h_BTD, *, steps):
    """The fast-weight layer alone on trunk hidden states (what an action adds to the trunk)."""
    return nnx.merge(graphdef, state).ttt(h_BTD, steps, unroll=True)[0]


def _signal_h(graphdef, state, h_BTD):
    """Reconstruction loss at the initial fast weights, per chunk [B] (input-only, no update)."""
    return nnx.merge(graphdef, state).ttt.recon_signal(h_BTD).mean(axis=-1)


def _features_h(graphdef, state, h_BTD):
    """[B, 18] device-side features of the chunk's inputs (no labels): confidence (4),
    activations (6), TTT attention pattern (4), reconstruction signal (4)."""
    model = nnx.merge(graphdef, state)
    logits_BTV, _ = model.logits_from_hidden(h_BTD, 0)
    conf = _entropy_stats(jax.nn.softmax(logits_BTV, axis=-1))
    a = jnp.abs(h_BTD)
    act = [h_BTD.mean((1, 2)), h_BTD.std((1, 2)), a.mean((1, 2)), (a < 0.1).mean((1, 2)),
           a.max(-1).mean(-1), jnp.sqrt(jnp.mean(jnp.square(h_BTD), -1)).mean(-1)]
    q, k, _, _ = model.ttt.projections(h_BTD)  # [B,H,J,M,K]
    B, H, J, M, K = q.shape
    q_BHTK, k_BHTK = q.reshape(B, H, J * M, K), k.reshape(B, H, J * M, K)
    T = J * M
    s = jnp.einsum("bhtk,bhsk->bhts", q_BHTK, k_BHTK) / np.sqrt(K)
    s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    ent = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.clip(p, 1e-30)), 0.0), -1)  # [B,H,T]
    att = [ent.mean((1, 2)), ent.std((1, 2)), p.max(-1).mean((1, 2)),
           jnp.diagonal(p, axis1=-2, axis2=-1).mean((1, 2))]
    r_BT = model.ttt.recon_signal(h_BTD)
    rec = [r_BT.mean(-1), r_BT.std(-1), r_BT[:, -M:].mean(-1), r_BT.max(-1)]
    return jnp.stack(conf + act + att + rec, axis=-1)


def token_features(x_CT: np.ndarray, vocab: int, eos_id: int) -> np.ndarray:
    """[C, 4] + [C, 4] code statistics of each chunk's token ids (host side)."""
    out = []
    for ids in np.asarray(x_CT):
        T = len(ids)
        _, counts = np.unique(ids, return_counts=True)
        p = counts / T
        seen, repeats = set(), 0
        for t in ids:
            repeats += int(t) in seen
            seen.add(int(t))
        bigrams = list(zip(ids[:-1].tolist(), ids[1:].tolist()))
        run, best = 1, 1
        for a, b in zip(ids[:-1], ids[1:]):
            run = run + 1 if a == b else 1
            best = max(best, run)
        out.append([-(p * np.log(p)).sum() / np.log(T), len(counts) / T, repeats / T,
                    1.0 - len(set(bigrams)) / max(len(bigrams), 1), ids.mean() / vocab,
                    ids.std() / vocab, best / T, float(np.mean(ids == eos_id))])
    return np.asarray(out, np.float32)


class ChunkRunner:
    """Compiled per-action programs for one PonderModel (weights passed as arguments)."""

    def __init__(self, model: PonderModel):
        self.graphdef, self.state = nnx.split(model)
        self.vocab, self.d_model = model.trunk.cfg.vocab_size, model.trunk.cfg.d_model
        self._nll = {s: jax.jit(functools.partial(_nll, self.graphdef, steps=s)) for s in STEPS}
        self._hidden = jax.jit(functools.partial(_hidden, self.graphdef))
        self._nll_h = {s: jax.jit(functools.partial(_nll_h, self.graphdef, steps=s)) for s in STEPS}
        self._features_h = jax.jit(functools.partial(_features_h, self.graphdef))

    def nll(self, x_BT, y_BT, action: int) -> np.ndarray:
        """Mean NLL per chunk [B] with ACTIONS[action] applied to every row."""
        return np.asarray(self._nll[STEPS[action]](self.state, jnp.asarray(x_BT), jnp.asarray(y_BT)))

    def run(self, x_BT, y_BT, actions_B) -> np.ndarray:
        """Per-chunk NLL [B] executing ONLY each row's chosen action (rows grouped by action)."""
        actions_B = np.asarray(actions_B)
        out = np.zeros(len(actions_B), np.float32)
        for a in np.unique(actions_B):
            rows = np.flatnonzero(actions_B == a)
            out[rows] = self.nll(np.asarray(x_BT)[rows], np.asarray(y_BT)[rows], int(a))
        return out

    def score(self, x_CT, y_CT, batch: int, *, vocab: int,
              eos_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """([C, A] mean NLL of every chunk under every action, [C] gate signal, [C, N_STATIC]
        label-free features), with one trunk pass per chunk shared by all of them. The gate
        signal is the features' SIGNAL_FEATURE column."""
        losses, feats = [], []
        for i in range(0, len(x_CT), batch):
            h_BTD = self._hidden(self.state, jnp.asarray(x_CT[i:i + batch]))
            y_BT = jnp.asarray(y_CT[i:i + batch])
            losses.append(np.stack([np.asarray(self._nll_h[s](self.state, h_BTD, y_BT))
                                    for s in STEPS], axis=-1))
            feats.append(np.asarray(self._features_h(self.state, h_BTD)))
        dev = np.concatenate(feats)
        return (np.concatenate(losses), dev[:, SIGNAL_FEATURE].copy(),
                np.concatenate([dev, token_features(x_CT, vocab, eos_id)], axis=-1))

    def flops(self, batch: int, seq_len: int, d_model: int) -> dict[str, float]:
        """FLOPs per chunk from XLA's HLO cost analysis of each program (lowered, not compiled,
        with the mini-batch scan unrolled: the analysis counts a loop body only once):
        ACTIONS: the whole chunk program (trunk + TTT + unembedding + loss); ttt/<action>: the
        fast-weight layer alone; signal, features: the gate's and the policy's decision
        programs on the trunk's hidden states (the overhead on top of the action)."""
        x = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
        h = jax.ShapeDtypeStruct((batch, seq_len, d_model), jnp.float32)
        progs = [(a, jax.jit(functools.partial(_nll, self.graphdef, steps=s, unroll=True)), (x, x))
                 for a, s in zip(ACTIONS, STEPS)]
        progs += [(f"ttt/{a}", jax.jit(functools.partial(_ttt_only, self.graphdef, steps=s)), (h,))
                  for a, s in zip(ACTIONS, STEPS)]
        progs += [("signal", jax.jit(functools.partial(_signal_h, self.graphdef)), (h,)),
                  ("features", jax.jit(functools.partial(_features_h, self.graphdef)), (h,))]
        out = {}
        for name, fn, args in progs:
            cost = fn.lower(self.state, *args).cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            out[name] = float(cost.get("flops", float("nan"))) / batch
        return out


def analytic_ttt_flops(d_model: int, n_heads: int, d_head: int, mini_batch: int, steps: int) -> float:
    """Matmul FLOPs per token of the TTT layer (2 per multiply-add), by hand.

    SKIP reads out only: q and o projections 2*D*2HK and q W0 2HK^2. An update adds the k, v
    projections and the lr gate 2*D*(2HK + H), the causal dual form (q k^T and two [M,M]x[M,K]
    products: 6MK per token and head) and per inner step k W plus k^T g (4HK^2).
    """
    D, H, K, M = d_model, n_heads, d_head, mini_batch
    read = 2 * D * 2 * H * K + 2 * H * K * K
    if steps == 0:
        return float(read)
    return float(read + 2 * D * (2 * H * K + H) + 6 * H * M * K + steps * 4 * H * K * K)
