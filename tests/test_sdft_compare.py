"""The tool-call skill (data, grader) and `jaxttt sdft-compare` end to end on a tiny model."""
import json

import pytest

from jaxttt import cli
from jaxttt.errors import UserError
from jaxttt.sdft import compare as cmp
from jaxttt.sdft import skill_tool_call as skill

WEATHER = {"city": "Oslo", "unit": "celsius"}
RIGHT = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}</tool_call>'


# ---------------------------------------------------------------------------------------------
# Grader
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("output", [
    RIGHT,
    "  \n" + RIGHT + "\n",  # surrounding whitespace is not extra text
    '<tool_call>{"arguments": {"unit": "celsius", "city": "Oslo"}, "name": "get_weather"}</tool_call>',
    '<tool_call> {"name":"get_weather","arguments":{"city":"Oslo","unit":"celsius"}} </tool_call>',
])
def test_grader_accepts_the_right_call_in_any_json_layout(output):
    assert skill.grade(output, "get_weather", WEATHER) == skill.Grade(True, True, "ok")


@pytest.mark.parametrize("output,reason", [
    ('<tool_call>{"name": "set_timer", "arguments": {"city": "Oslo", "unit": "celsius"}}</tool_call>',
     "wrong tool 'set_timer'"),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>',
     "wrong arguments"),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>', "wrong arguments"),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius", '
     '"extra": 1}}</tool_call>', "wrong arguments"),
])
def test_grader_wrong_calls_are_well_formed_but_not_correct(output, reason):
    assert skill.grade(output, "get_weather", WEATHER) == skill.Grade(True, False, reason)


def test_grader_checks_json_types_not_just_values():
    call = lambda v: f'<tool_call>{{"name": "set_timer", "arguments": {{"minutes": {v}}}}}</tool_call>'  # noqa: E731
    assert skill.grade(call("10"), "set_timer", {"minutes": 10}).correct
    for wrong in ('"10"', "10.0", "true"):
        g = skill.grade(call(wrong), "set_timer", {"minutes": 10})
        assert g.format_ok and not g.correct, wrong
    assert not skill.grade(call("1"), "set_timer", {"minutes": True}).correct  # True is not 1


@pytest.mark.parametrize("output,reason", [
    ("", "no <tool_call> tag"),
    ("Sure! The weather in Oslo is sunny.", "no <tool_call> tag"),
    ("Sure, here it is: " + RIGHT, "extra text before the call"),
    (RIGHT + " Let me know if you need anything else.", "extra text after the call"),
    (RIGHT[:-len("</tool_call>")], "no </tool_call> tag"),
    (RIGHT + RIGHT, "more than one tag pair"),
    # the format echoed from a prompt or a template, placeholders and all
    ('<tool_call>{"name": ..., "arguments": {...}}</tool_call>', "payload is not valid JSON"),
    ("<tool_call>get_weather(city='Oslo', unit='celsius')</tool_call>", "payload is not valid JSON"),
    ('<tool_call>{"name": "get_weather", "name": "x", "arguments": {}}</tool_call>',
     "payload is not valid JSON"),  # duplicate keys: the last would silently win
    ('<tool_call>{"name": "set_timer", "arguments": {"minutes": NaN}}</tool_call>',
     "payload is not valid JSON"),
    ('<tool_call>["get_weather", {"city": "Oslo"}]</tool_call>',
     "payload must be an object with exactly the keys name and arguments"),
    ('<tool_call>{"name": "get_weather", "arguments": {}, "id": 1}</tool_call>',
     "payload must be an object with exactly the keys name and arguments"),
    ('<tool_call>{"name": 3, "arguments": {}}</tool_call>',
     "name must be a string and arguments an object"),
    ('<tool_call>{"name": "get_weather", "arguments": "Oslo"}</tool_call>',
     "name must be a string and arguments an object"),
    ("<tool_call>" + "[" * 100_000 + "</tool_call>", "output too long"),
    ("<tool_call>" + "[" * 1500 + "]" * 1500 + "</tool_call>", "output too long"),
    ("<tool_call>" + "[" * 900 + "</tool_call>", "payload is not valid JSON"),
])
def test_grader_malformed_and_adversarial_outputs_score_nothing(output, reason):
    assert skill.grade(output, "get_weather", WEATHER) == skill.Grade(False, False, reason)


def test_score_counts_accuracy_format_and_reasons():
    exs = skill.make_examples("test", 4)
    outs = [exs[0].demonstration, "nope", exs[0].demonstration, "  " + exs[3].demonstration]
    res = skill.score(outs, exs)
    # exs[0]'s call answered for exs[2]: well formed, wrong (a different tool)
    assert res["accuracy"] == 0.5 and res["format"] == 0.75 and res["n"] == 4
    assert res["reasons"]["ok"] == 2 and res["reasons"]["no <tool_call> tag"] == 1
    with pytest.raises(ValueError, match="3 outputs for 4 examples"):
        skill.score(outs[:3], exs)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def test_data_is_deterministic_distinct_and_the_splits_are_disjoint():
    train, test = skill.make_split(0, 120, 40)
    again = skill.make_split(0, 120, 40)
    assert [e.to_dict() for e in train + test] == [e.to_dict() for e in again[0] + again[1]]
    other = skill.make_examples("train", 120, seed=1)
    assert [e.prompt for e in other] != [e.prompt for e in train]
    assert len({e.prompt for e in train}) == 120 and len({e.prompt for e in test}) == 40
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert not {e.demonstration for e in train} & {e.demonstration for e in test}
    for key in ("city", "contact", "minutes", "amount", "source"):  # argument values never shared
        vals = lambda exs: {e.meta["arguments"][key] for e in exs if key in e.meta["arguments"]}  # noqa: E731
        assert vals(train) and vals(test) and not vals(train) & vals(test), key
    assert [e.meta["tool"] for e in train[:8]] == list(skill.TOOLS) * 2
    for e in train + test:  # each demonstration is the one correct answer to its prompt
        assert skill.grade_example(e.demonstration, e).correct
        assert "<tool_call>" not in e.prompt  # the prompt never shows the format
    with pytest.raises(ValueError, match="cannot make 500 distinct test"):
        skill.make_examples("test", 500)


