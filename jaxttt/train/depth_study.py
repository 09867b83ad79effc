"""mHC vs HC vs plain residual with depth (issue 14): the mHC paper's stability claims, measured.

The same deep, narrow decoder is pretrained from scratch with `pretrain()` once per residual
mode (`model.mhc.mode` = mhc | hc | none) and seed, with identical data, schedule and learning
rate. Everything measured is read back from what the runs write (metrics.jsonl, the final
checkpoint), so the study adds no training code of its own:

* final loss: training loss averaged over the last `TAIL` steps; held-out loss at the last step
  (the run's own validation pass on the held-out split of the embedded corpus).
* gradient-norm spikes: step t (after the first `SPIKE_WINDOW` steps) is a spike when its global
  gradient L2 norm (before clipping) exceeds `SPIKE_FACTOR` times the median of the
  `SPIKE_WINDOW` steps before it; non-finite (skipped) updates are counted separately.
* H_res drift (mhc/hc only), per held-out token at the final checkpoint: how far each sublayer's
  H_res is from doubly stochastic (max |row sum - 1|, max |column sum - 1|, most negative entry)
  and the Amax gain magnitude of the composite residual map P_s = H_s ... H_1 through the first
  s sublayers (mHC paper): forward gain = max absolute row sum of P_s, backward gain = max
  absolute column sum. A doubly stochastic product has both gains exactly 1.

Outputs in the study directory: runs/<mode>-s<seed>/ (ordinary pretraining runs, resumable),
study.json (every per-run number), table.md (mean ± sd over seeds per mode) and three PNGs.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

MODES = ("mhc", "hc", "none")
TAIL = 20  # training steps averaged into the final training loss
SPIKE_WINDOW = 20  # steps in the running median a gradient norm is compared with
SPIKE_FACTOR = 3.0  # a spike: grad norm > SPIKE_FACTOR x that running median
H_RES_WINDOWS = 4  # held-out windows (of data.seq_len tokens) the H_res statistics run on
PLOTS = {"loss": "depth_loss.png", "grad_norm": "depth_grad_norm.png",
         "gain": "depth_h_res_gain.png"}


@dataclasses.dataclass(frozen=True)
class Study:
    config: str  # a PretrainConfig YAML (configs/pretrain/depth_8.yaml)
    out: Path  # study directory
    modes: tuple[str, ...] = MODES
    seeds: tuple[int, ...] = (0, 1, 2)
    overrides: tuple[str, ...] = ()  # KEY=VALUE applied to every run (steps, model.n_layers ...)

    def run_dir(self, mode: str, seed: int) -> Path:
        return self.out / "runs" / f"{mode}-s{seed}"


# --------------------------------------------------------------------------------------------
# Maths on plain arrays (tested on hand-made inputs)
# --------------------------------------------------------------------------------------------
def grad_spikes(grad_norms: Sequence[float | None], *, window: int = SPIKE_WINDOW,
                factor: float = SPIKE_FACTOR) -> dict:
    """Spikes in a per-step gradient-norm series (None/NaN/inf = a non-finite, skipped update).

    Step index i >= window is a spike when g[i] > factor * median(finite g[i-window:i]).
    Returns {"count", "steps" (0-based indices), "max_ratio" (largest g[i]/median over the
    compared steps), "max_norm" (largest finite g), "non_finite" (count)}.
    """
    g = np.array([np.nan if v is None else float(v) for v in grad_norms], dtype=np.float64)
    finite = np.isfinite(g)
    steps, ratios = [], []
    for i in range(window, len(g)):
        past = g[i - window:i][finite[i - window:i]]
        if not finite[i] or past.size == 0:
            continue
        ratio = g[i] / max(float(np.median(past)), 1e-30)
        ratios.append(ratio)
        if ratio > factor:
            steps.append(i)
    return {"count": len(steps), "steps": steps,
            "max_ratio": float(max(ratios)) if ratios else math.nan,
            "max_norm": float(g[finite].max()) if finite.any() else math.nan,
            "non_finite": int((~finite).sum())}


def stochastic_deviation(h_SXNN: np.ndarray) -> dict:
    """How far matrices [..., N, N] are from doubly stochastic: the worst |row sum - 1|,
    |column sum - 1| and the most negative entry (0 when none is negative)."""
    h = np.asarray(h_SXNN, dtype=np.float64)
    return {"row_dev": float(np.abs(h.sum(-1) - 1.0).max()),
            "col_dev": float(np.abs(h.sum(-2) - 1.0).max()),
            "min_entry": float(min(h.min(), 0.0))}


def composite(h_SXNN: np.ndarray) -> np.ndarray:
    """Running products P_s = H_s H_(s-1) ... H_1 over the leading (sublayer) axis: [S, ..., N, N].

    X after s sublayers = P_s X_0 + (the sublayer updates), so P_s is the residual path's map.
    """
    h = np.asarray(h_SXNN, dtype=np.float64)
    out = np.empty_like(h)
    p = np.broadcast_to(np.eye(h.shape[-1]), h.shape[1:])
    for s in range(h.shape[0]):
        p = h[s] @ p
        out[s] = p
    return out


def amax_gain(p_XNN: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(forward, backward) Amax gain magnitude of matrices [..., N, N]: the largest absolute row
    sum (how much a signal can grow going forward) and the largest absolute column sum (the
    same for gradients going back)."""
    a = np.abs(np.asarray(p_XNN, dtype=np.float64))
    return a.sum(-1).max(-1), a.sum(-2).max(-1)


