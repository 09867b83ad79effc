"""Pretraining, one SDFT and one TTT-Discover update as 2 processes x 4 CPU devices
(jax.distributed over gloo) == 1 process x 8."""
from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxttt import config as C
from jaxttt.data.packing import ensure_default_data
from jaxttt.train import metrics as M
from jaxttt.train.checkpoint import Checkpointer, load_model
from jaxttt.train.loop import pretrain
from launch.local import launch_local

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/pretrain/tiny.yaml"
OVERRIDES = ["model.n_layers=1", "model.d_model=64", "model.n_heads=2", "model.d_head=32",
             "model.d_ff=128", "model.mhc.sinkhorn_iters=4", "data.seq_len=32",
             "data.batch_size=8", "data.vocab_size=512", "data.max_bytes=600000", "steps=4",
             "save_every=2", "eval_every=2", "eval_batches=2", "log_every=1", "mesh.fsdp=2",
             "mesh.tensor=2"]


def test_two_processes_match_one_process(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    ensure_default_data(cache / "data", 512, max_bytes=600_000, progress=False)  # built once
    monkeypatch.setenv("JAXTTT_CACHE", str(cache))
    multi, single = tmp_path / "multi", tmp_path / "single"
    out = io.StringIO()
    cmd = [sys.executable, "-m", "jaxttt.cli", "pretrain", "--config", CONFIG, *OVERRIDES,
           f"run_dir={multi}"]
    rc = launch_local(cmd, n=2, devices_per_process=4, timeout=300, cwd=REPO,
                      env=dict(os.environ), out=out)
    assert rc == 0, out.getvalue()
    pretrain(C.load(C.PretrainConfig, REPO / CONFIG, OVERRIDES + [f"run_dir={single}"]))

    a, b = (M.read_jsonl(d / M.METRICS_FILE) for d in (multi, single))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 2, 3, 4, 4]
    for key in ("loss", "grad_norm", "val_loss"):
        xa, xb = ([r[key] for r in rows if key in r] for rows in (a, b))
        assert len(xa) == len(xb) > 0
        np.testing.assert_allclose(xa, xb, rtol=1e-5, err_msg=key)
    # both processes wrote their shards of every checkpoint (orbax multi-process save)
    assert Checkpointer(multi).all_steps() == [2, 4]
    for p in (0, 1):
        assert (multi / f"checkpoints/4/params/ocdbt.process_{p}").is_dir()
    assert "[p1]" in out.getvalue() and "run directory" in out.getvalue()
    _assert_same_params(multi, single)


def test_sdft_and_discover_updates_match_across_process_layouts(tmp_path):
    """The trainer core's batch placement and update are independent of the process layout."""
    worker = [sys.executable, str(REPO / "tests" / "_dist_worker.py"), "updates"]
    results = {}
    for n, per in ((2, 4), (1, 8)):
        out = io.StringIO()
        path = tmp_path / f"{n}x{per}.npz"
        rc = launch_local(worker + [str(path)], n=n, devices_per_process=per, timeout=300,
                          cwd=REPO, env=dict(os.environ), out=out)
        assert rc == 0, out.getvalue()
        results[n] = dict(np.load(path))
    multi, single = results[2], results[1]
    assert sorted(multi) == sorted(single) and len(multi) > 10
    assert float(single["sdft_tokens"]) > 0 and float(single["sdft_skipped"]) == 0
    assert bool(single["disc_updated"]) and float(single["disc_grad_norm"]) > 0
    for key in single:
        np.testing.assert_allclose(multi[key], single[key], rtol=1e-5, atol=1e-6, err_msg=key)


def _assert_same_params(run_a: Path, run_b: Path) -> None:
    leaves = [jax.tree.leaves(nnx.state(load_model(r)[0], nnx.Param)) for r in (run_a, run_b)]
    for x, y in zip(*leaves):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
