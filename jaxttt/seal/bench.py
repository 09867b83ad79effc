"""The evidence run: the synthetic knowledge set through a real server, one request per item.

The server runs in a thread on a free loopback port and the requests go through the client,
so the numbers include the wire. The first request also pays compilation; it is reported
apart and left out of the latency statistics.
"""
from __future__ import annotations

import statistics
import threading
import time
from typing import Any

from jaxttt.seal import client, knowledge
from jaxttt.seal.engine import TTTEngine
from jaxttt.seal.server import TTTServer

PHASES = ("baseline_eval_s", "finetune_s", "adapted_eval_s", "total_s")


def _spread(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {}
    return {"mean": statistics.fmean(xs), "std": statistics.pstdev(xs), "min": min(xs),
            "median": statistics.median(xs), "max": max(xs)}


def run_bench(engine: TTTEngine, *, n: int = 24, seed: int = 0,
              hparams: dict[str, Any] | None = None, echo=print) -> dict[str, Any]:
    items = knowledge.make_knowledge_set(n, seed)
    server = TTTServer(engine, port=0, echo=None)
    port = server.bind()
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    rows = []
    try:
        for i, item in enumerate(items):
            t0 = time.perf_counter()
            reply = client.query(knowledge.to_request(item, return_timings=True,
                                                      **{"seed": seed, **(hparams or {})}),
                                 port=port, timeout_s=3600, retries=1)
            rows.append({"title": item["title"], "client_s": time.perf_counter() - t0, **reply})
            echo(f"seal-bench: {i + 1}/{n} {item['title']}: base "
                 f"{reply['baseline_accuracy']:.2f} adapter {reply['adapter_accuracy']:.2f} "
                 f"({reply['timings']['total_s']:.2f}s)")
    finally:
        client.shutdown(port=port)
        thread.join(timeout=60)
    report = summarize(rows)
    report.update(passages=n, seed=seed, hparams=hparams or {}, requests=rows)
    s = report["summary"]
    echo(f"seal-bench: mean baseline accuracy {s['baseline_accuracy']['mean']:.3f} "
         f"(std {s['baseline_accuracy']['std']:.3f}), adapter {s['adapter_accuracy']['mean']:.3f} "
         f"(std {s['adapter_accuracy']['std']:.3f}) over {n} passages")
    for ph in PHASES:
        st = s["latency_s"].get(ph, {})
        if st:
            echo(f"seal-bench: {ph:16s} mean {st['mean']:.3f}s std {st['std']:.3f} "
                 f"median {st['median']:.3f} (first request {s['first_request_s'][ph]:.2f}s)")
    return report


def run_seeds(engine: TTTEngine, *, n: int, seeds: list[int],
              hparams: dict[str, Any] | None = None, echo=print) -> dict[str, Any]:
    """`run_bench` once per seed on one engine (compiled once); the spread is over seeds."""
    runs = [run_bench(engine, n=n, seed=s, hparams=hparams, echo=echo) for s in seeds]
    across = across_seeds(runs)
    for key in ("baseline_accuracy", "adapter_accuracy"):
        st = across[key]
        echo(f"seal-bench: {key} over seeds {seeds}: mean {st['mean']:.3f} sd {st['sd']:.3f} "
             f"(min {st['min']:.3f}, max {st['max']:.3f}; {st['correct']}/{st['questions']} "
             "questions)")
    return {"seeds": list(seeds), "passages": n, "hparams": hparams or {},
            "across_seeds": across, "per_seed": runs}


def across_seeds(runs: list[dict]) -> dict[str, Any]:
    """Per seed: the fraction of its questions answered right; then mean, sample sd, min, max."""
    out: dict[str, Any] = {}
    for key, flag in (("baseline_accuracy", "baseline_correct"),
                      ("adapter_accuracy", "adapter_correct")):
        hits = [[bool(c) for r in run["requests"] for c in r[flag]] for run in runs]
        acc = [sum(h) / len(h) if h else 0.0 for h in hits]
        out[key] = {"per_seed": acc, "mean": statistics.fmean(acc),
                    "sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                    "min": min(acc), "max": max(acc), "correct": sum(map(sum, hits)),
                    "questions": sum(map(len, hits))}
    return out


def plot_seeds(report: dict[str, Any], path) -> Any:
    """Per-passage accuracy, baseline beside adapted, passages grouped by seed (one PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxttt.eval.plots import save

    runs = report.get("per_seed", [report])
    labels, base, adapt, edges = [], [], [], []
    for run in runs:
        for i, r in enumerate(run["requests"]):
            labels.append(f"s{run['seed']}:{i}")
            base.append(r["baseline_accuracy"])
            adapt.append(r["adapter_accuracy"])
        edges.append(len(labels))
    x = list(range(len(labels)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(x) + 2), 3.8))
    ax.bar([i - 0.2 for i in x], base, 0.4, label="baseline (base model)")
    ax.bar([i + 0.2 for i in x], adapt, 0.4, label="adapted (LoRA on the passage)")
    for e in edges[:-1]:
        ax.axvline(e - 0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(x, labels, rotation=90, fontsize=7)
    ax.set(xlabel="passage (seed:index)", ylim=(0, 1.05),
           ylabel="accuracy per passage (fraction of 3 questions)")
    across = report.get("across_seeds")
    title = "SEAL knowledge incorporation, per passage"
    if across:
        b, a = across["baseline_accuracy"], across["adapter_accuracy"]
        title += (f": baseline {b['mean']:.2f} ± {b['sd']:.2f}, adapted {a['mean']:.2f} ± "
                  f"{a['sd']:.2f} (mean ± sd over {len(runs)} seeds)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


def summarize(rows: list[dict]) -> dict[str, Any]:
    warm = rows[1:] or rows
    return {"summary": {
        "baseline_accuracy": _spread([r["baseline_accuracy"] for r in rows]),
        "adapter_accuracy": _spread([r["adapter_accuracy"] for r in rows]),
        "adapter_gain": _spread([r["adapter_gain"] for r in rows]),
        "latency_s": {ph: _spread([r["timings"][ph] for r in warm]) for ph in PHASES},
        "first_request_s": {ph: rows[0]["timings"][ph] for ph in PHASES} if rows else {},
    }}
