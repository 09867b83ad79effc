"""One TTT-Discover update (handoff K4, §3-§6, §8, F3): LoRA-only AdamW on the entropic objective.

For the N actions a_n sampled from one start state (a group; G groups per update):
  A_n     leave-one-out entropic advantages (adaptive or fixed β), held constant;
  log π   summed over each action's tokens (F3), teacher-forced, under θ (adapters on) and
          θ0 (`use_lora=False`: the same weights, adapters off);
  loss    -mean_n[(A_n - λ (log π_θ - log π_θ0)) · log π_θ]   (`grouped_reinforce_loss`).
Groups whose rewards are all equal carry no signal and are dropped; if no group is left the
update is skipped (adapters and optimiser state unchanged, even under weight decay).

The update is ONE jitted program with shardings from `jaxttt.sharding`; adapters and optimiser
state are donated. Rows are padded to a multiple of the mesh's batch shards and widths to
power-of-two buckets, and the hyperparameters (lr, weight decay, clip, λ) are arrays, not
constants: one compile per model, row count and width bucket, shared by every run in a process.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxttt import sharding
from jaxttt.config import DiscoverConfig
from jaxttt.discover.objective import GroupAdvantages, group_advantages, grouped_reinforce_loss
from jaxttt.model.lora import has_lora
from jaxttt.model.transformer import token_logprobs
from jaxttt.sampling import bucket, pack_sequences

Batch = dict[str, Any]


def make_optimizer(cfg: DiscoverConfig) -> optax.GradientTransformation:
    """Global-norm clipping (`grad_clip <= 0`: none) then AdamW. The hyperparameters live in
    the optimiser state (`inject_hyperparams`), so they do not enter the compiled program."""
    clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    return optax.chain(
        optax.inject_hyperparams(optax.clip_by_global_norm)(max_norm=clip),
        optax.inject_hyperparams(optax.adamw)(learning_rate=cfg.lr, weight_decay=cfg.weight_decay))


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------
def masked_logprob_sums(logits_RWV, targets_RW, mask_RW) -> jax.Array:
    """Σ_t mask · log p(target_t) per row: with `pack_sequences` rows, log π(a | prompt) (F3)."""
    return jnp.sum(token_logprobs(logits_RWV, targets_RW) * mask_RW, axis=-1)


def action_logprobs(model: nnx.Module, tokens_RW, targets_RW, mask_RW, *, use_lora: bool) -> jax.Array:
    """log π(a | prompt) per row, teacher-forced (adapters on: θ; off: θ0)."""
    return masked_logprob_sums(model(tokens_RW, use_lora=use_lora), targets_RW, mask_RW)


def _groups(x_R: jax.Array, G: int, N: int) -> jax.Array:
    """The first G·N rows (the rest is mesh padding) as [G, N]."""
    return x_R[:G * N].reshape(G, N)


def discover_loss(lora, frozen, graphdef, batch: Batch):
    """(loss, aux) for adapters `lora` on a batch with tokens, targets, mask [R, W], A_GN,
    valid_G and the scalar kl_lambda; see the module docstring."""
    model = nnx.merge(graphdef, lora, frozen)
    G, N = batch["A_GN"].shape
    rows = (batch["tokens"], batch["targets"], batch["mask"])
    logp_theta_GN = _groups(action_logprobs(model, *rows, use_lora=True), G, N)
    logp_base_GN = jax.lax.stop_gradient(_groups(action_logprobs(model, *rows, use_lora=False), G, N))
    loss = grouped_reinforce_loss(logp_theta_GN, logp_base_GN, batch["A_GN"], batch["valid_G"],
                                  batch["kl_lambda"])
    aux = {"logp_theta": jnp.mean(logp_theta_GN), "kl": jnp.mean(logp_theta_GN - logp_base_GN)}
    return loss, aux


# --------------------------------------------------------------------------------------------
# The jitted update
# --------------------------------------------------------------------------------------------
def _update(lora, opt_state, frozen, batch: Batch, *, graphdef, mesh: Mesh):
    """One AdamW step on the adapters; skipped entirely when no group is valid."""
    grad_fn = jax.value_and_grad(discover_loss, has_aux=True)
    (loss, aux), grads = grad_fn(lora, frozen, graphdef, batch)
    tx = make_optimizer(DiscoverConfig())  # structure only: the values come from opt_state
    updates, new_opt = tx.update(grads, opt_state, lora)
    new_lora = optax.apply_updates(lora, updates)
    ok = jnp.any(batch["valid_G"])

    def pick(new, old):
        return jax.tree.map(lambda x, y: jnp.where(ok, x, y), new, old)

    out = (pick(new_lora, lora), pick(new_opt, opt_state))
    out = jax.lax.with_sharding_constraint(out, sharding.state_shardings(out, mesh))
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "updated": ok, **aux}
    return (*out, metrics)


@functools.lru_cache(maxsize=16)
def compiled_update(graphdef, mesh: Mesh) -> Callable:
    """`_update` jitted for a model structure on `mesh` (cached across trainers); donates the
    adapters and optimiser state (arguments 0-1). Inputs arrive placed (`place_batch`)."""
    return jax.jit(functools.partial(_update, graphdef=graphdef, mesh=mesh), donate_argnums=(0, 1))


def place_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> Batch:
    """Rows over the batch shards; per-group arrays replicated."""
    rows = ("tokens", "targets", "mask")
    return {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim) if k in rows
                              else sharding.replicated(mesh)) for k, v in batch.items()}


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


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------
class DiscoverTrainer:
    """Functional TTT-Discover state: adapters Δθ (trainable), the frozen θ0, AdamW state.

    `update(prompts, completions, rewards_GN)` = advantages (host + a small jit) and ONE jitted
    optimiser step; `model()` is the current adapted model (sampling, saving adapters).
    """

    def __init__(self, model: nnx.Module, cfg: DiscoverConfig, mesh: Mesh, *, pad_id: int):
        if not has_lora(model):
            raise ValueError("DiscoverTrainer needs a model with LoRA adapters (lora.add_lora)")
        self.cfg, self.mesh, self.pad_id = cfg, mesh, pad_id
        self.max_seq_len = model.cfg.max_seq_len
        self.graphdef, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
        self.lora = sharding.shard_state(lora, mesh)
        self.frozen = sharding.shard_state(frozen, mesh)
        init = make_optimizer(cfg).init
        opt_sh = sharding.state_shardings(jax.eval_shape(init, self.lora), mesh)
        self.opt_state = jax.jit(init, out_shardings=opt_sh)(self.lora)
        self._update = compiled_update(self.graphdef, mesh)
        self.n_updates = 0

    @property
    def rows_multiple(self) -> int:
        return sharding.batch_shards(self.mesh)

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.lora, self.frozen)

    def advantages(self, rewards_GN: np.ndarray) -> GroupAdvantages:
        cfg = self.cfg
        return group_advantages(jnp.asarray(rewards_GN, jnp.float32), cfg.gamma,
                                beta=None if cfg.adaptive_beta else cfg.beta,
                                beta_max=cfg.beta_max, drop_equal=cfg.drop_equal_groups)

    def update(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
               rewards_GN: np.ndarray) -> dict[str, Any]:
        """One update on G groups of N actions (rows in group-major order)."""
        rewards_GN = np.asarray(rewards_GN, np.float32)
        _check_rows(rewards_GN, prompts, completions)
        adv = self.advantages(rewards_GN)
        width = batch_width(max(map(len, prompts)), self.cfg.sampling.max_new_tokens,
                            self.max_seq_len)
        batch = build_batch(prompts, completions, pad_id=self.pad_id, width=width,
                            rows_multiple=self.rows_multiple)
        batch.update(A_GN=np.asarray(adv.A_GN), valid_G=np.asarray(adv.valid_G),
                     kl_lambda=np.float32(self.cfg.kl_lambda))
        with jax.set_mesh(self.mesh):
            self.lora, self.opt_state, m = self._update(self.lora, self.opt_state, self.frozen,
                                                        place_batch(batch, self.mesh))
        self.n_updates += int(bool(m["updated"]))
        out = {k: float(v) for k, v in m.items() if k != "updated"}
        return {**out, "updated": bool(m["updated"]), "beta": np.asarray(adv.beta_G).tolist(),
                "n_valid_groups": int(np.sum(np.asarray(adv.valid_G)))}


def _check_rows(rewards_GN: np.ndarray, prompts, completions) -> None:
    if rewards_GN.ndim != 2 or not rewards_GN.size == len(prompts) == len(completions):
        raise ValueError(f"rewards_GN {rewards_GN.shape} must be [G, N] with G·N == "
                         f"{len(prompts)} prompts == {len(completions)} completions")