def h_res_drift(h_SXNN: np.ndarray) -> dict:
    """Drift summary of per-token H_res [S sublayers, X tokens, N, N].

    Per-depth curves (length S) of the composite gains: max and median over tokens; scalars:
    the final composite's max gains, the largest single-sublayer gain and the deviations.
    """
    fwd_SX, bwd_SX = amax_gain(composite(h_SXNN))
    one_fwd, one_bwd = amax_gain(h_SXNN)
    return {**stochastic_deviation(h_SXNN),
            "gain_fwd": float(fwd_SX[-1].max()), "gain_bwd": float(bwd_SX[-1].max()),
            "layer_gain_max": float(max(one_fwd.max(), one_bwd.max())),
            "gain_fwd_by_depth": fwd_SX.max(-1).tolist(),
            "gain_bwd_by_depth": bwd_SX.max(-1).tolist(),
            "gain_fwd_median_by_depth": np.median(fwd_SX, -1).tolist()}


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of the finite values; NaN if none."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


# --------------------------------------------------------------------------------------------
# H_res of a trained model, per token
# --------------------------------------------------------------------------------------------
def h_res_per_token(model, tokens_BT) -> np.ndarray:
    """H_res of every sublayer (attention, MLP, attention, ...) at every token: [2L, B*T, N, N].

    The forward pass is the model's own (streams expanded, each block applied in turn); the
    mapping is evaluated on the streams each residual sees.
    """
    if model.cfg.mhc.mode == "none":
        raise ValueError("model has mhc.mode=none: there is no H_res to inspect")
    h_SBTNN = np.asarray(_h_res_stack(model, tokens_BT))
    S, B, T, N, _ = h_SBTNN.shape
    return h_SBTNN.reshape(S, B * T, N, N)


def _h_res_stack(model, tokens_BT):
    import jax.numpy as jnp
    from flax import nnx

    from jaxttt.model import mhc

    @nnx.jit
    def run(model, tokens_BT):
        B, T = tokens_BT.shape
        pos_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
        x = mhc.expand_streams(model.embed_tokens(tokens_BT), model.stream_emb[...])
        mats = []
        for block in model.blocks:
            mats.append(block.attn_res.mapping(x)[2])
            x_mid, _ = block.attn_res(x, lambda h: block.attn(block.attn_norm(h), pos_BT))
            mats.append(block.mlp_res.mapping(x_mid)[2])
            x, _ = block(x, pos_BT)
        return jnp.stack(mats)

    return run(model, jnp.asarray(tokens_BT))


# --------------------------------------------------------------------------------------------
# Running the study
# --------------------------------------------------------------------------------------------
def run_config(study: Study, mode: str, seed: int):
    from jaxttt import config as C

    return C.load(C.PretrainConfig, study.config, [
        *study.overrides, f"model.mhc.mode={mode}", f"seed={seed}",
        f"run_dir={study.run_dir(mode, seed)}"])


def check(study: Study) -> None:
    """Every run's config loads and validates before anything trains (one line on a mistake)."""
    from jaxttt import config as C

    for mode in study.modes:
        if mode not in MODES:
            raise C.ConfigError(f"depth study: mode {mode!r} is not one of {'|'.join(MODES)}")
        run_config(study, mode, study.seeds[0]).validate()


