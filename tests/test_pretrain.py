"""Pretraining: optimizer pieces, the compiled step, the loop (pulse, exact resume, mesh change,
SIGTERM, NaN, errors) and `jaxttt sample`. Tiny shapes; compiled programs are cached on disk
(per module) so repeated runs of one program compile once."""
from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache

from jaxttt import cli, sharding
from jaxttt import config as C
from jaxttt.data.packing import pack
from jaxttt.data.tokenizer import Tokenizer
from jaxttt.runs import enable_compile_cache
from jaxttt.train import metrics as M
from jaxttt.train.checkpoint import CheckpointError, Checkpointer, load_model
from jaxttt.train.loop import NonFiniteLossError, RunDirError, pretrain

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.n_layers=1", "model.d_model=64", "model.n_heads=2", "model.d_head=32",
        "model.d_ff=128", "data.seq_len=32", "data.batch_size=8", "data.vocab_size=512",
        "data.max_bytes=600000", "eval_batches=2", "log_every=10",
        "optim.schedule=constant", "optim.warmup_steps=0", "optim.lr=3e-3",
        "model.mhc.sinkhorn_iters=4"]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """A private JAXTTT_CACHE (default corpus + persistent XLA cache) for this module."""
    root = tmp_path_factory.mktemp("jaxttt_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("JAXTTT_CACHE", str(root))
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {k: getattr(jax.config, k) for k in keys}
    enable_compile_cache()  # what `jaxttt pretrain` does: under $JAXTTT_CACHE/xla
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield root
    for k, v in old.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()
    mp.undo()


def tiny(run_dir, *overrides: str) -> C.PretrainConfig:
    return C.load(C.PretrainConfig, None, TINY + [f"run_dir={run_dir}", *overrides])


def rows(run_dir, key: str = "loss") -> list[dict]:
    return [r for r in M.read_jsonl(Path(run_dir) / M.METRICS_FILE) if key in r]


def params_of(run_dir, step=None, mesh=None) -> tuple[nnx.Module, list[np.ndarray]]:
    model, _ = load_model(run_dir, step=step, mesh=mesh)
    return model, [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.fixture(scope="module")
def pulse_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("pulse") / "run"
    pretrain(tiny(run, "steps=30", "save_every=15", "eval_every=15"))
    return run


# --------------------------------------------------------------------------------------------
# Optimizer pieces and FLOPs
# --------------------------------------------------------------------------------------------
def test_flops_per_token_counts_matmuls_attention_and_mhc():
    cfg = C.load(C.ModelConfig, None, ["n_layers=2", "d_model=8", "n_heads=2", "d_head=4",
                                       "d_ff=16", "vocab_size=10", "mhc.n_streams=2"])
    per_layer = 4 * 8 * 8 + 3 * 8 * 16 + 2 * 16 * (4 + 4)  # q,k,v,o + mlp + two phi [N*D, 2N+N^2]
    expected = (6 * (2 * per_layer + 8 * 10) + 6 * 2 * 32 * 2 * 4
                + 6 * 2 * 2 * (4 * 8 + 2 * 2 * 8))
    assert M.flops_per_token(cfg, 32) == expected
    plain = C.load(C.ModelConfig, None, ["n_layers=2", "d_model=8", "n_heads=2", "d_head=4",
                                         "d_ff=16", "vocab_size=10", "mhc.mode=none"])
    assert M.flops_per_token(plain, 32) == 6 * (2 * (4 * 64 + 3 * 128) + 80) + 6 * 2 * 32 * 8


def test_peak_flops_table():
    kind = lambda k: type("D", (), {"device_kind": k})()  # noqa: E731
    assert M.peak_flops(kind("TPU v5 lite")) == 197e12 and M.peak_flops(kind("TPU v5p")) == 459e12
    assert M.peak_flops(kind("NVIDIA H100 80GB HBM3")) == 989e12
    assert M.peak_flops(kind("cpu")) is None and M.mfu(1e3, 1e6) is None  # CPU: no MFU
    assert M.mfu(1000.0, 1e9, n_devices=2, peak=1e12) == pytest.approx(0.5)


@pytest.mark.parametrize("name,seq,batch,accum,lr", [("120m", 512, 8, 4, 3e-4),
                                                     ("350m", 1024, 2, 16, 2e-4),
                                                     ("900m", 1024, 1, 32, 1e-4)])
def test_presets_follow_the_handoff(name, seq, batch, accum, lr):
    cfg = C.load(C.PretrainConfig, REPO / f"configs/pretrain/{name}.yaml")
    assert (cfg.data.seq_len, cfg.data.batch_size, cfg.grad_accum, cfg.optim.lr) == \
        (seq, batch, accum, lr)
    assert (cfg.optim.b1, cfg.optim.b2, cfg.optim.weight_decay, cfg.optim.grad_clip) == \
        (0.9, 0.95, 0.1, 1.0)
    assert cfg.model.dtype == "bfloat16" and cfg.model.mhc.mode == "mhc"
    tiny_cfg = C.load(C.PretrainConfig, REPO / "configs/pretrain/tiny.yaml")
    assert tiny_cfg.model.n_layers == 2 and tiny_cfg.data.seq_len <= tiny_cfg.model.max_seq_len


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def test_has_a_pulse(pulse_run):
    train = rows(pulse_run)
    assert [r["step"] for r in train] == list(range(1, 31))
    first, last = np.mean([r["loss"] for r in train[:3]]), np.mean([r["loss"] for r in train[-3:]])
    assert first > math.log(300) and last < first - 0.5, (first, last)
    assert all(r["tokens"] == r["step"] * 8 * 32 and r["tokens_per_s"] > 0 for r in train)
    assert {"lr", "grad_norm", "wall_time"} <= set(train[0])
    val = rows(pulse_run, "val_loss")
    assert [r["step"] for r in val] == [15, 30] and val[1]["val_loss"] < val[0]["val_loss"]
    assert val[1]["val_ppl"] == pytest.approx(math.exp(val[1]["val_loss"]), rel=1e-6)
    model_cfg = C.load(C.ModelConfig, pulse_run / "model.yaml")
    tok = C.load(C.PretrainConfig, pulse_run / "config.yaml").data.tokenizer
    assert model_cfg.vocab_size == Tokenizer(tok).vocab_size  # set from the tokenizer
    assert Checkpointer(pulse_run).all_steps() == [15, 30]
    assert list((pulse_run / M.TB_DIR).glob("events.out.tfevents.*"))


def test_exact_resume_is_bitwise(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pretrain(tiny(straight, "steps=20", "save_every=5", "eval_every=0"))
    pretrain(tiny(resumed, "steps=10", "save_every=5", "eval_every=0"))
    pretrain(tiny(resumed, "steps=20", "save_every=5", "eval_every=0"))  # resumes at 10
    a, b = rows(straight), rows(resumed)
    assert [r["step"] for r in b] == list(range(1, 21))  # no duplicate or missing rows
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    for step in (10, 20):  # step 10 was saved asynchronously while training went on
        for x, y in zip(params_of(straight, step)[1], params_of(resumed, step)[1]):
            np.testing.assert_array_equal(x, y)


def test_checkpoint_from_8_devices_restores_on_1(tmp_path):
    run = tmp_path / "run"
    pretrain(tiny(run, "steps=2", "mesh.fsdp=2", "mesh.tensor=2", "eval_every=0",
                  "model.mhc.mode=hc"))  # hc: every mHC parameter, no Sinkhorn to compile
    mesh8 = sharding.make_mesh(C.MeshConfig(fsdp=2, tensor=2))
    model8, p8 = params_of(run, mesh=mesh8)
    model1, p1 = params_of(run, mesh=sharding.single_device_mesh())
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(nnx.state(model8)))
    for x, y in zip(p8, p1):
        np.testing.assert_array_equal(x, y)
    tokens = np.random.default_rng(1).integers(0, 400, (8, 32)).astype(np.int32)
    forward = nnx.jit(lambda model, t: model(t))
    with jax.set_mesh(mesh8):
        logits8 = forward(model8, jax.device_put(tokens, sharding.batch_sharding(mesh8)))
    logits1 = forward(model1, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(logits8), np.asarray(logits1), rtol=1e-5, atol=1e-5)


def test_sigterm_saves_and_exits_then_resumes(tmp_path, cache):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "jaxttt.cli", "pretrain", *TINY, f"run_dir={run}",
           "steps=100000", "save_every=0", "eval_every=0"]
    log = tmp_path / "log.txt"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                env=dict(os.environ, JAXTTT_CACHE=str(cache)))
    try:
        _wait_for(lambda: _complete_lines(run / M.METRICS_FILE) >= 2, proc, 240)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log.read_text()
    assert proc.returncode == 0, out
    saved = Checkpointer(run).all_steps()
    assert len(saved) == 1 and saved[0] >= 2 and f"preempted: saved step {saved[0]}" in out
    assert rows(run)[-1]["step"] == saved[0]
    pretrain(tiny(run, f"steps={saved[0] + 2}", "save_every=0", "eval_every=0"))
    assert [r["step"] for r in rows(run)] == list(range(1, saved[0] + 3))


