"""Replay buffer for continual SDFT (handoff SDFT §8, Phase 8).

Past (prompt, demonstration) examples are kept in a bounded buffer filled by reservoir
sampling (once full, every example ever added is retained with equal probability
capacity / n_seen). `mix` replaces each slot of a new batch, independently with probability
`replay_ratio`, by an example drawn from the buffer, so on average `replay_ratio` of a batch
is replay. All randomness comes from one seeded NumPy generator whose state is part of
`state_dict()`, so a resumed run draws the same batches as an uninterrupted one.

Loop order per step: `batch = buf.mix(new, ratio)`, train on `batch.examples`, then
`buf.add(new)` (so a batch never replays its own new examples).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from jaxttt.sdft.data import Example


class Mixed(NamedTuple):
    examples: list[Example]  # the training batch, same size as the new batch
    n_replay: int  # how many of them came from the buffer (log as replay fraction)


class ReplayBuffer:
    def __init__(self, capacity: int = 50_000, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"replay capacity must be a positive integer, got {capacity}")
        self.capacity = capacity
        self.seed = seed
        self.items: list[Example] = []
        self.n_seen = 0  # examples ever offered to the buffer
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, examples: Sequence[Example]) -> None:
        """Reservoir sampling (Algorithm R): append while there is room, then replace at random."""
        for ex in examples:
            self.n_seen += 1
            if len(self.items) < self.capacity:
                self.items.append(ex)
                continue
            j = int(self._rng.integers(0, self.n_seen))
            if j < self.capacity:
                self.items[j] = ex

    def sample(self, k: int) -> list[Example]:
        """k examples: distinct when k <= len(self), otherwise drawn with replacement."""
        if not self.items:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = self._rng.choice(len(self.items), size=k, replace=k > len(self.items))
        return [self.items[int(i)] for i in idx]

    def mix(self, new_batch: Sequence[Example], replay_ratio: float) -> Mixed:
        """Replace each slot with a buffer example with probability `replay_ratio`."""
        if not 0.0 <= replay_ratio <= 1.0:
            raise ValueError(f"replay_ratio must be in [0, 1], got {replay_ratio}")
        batch = list(new_batch)
        if not self.items or replay_ratio == 0.0 or not batch:
            return Mixed(batch, 0)
        slots = np.flatnonzero(self._rng.random(len(batch)) < replay_ratio)
        for slot, ex in zip(slots, self.sample(len(slots)) if len(slots) else []):
            batch[int(slot)] = ex
        return Mixed(batch, len(slots))

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (examples, counters and the exact RNG state)."""
        return {
            "capacity": self.capacity,
            "seed": self.seed,
            "n_seen": self.n_seen,
            "items": [ex.to_dict() for ex in self.items],
            "rng": _rng_state_to_json(self._rng.bit_generator.state),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore exactly what `state_dict` saved (capacity must match this buffer's)."""
        if state["capacity"] != self.capacity:
            raise ValueError(f"replay state has capacity {state['capacity']}, "
                             f"this buffer has {self.capacity}")
        self.seed = state["seed"]
        self.n_seen = int(state["n_seen"])
        self.items = [Example.from_dict(d) for d in state["items"]]
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = _rng_state_from_json(state["rng"])

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ReplayBuffer:
        buf = cls(capacity=state["capacity"], seed=state["seed"])
        buf.load_state_dict(state)
        return buf


def _rng_state_to_json(state: dict) -> dict:
    """PCG64 state has 128-bit integers: store them as decimal strings (safe in any JSON)."""
    return {k: (_rng_state_to_json(v) if isinstance(v, dict) else str(v) if isinstance(v, int) else v)
            for k, v in state.items()}


def _rng_state_from_json(state: dict) -> dict:
    return {k: (_rng_state_from_json(v) if isinstance(v, dict) else
                int(v) if isinstance(v, str) and v.lstrip("-").isdigit() else v)
            for k, v in state.items()}