def train_runs(study: Study, *, say=print) -> dict[tuple[str, int], dict] | None:
    """Pretrain every (mode, seed) (resuming finished or interrupted runs); returns their
    status {"run_dir", "diverged": message or None}, or None when a run was preempted
    (SIGTERM: it saved its state; rerunning the study resumes it)."""
    from jaxttt.runs import read_jsonl
    from jaxttt.train.loop import NonFiniteLossError, pretrain

    status = {}
    for seed in study.seeds:  # seed-major: an interrupted study has every mode for its seeds
        for mode in study.modes:
            say(f"\n=== depth study: {mode}, seed {seed}", flush=True)
            cfg = run_config(study, mode, seed)
            diverged = None
            try:
                pretrain(cfg)
            except NonFiniteLossError as e:  # a result, not a failure of the study
                diverged = str(e)
                say(f"depth study: {mode} seed {seed} diverged: {e}", flush=True)
            done = [r["step"] for r in read_jsonl(Path(cfg.run_dir) / "metrics.jsonl") if "lr" in r]
            if diverged is None and (not done or done[-1] < cfg.steps):
                say(f"depth study: {mode} seed {seed} stopped at step {done[-1] if done else 0} "
                    f"of {cfg.steps} (preempted); rerun the same command to resume", flush=True)
                return None
            status[(mode, seed)] = {"run_dir": str(study.run_dir(mode, seed)),
                                    "diverged": diverged}
    return status


def measure_run(run_dir: Path, *, diverged: str | None = None) -> dict:
    """Every number of one run: losses, spikes, and (mhc/hc) H_res drift on held-out tokens."""
    from jaxttt import config as C
    from jaxttt.runs import read_jsonl
    from jaxttt.train.loop import CONFIG_YAML

    rows = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in rows if "lr" in r]
    val = [r for r in rows if "val_loss" in r]
    losses = [r.get("loss") for r in train]
    tail = [x for x in losses[-TAIL:] if x is not None]
    cfg = C.load(C.PretrainConfig, run_dir / CONFIG_YAML)
    out = {"mode": cfg.model.mhc.mode, "seed": cfg.seed, "run_dir": str(run_dir),
           "diverged": diverged, "steps": len(train),
           "train_loss": float(np.mean(tail)) if tail else math.nan,
           "val_loss": val[-1]["val_loss"] if val else math.nan,
           "val_step": val[-1]["step"] if val else None,
           "curve": {"step": [r["step"] for r in train], "loss": losses,
                     "grad_norm": [r.get("grad_norm") for r in train],
                     "val_step": [r["step"] for r in val], "val_loss": [r["val_loss"] for r in val]},
           "spikes": grad_spikes([r.get("grad_norm") for r in train])}
    if cfg.model.mhc.mode != "none" and diverged is None:
        out["h_res"] = _drift_of_run(run_dir, cfg)
    return out


def _drift_of_run(run_dir: Path, cfg) -> dict:
    from jaxttt.eval.perplexity import eval_windows
    from jaxttt.runs import load_run

    model, _, _ = load_run(run_dir)
    x_BT, _ = eval_windows(cfg.data.val, cfg.data.seq_len, max_windows=H_RES_WINDOWS,
                           expect_vocab=model.cfg.vocab_size)
    return h_res_drift(h_res_per_token(model, x_BT))


def run_study(study: Study, *, say=print) -> dict | None:
    """Train (or resume) every run, measure them, write study.json, table.md and the plots;
    None when a run was preempted (nothing measured; rerun to resume)."""
    from jaxttt.runs import enable_compile_cache

    check(study)
    enable_compile_cache()
    study.out.mkdir(parents=True, exist_ok=True)
    status = train_runs(study, say=say)
    if status is None:
        return None
    runs = [measure_run(Path(s["run_dir"]), diverged=s["diverged"]) for s in status.values()]
    summary = {"config": study.config, "overrides": list(study.overrides),
               "modes": list(study.modes), "seeds": list(study.seeds),
               "definitions": {"train_loss": f"mean training loss over the last {TAIL} steps",
                               "val_loss": "held-out loss at the last step",
                               "spike": f"grad norm > {SPIKE_FACTOR} x median of the previous "
                                        f"{SPIKE_WINDOW} steps (norm before clipping)",
                               "gain": "Amax gain magnitude of prod H_res over all sublayers, "
                                       f"max over {H_RES_WINDOWS} held-out windows' tokens"},
               "table": table(runs), "runs": runs}
    (study.out / "study.json").write_text(json.dumps(summary, indent=1))
    (study.out / "table.md").write_text(table_markdown(summary["table"]) + "\n")
    write_plots(runs, study.out)
    return summary


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------
COLUMNS = (  # (key in the table, header, digits)
    ("train_loss", "train loss (last 20 steps)", 3), ("val_loss", "held-out loss", 3),
    ("spikes", "grad-norm spikes", 1), ("max_ratio", "max grad norm / running median", 2),
    ("max_norm", "max grad norm", 2), ("gain_fwd", "∏H_res fwd gain", 3),
    ("gain_bwd", "∏H_res bwd gain", 3), ("row_dev", "max row-sum error", 3),
    ("col_dev", "max column-sum error", 3))  # no '|' inside cells: it splits a Markdown row


