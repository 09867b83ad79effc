"""Time the demo's TTT-Discover update program on SmolLM2-135M: trace, compile (or load from
the persistent cache), then a few steps. Run it twice with one cache directory to time a load:

    JAX_COMPILATION_CACHE_DIR=/tmp/c python docs/measure_update_load.py          # compiles
    JAX_COMPILATION_CACHE_DIR=/tmp/c python docs/measure_update_load.py          # loads
    JAX_COMPILATION_CACHE_DIR=/tmp/c python docs/measure_update_load.py --ynn    # XLA's default

`--ynn` compiles with XLA:CPU's default YNNPACK fusions (what the trainer did before it turned
them off for the update). Needs the model in the cache (`jaxttt demo` fetches it).
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ynn", action="store_true", help="keep XLA:CPU's YNNPACK fusions")
    ap.add_argument("--steps", type=int, default=2, help="updates to time after the compile")
    args = ap.parse_args()

    from jaxttt import config as C, sharding
    from jaxttt.discover.step import DiscoverTrainer, batch_width, build_batch, row_weights
    from jaxttt.model.lora import add_lora
    from jaxttt.runs import load_run, resolve_named
    from jaxttt.train import trainer

    if args.ynn:
        trainer.CPU_UPDATE_OPTIONS = {}
    cfg = C.load(C.DiscoverConfig, "discover/default.yaml", [
        "rollouts=8", "sampling.max_new_tokens=96", "optim.lr=1e-4", "lora.rank=8",
        "lora.alpha=16", "rollout_policy=importance"])
    mesh = sharding.make_mesh(cfg.mesh)
    model, _, _ = load_run(resolve_named("smollm2-135m-instruct"), mesh=mesh)
    tr = DiscoverTrainer(add_lora(model, cfg.lora, mesh=mesh), cfg, mesh, pad_id=0)
    rng = np.random.default_rng(0)  # random tokens at the demo's shapes: 150-token prompt
    prompts = [list(rng.integers(1, 40000, 150)) for _ in range(8)]
    comps = [list(rng.integers(1, 40000, int(rng.integers(40, 96)))) for _ in range(8)]
    width = batch_width(150, 96, tr.max_seq_len)
    batch = build_batch(prompts, comps, pad_id=0, width=width, rows_multiple=tr.rows_multiple)
    batch.update(row_weights(tr.advantages(rng.random((1, 8)).astype(np.float32)), len(batch["tokens"])))

    t0 = time.perf_counter()
    lowered = tr.core.lower(batch)
    t1 = time.perf_counter()
    with jax.set_mesh(tr.core.mesh):
        compiled = lowered.compile()
    t2 = time.perf_counter()
    ynn = compiled.as_text().count('"kind":"__ynn_fusion"')
    print(f"trace {t1 - t0:.1f} s, compile or load {t2 - t1:.1f} s, {ynn} YNN fusions", flush=True)
    for i in range(args.steps):
        rw = rng.random((1, 8)).astype(np.float32)
        t = time.perf_counter()
        m = tr.update(prompts, comps, rw)
        print(f"update {i}: {time.perf_counter() - t:.1f} s, loss {m['loss']:.4f}", flush=True)


if __name__ == "__main__":
    main()
