"""Regression gates for continual updates (handoff SDFT §9, Phase 8, blueprint §4.2).

Before and after a block of SDFT updates the loop evaluates a flat metrics dict, e.g.
`{"perplexity": 12.3, "probe/overall": 0.75, "probe/arith": 1.0, ...}` (see
`eval.probes.probe_metrics`). `decide` compares the two and accepts the update only if
  - perplexity rose by at most `gate.max_ppl_increase` (relative),
  - every `probe/*` score present before dropped by at most `gate.max_probe_drop` (absolute),
  - every extra `GateMetric` stayed within its own bound,
and every checked metric is present and finite. A rejected block is reverted by the loop
(orbax checkpoint taken before it). The decision is written to `gate_decision.json`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from jaxttt.config import GateConfig

PPL_KEY = "perplexity"
PROBE_PREFIX = "probe/"
DECISION_FILE = "gate_decision.json"
_EPS = 1e-12  # float slack so a regression exactly at the bound passes


@dataclasses.dataclass(frozen=True)
class GateMetric:
    name: str  # key in the metrics dicts
    higher_is_better: bool
    max_regression: float  # largest allowed move in the bad direction
    relative: bool  # regression measured as a fraction of |before|


@dataclasses.dataclass
class GateDecision:
    accepted: bool
    reasons: list[str]  # one line per failed check (or why no check ran)
    deltas: dict[str, float]  # after − before for every metric compared

    def to_dict(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "reasons": list(self.reasons),
                "deltas": {k: _json_float(v) for k, v in self.deltas.items()}}


def gate_metrics(before: Mapping[str, float], gate_cfg: GateConfig,
                 extra_metrics: Sequence[GateMetric] = ()) -> list[GateMetric]:
    """The checks implied by the config: perplexity, each probe score in `before`, extras."""
    metrics = [GateMetric(PPL_KEY, higher_is_better=False,
                          max_regression=gate_cfg.max_ppl_increase, relative=True)]
    metrics += [GateMetric(k, higher_is_better=True, max_regression=gate_cfg.max_probe_drop,
                           relative=False)
                for k in sorted(before) if k.startswith(PROBE_PREFIX)]
    return metrics + list(extra_metrics)


def regression(metric: GateMetric, before: float, after: float) -> float:
    """How far `after` moved in the bad direction (negative = improvement)."""
    worse = (before - after) if metric.higher_is_better else (after - before)
    if not metric.relative:
        return worse
    if before == 0.0:
        return 0.0 if worse == 0.0 else math.copysign(math.inf, worse)
    return worse / abs(before)


def _check(metric: GateMetric, before: Mapping, after: Mapping,
           deltas: dict[str, float]) -> str | None:
    """None if `metric` passes, else the reason it fails."""
    name = metric.name
    for label, values in (("before", before), ("after", after)):
        if name not in values:
            return f"{name}: missing from the {label} metrics"
    try:
        b, a = float(before[name]), float(after[name])
    except (TypeError, ValueError):
        return f"{name}: not a number (before={before[name]!r}, after={after[name]!r})"
    deltas[name] = a - b
    if not math.isfinite(b):
        return f"{name}: before value {b} is not finite, cannot compare"
    if not math.isfinite(a):
        return f"{name}: after value {a} is not finite"
    reg = regression(metric, b, a)
    if reg > metric.max_regression + _EPS:
        kind = "relative" if metric.relative else "absolute"
        verb = "dropped" if metric.higher_is_better else "rose"
        return (f"{name}: {verb} from {b:.6g} to {a:.6g} ({kind} regression {reg:.4g} > "
                f"allowed {metric.max_regression:.4g})")
    return None


def decide(before: Mapping[str, float], after: Mapping[str, float], gate_cfg: GateConfig,
           extra_metrics: Sequence[GateMetric] = ()) -> GateDecision:
    """Accept the update iff every gate metric is present, finite and within its bound."""
    deltas: dict[str, float] = {}
    checks = gate_metrics(before, gate_cfg, extra_metrics)
    reasons = [r for m in checks if (r := _check(m, before, after, deltas)) is not None]
    if not gate_cfg.enabled:
        return GateDecision(True, ["gates disabled (gate.enabled=false): accepted unchecked"], deltas)
    return GateDecision(not reasons, reasons, deltas)


def write_decision(path: str | Path, decision: GateDecision, **extra: Any) -> Path:
    """Write `gate_decision.json` (into `path` if it is a directory); `extra` keys are added.

    Non-finite numbers are written as the strings "nan", "inf", "-inf" (strict JSON).
    """
    path = Path(path)
    if path.is_dir():
        path = path / DECISION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**decision.to_dict(), **{k: _json_safe(v) for k, v in extra.items()}}
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    return path


def _json_float(x: float) -> float | str:
    x = float(x)
    return x if math.isfinite(x) else str(x)


def _json_safe(v: Any) -> Any:
    if isinstance(v, float):
        return _json_float(v)
    if isinstance(v, Mapping):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v
