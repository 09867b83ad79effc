"""Multi-process runs (jax.distributed over gloo, started by launch/local.py) equal one process:
`jaxttt pretrain`, `jaxttt discover` and `jaxttt sdft` as 2 processes x 4 CPU devices ==
1 process x 8 (fsdp=2 shards the weights across the two processes)."""
from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxttt import cli
from jaxttt import config as C
from jaxttt.data.packing import ensure_default_data
from jaxttt.model import lora
from jaxttt.model.transformer import Transformer
from jaxttt.runs import read_jsonl
from jaxttt.sharding import make_mesh
from jaxttt.train import metrics as M
from jaxttt.train.checkpoint import Checkpointer, load_model, save_model_config
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


# --------------------------------------------------------------------------------------------
# Whole `jaxttt discover` / `jaxttt sdft` runs: the same command on every process
# --------------------------------------------------------------------------------------------
TINY = C.ModelConfig(vocab_size=512, n_layers=1, d_model=64, n_heads=2, d_head=32, d_ff=128,
                     max_seq_len=128, mhc=C.MHCConfig(sinkhorn_iters=4))
TIMING = {"wall_s", "sample_s", "reward_s", "update_s", "rollout_tokens_per_s", "timestamp",
          "time_s", "step_wall_s", "first_step_wall_s", "run_dir", "out_dir", "data"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random θ0 run (its tokenizer recorded) and the corpus's held-out split."""
    root = tmp_path_factory.mktemp("mh")
    files = ensure_default_data(root / "data", 512, max_bytes=200_000, progress=False)
    run = root / "base"
    run.mkdir()
    save_model_config(run, TINY)
    ckpt = Checkpointer(run, async_save=False)
    ckpt.save(0, nnx.state(Transformer(TINY, rngs=nnx.Rngs(0)), nnx.Param),
              meta={"tokenizer": str(files["tokenizer"])})
    ckpt.close()
    return run, files["val"]


def _both(tmp_path: Path, argv: list[str]) -> tuple[Path, Path, str]:
    """`jaxttt ARGV --out DIR` as 2 processes x 4 devices (launch.local) and in this process
    (1 x 8); returns (multi dir, single dir, launcher output)."""
    multi, single = tmp_path / "multi", tmp_path / "single"
    out = io.StringIO()
    rc = launch_local([sys.executable, "-m", "jaxttt.cli", *argv, "--out", str(multi)], n=2,
                      devices_per_process=4, timeout=400, cwd=REPO, env=dict(os.environ),
                      out=out)
    assert rc == 0, out.getvalue()
    assert cli.main([*argv, "--out", str(single)]) == 0
    return multi, single, out.getvalue()


def _files(run: Path) -> set[str]:
    """The run's files, orbax's per-process shard folders aside (one per writing process)."""
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()
            and not any(part.startswith(("ocdbt.process_", "process_")) or part == "d"
                        for part in p.relative_to(run).parts)}


def _assert_same_rows(a: list[dict], b: list[dict], what: str) -> None:
    """Same lines (timings aside); numbers equal to float32 reduction-order tolerance."""
    assert len(a) == len(b) > 0, what
    for i, (x, y) in enumerate(zip(a, b)):
        _assert_close(x, y, f"{what}:{i}")


def _assert_close(x, y, where: str) -> None:
    if isinstance(x, dict) and isinstance(y, dict):
        assert x.keys() == y.keys(), where
        for k in x.keys() - TIMING:
            _assert_close(x[k], y[k], f"{where}:{k}")
    elif isinstance(x, list) and isinstance(y, list):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            _assert_close(u, v, f"{where}[{i}]")
    elif isinstance(x, float) and isinstance(y, float):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7, err_msg=where)
    else:
        assert x == y, (where, x, y)


