"""Discovery environments: reward properties, parsers under adversarial input, safe_reward and
load_env."""
import json
import math
import sys
import textwrap
import time

import pytest

from jaxttt.discover.archive import Archive
from jaxttt.discover.env import DiscoveryEnv, EnvError, load_env, reward_record, safe_reward
from jaxttt.discover.envs import (CodeTestsEnv, GSM8KEnv, NumericTargetEnv, ToyStringEnv,
                                  extract_code, parse_final_answer, parse_numbers)


# ---- toy ----------------------------------------------------------------------------------
def test_toy_reward_properties():
    env = ToyStringEnv(target="HELLO")
    assert env.reward("HELLO") == 1.0
    guesses = ["HELLO", "HELLX", "HELXX", "HXXXX", "XXXXX"]
    rewards = [env.reward(g) for g in guesses]
    assert rewards == sorted(rewards, reverse=True) and len(set(rewards)) == 5
    assert rewards[-1] == 0.0 and env.reward("") == 0.0 and env.reward("\x00\x01") == 0.0
    assert env.reward("HELLO WORLD") < 1.0  # extra characters cost credit
    assert all(0.0 <= env.reward(g) <= 1.0 for g in ["H", "HE", "HELLOO", "hello"])


def test_toy_transition_and_prompt():
    env = ToyStringEnv(target="HELLO")
    assert env.transition("  HELLX  \nmore text") == "HELLX"
    assert env.transition("\n\n") == ""
    arc = Archive()
    arc.add_seed("HELXX", env.reward("HELXX"))
    prompt = env.context_from_archive("HELXX", arc)
    assert prompt == "Guess the hidden string of 5 characters.\nGuess: HELXX\nScore: 0.60\nGuess:"
    assert env.context_from_archive("", arc).endswith("characters.\nGuess:")
    assert "HELLO" not in prompt  # the target stays hidden


# ---- numeric ------------------------------------------------------------------------------
def test_numeric_reward_properties():
    env = NumericTargetEnv(target=[3.0, -1.0, 2.5], alpha=0.5)
    assert env.reward(env.transition("3, -1, 2.5")) == 1.0
    assert env.reward(env.transition("6/2, -(2-1), 5/2")) == 1.0
    distances = [0.0, 0.1, 0.5, 1.0, 2.0, 5.0]
    rewards = [env.reward(env.transition(f"{3 + d}, -1, 2.5")) for d in distances]
    assert all(a > b for a, b in zip(rewards, rewards[1:]))
    assert rewards[3] == pytest.approx(math.exp(-0.5))
    for garbage in ["", "hello", "1, 2", "1, 2, 3, 4", "__import__('os')", "nan, 1, 2", "1e400, 0, 0"]:
        assert env.transition(garbage) == "" and env.reward(garbage) == 0.0
    assert env.reward(env.initial_state()) == pytest.approx(math.exp(-0.5 * (9 + 1 + 6.25)))
    assert env.reward("1e200, 0, 0") == 0.0  # squares overflow to inf, not an exception


def test_numeric_parser_accepts_arithmetic_only():
    assert parse_numbers("1.5, 2*3, -(4/2)") == [1.5, 6.0, -2.0]
    assert parse_numbers("[1, 2, 3]") == [1.0, 2.0, 3.0]
    assert parse_numbers("1 2 -3") == [1.0, 2.0, -3.0]
    assert parse_numbers("2**10") == [1024.0]
    hostile = ["__import__('os')", "__import__('os').system('touch /tmp/x')", "().__class__",
               "os.system('ls')", "x", "1 if 1 else 2", "'abc'", "True", "1j", "[1, [2]]",
               "lambda: 1", "[i for i in range(3)]", "9**9**9", "10**400", "1/0", "(-8)**0.5",
               "(" * 500 + "1" + ")" * 500, "1," * 300, "{1: 2}", "f'{1}'", "1; 2", "b'1'"]
    for text in hostile:
        assert parse_numbers(text) is None, text


# ---- gsm8k --------------------------------------------------------------------------------
@pytest.fixture
def gsm8k_file(tmp_path):
    rows = [{"question": "Ann has 3 apples and buys 4 more. How many apples does she have?",
             "answer": "3 + 4 = 7\n#### 7"},
            {"question": "A farm has 1,000 hens and buys 234 more. How many hens are there?",
             "answer": "1000 + 234 = 1234\n#### 1,234"}]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_gsm8k_answer_parsing():
    assert parse_final_answer("so the total is\n#### 1,234") == (1234.0, True)
    assert parse_final_answer("#### $1,234.00") == (1234.0, True)
    assert parse_final_answer("#### -5") == (-5.0, True)
    assert parse_final_answer("First 12, then 30. The answer is 42.") == (42.0, False)
    assert parse_final_answer("#### seven, I think 7") == (7.0, False)  # no number after ####
    assert parse_final_answer("no numbers here") == (None, False)
    assert parse_final_answer("#### 3\nwait, #### 4") == (4.0, True)  # the last marker counts


