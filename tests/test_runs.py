"""The run layer and its faults: JSONL torn lines, run directories, the cache root, verified
checkpoints with fallback, keep >= 1, a failed save stopping the run, a copied run resuming
as the copy, and one-line CLI errors (via subprocess)."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest
import yaml

from jaxttt import cli, runs
from jaxttt import config as C
from jaxttt import sharding
from jaxttt.errors import UserError
from jaxttt.train.checkpoint import CheckpointError, Checkpointer

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.n_layers=1", "model.d_model=64", "model.n_heads=2", "model.d_head=32",
        "model.d_ff=128", "data.seq_len=32", "data.batch_size=8", "data.vocab_size=512",
        "data.max_bytes=300000", "eval_every=0", "log_every=10", "optim.schedule=constant",
        "optim.warmup_steps=0", "model.mhc.sinkhorn_iters=4", "save_every=2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private JAXTTT_CACHE (default corpus) for this module."""
    root = tmp_path_factory.mktemp("jaxttt_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("JAXTTT_CACHE", str(root))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def run4(cache, tmp_path_factory):
    """`jaxttt pretrain steps=8 save_every=2` whose save at step 6 fails (disk full):
    (run dir with checkpoints 2 and 4, exit status, stderr)."""
    orig = ocp.CheckpointManager.save

    def fail_at_6(self, step, *a, **kw):  # what orbax raises when the disk is full
        if step == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return orig(self, step, *a, **kw)

    run = tmp_path_factory.mktemp("runs") / "a"
    mp = pytest.MonkeyPatch()
    mp.setattr(ocp.CheckpointManager, "save", fail_at_6)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["pretrain", *TINY, "steps=8", f"run_dir={run}"])
    mp.undo()
    return run, rc, err.getvalue()


# --------------------------------------------------------------------------------------------
# JSONL
# --------------------------------------------------------------------------------------------
def test_torn_last_line_is_dropped_on_resume_and_on_read(tmp_path, capsys):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in runs.read_jsonl(p)] == [1, 2]
    assert f"{p}:3: dropped a torn last line" in capsys.readouterr().err
    assert p.read_text().endswith('"lo')  # reading never modifies the file
    with runs.JsonlWriter(p, resume_step=5) as w:  # resume: repair, then append
        w.write({"step": 3, "loss": 1.0})
    assert "torn last line" in capsys.readouterr().err
    assert [r["step"] for r in runs.read_jsonl(p)] == [1, 2, 3]
    with runs.JsonlWriter(p, resume_step=1):  # resumed from an older checkpoint: rows redone
        pass
    assert [r["step"] for r in runs.read_jsonl(p)] == [1]


