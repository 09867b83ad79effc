"""One TTT-Discover update (handoff K4, §3-§6, §8, F3) over the trainer core: LoRA-only AdamW on
the entropic objective.

For the N actions a_n sampled from one start state (a group; G groups per update):
  A_n     leave-one-out entropic advantages (adaptive or fixed β), held constant;
  log π   per token of each action (F3), teacher-forced, under θ (adapters on) and θ0
          (`use_lora=False`: the same weights, adapters off);
  shaping `kl_shaping=sequence`: A_n − λ·Σ_t (log π_θ − log π_θ0), one weight per action;
          `per_token_centered` (the official code): token t gets A_n − λ·(r_t − r̄), r_t its
          log-ratio and r̄ the mean log-ratio over every action token of the update;
  loss    −Σ_n w_n Σ_t Â_{n,t} log π_θ(a_{n,t}),  w_n = 1 / (valid groups · N) on a valid group's
          rows (0 on dropped groups and mesh padding), times the importance weight
          min(1, π_θ(a)/q(a)) under `rollout_policy=importance` (q: the truncated sampler).
Groups whose rewards are all equal carry no signal and are dropped; if no group is left the
update is skipped before any forward pass and counted by the trainer (adapters and optimiser state bitwise unchanged),
as it does for a non-finite loss or gradient (e.g. a reward of 1e300, inf in float32).

Every batch entry is per row, so the update is the trainer's one jitted program; rows are
padded to a multiple of the mesh's batch shards and widths to `sampling.bucket` sizes: one
compile per model, row count and width bucket, shared by every run in a process.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxttt import sharding
from jaxttt.config import DiscoverConfig
from jaxttt.discover.objective import GroupAdvantages, group_advantages
from jaxttt.model.lora import has_lora
from jaxttt.model.transformer import chunked_token_logprobs, map_logit_chunks, token_logprobs
from jaxttt.sampling import bucket, filter_probs, pack_sequences
from jaxttt.train.trainer import ADAPTERS, Trainer

Batch = dict[str, Any]
IS_CLIP = 1.0  # truncated importance weights (V-trace's rho-bar = 1)


def rollout_sampling(cfg: DiscoverConfig) -> dict[str, Any]:
    """Sampler settings of the TTT rollouts under `cfg.rollout_policy`."""
    sc = cfg.sampling
    if cfg.rollout_policy == "untruncated":
        return {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "greedy": False}
    return {"temperature": sc.temperature, "top_p": sc.top_p, "top_k": sc.top_k,
            "greedy": sc.greedy}


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------
def masked_logprob_sums(logits_BWV, targets_BW, mask_BW) -> jax.Array:
    """Σ_t mask · log p(target_t) per row: with `pack_sequences` rows, log π(a | prompt) (F3)."""
    return jnp.sum(token_logprobs(logits_BWV, targets_BW) * mask_BW, axis=-1)


def sampler_logprobs(logits_BWV, targets_BW, temperature: float, top_p: float, top_k: int):
    """log q(target) under the truncated sampler (temperature, top-k, top-p) per position."""
    B, W, V = logits_BWV.shape
    w_XV = filter_probs(logits_BWV.reshape(B * W, V).astype(jnp.float32), temperature, top_p,
                        top_k, None)
    q_XV = w_XV / jnp.sum(w_XV, axis=-1, keepdims=True)
    q_BW = jnp.take_along_axis(q_XV, targets_BW.reshape(-1, 1), axis=-1).reshape(B, W)
    return jnp.log(jnp.maximum(q_BW, 1e-30))


def chunked_sampler_logprobs(h_BWD, w_DV, targets_BW, mask_BW, importance, chunk: int):
    """`sampler_logprobs` of the logits h @ w, `chunk` positions at a time (0 where unmasked)."""
    c = max(1, min(chunk, targets_BW.shape[1]))

    def log_q(logits_BcV, start):
        return sampler_logprobs(logits_BcV, jax.lax.dynamic_slice_in_dim(targets_BW, start, c, 1),
                                *importance)

    return map_logit_chunks(log_q, h_BWD, w_DV, mask_BW, c)


def shaped_reinforce_loss(logp_BW, base_BW, mask_BW, adv_B, weight_B, kl_lambda: float,
                          kl_shaping: str = "sequence", log_q_BW=None):
    """−Σ_n w_n Σ_t Â_{n,t} log π_θ(a_{n,t}) from per-token log-probs (see the module docstring):
    logp_BW under θ (differentiated), base_BW under θ0, log_q_BW under the sampler (None: no
    importance weights). Returns (loss, aux: logp_theta, kl, n_tokens over the live rows)."""
    logp_BW = logp_BW * mask_BW
    ratio_BW = jax.lax.stop_gradient(logp_BW) - base_BW * mask_BW
    live_B = (weight_B > 0).astype(jnp.float32)
    if kl_shaping == "sequence":
        adv_BW = (adv_B - kl_lambda * jnp.sum(ratio_BW, -1))[:, None] * mask_BW
    else:
        live_BW = mask_BW * live_B[:, None]
        mean = jnp.sum(ratio_BW * live_BW) / jnp.maximum(jnp.sum(live_BW), 1.0)
        adv_BW = (adv_B[:, None] - kl_lambda * (ratio_BW - mean)) * mask_BW
    if log_q_BW is not None:
        log_w_B = jnp.sum((jax.lax.stop_gradient(logp_BW) - log_q_BW) * mask_BW, -1)
        weight_B = weight_B * jnp.minimum(jnp.exp(log_w_B), IS_CLIP)
    loss = -jnp.sum(weight_B[:, None] * jax.lax.stop_gradient(adv_BW) * logp_BW)
    n_live = jnp.maximum(jnp.sum(live_B), 1.0)
    aux = {"logp_theta": jnp.sum(live_B * jnp.sum(logp_BW, -1)) / n_live,
           "kl": jnp.sum(live_B * jnp.sum(ratio_BW, -1)) / n_live,
           "n_tokens": jnp.sum(live_B[:, None] * mask_BW)}
    return loss, aux


@dataclasses.dataclass(frozen=True)
class DiscoverLoss:
    """`shaped_reinforce_loss` of a model on per-row batches: tokens, targets, mask [B, W];
    adv, weight [B] (weight = 1/(valid groups · N) on live rows, else 0).

    Log-probs come from the final hidden states `chunk` positions at a time and only where
    `mask` (the action tokens) is set: full [B, W, V] logits never exist (at B·W = 8k and a
    49k vocabulary they alone would be 1.6 GB per copy, and the update held several).
    """
    kl_lambda: float
    kl_shaping: str = "sequence"
    importance: tuple[float, float, int] | None = None  # sampler (temperature, top_p, top_k)
    chunk: int = 64
    remat: bool = True  # the θ forward keeps only block inputs for the backward pass

    def __call__(self, model: nnx.Module, b: Batch):
        w_DV = model.unembed_matrix()
        h_BWD = model.hidden(b["tokens"], use_lora=True, remat=self.remat)
        logp_BW = chunked_token_logprobs(h_BWD, w_DV, b["targets"], b["mask"], self.chunk)
        h0_BWD = jax.lax.stop_gradient(model.hidden(b["tokens"], use_lora=False))
        w0_DV = jax.lax.stop_gradient(w_DV)
        base_BW = chunked_token_logprobs(h0_BWD, w0_DV, b["targets"], b["mask"], self.chunk)
        log_q_BW = None
        if self.importance is not None:
            log_q_BW = chunked_sampler_logprobs(jax.lax.stop_gradient(h_BWD), w0_DV,
                                                b["targets"], b["mask"], self.importance,
                                                self.chunk)
        return shaped_reinforce_loss(logp_BW, base_BW, b["mask"], b["adv"], b["weight"],
                                     self.kl_lambda, self.kl_shaping, log_q_BW)


def make_loss(cfg: DiscoverConfig) -> DiscoverLoss:
    imp = None
    if cfg.rollout_policy == "importance":
        s = rollout_sampling(cfg)
        imp = (float(s["temperature"]), float(s["top_p"]), int(s["top_k"]))
    return DiscoverLoss(float(cfg.kl_lambda), cfg.kl_shaping, imp, remat=bool(cfg.remat))


# --------------------------------------------------------------------------------------------
# Host side: batches
# --------------------------------------------------------------------------------------------
def batch_width(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> int:
    """Static bucket width for rows of a `prompt_len` prompt plus up to `max_new_tokens`."""
    return min(bucket(prompt_len + max_new_tokens), max(max_seq_len, prompt_len + max_new_tokens))


def build_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *,
                pad_id: int, width: int, rows_multiple: int) -> dict[str, np.ndarray]:
    """Teacher-forcing rows (`pack_sequences`) padded to a multiple of `rows_multiple` rows
    with fully masked copies of row 0."""
    tokens, targets, mask = pack_sequences(list(prompts), list(completions), pad_id, width=width)
    extra = (-len(prompts)) % rows_multiple
    if extra:
        tokens, targets = (np.concatenate([x, np.repeat(x[:1], extra, 0)]) for x in (tokens, targets))
        mask = np.concatenate([mask, np.zeros((extra, mask.shape[1]), mask.dtype)])
    return {"tokens": tokens, "targets": targets, "mask": mask}


def row_weights(adv: GroupAdvantages, n_rows: int) -> dict[str, np.ndarray]:
    """Per-row advantage and weight 1/(valid groups · N) (0: dropped group or padding)."""
    A_GN, valid_G = np.asarray(adv.A_GN, np.float32), np.asarray(adv.valid_G, bool)
    G, N = A_GN.shape
    w_GN = np.where(valid_G[:, None], 1.0 / (max(int(valid_G.sum()), 1) * N), np.zeros((G, N)))
    pad = n_rows - G * N
    return {"adv": np.concatenate([A_GN.reshape(-1), np.zeros(pad)]).astype(np.float32),
            "weight": np.concatenate([w_GN.reshape(-1), np.zeros(pad)]).astype(np.float32)}


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------
class DiscoverTrainer:
    """TTT-Discover state: the core `Trainer` over the adapters Δθ of a LoRA model (θ0 frozen).

    `update(prompts, completions, rewards_GN)` = advantages (host + a small jit) and ONE jitted
    optimiser step; `model()` is the current adapted model (sampling, saving adapters).
    """

    def __init__(self, model: nnx.Module, cfg: DiscoverConfig, mesh: Mesh, *, pad_id: int):
        if not has_lora(model):
            raise ValueError("DiscoverTrainer needs a model with LoRA adapters (lora.add_lora)")
        self.cfg, self.mesh, self.pad_id = cfg, mesh, pad_id
        self.max_seq_len = model.cfg.max_seq_len
        self.core = Trainer(model, make_loss(cfg), cfg.optim, mesh=mesh, total_steps=cfg.steps,
                            wrt=ADAPTERS)

    @property
    def lora(self) -> nnx.State:
        return self.core.params

    @property
    def frozen(self) -> nnx.State:
        return self.core.rest

    @property
    def opt_state(self):
        return self.core.opt_state

    @property
    def n_updates(self) -> int:
        """Updates applied (skipped ones excluded)."""
        return self.core.update_count

    @property
    def rows_multiple(self) -> int:
        return sharding.batch_shards(self.mesh)

    def model(self) -> nnx.Module:
        return self.core.model

    def advantages(self, rewards_GN: np.ndarray) -> GroupAdvantages:
        cfg = self.cfg
        return group_advantages(jnp.asarray(rewards_GN, jnp.float32), cfg.gamma,
                                beta=None if cfg.adaptive_beta else cfg.beta,
                                beta_max=cfg.beta_max, drop_equal=cfg.drop_equal_groups)

    def rows(self, prompts: Sequence[Sequence[int]],
             completions: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """The update's teacher-forcing rows, in the width bucket of the longest prompt."""
        width = batch_width(max(map(len, prompts)), self.cfg.sampling.max_new_tokens,
                            self.max_seq_len)
        return build_batch(prompts, completions, pad_id=self.pad_id, width=width,
                           rows_multiple=self.rows_multiple)

    def precompile(self, prompt_len: int, n_rows: int) -> None:
        """Compile, in the background, the update for `n_rows` actions of a `prompt_len`
        prompt: call it before sampling them, and the compile runs beside the sampling."""
        batch = self.rows([[self.pad_id] * prompt_len] * n_rows, [[self.pad_id]] * n_rows)
        zeros = np.zeros(len(batch["tokens"]), np.float32)
        self.core.precompile({**batch, "adv": zeros, "weight": zeros})

    def update(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
               rewards_GN: np.ndarray) -> dict[str, Any]:
        """One update on G groups of N actions (rows in group-major order)."""
        with np.errstate(over="ignore"):  # a reward beyond float32 becomes inf: skipped below
            rewards_GN = np.asarray(rewards_GN, np.float32)
        _check_rows(rewards_GN, prompts, completions)
        adv = self.advantages(rewards_GN)
        batch = self.rows(prompts, completions)
        batch.update(row_weights(adv, len(batch["tokens"])))
        if not np.any(np.asarray(adv.valid_G)):
            # No group has a reward spread: nothing to learn, so no forward or backward pass.
            # What the jitted update would report for a batch without live rows.
            self.core.skip()
            m = {"loss": 0.0, "grad_norm": 0.0, "logp_theta": 0.0, "kl": 0.0,
                 "lr": self.core.current_lr()}
            updated = False
        else:
            m = self.core.step(batch)
            updated = not m.pop("skipped")
            m.pop("n_tokens", None)
        return {**m, "updated": updated, "beta": np.asarray(adv.beta_G).tolist(),
                "n_valid_groups": int(np.sum(np.asarray(adv.valid_G)))}


def _check_rows(rewards_GN: np.ndarray, prompts, completions) -> None:
    if rewards_GN.ndim != 2 or not rewards_GN.size == len(prompts) == len(completions):
        raise ValueError(f"rewards_GN {rewards_GN.shape} must be [G, N] with G·N == "
                         f"{len(prompts)} prompts == {len(completions)} completions")