def test_discover_cli_on_two_processes_matches_one(base, tmp_path):
    """TTT-Discover as the same program on 2 processes (rollouts sharded over the batch axes,
    rewards scored per process and all-gathered, fsdp=2 shards the weights across the
    processes): one set of run files, the same actions, rewards, archive and adapters.
    reuse=false keeps one prompt width (one compile per program: the test's time)."""
    ckpt, _ = base
    argv = ["discover", "--ckpt", str(ckpt), "--config", "discover/tiny.yaml",
            "--steps", "2", "--rollouts", "8", "--seed", "0", "--no-progress", "lora.rank=4",
            "lora.alpha=8", "sampling.max_new_tokens=16", "hot_swap_eval=false", "reuse=false",
            "mesh.fsdp=2"]
    multi, single, printed = _both(tmp_path, argv)
    assert printed.count("[p0] {") == 1 and "[p1] {" not in printed  # the summary, once
    assert _files(multi) == _files(single)
    for name, rows in (("log.jsonl", 2), ("discovery_log.jsonl", 16), ("baseline_log.jsonl", 16)):
        a, b = read_jsonl(multi / name), read_jsonl(single / name)
        assert len(a) == rows, name  # one line per step / sample: process 1 wrote none
        _assert_same_rows(a, b, name)
    assert any(r["updated"] for r in read_jsonl(single / "log.jsonl"))  # rewards carried signal
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (multi, single))
    assert ra["archive"] == rb["archive"] and ra["best_state"] == rb["best_state"]
    assert ra["best_reward"] == rb["best_reward"] and ra["samples"] == 16
    assert ra["final_adapter"] == "adapters/step_0002"
    (xa, xb) = (_adapters(ckpt, d / "adapters/step_0002") for d in (multi, single))
    for x, y in zip(xa, xb):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_sdft_cli_on_two_processes_matches_one(base, tmp_path):
    """Gated SDFT as the same program on 2 processes (on-policy rollouts, 2 micro-batches,
    fsdp=2): one metrics line per update and gate, the same evaluations and weights."""
    ckpt, heldout = base
    data = tmp_path / "sdft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {a}+{b}?", "demonstration": f"A: {a + b}"})
                            + "\n" for a, b in ((2, 2), (3, 3), (1, 4), (2, 5))))
    argv = ["sdft", "--ckpt", str(ckpt), "--data", str(data), "--config", "sdft/tiny.yaml",
            "--no-progress", "blocks=1", "steps_per_block=1", "grad_accum=2", "mesh.fsdp=2",
            "sampling.max_new_tokens=8", "optim.lr=1e-2", "eval.windows=2", "eval.probes=''",
            f"eval.heldout={heldout}"]
    multi, single, printed = _both(tmp_path, argv)
    assert printed.count('[p0] {"out_dir"') == 1 and "[p1] {" not in printed
    assert _files(multi) == _files(single)
    a, b = read_jsonl(multi / "metrics.jsonl"), read_jsonl(single / "metrics.jsonl")
    assert [r.get("gate") for r in a] == [None, "accepted"]  # one update, one gate: once each
    _assert_same_rows(a, b, "metrics.jsonl")
    assert a[0]["tokens"] > 0 and a[0]["skipped"] == 0
    for name in ("block_000/eval_before.json", "block_000/eval_after.json", "summary.json"):
        ea, eb = (json.loads((d / name).read_text()) for d in (multi, single))
        _assert_same_rows([ea], [eb], name)
    assert Checkpointer(multi).all_steps() == Checkpointer(single).all_steps() == [0, 1]
    _assert_same_params(multi, single)


def _adapters(base_run: Path, path: Path) -> list[np.ndarray]:
    model, _ = load_model(base_run, mesh=make_mesh(None))
    lora.load_adapters(model, path)
    return [np.asarray(x) for x in jax.tree.leaves(lora.lora_state(model))]


def _assert_same_params(run_a: Path, run_b: Path) -> None:
    leaves = [jax.tree.leaves(nnx.state(load_model(r)[0], nnx.Param)) for r in (run_a, run_b)]
    for x, y in zip(*leaves):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