def test_bad_middle_line_names_file_and_line(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(UserError, match=rf"{p}:2: not valid JSON"):
        runs.read_jsonl(p)
    with pytest.raises(UserError, match=rf"{p}:2: not valid JSON"):  # on resume too
        runs.JsonlWriter(p, resume_step=1)
    complete = tmp_path / "c.jsonl"
    complete.write_text('{"a": 1}\n{"a": 2}')  # last record complete, newline missing: kept
    assert runs.read_jsonl(complete) == [{"a": 1}, {"a": 2}]
    assert runs.repair_jsonl(complete) is False  # nothing torn: only the newline is added
    runs.append_jsonl(complete, [{"a": 3}])
    assert runs.read_jsonl(complete) == [{"a": 1}, {"a": 2}, {"a": 3}]


# --------------------------------------------------------------------------------------------
# Run directories and the cache
# --------------------------------------------------------------------------------------------
def test_fresh_run_dir_never_overwrites(tmp_path):
    out = runs.fresh_run_dir(tmp_path / "new" / "run")
    assert out.is_dir() and out.is_absolute()
    (out / "x").write_text("data")
    with pytest.raises(runs.RunDirError, match="not empty"):
        runs.fresh_run_dir(out)
    assert runs.fresh_run_dir(out, keep=["x"]) == out and (out / "x").read_text() == "data"
    (tmp_path / "f").write_text("")
    with pytest.raises(runs.RunDirError, match="not a directory"):
        runs.fresh_run_dir(tmp_path / "f")


def test_cache_root_env(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXTTT_CACHE", str(tmp_path / "c"))
    assert runs.cache_root() == tmp_path / "c"
    monkeypatch.setenv("JAXTTT_CACHE", " ")
    with pytest.raises(UserError, match="JAXTTT_CACHE is set but empty"):
        runs.cache_root()
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("JAXTTT_CACHE", str(tmp_path / "file"))
    with pytest.raises(UserError, match="not a directory"):
        runs.cache_root()
    monkeypatch.delenv("JAXTTT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert runs.cache_root() == tmp_path / "xdg" / "jaxttt"


# --------------------------------------------------------------------------------------------
# Checkpoints: checksums, fallback, keep, failed saves
# --------------------------------------------------------------------------------------------
STATE = {"w": jnp.arange(8.0), "b": jnp.ones((2, 3))}


def _save_steps(d: Path, steps, keep=None) -> Checkpointer:
    ck = Checkpointer(d, keep=keep, async_save=False)
    for s in steps:
        ck.save(s, jax.tree.map(lambda x: x * s, STATE), meta={"tokenizer": "t"})
    return ck


def _corrupt(step_dir: Path) -> Path:
    victim = max((f for f in step_dir.rglob("*") if f.is_file() and "ocdbt" in str(f)),
                 key=lambda f: f.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    return victim


def test_corrupt_newest_checkpoint_falls_back_naming_both(tmp_path, capsys):
    mesh = sharding.single_device_mesh()
    ck = _save_steps(tmp_path, (1, 2, 3))
    assert all((tmp_path / "checkpoints" / str(s) / "sha256.json").is_file() for s in (1, 2, 3))
    victim = _corrupt(tmp_path / "checkpoints" / "3")
    params, _, meta = ck.restore(STATE, mesh=mesh)
    assert meta["step"] == 2 and float(params["w"][1]) == 2.0
    err = capsys.readouterr().err
    assert "checkpoint step 3 is corrupt" in err and str(victim) in err and "restored step 2" in err
    with pytest.raises(CheckpointError, match="checksum mismatch"):  # an explicit older step
        _corrupt(tmp_path / "checkpoints" / "1")
        ck.restore(STATE, mesh=mesh, step=1)
    _corrupt(tmp_path / "checkpoints" / "2")
    with pytest.raises(CheckpointError, match="every checkpoint is corrupt"):
        ck.restore(STATE, mesh=mesh)
    ck.close()


def test_keep_never_deletes_every_checkpoint(tmp_path):
    with pytest.raises(C.ConfigError, match="keep"):
        Checkpointer(tmp_path, keep=0)
    ck = _save_steps(tmp_path, (1, 2, 3), keep=1)
    assert ck.all_steps() == [3]
    ck.close()
    for bad in ("keep=0", "steps=0", "data.batch_size=0", "save_every=-1"):
        with pytest.raises(C.ConfigError, match=bad.split("=")[0]):
            C.load(C.PretrainConfig, None, [bad])


def test_failed_save_raises_naming_step_and_last_good(tmp_path, monkeypatch):
    ck = _save_steps(tmp_path, (1,))

    def full_disk(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.manager, "save", full_disk)
    with pytest.raises(CheckpointError) as e:
        ck.save(2, STATE)
    msg = str(e.value)
    assert "checkpoints/2: saving the checkpoint failed" in msg and "No space left" in msg
    assert "stopped at step 2" in msg and "last good checkpoint is step 1" in msg
    ck.close()


def test_failed_save_stops_pretraining_there(run4):
    run, rc, err = run4
    assert rc == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("jaxttt pretrain: error: ") and "checkpoints/6" in last
    assert "No space left on device" in last and "last good checkpoint is step 4" in last
    assert max(r["step"] for r in runs.read_jsonl(run / "metrics.jsonl")) == 6  # none past it
    assert Checkpointer(run).all_steps() == [2, 4]


# --------------------------------------------------------------------------------------------
# Portable runs
# --------------------------------------------------------------------------------------------
def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_copied_run_resumes_as_the_copy(run4, tmp_path):
    run4 = run4[0]
    saved = yaml.safe_load((run4 / "config.yaml").read_text())
    assert saved["run_dir"] == "" and str(run4) not in (run4 / "config.yaml").read_text()
    copy = tmp_path / "copy"
    shutil.copytree(run4, copy)
    before = _snapshot(run4)
    assert cli.main(["pretrain", "--config", str(copy / "config.yaml"), "steps=6"]) == 0
    assert _snapshot(run4) == before  # the original is untouched
    assert Checkpointer(copy).all_steps() == [2, 4, 6]
    assert [r["step"] for r in runs.read_jsonl(copy / "metrics.jsonl")] == list(range(1, 7))


def test_run_config_records_no_path_of_the_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.yaml").write_text("n_layers: 1\n")
    cfg = C.load(C.PretrainConfig, None, [f"run_dir={run}", f"ckpt_dir={run / 'ck'}", "steps=5"])
    runs.save_run_config(cfg, run)
    text = (run / "config.yaml").read_text()
    assert str(run) not in text and yaml.safe_load(text)["ckpt_dir"] == "ck"
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    resumed = runs.config_for_resume(C.load(C.PretrainConfig, copy / "config.yaml"),
                                     copy / "config.yaml")
    assert (resumed.run_dir, resumed.ckpt_dir, resumed.steps) == (str(copy), str(copy / "ck"), 5)
    bucket = C.load(C.PretrainConfig, None, ["ckpt_dir=gs://b/x"])
    runs.save_run_config(bucket, run)  # outside the run: kept as given
    assert yaml.safe_load((run / "config.yaml").read_text())["ckpt_dir"] == "gs://b/x"


def test_load_run_gives_model_tokenizer_meta(run4):
    run4 = run4[0]
    model, tok, meta = runs.load_run(run4)
    assert meta["step"] == 4 and meta["run_dir"] == str(run4)
    assert tok.vocab_size <= model.cfg.vocab_size
    _, _, meta2 = runs.load_run(run4 / "checkpoints" / "2")
    assert meta2["step"] == 2
    with pytest.raises(UserError, match="no such run directory"):
        runs.load_run(run4 / "nope")
    with pytest.raises(FileNotFoundError):
        runs.load_run(run4, tokenizer=run4 / "missing.model")


# --------------------------------------------------------------------------------------------
# One-line CLI errors (real processes)
# --------------------------------------------------------------------------------------------
def _jaxttt(*args: str, env: dict | None = None) -> subprocess.Popen:
    """`jaxttt ARGS` started in a real process (the cases run side by side)."""
    return subprocess.Popen([sys.executable, "-m", "jaxttt.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, **(env or {})})


def _done(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _one_line_error(proc: subprocess.CompletedProcess, command: str, *needles: str) -> None:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()
             and not ln.startswith(("WARNING", "I0", "W0"))]  # absl/XLA start-up chatter
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"jaxttt {command}: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_mistakes_are_one_line(run4, tmp_path):
    run4 = run4[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 3\noptim: {lr: 1e-3\n")
    cases = [  # (process, command, what the one line must name)
        (_jaxttt("discover", "--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "o1")),
         "discover", ("missing", "no such run directory")),
        (_jaxttt("pretrain", "optim.b2=1.5"), "pretrain", ("optim.b2=1.5", "[0, 1)")),
        (_jaxttt("pretrain", "--config", str(bad)), "pretrain", (f"{bad}:", "YAML")),
        (_jaxttt("discover", "--ckpt", str(run4), "--out", str(tmp_path / "o2"), "--env",
                 "no_such_env", "--steps", "1"), "discover", ("no_such_env",)),
        (_jaxttt("pretrain", "steps=1", env={"JAXTTT_CACHE": ""}), "pretrain", ("JAXTTT_CACHE",)),
    ]
    usage = _done(_jaxttt("pretrain", "--no-such-flag"))
    for proc, command, needles in cases:
        _one_line_error(_done(proc), command, *needles)
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1 and "--no-such-flag" in usage.stderr


ARENAS_CHILD = """
import ctypes, os, sys, threading
from jaxttt.runs import limit_malloc_arenas
print(limit_malloc_arenas() if sys.argv[1] == "cap" else "off", flush=True)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
held = []
def work():
    held.append(libc.malloc(1 << 16))
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
libc.malloc_stats()  # one "Arena i:" block per arena, on stderr
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc arenas")
def test_malloc_arenas_are_capped_unless_the_user_set_them():
    def arenas(mode, **env):
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env
        p = subprocess.run([sys.executable, "-c", ARENAS_CHILD, mode], capture_output=True,
                           text=True, env=env, timeout=60, check=True)
        return p.stdout.strip(), p.stderr.count("Arena ")

    assert arenas("off")[1] > 1  # the threads got arenas of their own
    assert arenas("cap") == ("True", 1)
    assert arenas("cap", MALLOC_ARENA_MAX="2")[0] == "False"  # an explicit setting is kept