def test_gsm8k_env_rewards_and_prompt(gsm8k_file):
    env = GSM8KEnv(path=str(gsm8k_file), index=1)
    assert env.gold == 1234.0 and "1,000 hens" in env.problem_description()
    assert env.reward("1000 + 234 = 1234\n#### 1,234") == 1.0
    assert env.reward("The farm has 1234 hens.") == 1.0  # last-number fallback
    assert env.reward("#### 1200") == pytest.approx(0.1)  # right format, wrong answer
    assert env.reward("about 1200 hens") == 0.0  # wrong, no format
    assert env.reward("I don't know") == 0.0
    prompt = env.context_from_archive("", None)
    assert prompt == (GSM8KEnv.INSTRUCTION + "\nQuestion: " + env.question + "\nAnswer:")
    assert env.context_from_archive("", None) == prompt  # deterministic
    arc = Archive()
    arc.add_seed("#### 1200", 0.1)
    assert "Previous answer (reward 0.10):\n#### 1200\nAnswer:" in env.context_from_archive("#### 1200", arc)
    assert env.transition(" 1234 hens\n#### 1234\nQuestion: next one? #### 9") == "1234 hens\n#### 1234"
    assert GSM8KEnv(path=str(gsm8k_file)).gold == 7.0  # index defaults to 0


