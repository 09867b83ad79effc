"""TTT-Discover -> SDFT consolidation: discovery logs -> SDFT JSONL -> gated SDFT, end to end."""
import builtins
import io
import json

import pytest
from flax import nnx

from jaxttt import cli
from jaxttt import config as C
from jaxttt.data.packing import ensure_default_data
from jaxttt.eval.commands import run_history
from jaxttt.model import lora
from jaxttt.model.transformer import Transformer
from jaxttt.sdft.consolidate import discoveries_to_sdft
from jaxttt.sdft.data import load_jsonl
from jaxttt.train import checkpoint
from jaxttt.train.checkpoint import Checkpointer, load_model, save_model_config

MODEL = C.ModelConfig(vocab_size=512, n_layers=1, d_model=64, n_heads=2, d_head=32, d_ff=128,
                      max_seq_len=256, mhc=C.MHCConfig(mode="none"))
F1 = "y = x + 1"  # short texts keep the batch shapes of test_sdft.py (no recompiles)


def _rec(pid, reward, state, action=None, step=1):
    return {"problem_id": pid, "prompt": f"Problem {pid}?",
            "action": action if action is not None else f"```\n{state}\n```", "state": state,
            "reward": reward, "timestamp": "2025-01-01T00:00:00+00:00", "env_version": "Toy/1",
            "step": step}


RUN1 = [_rec("A", 0.9, F1), _rec("A", 0.95, F1.replace("x +", "x  +")),
        _rec("A", 0.2, "y = 0"), _rec("B", 0.7, "B1")]
RUN2 = [_rec("B", 0.8, "B2"), _rec("A", 0.9, F1), _rec("C", 0.1, "C1"),
        _rec("B", 0.6, "", action="B3 action")]


def _discover_run(root, name, records, blank_line=True):
    """A TTT-Discover run dir: the G5 log, a result.json and (never to be read) adapters."""
    run = root / name
    (run / "adapters/step_0010/adapters").mkdir(parents=True)
    (run / "adapters/step_0010/lora.json").write_text("not json: must never be read")
    lines = [json.dumps(r) for r in records]
    if blank_line:
        lines.insert(1, "")
    (run / "discovery_log.jsonl").write_text("\n".join(lines) + "\n")
    best = max(records, key=lambda r: r.get("reward", 0.0))
    (run / "result.json").write_text(json.dumps({"best_reward": best["reward"],
                                                 "best_state": best["state"],
                                                 "archive": [{"big": "list"}]}))
    return run


@pytest.fixture()
def runs(tmp_path):
    return [_discover_run(tmp_path, "ttt1", RUN1), _discover_run(tmp_path, "ttt2", RUN2)]


def test_filters_by_reward_dedups_and_keeps_the_best_per_problem(runs, tmp_path):
    out = tmp_path / "best.jsonl"
    stats = discoveries_to_sdft(runs, out, min_reward=0.5)
    assert {k: stats[k] for k in ("rows", "below_threshold", "duplicates", "kept", "problems")} == \
        {"rows": 8, "below_threshold": 2, "duplicates": 2, "kept": 2, "problems": 2}
    examples, _ = load_jsonl(out)
    by_pid = {e.meta["problem_id"]: e for e in examples}
    assert by_pid["A"].meta["reward"] == 0.95 and "x  +" in by_pid["A"].demonstration
    assert by_pid["A"].meta["source"] == f"{runs[0] / 'discovery_log.jsonl'}:3"  # line 2 is blank
    assert (by_pid["B"].demonstration, by_pid["B"].meta["reward"]) == ("B2", 0.8)
    assert by_pid["B"].prompt == "Problem B?"

    stats = discoveries_to_sdft(runs, out, min_reward=0.5, best_per_problem=False, top_k=2)
    demos = [(e.meta["problem_id"], e.demonstration) for e in load_jsonl(out)[0]]
    assert demos == [("A", F1.replace("x +", "x  +")), ("B", "B2"), ("B", "B1")]
    discoveries_to_sdft(runs, out, min_reward=0.5, best_per_problem=False)
    assert ("B", "B3 action") in [(e.meta["problem_id"], e.demonstration)
                                  for e in load_jsonl(out)[0]]  # empty state -> the action
    discoveries_to_sdft(runs, out, min_reward=0.5, demonstration="action")
    assert load_jsonl(out)[0][0].demonstration.startswith("```\n")


