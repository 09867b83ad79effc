"""Compile the discover update beside sampling, or after it (README, the 8:29 demo run).

    python docs/measure_precompile.py seq    # sample, then compile: two times
    python docs/measure_precompile.py conc   # compile in the background while sampling: one wall

SmolLM2-135M-Instruct (fetched into the cache by `jaxttt demo`), the demo's discover settings.
"""
import sys, time, threading
import numpy as np, jax
from jaxttt import config as C, sharding
from jaxttt.runs import resolve_named, load_run, enable_compile_cache
from jaxttt.model.lora import add_lora
from jaxttt.discover.step import DiscoverTrainer, batch_width, build_batch, row_weights
from jaxttt.discover.loop import sample_rollouts
mode = sys.argv[1]
enable_compile_cache()
cfg = C.load(C.DiscoverConfig, "discover/default.yaml", [
    "steps=3", "rollouts=8", "sampling.max_new_tokens=96", "optim.lr=1e-4", "lora.rank=8",
    "lora.alpha=16", "rollout_policy=importance"])
mesh = sharding.make_mesh(cfg.mesh)
model, tok, _ = load_run(resolve_named("smollm2-135m-instruct"), mesh=mesh)
model = add_lora(model, cfg.lora, mesh=mesh)
tr = DiscoverTrainer(model, cfg, mesh, pad_id=tok.pad_id)
prompt = "Complete the Python function below.\n```python\ndef f(x):\n    return x\n```\n" * 6
def sample(i):
    t = time.perf_counter()
    sample_rollouts(tr.model(), tok, prompt, 8, jax.random.key(i), cfg, ttt=True, mesh=mesh)
    return time.perf_counter() - t
rng = np.random.default_rng(0)
prompts = [list(rng.integers(1, 40000, 221)) for _ in range(8)]
comps = [list(rng.integers(1, 40000, 96)) for _ in range(8)]
b = build_batch(prompts, comps, pad_id=0, width=batch_width(221, 96, tr.max_seq_len), rows_multiple=1)
b.update(row_weights(tr.advantages(rng.random((1, 8)).astype(np.float32)), 8))
def comp():
    t = time.perf_counter(); tr.core.compile(b, verbose=False); return time.perf_counter() - t
print("warm-up sample", round(sample(0), 1), flush=True)
print("sample alone", round(sample(1), 1), flush=True)
if mode == "seq":
    print("compile alone", round(comp(), 1), flush=True)
else:
    res = {}
    t0 = time.perf_counter()
    th = threading.Thread(target=lambda: res.update(c=comp())); th.start()
    s = sample(2); th.join()
    print(f"concurrent: wall {time.perf_counter()-t0:.1f} sample {s:.1f} compile {res['c']:.1f}", flush=True)
t = time.perf_counter(); tr.update(prompts, comps, rng.random((1, 8)).astype(np.float32))
print("update after", round(time.perf_counter() - t, 1))
