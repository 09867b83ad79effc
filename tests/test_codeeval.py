"""`jaxttt codeeval` and its parts: the pass@k estimator, HumanEval/MBPP tasks, check() splitting,
all 164 canonical HumanEval solutions passing under confinement, wrong ones failing, and the
refusal path without confinement."""
import itertools
import json
import math

import pytest

from jaxttt import cli
from jaxttt.eval import codeeval, sandbox
from jaxttt.eval.humaneval import load_humaneval, load_mbpp, pass_at_k, split_check

TASKS = load_humaneval()


def _comb_pass_at_k(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_matches_the_combinatorial_definition():
    for n in (1, 2, 5, 10, 20, 100):
        for c, k in itertools.product(range(n + 1), range(1, n + 1)):
            assert pass_at_k(n, c, k) == pytest.approx(_comb_pass_at_k(n, c, k), abs=1e-12)
    assert pass_at_k(10, 0, 10) == 0.0 and pass_at_k(10, 1, 10) == 1.0 and pass_at_k(10, 3, 1) == pytest.approx(0.3)
    for bad in ((5, 6, 1), (5, 2, 6), (5, 2, 0)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_humaneval_tasks_and_check_splitting():
    assert len(TASKS) == 164 and all(t.entry_point and t.check for t in TASKS.values())
    # HumanEval/12 has three asserts; `assert True` lines would not count
    snippets = split_check(TASKS["HumanEval/12"].check)
    assert len(snippets) == 3 and all(s.endswith("_check_one(candidate)\n") for s in snippets)
    src = ("def check(candidate):\n    x = 2\n    assert True, 'free'\n    assert candidate(x) == 4\n"
           "    for i in range(3):\n        assert candidate(i) == 2 * i\n")
    parts = split_check(src)
    assert len(parts) == 2 and "x = 2" in parts[1] and "assert True" in parts[1]
    assert split_check("def helper():\n    pass\n") == []


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _run_cli(capsys, *argv):
    rc = cli.main(["codeeval", *argv, "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_all_164_canonical_solutions_pass_and_wrong_ones_fail(tmp_path, capsys):
    rows = [{"task_id": t, "completion": task.canonical_solution} for t, task in TASKS.items()]
    f = _write(tmp_path / "canonical.jsonl", rows)
    rc, out, _ = _run_cli(capsys, "--bench", "humaneval", "--completions", f, "--k", "1",
                          "--out", str(tmp_path / "out"), "--timeout", "20")
    last = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and last["pass@1"] == 1.0 and last["n_tasks"] == 164
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 164 and all(s["passed"] and s["confined"] for s in samples)


def test_wrong_completions_fail_and_pass_at_k_counts_per_task(tmp_path, capsys):
    ids = list(TASKS)[:6]
    wrong = ["    return None\n", "    return 0\n", "    raise ValueError\n",
             "    import os\n    os._exit(0)\n", "    return candidate\n", "    pass\n"]
    rows = []
    for i, tid in enumerate(ids):  # task i: 1 right out of 2 for even i, 0 of 2 for odd i
        rows.append({"task_id": tid, "completion": wrong[i]})
        rows.append({"task_id": tid, "completion": TASKS[tid].canonical_solution if i % 2 == 0 else wrong[-1 - i]})
    f = _write(tmp_path / "mixed.jsonl", rows)
    rc, out, _ = _run_cli(capsys, "--bench", "humaneval", "--completions", f, "--k", "1", "2",
                          "--out", str(tmp_path / "out"))
    last = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and last["pass@1"] == pytest.approx(0.25) and last["pass@2"] == pytest.approx(0.5)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n_passed"] == 3 and summary["confined"] and not summary["unsafe_local_exec"]


def test_mbpp_from_a_local_file(tmp_path, capsys):
    mbpp = _write(tmp_path / "mbpp.jsonl", [
        {"task_id": 11, "prompt": "Remove first and last occurrence of a char.",
         "code": "def remove_Occ(s, ch):\n    s = s.replace(ch, '', 1)\n    return s[::-1].replace(ch, '', 1)[::-1]\n",
         "test_imports": [], "test_list": ['assert remove_Occ("hello","l") == "heo"',
                                           'assert remove_Occ("abcda","a") == "bcd"']}])
    tasks = load_mbpp(mbpp)
    assert list(tasks) == ["Mbpp/11"] and tasks["Mbpp/11"].entry_point == "remove_Occ"
    f = _write(tmp_path / "c.jsonl", [{"task_id": "Mbpp/11", "completion": tasks["Mbpp/11"].canonical_solution},
                                      {"task_id": "Mbpp/11", "completion": "def remove_Occ(s, ch):\n    return s\n"}])
    rc, out, _ = _run_cli(capsys, "--bench", "mbpp", "--mbpp-file", mbpp, "--completions", f,
                          "--out", str(tmp_path / "out"))
    assert rc == 0 and json.loads(out.strip().splitlines()[-1])["pass@1"] == 0.5


@pytest.mark.parametrize("rows,argv,needle", [
    ([{"task_id": "HumanEval/0"}], [], "row 1: expected an object with string fields"),
    ([{"task_id": "HumanEval/9999", "completion": ""}], [], "unknown task_id"),
    ([{"task_id": "HumanEval/0", "completion": ""}], ["--k", "2"], "--k 2: pass@k needs 1 <= k <= n"),
    ([{"task_id": "HumanEval/0", "completion": ""}], ["--tasks", "Nope/1"], "--tasks: unknown task id"),
])
def test_user_errors_are_one_line(tmp_path, capsys, rows, argv, needle):
    f = _write(tmp_path / "c.jsonl", rows)
    rc, out, err = _run_cli(capsys, "--bench", "humaneval", "--completions", f, *argv, "--out",
                            str(tmp_path / "out"))
    assert rc == 1 and needle in err and len(err.strip().splitlines()) == 1 and out == ""
    assert not (tmp_path / "out").exists()


def test_bad_jsonl_line_names_file_and_line(tmp_path, capsys):
    f = tmp_path / "c.jsonl"
    f.write_text('{"task_id": "HumanEval/0", "completion": ""}\n{oops\n{"task_id": "HumanEval/1", "completion": ""}\n')
    rc, _, err = _run_cli(capsys, "--bench", "humaneval", "--completions", str(f), "--out", str(tmp_path / "o"))
    assert rc == 1 and f"{f}:2: not valid JSON" in err


def test_refuses_without_confinement_unless_the_flag_is_given(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sandbox, "_probe_result", ["simulated: no user namespaces"])
    f = _write(tmp_path / "c.jsonl", [{"task_id": "HumanEval/0", "completion": TASKS["HumanEval/0"].canonical_solution}])
    rc, out, err = _run_cli(capsys, "--bench", "humaneval", "--completions", f, "--out", str(tmp_path / "a"))
    assert rc == 1 and "--unsafe-local-exec" in err and "simulated" in err and out == ""
    assert not (tmp_path / "a").exists()  # nothing started, nothing written
    rc, out, err = _run_cli(capsys, "--bench", "humaneval", "--completions", f, "--out", str(tmp_path / "b"),
                            "--unsafe-local-exec")
    assert rc == 0 and json.loads(out.strip().splitlines()[-1]) == {
        "pass@1": 1.0, "n_tasks": 1, "n_samples": 1, "unsafe_local_exec": True}
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["unsafe_local_exec"] is True and summary["confined"] is False


def test_completion_extraction_for_base_and_chat_outputs():
    task = TASKS["HumanEval/12"]
    base = "    return max(strings, key=len) if strings else None\n\ndef other():\n    pass\n"
    assert codeeval.completion_from_output(task, base, chat=False) == (
        "    return max(strings, key=len) if strings else None\n")
    chat = ("Here it is:\n```python\nfrom typing import List, Optional\n\ndef longest(strings):\n"
            "    return max(strings, key=len) if strings else None\n```\nDone.")
    program = task.program(codeeval.completion_from_output(task, chat, chat=True))
    assert program.startswith(task.prompt) and program.rstrip().endswith("else None")
    r = sandbox.evaluate(program, **task.tests())
    assert r.all_passed


class _ByteTokenizer:
    """Bytes as ids (0 = pad, 1 = eos, byte b = b + 2): the tokenizer interface the sampler path
    uses, so the test needs no trained tokenizer; `chat` adds a chat template."""

    pad_id, eos_id = 0, 1

    def __init__(self, chat: bool):
        self.chat_template = "{{ messages }}" if chat else None
        self.chats = []

    def prompt_ids(self, text):
        return [b + 2 for b in text.encode()]

    def chat_ids(self, messages):
        self.chats.append(messages)
        return self.prompt_ids("<user>" + messages[0]["content"] + "<assistant>")

    def decode(self, ids):
        return bytes(int(i) - 2 for i in ids if int(i) >= 2).decode("utf-8", "replace")


@pytest.mark.parametrize("chat", [False, True])
def test_generation_from_a_checkpoint(tmp_path, capsys, monkeypatch, chat):
    """--ckpt: batched sampling from a tiny untrained model (prompts longer than its context are
    cut from the left), then the same evaluation path; the chat template when the tokenizer has one."""
    from flax import nnx

    from jaxttt import config as C
    from jaxttt import runs
    from jaxttt.model.transformer import Transformer

    cfg = C.load(C.ModelConfig, "model/tiny.yaml", ["n_layers=1", "vocab_size=258", "max_seq_len=64"])
    tok = _ByteTokenizer(chat)
    monkeypatch.setattr(runs, "load_run", lambda spec: (Transformer(cfg, rngs=nnx.Rngs(0)), tok, {"step": 3}))
    rc, out, err = _run_cli(capsys, "--bench", "humaneval", "--ckpt", "RUN", "--n", "2",
                            "--temperature", "0.8", "--k", "1", "2", "--tasks", "HumanEval/0,HumanEval/12",
                            "--max-new-tokens", "16", "--batch-size", "3", "--out", str(tmp_path / "out"))
    assert rc == 0, err
    last = json.loads(out.strip().splitlines()[-1])
    assert last["n_tasks"] == 2 and last["n_samples"] == 4 and 0.0 <= last["pass@1"] <= last["pass@2"] <= 1.0
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert sorted(s["task_id"] for s in samples) == ["HumanEval/0"] * 2 + ["HumanEval/12"] * 2
    assert all(len(s["raw"]) <= 16 for s in samples)
    gen = json.loads((tmp_path / "out" / "summary.json").read_text())["generation"]
    assert gen["n"] == 2 and gen["chat"] is chat and gen["step"] == 3 and gen["prompts_truncated"] >= 1
    assert len(tok.chats) == (2 if chat else 0)
    assert not chat or "def has_close_elements" in tok.chats[0][0]["content"]
