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
                                                      **(hparams or {})),
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


def summarize(rows: list[dict]) -> dict[str, Any]:
    warm = rows[1:] or rows
    return {"summary": {
        "baseline_accuracy": _spread([r["baseline_accuracy"] for r in rows]),
        "adapter_accuracy": _spread([r["adapter_accuracy"] for r in rows]),
        "adapter_gain": _spread([r["adapter_gain"] for r in rows]),
        "latency_s": {ph: _spread([r["timings"][ph] for r in warm]) for ph in PHASES},
        "first_request_s": {ph: rows[0]["timings"][ph] for ph in PHASES} if rows else {},
    }}