def test_nan_updates_are_skipped_then_stop_the_run(tmp_path):
    """lr=1e30: after the first update every loss is NaN; those updates are skipped (weights
    unchanged, rows marked), and max_skipped of them in a row stop the run."""
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"^step (\d+): non-finite training loss") as e:
        pretrain(tiny(run, "steps=20", "save_every=1", "eval_every=0", "optim.lr=1e30",
                      "model.mhc.mode=none", "max_skipped=3"))
    stop = int(str(e.value).split()[1].rstrip(":"))
    train = rows(run, "step")
    skipped = [r["step"] for r in train if r.get("skipped")]
    assert skipped == list(range(stop - 2, stop + 1)) and "3 updates in a row" in str(e.value)
    assert all("grad_norm" not in r or "loss" not in r for r in train if r.get("skipped"))
    assert all(math.isfinite(v) for r in train for v in r.values() if isinstance(v, float))
    saved = Checkpointer(run).all_steps()
    assert saved and max(saved) == stop - 1, (saved, stop)
    first_bad = params_of(run, stop - 3)[1]
    for x, y in zip(first_bad, params_of(run, stop - 1)[1]):  # skipped updates changed nothing
        assert np.isfinite(x).all()
        np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------------
def test_vocab_mismatch_names_the_tokenizer(pulse_run, tmp_path):
    data = C.load(C.PretrainConfig, pulse_run / "config.yaml").data
    with pytest.raises(C.ConfigError, match="vocab mismatch") as e:
        pretrain(tiny(tmp_path / "run", f"data.train={data.train}", "model.vocab_size=1000"))
    assert data.tokenizer in str(e.value) and "model.vocab_size" in str(e.value)