def test_bad_discovery_rows_name_the_line(tmp_path):
    bad = dict(RUN1[0])
    del bad["reward"]
    run = _discover_run(tmp_path, "bad", [RUN1[0], bad], blank_line=False)
    with pytest.raises(ValueError, match=r"discovery_log.jsonl:2: missing key\(s\) 'reward'"):
        discoveries_to_sdft([run], tmp_path / "x.jsonl", min_reward=0.0)
    stats = discoveries_to_sdft([run], tmp_path / "x.jsonl", min_reward=0.0, skip_bad=True)
    assert (stats["bad"], stats["kept"]) == (1, 1)
    with pytest.raises(FileNotFoundError, match="no discovery_log.jsonl"):
        discoveries_to_sdft([tmp_path], tmp_path / "y.jsonl", min_reward=0.0)


def test_eval_history_of_a_discover_run(runs):
    h = run_history(runs[0])
    assert h["discover_result"] == {"best_reward": 0.95, "best_state": RUN1[1]["state"]}
    assert h["discovery_log"] == {"rows": 4, "bad_rows": 0, "problems": 2, "best_reward": 0.95}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return ensure_default_data(tmp_path_factory.getbasetemp() / "jaxttt-data", 512,
                               max_bytes=200_000, progress=False)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data):
    run = tmp_path_factory.mktemp("base")
    save_model_config(run, MODEL)
    ckpt = Checkpointer(run, async_save=False)
    ckpt.save(0, nnx.state(Transformer(MODEL, rngs=nnx.Rngs(0)), nnx.Param),
              meta={"tokenizer": str(data["tokenizer"])})
    ckpt.close()
    return run


def _spy_reads(monkeypatch) -> tuple[list[str], list[str]]:
    """Record every file opened from Python and every checkpoint directory restored."""
    opened, restored = [], []
    real_open, real_restore = io.open, checkpoint.Checkpointer.restore

    def spy_open(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    def spy_restore(self, *a, **k):
        restored.append(str(self.dir))
        return real_restore(self, *a, **k)

    def no_adapters(*a, **k):
        raise AssertionError("consolidation must never load test-time adapters")

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)  # pathlib's read_text/open go through io.open
    monkeypatch.setattr(checkpoint.Checkpointer, "restore", spy_restore)
    monkeypatch.setattr(lora, "load_adapters", no_adapters)
    return opened, restored


def test_consolidate_end_to_end_through_the_cli(runs, base_run, data, tmp_path, monkeypatch):
    opened, restored = _spy_reads(monkeypatch)
    out = tmp_path / "continual" / "sdft_001"
    argv = ["consolidate", "--discoveries", *map(str, runs), "--ckpt", str(base_run),
            "--out", str(out), "--min-reward", "0.5", "--config", "sdft/tiny.yaml",
            "--no-progress", "--", f"eval.heldout={data['val']}", "blocks=1", "optim.lr=1e-3",
            "gate.max_ppl_increase=10", "gate.max_probe_drop=1"]
    assert cli.main(argv) == 0

    assert any(p.endswith("discovery_log.jsonl") for p in opened)  # the spy sees reads
    assert any(p == str(base_run / "model.yaml") for p in opened)
    assert not [p for p in opened if "adapters" in p]  # no test-time adapter file was read
    assert restored and all(p == str(base_run / "checkpoints") for p in restored)
    stats = json.loads((out / "consolidation.json").read_text())
    assert (stats["kept"], stats["problems"], stats["below_threshold"]) == (2, 2, 2)
    assert len(load_jsonl(out / "from_ttt.jsonl")[0]) == 2
    for name in ("eval_before.json", "eval_after.json", "gate_decision.json"):
        assert (out / "block_000" / name).is_file(), name
    before = json.loads((out / "block_000/eval_before.json").read_text())
    assert before["perplexity"] > 1 and "probe/overall" in before
    gate = json.loads((out / "block_000/gate_decision.json").read_text())
    assert gate["accepted"] is True and "perplexity" in gate["deltas"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "kl" in r] == [1, 2]
    assert rows[-1] == {"step": 2, "block": 0, "gate": "accepted", "reasons": []}
    model, meta = load_model(out)
    assert meta["step"] == 2 and meta["source"] == str(base_run)
    assert not lora.has_lora(model)
    assert json.loads((out / "summary.json").read_text())["consolidation"]["kept"] == 2


def test_consolidate_cli_errors(runs, base_run, tmp_path, capsys):
    args = ["consolidate", "--discoveries", *map(str, runs), "--ckpt", str(base_run)]
    assert cli.main(args + ["--out", str(tmp_path / "o1"), "--min-reward", "5"]) == 1
    assert "no discovery with reward >= 5" in capsys.readouterr().err
    (runs[1] / "discovery_log.jsonl").write_text('{"problem_id": "A"}\n')
    assert cli.main(args + ["--out", str(tmp_path / "o2")]) == 1
    assert "ttt2/discovery_log.jsonl:1: missing key" in capsys.readouterr().err
