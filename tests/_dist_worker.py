"""Worker for tests/test_launch.py, started by launch.local in each process.

    _dist_worker.py sum            init jax.distributed, check the topology, print a global sum
    _dist_worker.py fail DIR       rank 0 hangs (with a child `sleep`), rank 1 exits with 3 once
                                   rank 0 has written its pids to DIR/pids
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
    jax.distributed.shutdown()  # both ranks leave together here, not in separate atexit hooks


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


if __name__ == "__main__":
    if sys.argv[1] == "sum":
        run_sum()
    else:
        run_fail(Path(sys.argv[2]))
