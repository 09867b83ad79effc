"""Worker for tests/test_launch.py, started by launch.local in each process.

    _dist_worker.py sum            init jax.distributed, check the topology, print a global sum
    _dist_worker.py fail DIR       rank 0 hangs (with a child `sleep`), rank 1 exits with 3 once
                                   rank 0 has written its pids to DIR/pids
    _dist_worker.py updates FILE   one SDFT and one TTT-Discover update of a tiny model on fixed
                                   rows over all devices (mesh fsdp=2); process 0 saves the
                                   resulting weights and metrics to FILE (.npz)
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def run_sum() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from jaxttt.sharding import init_distributed

    init_distributed()
    rank = jax.process_index()
    assert jax.process_count() == 2, jax.process_count()
    assert jax.device_count() == 4 and jax.local_device_count() == 2, jax.devices()
    mesh = Mesh(np.asarray(jax.devices()), ("x",))
    local_x = np.full((2,), rank + 1.0, np.float32)  # global [1, 1, 2, 2]
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("x")), local_x)
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
    ranks = multihost_utils.process_allgather(np.int32(rank))
    print(f"rank={rank} devices={jax.device_count()} sum={float(total)} "
          f"ranks={ranks.tolist()}", flush=True)


def run_fail(out_dir: Path) -> None:
    rank = int(os.environ["JAXTTT_PROCESS_ID"])
    pids = out_dir / "pids"
    if rank == 0:
        child = subprocess.Popen(["sleep", "120"])
        pids.write_text(f"{os.getpid()} {child.pid}")
        time.sleep(120)  # a hung peer: only the launcher can end it
        return
    deadline = time.monotonic() + 30
    while not pids.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    print("rank 1 failing on purpose", flush=True)
    sys.exit(3)


def run_updates(out_file: Path) -> None:
    import types

    import jax
    import numpy as np
    from flax import nnx
    from jax.experimental import multihost_utils

    from jaxttt import config as C
    from jaxttt.discover.step import DiscoverTrainer
    from jaxttt.model import lora
    from jaxttt.model.transformer import build
    from jaxttt.sdft.step import SDFTTrainer
    from jaxttt.sharding import init_distributed, make_mesh

    init_distributed()
    model_cfg = C.ModelConfig(vocab_size=128, n_layers=1, d_model=32, n_heads=2, d_head=16,
                              d_ff=64, max_seq_len=64, mhc=C.MHCConfig(sinkhorn_iters=4))
    mesh = make_mesh(C.MeshConfig(fsdp=2))
    optim = C.OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant")
    tok = types.SimpleNamespace(pad_id=0, eos_id=1)  # SDFT batches only need the two ids
    rng = np.random.default_rng(0)
    out = {}

    sdft_cfg = C.SDFTConfig(optim=optim, ema_decay=0.5, batch_size=4, grad_accum=2,
                            sampling=C.SamplingConfig(max_new_tokens=8))
    sdft = SDFTTrainer(build(model_cfg, mesh, seed=0), tok, sdft_cfg, mesh)
    s_ctx = [[1] + rng.integers(2, 128, k).tolist() for k in (5, 9, 3, 7, 4, 6, 8, 2)]
    t_ctx = [c + rng.integers(2, 128, 6).tolist() for c in s_ctx]
    ys = [rng.integers(2, 128, k).tolist() for k in (8, 3, 5, 1, 8, 6, 2, 7)]
    m = sdft.update(sdft.finish(sdft.sdft_batch(s_ctx, t_ctx, ys), ("kl_len",)))
    out.update({f"sdft_{k}": v for k, v in m.items()})
    out["sdft_params"] = nnx.state(sdft.model(), nnx.Param)
    out["sdft_teacher"] = sdft.teacher

    disc_cfg = C.DiscoverConfig(optim=optim, rollouts=4, lora=C.LoRAConfig(rank=4, alpha=8.0),
                                sampling=C.SamplingConfig(max_new_tokens=8))
    adapted = lora.add_lora(build(model_cfg, mesh, seed=1), disc_cfg.lora, seed=0, mesh=mesh)
    disc = DiscoverTrainer(adapted, disc_cfg, mesh, pad_id=0)
    prompts = [[1] + rng.integers(2, 128, 6).tolist()] * 8
    actions = [rng.integers(2, 128, k).tolist() for k in (3, 8, 5, 1, 7, 2, 4, 6)]
    rewards = rng.random((2, 4)).astype(np.float32)
    for _ in range(2):  # the second update moves A too (B starts at 0)
        m = disc.update(prompts, actions, rewards)
    out.update({f"disc_{k}": v for k, v in m.items() if k != "beta"})
    out["disc_lora"] = disc.lora

    flat = {}
    for name, value in out.items():
        if isinstance(value, (int, float, bool)):
            flat[name] = np.asarray(value)
            continue
        for path, x in jax.tree_util.tree_leaves_with_path(value):
            flat[name + jax.tree_util.keystr(path)] = multihost_utils.process_allgather(x, tiled=True)
    if jax.process_index() == 0:
        np.savez(out_file, **flat)
    print(f"rank={jax.process_index()} saved {len(flat)} arrays", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "sum":
        run_sum()
    elif sys.argv[1] == "updates":
        run_updates(Path(sys.argv[2]))
    else:
        run_fail(Path(sys.argv[2]))
