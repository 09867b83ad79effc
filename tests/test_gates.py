"""Regression gates (accept/reject logic, gate_decision.json) and capability probes."""
import json
import math

import pytest

from jaxttt.config import GateConfig
from jaxttt.eval.gates import GateMetric, decide, write_decision
from jaxttt.eval.probes import load_probes, probe_metrics, score_probes

CFG = GateConfig(max_ppl_increase=0.05, max_probe_drop=0.0)
BEFORE = {"perplexity": 20.0, "probe/overall": 0.5, "probe/arith": 1.0, "probe/echo": 0.0}


def _after(**changes):
    out = dict(BEFORE)
    out.update({k.replace("__", "/"): v for k, v in changes.items()})
    return out


# ---------------------------------------------------------------------------------------------
# Gates
# ---------------------------------------------------------------------------------------------
def test_improvement_and_bounded_changes_accept():
    d = decide(BEFORE, _after(perplexity=18.0, probe__echo=1.0, probe__overall=1.0), CFG)
    assert d.accepted and d.reasons == []
    assert d.deltas["perplexity"] == pytest.approx(-2.0)
    assert d.deltas["probe/echo"] == pytest.approx(1.0)
    # Exactly at the bound (5% of 20 = 1.0) still passes.
    assert decide(BEFORE, _after(perplexity=21.0), CFG).accepted


def test_perplexity_regression_rejects_with_reason():
    d = decide(BEFORE, _after(perplexity=22.0), CFG)
    assert not d.accepted
    assert len(d.reasons) == 1 and d.reasons[0].startswith("perplexity: rose from 20 to 22")
    assert "relative regression 0.1 > allowed 0.05" in d.reasons[0]


def test_probe_drop_rejects_naming_each_probe():
    d = decide(BEFORE, _after(probe__arith=0.0, probe__overall=0.0), CFG)
    assert not d.accepted
    assert [r.split(":")[0] for r in d.reasons] == ["probe/arith", "probe/overall"]
    loose = GateConfig(max_ppl_increase=0.05, max_probe_drop=0.5)
    assert not decide(BEFORE, _after(probe__arith=0.0), loose).accepted  # drop 1.0 > 0.5
    assert decide(BEFORE, _after(probe__overall=0.25), loose).accepted  # drop 0.25 <= 0.5


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_after_metric_rejects(bad):
    d = decide(BEFORE, _after(perplexity=bad), CFG)
    assert not d.accepted and "perplexity: after value" in d.reasons[0] and "not finite" in d.reasons[0]
    d = decide(BEFORE, _after(probe__overall=bad), CFG)
    assert not d.accepted and d.reasons[0].startswith("probe/overall")


def test_missing_metric_rejects():
    after = _after()
    del after["probe/echo"]
    d = decide(BEFORE, after, CFG)
    assert not d.accepted and d.reasons == ["probe/echo: missing from the after metrics"]
    d = decide({"probe/overall": 1.0}, {"probe/overall": 1.0}, CFG)
    assert not d.accepted and d.reasons == ["perplexity: missing from the before metrics"]
    d = decide(BEFORE, _after(perplexity=None), CFG)
    assert not d.accepted and "not a number" in d.reasons[0]


def test_extra_metrics_and_disabled_gate():
    extra = [GateMetric("task/acc", higher_is_better=True, max_regression=0.1, relative=True)]
    before = {**BEFORE, "task/acc": 0.8}
    assert decide(before, {**BEFORE, "task/acc": 0.75}, CFG, extra).accepted  # -6.25% relative
    d = decide(before, {**BEFORE, "task/acc": 0.6}, CFG, extra)
    assert not d.accepted and d.reasons[0].startswith("task/acc: dropped from 0.8 to 0.6")
    off = GateConfig(enabled=False)
    d = decide(BEFORE, _after(perplexity=math.nan), off)
    assert d.accepted and "disabled" in d.reasons[0]


def test_write_decision_is_strict_json(tmp_path):
    d = decide(BEFORE, _after(perplexity=math.nan), CFG)
    path = write_decision(tmp_path, d, step=40)
    assert path == tmp_path / "gate_decision.json"
    data = json.loads(path.read_text())
    assert data["accepted"] is False and data["step"] == 40
    assert data["deltas"]["perplexity"] == "nan" and data["reasons"] == d.reasons
    other = write_decision(tmp_path / "sub" / "g.json", decide(BEFORE, _after(), CFG))
    assert json.loads(other.read_text())["accepted"] is True


# ---------------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------------
PROBES_YAML = """
- name: arith
  prompt: "2 + 2 ="
  expect: {regex: "\\\\b4\\\\b", not_substring: "5"}
  weight: 3
- name: echo
  prompt: "Say hello"
  expect:
    substring: [hello, world]
"""


def _probe_file(tmp_path, text):
    p = tmp_path / "probes.yaml"
    p.write_text(text)
    return p


def test_score_probes_with_fake_generate(tmp_path):
    probes = load_probes(_probe_file(tmp_path, PROBES_YAML))
    assert [p.name for p in probes] == ["arith", "echo"] and probes[0].weight == 3.0
    answers = {"2 + 2 =": " 4, not 5", "Say hello": "hello world"}
    calls = []

    def generate(prompts):
        calls.append(list(prompts))
        return [answers[p] for p in prompts]

    s = score_probes(probes, generate)
    assert calls == [["2 + 2 =", "Say hello"]]  # one batched call
    assert s["passed"] == {"arith": False, "echo": True}  # "5" is forbidden
    assert s["overall"] == pytest.approx(1 / 4) and (s["n_passed"], s["n_probes"]) == (1, 2)
    answers["2 + 2 ="] = " 4."
    s = score_probes(probes, generate)
    assert s["overall"] == 1.0
    assert probe_metrics(s) == {"probe/overall": 1.0, "probe/arith": 1.0, "probe/echo": 1.0}
    with pytest.raises(ValueError, match="1 completions for 2 prompts"):
        score_probes(probes, lambda ps: ["x"])


@pytest.mark.parametrize("text, message", [
    ("- {name: a, prompt: p, expect: {substring: x}, colour: red}", "probe #0: unknown key 'colour'"),
    ("- {name: a, prompt: p, expect: {substring: x}}\n- {name: b, prompt: q}", "probe #1: missing key 'expect'"),
    ("- {name: a, prompt: p, expect: {contains: x}}", "probe #0: expect: unknown check 'contains'"),
    ("- {name: a, prompt: p, expect: {regex: '(unclosed'}}", "probe #0: expect.regex: invalid regular expression"),
    ("- {name: a, prompt: p, expect: {substring: 3}}", "probe #0: expect.substring: expected a string"),
    ("- {name: a, prompt: p, expect: {substring: x}, weight: 0}", "probe #0: key 'weight' must be a positive"),
    ("- {name: '', prompt: p, expect: {substring: x}}", "probe #0: key 'name' must be a non-empty string"),
    ("- {name: a, prompt: p, expect: {substring: x}}\n- {name: a, prompt: q, expect: {substring: y}}",
     "probe #1: key 'name': 'a' is a duplicate"),
    ("- {name: overall, prompt: p, expect: {substring: x}}", "'overall' is reserved"),
    ("name: a", "expected a non-empty YAML list"),
    ("- [unclosed", "not valid YAML"),
])
def test_bad_probe_file_errors_name_file_and_entry(tmp_path, text, message):
    path = _probe_file(tmp_path, text)
    with pytest.raises(ValueError) as err:
        load_probes(path)
    assert str(path) in str(err.value) and message in str(err.value)