def test_dataset_shorter_than_seq_len_names_the_file(pulse_run, tmp_path):
    tok = C.load(C.PretrainConfig, pulse_run / "config.yaml").data.tokenizer
    (tmp_path / "small.txt").write_text("x = 1\n")
    small = tmp_path / "small.bin"
    pack(tok, tmp_path / "small.txt", small, progress=False)
    with pytest.raises(ValueError, match="too small for seq_len") as e:
        pretrain(tiny(tmp_path / "run", f"data.train={small}", f"data.tokenizer={tok}",
                      "model.vocab_size=512"))
    assert str(small) in str(e.value)


def test_missing_and_corrupt_checkpoints_name_the_path(pulse_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(pulse_run / "model.yaml", empty / "model.yaml")
    with pytest.raises(CheckpointError, match="no checkpoint found") as e:
        load_model(empty)
    assert str(empty / "checkpoints") in str(e.value)
    assert cli.main(["sample", "--run", str(tmp_path), "--prompt", "x"]) == 1  # one line
    assert "not a run directory" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(pulse_run, broken)
    for step in (15, 30):
        for f in (broken / f"checkpoints/{step}/params").rglob("*"):
            if f.is_file() and f.name != "commit_success.txt":
                f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="every checkpoint is corrupt") as e:
        pretrain(tiny(broken, "steps=40"))
    assert str(broken / "checkpoints") in str(e.value) and "step 15" in str(e.value)


def test_run_dir_is_never_overwritten(pulse_run, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="refusing to overwrite") as e:
        pretrain(tiny(taken, "steps=2"))
    assert str(taken) in str(e.value) and (taken / "notes.txt").read_text() == "mine"
    assert os.listdir(taken) == ["notes.txt"]
    other = tmp_path / "other"
    shutil.copytree(pulse_run, other)
    with pytest.raises(RunDirError, match="model differs") as e:
        pretrain(tiny(other, "steps=40", "model.d_ff=256"))
    assert str(other / "model.yaml") in str(e.value) and "d_ff" in str(e.value)
    assert Checkpointer(other).all_steps() == [15, 30]


def test_cli_pretrain_reports_errors_cleanly(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    assert cli.main(["pretrain", *TINY, f"run_dir={taken}"]) == 1
    assert f"jaxttt pretrain: error: {taken}" in capsys.readouterr().err


def test_sample_prints_text(pulse_run, capsys):
    argv = ["sample", "--run", str(pulse_run), "--prompt", "def ", "--max-new-tokens", "8",
            "--num-samples", "2", "--greedy"]
    assert cli.main(argv) == 0
    blocks = capsys.readouterr().out.split("--- sample ")[1:]
    assert [b.split("\n", 1)[0] for b in blocks] == ["1 (step 30) ---", "2 (step 30) ---"]
    texts = [b.split("\n", 1)[1][:-1] for b in blocks]  # drop print's newline
    assert texts[0] == texts[1] and texts[0].startswith("def ") and len(texts[0]) > len("def ")


# --------------------------------------------------------------------------------------------
def _wait_for(cond, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"process exited early with status {proc.returncode}")
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def _complete_lines(path: Path) -> int:
    return path.read_text().count("\n") if path.is_file() else 0


def test_checkpoints_in_a_separate_ckpt_dir_resume_and_load(tmp_path):
    """ckpt_dir (e.g. gs://BUCKET/x on TPU) holds the checkpoints; the run dir keeps the logs."""
    run, store = tmp_path / "run", tmp_path / "bucket" / "x"
    pretrain(tiny(run, "steps=4", "save_every=2", "eval_every=0", f"ckpt_dir={store}"))
    assert sorted(p.name for p in store.iterdir() if p.name.isdigit()) == ["2", "4"]
    assert not (run / "checkpoints").exists()
    pretrain(tiny(run, "steps=6", "save_every=2", "eval_every=0", f"ckpt_dir={store}"))  # resumes
    assert [r["step"] for r in rows(run)] == list(range(1, 7))
    model, meta = load_model(run)
    assert meta["step"] == 6 and model.cfg.n_layers == 1
