"""PonderTTT settings: the fast-weight layer, the outer loop (`ponder train`) and `ponder eval`.

Loaded with jaxttt.config.load (YAML + dotted overrides, unknown keys are errors).
"""
from __future__ import annotations

import dataclasses

from jaxttt.config import ConfigError, MeshConfig, OptimConfig

ACTIONS = ("SKIP", "UPDATE_1", "UPDATE_2", "UPDATE_4")
STEPS = (0, 1, 2, 4)  # inner fast-weight updates per mini-batch of each action
NOMINAL_COST = (1.0, 3.0, 5.0, 12.0)  # the seeds' cost multipliers (x a plain forward)


def _check(ok: bool, key: str, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r}: expected {expected}")


@dataclasses.dataclass(frozen=True)
class TTTConfig:
    n_heads: int = 4
    d_head: int = 0  # 0 = trunk d_model // n_heads
    mini_batch: int = 16  # tokens per TTT mini-batch (M)
    base_lr: float = 1.0  # ttt_base_lr of the reference layer
    zero_out: bool = False  # the output projection starts at 0: a fresh layer leaves the
    #                         trunk's logits unchanged (for a pretrained trunk)


@dataclasses.dataclass(frozen=True)
class PonderTrainConfig:
    base: str = ""  # trunk: a pretraining run directory (or one of its checkpoints)
    ttt: TTTConfig = TTTConfig()
    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig(lr=3e-3, warmup_steps=20, weight_decay=0.0)
    chunk_len: int = 128  # tokens per chunk (one independent fast-weight episode)
    train_actions: tuple[int, ...] = (1, 2, 4)  # inner steps drawn (uniformly, per step) in training
    train: str = ""  # packed .bin; empty = the default corpus' train split (trunk tokenizer)
    batch_size: int = 16  # chunks per outer step
    steps: int = 300
    seed: int = 0
    log_every: int = 25
    save_every: int = 100
    keep: int = 3

    def validate(self) -> None:
        _check(self.ttt.n_heads >= 1, "ttt.n_heads", "a positive integer")
        _check(self.ttt.d_head >= 0, "ttt.d_head", "0 (auto) or a positive integer")
        _check(self.ttt.mini_batch >= 1, "ttt.mini_batch", "a positive integer")
        _check(self.ttt.base_lr > 0, "ttt.base_lr", "a positive number")
        _check(self.chunk_len % self.ttt.mini_batch == 0, "chunk_len",
               f"a multiple of ttt.mini_batch={self.ttt.mini_batch}, got {self.chunk_len}")
        _check(bool(self.train_actions) and all(s in STEPS for s in self.train_actions),
               "train_actions", f"a non-empty subset of {list(STEPS)}, got {list(self.train_actions)}")
        for key in ("batch_size", "steps", "keep"):
            _check(getattr(self, key) >= 1, key, "a positive integer")
        _check(self.save_every >= 0, "save_every", "a non-negative integer (0 = only at the end)")


@dataclasses.dataclass(frozen=True)
class PonderEvalConfig:
    val: str = ""  # packed .bin; empty = held-out split of the default corpus (trunk tokenizer)
    train: str = ""  # chunks the PPO policy learns on; empty = the default corpus' train split
    chunks: int = 224  # held-out chunks scored per seed (consecutive windows of the stream)
    train_chunks: int = 512  # chunks in the PPO training table
    batch_size: int = 16
    budget: float = 2.0  # mean nominal cost per chunk (SKIP = 1); sets the gates' target rate
    gate_action: int = 1  # index into ACTIONS used by gates, random and the oracle (UPDATE_1)
    calib_chunks: int = 16  # gate: threshold = quantile of the first chunks' signal
    gate_ema: float = 0.1  # gate: EMA of the realised update rate
    gate_kp: float = 0.5  # gate: PID gains on (EMA rate - target), in units of the signal's std
    gate_ki: float = 0.05
    gate_kd: float = 0.0
    episode_len: int = 32  # PPO: chunks per episode (the budget holds per episode)
    ppo_iters: int = 150
    ppo_episodes: int = 16  # episodes collected per iteration
    ppo_epochs: int = 4
    ppo_lr: float = 3e-4
    ppo_hidden: int = 64
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    kp: float = 0.1  # PID-Lagrangian gains (seeds)
    ki: float = 0.01
    kd: float = 0.01
    reward_scale: float = 10.0  # reward = scale * (loss_SKIP - loss_action) per chunk
    bootstrap: int = 2000  # resamples for confidence intervals

    def validate(self) -> None:
        for key in ("chunks", "train_chunks", "batch_size", "calib_chunks", "episode_len",
                    "ppo_iters", "ppo_episodes", "ppo_epochs", "ppo_hidden", "bootstrap"):
            _check(getattr(self, key) >= 1, key, "a positive integer")
        _check(1.0 <= self.budget <= NOMINAL_COST[-1], "budget",
               f"a mean cost per chunk in [1, {NOMINAL_COST[-1]}], got {self.budget}")
        _check(self.gate_action in (1, 2, 3), "gate_action", "1, 2 or 3 (UPDATE_1/2/4)")
        _check(0 < self.gate_ema <= 1, "gate_ema", "a value in (0, 1]")
        _check(0 < self.clip < 1, "clip", "a value in (0, 1)")
        _check(self.chunks % self.episode_len == 0 and self.train_chunks >= self.episode_len,
               "chunks", f"a multiple of episode_len={self.episode_len} (and train_chunks >= it)")

    @property
    def target_rate(self) -> float:
        """Update rate of the gate's action that spends `budget` on average."""
        extra = NOMINAL_COST[self.gate_action] - 1.0
        return min(max((self.budget - 1.0) / extra, 0.0), 1.0)
