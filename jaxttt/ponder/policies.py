"""Which chunks to update: fixed actions, random, post-hoc oracles, the reconstruction gate.

Every policy returns one action index (into config.ACTIONS) per chunk of a stream. The gate is
training-free: UPDATE when the chunk's reconstruction loss at the initial fast weights exceeds
a threshold; the threshold starts at the (1 - rate) quantile of the first chunks' signal and a
PID controller on (EMA of realised update rate - target) moves it. With `lag=1` the decision
for chunk c uses only chunk c-1's signal (the chunk's own tokens cannot influence whether its
own predictions are adapted).
"""
from __future__ import annotations

import numpy as np


class PID:
    """u = kp e + ki sum(e) + kd (e - e_prev)."""

    def __init__(self, kp: float, ki: float, kd: float):
        self.kp, self.ki, self.kd = kp, ki, kd
        self.integral, self.prev = 0.0, None

    def __call__(self, error: float) -> float:
        self.integral += error
        deriv = 0.0 if self.prev is None else error - self.prev
        self.prev = error
        return self.kp * error + self.ki * self.integral + self.kd * deriv


def fixed(n: int, action: int) -> np.ndarray:
    return np.full(n, action, np.int64)


def random_rate(n: int, rate: float, action: int, seed: int) -> np.ndarray:
    """Each chunk independently: `action` with probability `rate`, else SKIP."""
    return np.where(np.random.default_rng(seed).random(n) < rate, action, 0)


def oracle_top(losses_CA: np.ndarray, rate: float, action: int) -> np.ndarray:
    """Post-hoc: `action` on the round(rate*C) chunks with the largest realised gain
    loss[SKIP] - loss[action] (never on a chunk the update makes worse)."""
    gain_C = losses_CA[:, 0] - losses_CA[:, action]
    n = int(round(rate * len(gain_C)))
    top = np.argsort(-gain_C, kind="stable")[:n]
    out = np.zeros(len(gain_C), np.int64)
    out[top[gain_C[top] > 0]] = action
    return out


def oracle_best(losses_CA: np.ndarray) -> np.ndarray:
    """Post-hoc, unconstrained: each chunk's best action (a lower bound for every policy)."""
    return np.argmin(losses_CA, axis=1)


class ThresholdGate:
    """Calibrated threshold on a per-chunk signal with a PID rate controller (see module doc)."""

    def __init__(self, target_rate: float, *, action: int = 1, calib: int = 16, ema: float = 0.1,
                 kp: float = 0.5, ki: float = 0.05, kd: float = 0.0, lag: int = 0):
        self.target, self.action, self.calib, self.ema, self.lag = target_rate, action, calib, ema, lag
        self.pid = PID(kp, ki, kd)

    def run(self, signal_C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(actions [C], thresholds used [C]) for a stream of per-chunk signals."""
        signal_C = np.asarray(signal_C, np.float64)
        C = len(signal_C)
        actions, thresholds = np.zeros(C, np.int64), np.full(C, np.nan)
        rate, base, scale, offset = self.target, None, 1.0, 0.0
        for c in range(C):
            seen = signal_C[:max(c + 1 - self.lag, 0)]  # what the decision may look at
            if len(seen) == 0:
                update = self.target >= 0.5  # nothing seen yet: the more likely choice
            else:
                if base is None and len(seen) >= self.calib:
                    calib = seen[:self.calib]
                    base, scale = np.quantile(calib, 1.0 - self.target), calib.std() + 1e-12
                thr = (np.quantile(seen[:-1] if len(seen) > 1 else seen, 1.0 - self.target)
                       if base is None else base + scale * offset)
                thresholds[c] = thr
                update = seen[-1] > thr
            actions[c] = self.action if update else 0
            rate = (1.0 - self.ema) * rate + self.ema * float(update)
            if base is not None:
                offset = self.pid(rate - self.target)  # too many updates -> raise the threshold
        return actions, thresholds
