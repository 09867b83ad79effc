"""`jaxttt demo --quick` end to end (the run comes from the session fixture `demo_run`)."""
import dataclasses
import json
import math
import re
import struct
import zlib

import pytest

from jaxttt import demo
from jaxttt.cli import build_parser
from jaxttt.eval.plots import read_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STAGES = ("pretrain (mhc)", "pretrain (none)", "evaluate (mhc)", "TTT-Discover",
          "consolidate", "evaluate the continual model")


def _png_chunks(data: bytes):
    """(type, payload) of every chunk, checking each CRC: a truncated file raises."""
    pos = len(PNG_MAGIC)
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, payload = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert len(payload) == n and crc == zlib.crc32(kind + payload), f"bad {kind!r} chunk"
        yield kind, payload
        pos += 12 + n


def assert_valid_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC), f"{path.name}: not a PNG"
    chunks = list(_png_chunks(data))
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND", path.name
    width, height = struct.unpack(">II", chunks[0][1][:8])
    assert width > 50 and height > 50, (path.name, width, height)


@pytest.fixture(scope="module")
def summary(demo_run):
    return json.loads((demo_run / "summary.json").read_text())


@pytest.mark.timeout(1500)  # the first test to ask for demo_run pays for the run (~3 min)
def test_report_has_headline_numbers(demo_run, summary):
    report = (demo_run / "report.md").read_text()
    d, c = summary["discover"], summary["continual"]
    assert f"{d['best_reward']:.3f}" in report
    assert f"{d['baseline_best_reward']:.3f}" in report
    gates = ", ".join("accepted" if g["accepted"] else "reverted" for g in c["gates"])
    assert gates and gates in report
    assert f"{summary['eval']['mhc']['perplexity']:.2f}" in report
    assert f"{summary['final_eval']['perplexity']:.2f}" in report
    for mode in ("mhc", "none"):
        assert f"{summary['eval'][mode]['perplexity']:.1f}" in report


def test_report_plots_are_valid_pngs(demo_run):
    report = (demo_run / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(images) >= 5, images
    for name in images:
        path = demo_run / name
        assert path.is_file(), f"report.md references a missing plot {name}"
        assert_valid_png(path)


def test_summary_has_every_stage(summary):
    for key in ("plan", "runs", "eval", "discover", "continual", "final_eval", "stage_seconds"):
        assert key in summary, key
    assert summary["plan"] == dataclasses.asdict(demo.QUICK)
    for stage in STAGES:
        assert any(s.startswith(stage) for s in summary["stage_seconds"]), stage
    assert set(summary["runs"]) == {"mhc", "none"}


def test_pretraining_loss_decreased(demo_run):
    for mode in ("mhc", "none"):
        rows = read_jsonl(demo_run / f"pretrain-{mode}" / "metrics.jsonl")
        loss = [r["loss"] for r in rows if "loss" in r]
        assert len(loss) >= 2 and all(math.isfinite(x) for x in loss), mode
        assert loss[-1] < loss[0], (mode, loss)
        assert any("val_loss" in r for r in rows), mode


def test_discover_result_has_both_best_rewards(demo_run):
    result = json.loads((demo_run / "discover" / "result.json").read_text())
    for key in ("best_reward", "baseline_best_reward"):
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
    assert result["samples"] == result["baseline_samples"]  # same budget for both methods
    assert result["archive"]["nodes"], "empty archive"


def test_continual_gate_decision_written(demo_run):
    block = demo_run / "continual" / "block_000"
    decision = json.loads((block / "gate_decision.json").read_text())
    assert isinstance(decision["accepted"], bool)
    for name in ("eval_before.json", "eval_after.json"):
        assert "perplexity" in json.loads((block / name).read_text())


def test_rerun_into_same_dir_is_refused(demo_run):
    before = sorted(p.name for p in demo_run.iterdir())
    with pytest.raises(FileExistsError):
        demo.run_demo(quick=True, out=demo_run, progress=False)
    assert sorted(p.name for p in demo_run.iterdir()) == before


def test_default_run_dirs_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = demo.new_run_dir(None), demo.new_run_dir(None)
    assert first != second
    for d in (first, second):
        assert d.is_dir() and d.is_absolute() and not any(d.iterdir())
        assert d.parent == tmp_path / "runs" and d.name.startswith("demo-")
    (first / "report.md").write_text("x")
    with pytest.raises(FileExistsError):
        demo.new_run_dir(first)
    assert demo.new_run_dir(tmp_path / "empty") == tmp_path / "empty"  # an empty dir is fine


def test_cli_wiring():
    args = build_parser().parse_args(["demo", "--quick"])
    assert callable(args.func) and args.quick and not args.no_progress and args.out == ""
    args = build_parser().parse_args(["demo", "--out", "somewhere", "--no-progress"])
    assert not args.quick and args.out == "somewhere" and args.no_progress