def test_mean_sd_and_aggregate():
    assert cmp.mean_sd([1.0, None, 3.0]) == (2.0, pytest.approx(2 ** 0.5), 2)
    assert cmp.mean_sd([0.5]) == (0.5, 0.0, 1) and cmp.mean_sd([None]) is None
    base = {"perplexity": 10.0}
    cells = [{"arm": "sft", "seed": s, "accuracy": a, "format": 1.0, "perplexity": p,
              "probes": 0.5, "humaneval": None, "accepted": 2}
             for s, a, p in ((0, 0.2, 11.0), (1, 0.4, 12.0))]
    agg = cmp.aggregate(base, cells, ["sft", "sdft-rev"])
    assert list(agg) == ["sft"] and agg["sft"]["seeds"] == [0, 1]
    assert agg["sft"]["ppl_rise"][0] == pytest.approx(0.15)
    assert agg["sft"]["accuracy"][0] == pytest.approx(0.3) and agg["sft"]["humaneval"] is None


# ---------------------------------------------------------------------------------------------
# End to end on a tiny instruct checkpoint (Hugging Face layout, chat template)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from _tiny_hf import write_tiny_instruct

    from jaxttt.model.pretrained import convert_to_run

    root = tmp_path_factory.mktemp("tiny")
    return convert_to_run(f"hf:{write_tiny_instruct(root / 'hf')}", root / "run")


FAST = ["steps_per_block=1", "blocks=1", "sampling.max_new_tokens=8", "eval.windows=2",
        "eval.seq_len=32", "eval.max_new_tokens=4", "max_prompt_len=64"]
KW = dict(n_train=8, n_test=4, humaneval=1, he_tokens=16, skill_tokens=8, progress=False,
          log=lambda s: None)


def test_compare_end_to_end_on_a_tiny_model(tiny_run, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["sdft-compare", "--ckpt", str(tiny_run), "--out", str(out), "--seeds", "0",
            "--arms", "sft", "sdft-rev-gated", "--train", "8", "--test", "4", "--humaneval", "1",
            "--humaneval-max-new-tokens", "16", "--skill-max-new-tokens", "8", "--no-progress",
            *FAST]
    assert cli.main(args) in (0, None)
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert "| sft | 1 |" in printed and "| sdft-rev-gated | 1 |" in printed
    assert [(c["arm"], c["seed"]) for c in res["cells"]] == [("sft", 0), ("sdft-rev-gated", 0)]
    for cell in [res["base"], *res["cells"]]:
        assert 0.0 <= cell["accuracy"] <= cell["format"] <= 1.0
        assert cell["skill"]["n"] == 4 and sum(cell["skill"]["reasons"].values()) == 4
        assert cell["perplexity"] > 1.0 and 0.0 <= cell["probes"] <= 1.0
        assert cell["humaneval_detail"]["n_tasks"] == 1 and cell["humaneval"] in (0.0, 1.0)
    sft, gated = res["cells"]
    assert sft["steps"] == 1 and gated["blocks"] == 1 and sft["accepted"] == 1  # ungated
    run = out / "sdft-rev-gated" / "seed0" / "run"
    decision = json.loads((run / "block_000" / "gate_decision.json").read_text())
    assert gated["accepted"] == int(decision["accepted"])
    # the cell's perplexity is the run's own final evaluation, on the packed held-out set
    summary = json.loads((run / "summary.json").read_text())
    assert gated["perplexity"] == summary["eval_final"]["perplexity"]
    assert summary["eval_final"]["heldout"] == str(out / "heldout.bin")
    # the SFT run trained: its accepted checkpoint differs from the base in its weights
    assert (out / "sft" / "seed0" / "run" / "checkpoints").is_dir()
    assert (out / "tradeoff.png").stat().st_size > 1000 and (out / "table.md").is_file()
    train = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert [t["prompt"] for t in train] == [e.prompt for e in skill.make_examples("train", 8)]

    # --report rebuilds the table from the finished cells alone (here: the same table)
    assert cmp.report(out)["table"] == res["table"]
    with pytest.raises(UserError, match="not an sdft-compare output"):
        cmp.report(tmp_path)
    # resume: finished cells are reused as they are; changed settings are refused
    again = cmp.compare(tiny_run, out, seeds=[0], arms=["sft"], overrides=FAST, resume=True, **KW)
    assert again["cells"][0] == {**res["cells"][0]}
    with pytest.raises(UserError, match="different settings"):
        cmp.compare(tiny_run, out, seeds=[0], arms=["sft"], overrides=FAST, resume=True,
                    **{**KW, "n_test": 5})


def test_bad_arguments_are_one_line_and_write_nothing(tiny_run, tmp_path, capsys):
    out = tmp_path / "bad"
    with pytest.raises(SystemExit) as e:
        cli.main(["sdft-compare", "--ckpt", str(tiny_run), "--out", str(out), "--arms", "dpo"])
    assert e.value.code == 2 and "invalid choice: 'dpo'" in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown arm 'dpo'"):
        cmp.compare(tiny_run, out, arms=["dpo"], **KW)
    rc = cli.main(["sdft-compare", "--ckpt", str(tiny_run), "--out", str(out), "no_such_key=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "no_such_key" in err[0]
    assert not out.exists()
