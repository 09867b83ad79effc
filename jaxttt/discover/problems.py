"""The TTT-Discover paper's mathematical discovery problems as discovery envs (in progress)."""
from __future__ import annotations

from jaxttt.discover.env import DiscoveryEnv

PROBLEMS: dict[str, type[DiscoveryEnv]] = {}
