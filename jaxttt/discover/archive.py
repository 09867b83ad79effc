"""The archive H of discovered states and PUCT selection of the next start state (handoff §7).

Two variants (`DiscoverConfig.puct_variant`), both with Q(s) = m(s) once s has been visited
(n(s) > 0), else R(s), and a rank prior P(s) proportional to size - rank (best reward first):

handoff   score = Q + c * scale * P * sqrt(1 + T / (1 + n)); n and T count expansions (one per
          step); m(s) = best child reward over expansions of s or any descendant (updated on
          every ancestor); scale = R_max - R_min over all states; equal rewards share a rank.
official  score = Q + c * scale * P * sqrt(1 + T) / (1 + n), as the TTT-Discover code: n and T
          count rollouts; a rollout raises m only on its direct parent and adds a visit to the
          parent and every ancestor; a failed rollout (no valid state) only adds the visits;
          scale = R_max - R_min over the non-initial states (all states while there are none);
          ties in rank are broken by age (older first).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Iterator, Sequence

SCALE_FLOOR = 1e-6  # R_max - R_min floor: equal rewards still get a visit-count tie-break
VARIANTS = ("handoff", "official")


@dataclasses.dataclass
class Node:
    id: int
    state: str
    reward: float
    parent: int | None = None
    children: list[int] = dataclasses.field(default_factory=list)
    n: int = 0  # visits: expansions (handoff) or rollouts (official) of it or its descendants
    m: float | None = None  # best child reward seen (handoff: of descendants too)
    step: int = 0  # TTT step at which the state was added
    seed: bool = False  # initial states are never evicted

    @property
    def q(self) -> float:
        return self.m if self.n > 0 and self.m is not None else self.reward


class Archive:
    """Tree of states keyed by id; at most `max_size` nodes (seeds may exceed it)."""

    def __init__(self, max_size: int = 1000, variant: str = "handoff"):
        if max_size < 1:
            raise ValueError("archive max_size must be >= 1")
        if variant not in VARIANTS:
            raise ValueError(f"archive variant must be one of {'|'.join(VARIANTS)}, got {variant!r}")
        self.max_size = max_size
        self.variant = variant
        self.nodes: dict[int, Node] = {}
        self.total_expansions = 0  # T: expansions (handoff) or rollouts (official)
        self._next_id = 0
        self._by_state: dict[str, int] = {}

    # ---- container -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.nodes

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    def get(self, node_id: int) -> Node | None:
        return self.nodes.get(node_id)

    def lookup(self, state: str) -> Node | None:
        node_id = self._by_state.get(state)
        return None if node_id is None else self.nodes[node_id]

    def best(self) -> Node:
        if not self.nodes:
            raise ValueError("archive is empty")
        return max(self.nodes.values(), key=lambda node: (node.reward, -node.id))

    # ---- adding ----------------------------------------------------------------------------
    def _new(self, state: str, reward: float, parent: int | None, step: int, seed: bool) -> int:
        if not math.isfinite(reward):
            raise ValueError(f"archive rewards must be finite, got {reward}")
        node = Node(id=self._next_id, state=state, reward=float(reward), parent=parent,
                    step=step, seed=seed)
        self._next_id += 1
        self.nodes[node.id] = node
        self._by_state[state] = node.id
        if parent is not None:
            self.nodes[parent].children.append(node.id)
        self._evict()
        return node.id

    def add_seed(self, state: str, reward: float, step: int = 0) -> int:
        """An initial state: a root that is never evicted."""
        existing = self._by_state.get(state)
        return existing if existing is not None else self._new(state, reward, None, step, True)

    def add_child(self, parent_id: int, state: str, reward: float, step: int) -> int:
        """Add `state` under `parent_id`; returns its id (the existing id if the state is already
        archived). When the archive is full the lowest-reward non-seed leaf is evicted, which
        can be the new child itself: check `id in archive`."""
        if parent_id not in self.nodes:
            raise KeyError(f"archive has no node {parent_id}")
        existing = self._by_state.get(state)
        return existing if existing is not None else self._new(state, reward, parent_id, step, False)

    def add_top_children(self, parent_id: int, states: Sequence[str], rewards: Sequence[float],
                         k: int, step: int = 0) -> list[int]:
        """Add the k best distinct, non-empty states of a batch that are not archived yet."""
        best: dict[str, float] = {}
        for state, reward in zip(states, rewards):
            if state and state not in self._by_state and reward > best.get(state, -math.inf):
                best[state] = float(reward)
        ranked = sorted(best.items(), key=lambda item: -item[1])[:k]
        added = [self.add_child(parent_id, state, reward, step) for state, reward in ranked]
        return [node_id for node_id in added if node_id in self.nodes]

    def _evict(self) -> None:
        while len(self.nodes) > self.max_size:
            leaves = [n for n in self.nodes.values() if not n.seed and not n.children]
            if not leaves:
                return  # only seeds (or their chains) left: seeds are kept regardless
            victim = min(leaves, key=lambda node: (node.reward, node.id))  # ties: oldest goes
            del self.nodes[victim.id]
            del self._by_state[victim.state]
            if victim.parent is not None and victim.parent in self.nodes:
                self.nodes[victim.parent].children.remove(victim.id)

    # ---- PUCT ------------------------------------------------------------------------------
    def update_after_expand(self, node_id: int, child_rewards: Sequence[float],
                            failed: Sequence[bool] | None = None) -> None:
        """After sampling rollouts from `node_id` (`failed[i]`: rollout i gave no valid state).

        handoff: n += 1 and m = max(m, max child reward) for the node and all its ancestors;
        T += 1. official: per rollout, n += 1 for the node and its ancestors and T += 1; a
        valid rollout also sets m = max(m, reward) on the node itself.
        """
        if node_id not in self.nodes:
            raise KeyError(f"archive has no node {node_id} (update before adding its children)")
        if self.variant == "official":
            self._update_official(node_id, child_rewards, failed)
            return
        finite = [float(r) for r in child_rewards if math.isfinite(r)]
        y = max(finite) if finite else None
        cur: Node | None = self.nodes[node_id]
        while cur is not None:
            cur.n += 1
            if y is not None:
                cur.m = y if cur.m is None else max(cur.m, y)
            cur = self.nodes.get(cur.parent) if cur.parent is not None else None
        self.total_expansions += 1

    def _update_official(self, node_id: int, child_rewards: Sequence[float],
                         failed: Sequence[bool] | None) -> None:
        failed = [False] * len(child_rewards) if failed is None else list(failed)
        if len(failed) != len(child_rewards):
            raise ValueError(f"{len(failed)} failed flags for {len(child_rewards)} rollouts")
        parent = self.nodes[node_id]
        for reward, bad in zip(child_rewards, failed):
            if not bad and math.isfinite(reward):
                parent.m = float(reward) if parent.m is None else max(parent.m, float(reward))
            cur: Node | None = parent
            while cur is not None:
                cur.n += 1
                cur = self.nodes.get(cur.parent) if cur.parent is not None else None
            self.total_expansions += 1

    def priors(self) -> dict[int, float]:
        """P(s) proportional to size - rank(s), rank 0 = highest reward; equal rewards share a
        rank (handoff) or are ranked oldest first (official)."""
        order = sorted(self.nodes.values(), key=lambda node: (-node.reward, node.id))
        rank_of: dict[int, int] = {}
        for rank, node in enumerate(order):
            tied = self.variant == "handoff" and rank > 0 and node.reward == order[rank - 1].reward
            rank_of[node.id] = rank_of[order[rank - 1].id] if tied else rank
        size = len(order)
        raw = {node_id: float(size - rank) for node_id, rank in rank_of.items()}
        total = sum(raw.values())
        return {node_id: v / total for node_id, v in raw.items()}

    def scale(self) -> float:
        """R_max - R_min (official: over non-initial states when there are any), floored."""
        rewards = [node.reward for node in self.nodes.values()]
        if self.variant == "official":
            rewards = [node.reward for node in self.nodes.values() if not node.seed] or rewards
        return max(max(rewards) - min(rewards), SCALE_FLOOR)

    def scores(self, c: float, T: int | None = None) -> dict[int, float]:
        if not self.nodes:
            raise ValueError("archive is empty")
        T = self.total_expansions if T is None else T
        scale, priors = self.scale(), self.priors()
        if self.variant == "official":
            return {node.id: node.q + c * scale * priors[node.id] * math.sqrt(1.0 + T) / (1.0 + node.n)
                    for node in self.nodes.values()}
        return {node.id: node.q + c * scale * priors[node.id] * math.sqrt(1.0 + T / (1.0 + node.n))
                for node in self.nodes.values()}

    def select(self, c: float, T: int | None = None) -> Node:
        """The node maximising the PUCT score (ties: the oldest)."""
        scores = self.scores(c, T)
        best_id = max(scores, key=lambda node_id: (scores[node_id], -node_id))
        return self.nodes[best_id]

    # ---- serialisation ---------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (for result.json)."""
        return {"max_size": self.max_size, "variant": self.variant,
                "total_expansions": self.total_expansions, "next_id": self._next_id,
                "nodes": [dataclasses.asdict(node) for node in self.nodes.values()]}

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> Archive:
        if isinstance(data, str):
            data = json.loads(data)
        archive = cls(max_size=int(data["max_size"]), variant=data.get("variant", "handoff"))
        archive.total_expansions = int(data["total_expansions"])
        archive._next_id = int(data["next_id"])
        for raw in data["nodes"]:
            node = Node(**raw)
            archive.nodes[node.id] = node
            archive._by_state[node.state] = node.id
        return archive