def _run_values(r: dict) -> dict:
    h = r.get("h_res", {})
    return {"train_loss": r["train_loss"], "val_loss": r["val_loss"],
            "spikes": r["spikes"]["count"], "max_ratio": r["spikes"]["max_ratio"],
            "max_norm": r["spikes"]["max_norm"], "gain_fwd": h.get("gain_fwd"),
            "gain_bwd": h.get("gain_bwd"), "row_dev": h.get("row_dev"), "col_dev": h.get("col_dev")}


def table(runs: list[dict]) -> dict:
    """{mode: {"n", "diverged", key: [mean, sd]}} over the seeds of each mode."""
    out = {}
    for mode in dict.fromkeys(r["mode"] for r in runs):
        mine = [_run_values(r) for r in runs if r["mode"] == mode]
        out[mode] = {"n": len(mine), "diverged": sum(1 for r in runs
                                                     if r["mode"] == mode and r["diverged"])}
        for key, _, _ in COLUMNS:
            out[mode][key] = list(mean_sd([v[key] for v in mine]))
    return out


def table_markdown(tab: dict) -> str:
    head = "| residual | seeds | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for mode, row in tab.items():
        cells = []
        for key, _, digits in COLUMNS:
            m, s = row[key]
            cells.append("n/a" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}")
        seeds = f"{row['n']}" + (f" ({row['diverged']} diverged)" if row["diverged"] else "")
        lines.append(f"| {mode} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------
def write_plots(runs: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {m: f"C{i}" for i, m in enumerate(MODES)}
    made = []
    for name, draw in (("loss", _plot_loss), ("grad_norm", _plot_grad_norm),
                       ("gain", _plot_gain)):
        fig, ax = plt.subplots(figsize=(7, 4))
        draw(ax, runs, colours)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / PLOTS[name], dpi=110)
        plt.close(fig)
        made.append(out / PLOTS[name])
    return made


def _label_once(seen: set, mode: str, text: str) -> str | None:
    key = (mode, text)
    if key in seen:
        return None
    seen.add(key)
    return text


def _plot_loss(ax, runs, colours):
    seen: set = set()
    for r in runs:
        c, m = r["curve"], r["mode"]
        steps = np.array(c["step"])
        loss = np.array([np.nan if v is None else v for v in c["loss"]], dtype=float)
        ax.plot(steps, _smooth(loss), color=colours[m], alpha=0.8, lw=1,
                label=_label_once(seen, m, f"{m} train (10-step mean)"))
        ax.plot(c["val_step"], c["val_loss"], "o--", color=colours[m], ms=4,
                label=_label_once(seen, m, f"{m} held-out"))
    ax.set(xlabel="step (optimizer updates)", ylabel="loss (nats/token)",
           title="Training and held-out loss, one line per seed")


def _plot_grad_norm(ax, runs, colours):
    seen: set = set()
    for r in runs:
        c, m = r["curve"], r["mode"]
        g = np.array([np.nan if v is None else v for v in c["grad_norm"]], dtype=float)
        ax.plot(c["step"], g, color=colours[m], alpha=0.6, lw=0.8,
                label=_label_once(seen, m, m))
        spikes = r["spikes"]["steps"]
        ax.plot(np.array(c["step"])[spikes], g[spikes], "x", color=colours[m], ms=7,
                label=_label_once(seen, m, f"{m} spikes (> {SPIKE_FACTOR:g}× running median)"))
    ax.set_yscale("log")
    ax.set(xlabel="step (optimizer updates)", ylabel="global gradient L2 norm, before clipping",
           title="Gradient norm per step, one line per seed")


def _plot_gain(ax, runs, colours):
    seen: set = set()
    for r in runs:
        if "h_res" not in r:
            continue
        h, m = r["h_res"], r["mode"]
        depth = np.arange(1, len(h["gain_fwd_by_depth"]) + 1)
        ax.plot(depth, h["gain_fwd_by_depth"], "-", color=colours[m], alpha=0.8,
                label=_label_once(seen, m, f"{m} forward (max row sum)"))
        ax.plot(depth, h["gain_bwd_by_depth"], ":", color=colours[m], alpha=0.8,
                label=_label_once(seen, m, f"{m} backward (max column sum)"))
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set(xlabel="sublayers composed s (2 per block: attention, MLP)",
           ylabel="Amax gain of H_s···H_1 (×, max over tokens)",
           title="Composite residual map gain at the final checkpoint, one line per seed")


def _smooth(x: np.ndarray, k: int = 10) -> np.ndarray:
    """Trailing mean over up to k steps (NaN steps ignored)."""
    out = np.full_like(x, np.nan)
    for i in range(len(x)):
        w = x[max(0, i - k + 1):i + 1]
        w = w[np.isfinite(w)]
        out[i] = w.mean() if w.size else np.nan
    return out