def test_gsm8k_errors(gsm8k_file, tmp_path):
    with pytest.raises(EnvError, match="out of range"):
        GSM8KEnv(path=str(gsm8k_file), index=2)
    with pytest.raises(EnvError, match="no such file"):
        GSM8KEnv(path=str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(EnvError, match="bad.jsonl:1"):
        GSM8KEnv(path=str(bad))
    assert GSM8KEnv(index=3).gold == 1320.0  # the embedded problems, with a comma answer


# ---- code ---------------------------------------------------------------------------------
RLE_OK = textwrap.dedent("""
    def rle(s):
        out, i = [], 0
        while i < len(s):
            j = i
            while j < len(s) and s[j] == s[i]:
                j += 1
            out.append(f"{s[i]}{j - i}")
            i = j
        return "".join(out)
""")
RLE_HALF = "def rle(s):\n    return ''.join(c + '1' for c in s)\n"


def test_extract_code():
    assert extract_code("Here:\n```python\nx = 1\n```\nthanks") == "x = 1\n"
    assert extract_code("x = 2\n```\nand then prose") == "x = 2\n"  # continuation of an open fence
    assert extract_code("```\ny = 3\n```") == "y = 3\n"
    assert extract_code("z = 4") == "z = 4\n"
    assert extract_code("```python\n```") == "" and extract_code("   ") == ""
    # a block opened but cut before its closing fence (the prompt had already opened one)
    assert extract_code("```python\nimport math\ndef f():\n    return 1") == \
        "import math\ndef f():\n    return 1\n"
    assert extract_code("\n```Python\nw = 5\n") == "w = 5\n"


def test_code_env_rewards_through_sandbox():
    env = CodeTestsEnv(timeout_s=2.0)
    assert env.reward(env.transition(f"```python\n{RLE_OK}```")) == 1.0
    assert env.reward(env.transition(RLE_HALF + "```\n")) == 0.5
    assert env.reward(env.initial_state()) == 0.0
    assert env.reward("def rle(s):\n    while True:\n        pass\n") == 0.0
    # a process cannot be started (the call fails inside), the function itself is still right
    assert env.reward("import os\nassert os.system('true') != 0\n" + RLE_OK) == 1.0
    assert env.reward("import os\nos.execv('/bin/true', ['true'])\n" + RLE_OK) == 0.0
    assert env.reward("") == 0.0
    prompt = env.context_from_archive(RLE_HALF, None)
    assert prompt.endswith("Improved solution:\n```python\n") and "rle(s)" in prompt


@pytest.mark.parametrize("action,needle", [
    ("no code here, just words about rle", "line 1: SyntaxError"),
    ("```python\ndef rle(s):\n    return (\n```", "line 2: SyntaxError"),
    ("```python\ndef rle(s):\n  return 1\n    x = 2\n```", "line 3: IndentationError"),
    ("```python\nx = 1\x00\n```", "null bytes"),
    ("```python\nx = " + "(" * 300 + "1" + ")" * 300 + "\n```", "SyntaxError"),
    ("```python\n```", "no code in the action"),
])
def test_code_env_marks_unparsable_actions_invalid_without_running_them(action, needle):
    # reward 0 as before, but the log says why (n_invalid, not a silent 0 from the sandbox)
    state, reward, error = safe_reward(CodeTestsEnv(timeout_s=2.0), action, timeout_s=10.0)
    assert (state, reward) == ("", 0.0) and error.startswith("invalid action") and needle in error


def test_humaneval_env_marks_a_broken_body_invalid():
    env = load_env("humaneval:HumanEval/12", {"timeout_s": 10.0})
    _, reward, error = safe_reward(env, "    return strings[0\n", timeout_s=20.0)
    assert reward == 0.0 and error.startswith("invalid action") and "SyntaxError" in error
    state, reward, error = safe_reward(env, env.task.canonical_solution, timeout_s=20.0)
    assert (reward, error) == (1.0, None) and env.task.prompt.strip() in state


def test_code_env_custom_problem():
    env = load_env("code", {"description": "Write sq(x).",
                            "tests": ["assert sq(2) == 4", "assert sq(-3) == 9"]})
    assert env.initial_state() == "" and env.problem_description() == "Write sq(x)."
    assert env.reward("def sq(x):\n    return x * x\n") == 1.0
    assert env.reward("def sq(x):\n    return 2 * x\n") == 0.5
    with pytest.raises(EnvError, match="together"):
        load_env("code", {"description": "Write sq(x)."})
    with pytest.raises(EnvError, match="at least one test"):
        load_env("code", {"description": "Write sq(x).", "tests": []})


# ---- safe_reward --------------------------------------------------------------------------
class _ScriptedEnv(DiscoveryEnv):
    version = "test-1"

    def __init__(self, *, behaviour: str):
        super().__init__(behaviour=behaviour)
        self.behaviour = behaviour

    def problem_description(self) -> str:
        return "scripted"

    def transition(self, action: str) -> str:
        if self.behaviour == "bad_transition":
            raise RuntimeError("cannot parse")
        return action

    def reward(self, state: str):
        return {"ok": lambda: 0.25, "nan": lambda: math.nan, "inf": lambda: -math.inf,
                "str": lambda: "0.5", "bool": lambda: True, "raise": lambda: 1 / 0,
                "hang": lambda: time.sleep(5)}[self.behaviour]()


@pytest.mark.parametrize("behaviour,needle", [
    ("raise", "ZeroDivisionError"), ("nan", "finite"), ("inf", "finite"), ("str", "real number"),
    ("bool", "real number"), ("bad_transition", "cannot parse")])
def test_safe_reward_maps_failures_to_zero(behaviour, needle):
    state, reward, error = safe_reward(_ScriptedEnv(behaviour=behaviour), "action", timeout_s=2.0)
    assert reward == 0.0 and state == "" and needle in error


def test_safe_reward_timeout():
    t0 = time.monotonic()
    state, reward, error = safe_reward(_ScriptedEnv(behaviour="hang"), "action", timeout_s=0.3)
    assert time.monotonic() - t0 < 1.5
    assert (state, reward) == ("", 0.0) and error.startswith("timeout")


def test_safe_reward_success_and_empty():
    assert safe_reward(_ScriptedEnv(behaviour="ok"), "s", timeout_s=2.0) == ("s", 0.25, None)
    state, reward, error = safe_reward(ToyStringEnv(), "\n", timeout_s=2.0)
    assert (state, reward) == ("", 0.0) and "empty" in error
    assert safe_reward(ToyStringEnv(), "HELLO", timeout_s=2.0) == ("HELLO", 1.0, None)


# ---- interface + loading ------------------------------------------------------------------
USER_ENV = textwrap.dedent("""
    from jaxttt.discover.env import DiscoveryEnv

    class CountEnv(DiscoveryEnv):
        version = "count-1"

        def __init__(self, *, n: int = 3):
            super().__init__(n=n)
            self.n = n

        def problem_description(self):
            return f"Write {self.n} letters a."

        def transition(self, action):
            return action.strip()

        def reward(self, state):
            return min(state.count("a"), self.n) / self.n

    class NotAnEnv:
        pass

    class Incomplete(DiscoveryEnv):
        def problem_description(self):
            return "x"
""")


@pytest.fixture
def user_env_file(tmp_path, monkeypatch):
    path = tmp_path / "user_envs_for_test.py"
    path.write_text(USER_ENV)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield path
    sys.modules.pop("user_envs_for_test", None)


def test_load_builtin_envs():
    assert isinstance(load_env("toy", {"target": "AB"}), ToyStringEnv)
    assert load_env("toy", {"target": "AB"}).reward("AB") == 1.0
    assert isinstance(load_env("numeric", {}), NumericTargetEnv)
    assert isinstance(load_env("code", None), CodeTestsEnv)
    assert isinstance(load_env("gsm8k", {"index": 1}), GSM8KEnv)


def test_load_user_env_from_file_and_module(user_env_file):
    env = load_env(f"{user_env_file}:CountEnv", {"n": 2})
    assert env.reward(env.transition(" aab ")) == 1.0 and env.version == "count-1"
    by_module = load_env("user_envs_for_test:CountEnv", {})
    assert by_module.reward("a") == pytest.approx(1 / 3)
    # the default prompt shows the state being improved and its archived reward
    arc = Archive()
    arc.add_seed("ab", by_module.reward("ab"))
    assert by_module.context_from_archive("ab", arc) == (
        "Write 3 letters a.\nCurrent solution (reward 0.3333):\nab\nImproved solution:\n")
    assert len(by_module.problem_id) == 12 and by_module.problem_id != env.problem_id


@pytest.mark.parametrize("spec,options,needle", [
    ("nope", {}, "built-in name"),
    ("no_such_module_xyz:Env", {}, "not found"),
    ("missing_dir/none.py:Env", {}, "does not exist"),
    ("user_envs_for_test:Missing", {}, "CountEnv"),
    ("user_envs_for_test:NotAnEnv", {}, "not a DiscoveryEnv subclass"),
    ("user_envs_for_test:Incomplete", {}, "does not implement"),
    ("user_envs_for_test:CountEnv", {"bogus": 1}, "rejected options"),
    ("toy", {"taget": "x"}, "rejected options"),
])
def test_load_env_errors(user_env_file, spec, options, needle):
    with pytest.raises(EnvError, match=needle):
        load_env(spec, options)


def test_reward_record_has_the_g5_fields():
    env = ToyStringEnv(target="HELLO")
    prompt = env.context_from_archive("", None)
    state, reward, error = safe_reward(env, " HELXX\n", timeout_s=2.0)
    rec = json.loads(json.dumps(reward_record(env, prompt, " HELXX\n", state, reward, error)))
    assert {"problem_id", "prompt", "action", "state", "reward", "timestamp", "env_version"} <= set(rec)
    assert (rec["problem_id"], rec["state"], rec["reward"], rec["error"]) == (env.problem_id, "HELXX", 0.6, None)
    assert rec["env_version"] == "ToyStringEnv/toy-1" and rec["timestamp"].endswith("+00:00")


def test_problem_id_is_a_stable_hash():
    a, b = ToyStringEnv(target="HELLO"), ToyStringEnv(target="WORLD")
    c = ToyStringEnv(target="ABCDEF")
    assert a.problem_id == b.problem_id  # same description (the length is all it reveals)
    assert a.problem_id != c.problem_id and all(ch in "0123456789abcdef" for ch in a.problem_id)


# ---- benchmark envs and the module layout --------------------------------------------------
def test_env_module_does_not_import_the_builtin_envs():
    import ast
    import jaxttt.discover.env as env_module
    tree = ast.parse(open(env_module.__file__).read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "jaxttt.discover.envs" not in imported, imported


def test_humaneval_env_rewards_the_fraction_of_asserts():
    env = load_env("humaneval:HumanEval/12", {"timeout_s": 10.0})
    assert len(env.tests) == 3 and "def longest" in env.context_from_archive("", None)
    assert env.reward(env.transition(env.task.canonical_solution)) == 1.0  # a body continuing the prompt
    partial = "```python\n" + env.task.prompt + "    return strings[0] if strings else None\n```"
    assert env.reward(env.transition(partial)) == pytest.approx(2 / 3)
    # `assert True` lines in check() are setup, not free credit
    assert env.reward(env.transition("```python\ndef longest(strings):\n    return 0\n```")) == 0.0
    with pytest.raises(EnvError, match="no task"):
        load_env("humaneval:HumanEval/999")


MBPP_ROWS = [{"source_file": "x", "task_id": 2, "prompt": "Write a function to find the shared elements.",
              "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))\n",
              "test_imports": [],
              "test_list": ["assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
                            "assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))"]}]


def test_mbpp_env_from_a_local_file(tmp_path):
    path = tmp_path / "sanitized-mbpp.json"
    path.write_text(json.dumps(MBPP_ROWS))
    env = load_env("mbpp:Mbpp/2", {"path": str(path)})
    assert env.reward(env.transition(f"```python\n{MBPP_ROWS[0]['code']}```")) == 1.0
    assert env.reward("def similar_elements(a, b):\n    return (4, 5)\n") == 0.5
    with pytest.raises(EnvError, match="mbpp"):
        load_env("mbpp:Mbpp/2", {})


def test_code_env_refuses_without_confinement(monkeypatch):
    from jaxttt.eval import sandbox
    monkeypatch.setattr(sandbox, "_probe_result", ["simulated: no namespaces"])
    with pytest.raises(EnvError, match="unsafe-local-exec"):
        CodeTestsEnv()
    env = CodeTestsEnv(unsafe_local_exec=True)
    assert env.options["unsafe_local_exec"] is True  # recorded with the run's env options
    assert env.reward(RLE_OK) == 1.0
