"""Plots of run directories, shared by `jaxttt demo`'s report and the notebooks.

Every function reads the files a run writes (JSONL/JSON, nothing private) and draws onto a
matplotlib Axes, so a notebook can lay them out as it likes and the report can save PNGs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxttt.runs import read_jsonl  # noqa: F401  (re-exported for notebooks)


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt
        _, ax = plt.subplots(figsize=(6, 3.5))
    return ax


def loss_curves(runs: dict[str, str | Path], ax=None):
    """Training loss (and validation loss, dashed) per step for several pretraining runs."""
    ax = _axes(ax)
    for i, (label, run) in enumerate(runs.items()):
        rows = read_jsonl(Path(run) / "metrics.jsonl")
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        color = f"C{i}"
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.8, label=f"{label} train")
        if val:
            ax.plot(*zip(*val), "o--", color=color, label=f"{label} val")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="Pretraining: mHC vs baseline")
    ax.legend(fontsize=8)
    return ax


def discover_rewards(run: str | Path, ax=None):
    """Best reward so far vs the best-of-N baseline at equal samples, and β, per TTT step."""
    ax = _axes(ax)
    rows = [r for r in read_jsonl(Path(run) / "log.jsonl") if "best_reward" in r]
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["best_reward"] for r in rows], "o-", label="TTT-Discover best")
    ax.plot(steps, [r["r_mean"] for r in rows], ".:", alpha=0.6, label="rollout mean")
    if rows and "baseline_best_reward" in rows[0]:
        ax.plot(steps, [r["baseline_best_reward"] for r in rows], "s--",
                label="best-of-N from θ0 (same samples)")
    ax.set(xlabel="TTT step", ylabel="reward", title="TTT-Discover vs best-of-N")
    ax.xaxis.get_major_locator().set_params(integer=True)
    twin = ax.twinx()
    twin.plot(steps, [r["beta"] for r in rows], color="grey", alpha=0.4, lw=1,
              label="β (adaptive, right axis)")
    twin.set_ylabel("β (adaptive)", color="grey")
    handles = [h for a in (ax, twin) for h in a.get_legend_handles_labels()[0]]
    twin.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="best")
    return ax


def archive_tree(run: str | Path, ax=None, max_nodes: int = 60):
    """The discovery archive as a tree: x = step added, y = reward, edges parent → child."""
    ax = _axes(ax)
    result = json.loads((Path(run) / "result.json").read_text())
    nodes = result["archive"]["nodes"]
    nodes = sorted(nodes, key=lambda n: -n["reward"])[:max_nodes]
    by_id = {n["id"]: n for n in nodes}
    for n in nodes:
        parent = by_id.get(n.get("parent"))
        if parent is not None:
            ax.plot([parent["step"], n["step"]], [parent["reward"], n["reward"]], "-",
                    color="grey", alpha=0.5, lw=0.8)
    ax.scatter([n["step"] for n in nodes], [n["reward"] for n in nodes],
               c=["C3" if n.get("seed") else "C0" for n in nodes],
               s=[20 + 10 * n.get("n", 0) for n in nodes], zorder=3)
    ax.set(xlabel="step added", ylabel="reward", title="Archive (size = visits, red = seed)")
    return ax


def gate_history(run: str | Path, ax=None):
    """Held-out perplexity before/after each SDFT block, marked accepted (✓) or reverted (✗)."""
    ax = _axes(ax)
    blocks = sorted(Path(run).glob("block_*"))
    xs, before, after, ok = [], [], [], []
    for i, bdir in enumerate(blocks):
        if not (bdir / "gate_decision.json").is_file():
            continue
        xs.append(i)
        before.append(json.loads((bdir / "eval_before.json").read_text())["perplexity"])
        after.append(json.loads((bdir / "eval_after.json").read_text())["perplexity"])
        ok.append(json.loads((bdir / "gate_decision.json").read_text())["accepted"])
    width = 0.38
    ax.bar(np.asarray(xs) - width / 2, before, width, label="before", color="C7")
    ax.bar(np.asarray(xs) + width / 2, after, width, label="after",
           color=["C2" if a else "C3" for a in ok])
    for x, a, y in zip(xs, ok, after):
        ax.annotate("accepted" if a else "reverted", (x + width / 2, y), ha="center",
                    va="bottom", fontsize=8)
    ax.set(xlabel="SDFT block", ylabel="held-out perplexity", title="SDFT gates (forgetting)")
    ax.set_xticks(xs)
    ax.legend(fontsize=8)
    return ax


def forgetting(run: str | Path, ax=None):
    """Held-out perplexity (left) and probe score (right) before → after each SDFT block.

    Each block is a segment from its evaluation before to its evaluation after: solid green
    when the gate accepted it (the next block starts there), dotted red when it was reverted
    (the next block starts from the same weights again). Rising perplexity or a falling probe
    score across accepted blocks is forgetting.
    """
    ax = _axes(ax)
    twin = ax.twinx()
    for i, bdir in enumerate(sorted(Path(run).glob("block_*"))):
        if not (bdir / "gate_decision.json").is_file():
            continue
        before = json.loads((bdir / "eval_before.json").read_text())
        after = json.loads((bdir / "eval_after.json").read_text())
        ok = json.loads((bdir / "gate_decision.json").read_text())["accepted"]
        style = dict(color="C2" if ok else "C3", ls="-" if ok else ":", marker="o")
        ax.plot([i, i + 1], [before["perplexity"], after["perplexity"]], **style)
        if "probe/overall" in before and "probe/overall" in after:
            twin.plot([i, i + 1], [before["probe/overall"], after["probe/overall"]],
                      **{**style, "marker": "s", "alpha": 0.5})
    ax.set(xlabel="SDFT block boundary", ylabel="held-out perplexity (circles)",
           title="Forgetting (green = accepted, red = reverted)")
    twin.set_ylabel("probe score (squares)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    return ax


def identity_distances(h_res: dict[str, np.ndarray], ax=None):
    """||H_res - I|| per sublayer, one group of bars per model (see eval/mhc_stats.py)."""
    from jaxttt.eval.mhc_stats import identity_distance

    ax = _axes(ax)
    width = 0.8 / max(len(h_res), 1)
    n = 0
    for i, (label, h_LNN) in enumerate(h_res.items()):
        d = identity_distance(np.asarray(h_LNN))
        n = max(n, len(d))
        ax.bar(np.arange(len(d)) + (i - (len(h_res) - 1) / 2) * width, d, width, label=label)
    ax.set_xticks(range(n), [f"{'attn' if j % 2 == 0 else 'mlp'} {j // 2}" for j in range(n)],
                  fontsize=8)
    ax.set(xlabel="sublayer", ylabel="||H_res − I||_F", title="Drift of the mixing from identity")
    ax.set_ylim(top=ax.get_ylim()[1] * 1.3)  # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper center", ncols=max(len(h_res), 1))
    return ax


def h_res_heatmaps(h_res_LNN: np.ndarray, fig=None, labels: Sequence[str] | None = None):
    """One heat map per sublayer of the token-averaged H_res (see eval/mhc_stats.py): entry
    (i, j) is the weight of input stream j in output stream i, written in each cell, with one
    colour bar for all maps."""
    import matplotlib.pyplot as plt

    n = len(h_res_LNN)
    fig = fig or plt.figure(figsize=(2.4 * n + 1.0, 2.8), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    im = None
    for i, (ax, h) in enumerate(zip(axes, h_res_LNN)):
        im = ax.imshow(h, vmin=0.0, vmax=1.0, cmap="viridis")
        _annotate_cells(ax, np.asarray(h))
        ax.set_title(labels[i] if labels else f"{'attn' if i % 2 == 0 else 'mlp'} {i // 2}",
                     fontsize=8)
        ax.set_xticks(range(h.shape[1]))
        ax.set_yticks(range(h.shape[0]))
        ax.tick_params(labelsize=6)
        ax.set_xlabel("input stream j", fontsize=7)
        if i == 0:
            ax.set_ylabel("output stream i", fontsize=7)
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.8, label="H_res[i, j] (mixing weight)")
    fig.suptitle("H_res per sublayer (identity = diagonal)", fontsize=9)
    return fig


def _annotate_cells(ax, h: np.ndarray) -> None:
    """Each cell's value, in a colour readable on the viridis map."""
    if h.size > 64:  # too many cells to read
        return
    for (r, c), v in np.ndenumerate(h):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=5,
                color="black" if v > 0.6 else "white")


def save(fig_or_ax, path: str | Path) -> Path:
    fig = getattr(fig_or_ax, "figure", fig_or_ax)
    if fig.get_layout_engine() is None:  # a constrained layout (colour bars) arranges itself
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return Path(path)
