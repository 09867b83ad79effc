"""`jaxttt bench`: training and sampling throughput on the peer's benchmark shape.

Times, after warm-up, (a) the pretraining AdamW step (the same compiled program `jaxttt
pretrain` runs) on `configs/model/bench.yaml`, batch 8 x 256, (b) sampling 16 rows x 64-token
prompt x 64 new tokens (temperature 1.0, top-p 0.95, no EOS), and (c) the training step again
with `mhc.mode=none`. On a GPU/TPU it also measures MFU of a larger preset (`--mfu-model`,
bf16, `--mfu-seq-len`). The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import time

DEFAULT_MODEL = "model/bench.yaml"


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="training/sampling throughput (JSON on the last line)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model preset for (a)-(c)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--sample-rows", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--mfu-model", default="model/120m.yaml", help="preset for MFU (accelerators)")
    p.add_argument("--mfu-seq-len", type=int, default=1024)
    p.add_argument("--mfu-batch", type=int, default=16)
    p.add_argument("--no-mfu", action="store_true", help="skip the MFU measurement")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.set_defaults(func=_main)


def time_train(model_cfg, *, batch: int, seq_len: int, steps: int, warmup: int = 2) -> float:
    """Tokens/s of the pretraining update (the trainer core `jaxttt pretrain` runs) on all
    local devices, random tokens."""
    import jax
    import numpy as np

    from jaxttt import config as C
    from jaxttt import sharding
    from jaxttt.train.step import make_trainer

    mesh = sharding.make_mesh(C.MeshConfig())
    trainer = make_trainer(model_cfg, C.OptimConfig(warmup_steps=0), mesh, total_steps=1000)
    rng = np.random.default_rng(0)
    xy = rng.integers(0, model_cfg.vocab_size, (2, batch, seq_len), dtype=np.int32)
    placed = {k: sharding.place_batch(a, mesh) for k, a in zip(("x", "y"), xy)}
    trainer.compile(placed, verbose=False)
    for _ in range(warmup):
        m = trainer.step_async(placed)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        m = trainer.step_async(placed)
    jax.block_until_ready((trainer.params, m))
    return steps * batch * seq_len / (time.perf_counter() - t0)


def time_sampling(model_cfg, *, rows: int, prompt_len: int, new_tokens: int, reps: int = 3) -> float:
    """Generated tokens/s of the KV-cached sampler (best of `reps` after a warm-up call)."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxttt import sampling
    from jaxttt.model.transformer import Transformer

    model = Transformer(model_cfg, rngs=nnx.Rngs(0))
    prompts = np.random.default_rng(0).integers(4, model_cfg.vocab_size, (rows, prompt_len)).tolist()
    kw = dict(max_new_tokens=new_tokens, temperature=1.0, top_p=0.95, eos_id=None)
    sampling.generate(model, prompts, jax.random.key(0), **kw)
    best = float("inf")
    for i in range(reps):
        t0 = time.perf_counter()
        sampling.generate(model, prompts, jax.random.key(i + 1), **kw)
        best = min(best, time.perf_counter() - t0)
    return rows * new_tokens / best


def measure_mfu(preset: str, *, seq_len: int, batch: int, steps: int) -> dict:
    """MFU of a larger preset in bf16 (only meaningful where the device peak is known)."""
    import jax

    from jaxttt import config as C
    from jaxttt.train import metrics

    cfg = C.load(C.ModelConfig, preset, ["dtype=bfloat16", f"max_seq_len={max(seq_len, 2048)}"])
    tps = time_train(cfg, batch=batch, seq_len=seq_len, steps=steps)
    plain = time_train(C.load(C.ModelConfig, preset, ["dtype=bfloat16", "mhc.mode=none",
                                                      f"max_seq_len={max(seq_len, 2048)}"]),
                       batch=batch, seq_len=seq_len, steps=steps)
    flops = metrics.flops_per_token(cfg, seq_len)
    return {"mfu_model": preset, "mfu_seq_len": seq_len, "mfu_batch": batch,
            "mfu_tokens_per_s": round(tps, 1),
            "mfu": metrics.mfu(tps, flops, n_devices=jax.device_count()),
            "mfu_mhc_overhead": round(plain / tps - 1.0, 4)}


def run(args) -> dict:
    import jax

    from jaxttt import config as C
    from jaxttt.model.transformer import abstract_model, count_params
    from jaxttt.train import metrics

    cfg = C.load(C.ModelConfig, args.model)
    plain_cfg = C.load(C.ModelConfig, args.model, ["mhc.mode=none"])
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))
    train = time_train(cfg, batch=args.batch, seq_len=args.seq_len, steps=args.steps)
    log(f"train step (mHC):   {train:,.0f} tokens/s")
    sample = time_sampling(cfg, rows=args.sample_rows, prompt_len=args.prompt_len,
                           new_tokens=args.new_tokens)
    log(f"sampling (KV cache): {sample:,.0f} tokens/s")
    plain = time_train(plain_cfg, batch=args.batch, seq_len=args.seq_len, steps=args.steps)
    log(f"train step (plain): {plain:,.0f} tokens/s")
    n_params = count_params(abstract_model(cfg))
    out = {"train_tokens_per_s": round(train, 1), "sample_tokens_per_s": round(sample, 1),
           "plain_train_tokens_per_s": round(plain, 1), "mhc_overhead": round(plain / train - 1, 4),
           "device": jax.devices()[0].device_kind, "n_devices": jax.device_count(),
           "params_M": round(n_params / 1e6, 2), "model": args.model,
           "batch": args.batch, "seq_len": args.seq_len}
    if not args.no_mfu and metrics.peak_flops() is not None:
        out.update(measure_mfu(args.mfu_model, seq_len=args.mfu_seq_len, batch=args.mfu_batch,
                               steps=args.steps))
    return out


def _main(args) -> None:
    print(json.dumps(run(args)), flush=True)
