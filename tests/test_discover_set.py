"""TTT-Discover over a problem set (seed 000): answer parsing, the GSM-style generator, problem
sets and held-out splits, the reuse score, metric semantics, per-step adapter files, the CLI."""
import json
import math
import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxttt import config as C
from jaxttt.cli import main
from jaxttt.data.packing import ensure_default_data
from jaxttt.data.tokenizer import Tokenizer
from jaxttt.discover import adapter_files
from jaxttt.discover.env import DiscoveryEnv, EnvError
from jaxttt.discover.envs import parse_final_answer
from jaxttt.discover.gsm_synth import generate_problems
from jaxttt.discover.problemset import (GSM8KProblem, Pick, ProblemSet, SetArchive,
                                        load_problem_sets, solved)
from jaxttt.discover.setrun import DiscoverSetConfig, SetRun
from jaxttt.model import lora
from jaxttt.model.transformer import Transformer
from jaxttt.sharding import make_mesh, shard_state
from jaxttt.train.checkpoint import Checkpointer, save_model_config

MODEL = ["n_layers=1", "d_model=64", "n_heads=2", "d_head=32", "d_ff=128", "vocab_size=512",
         "max_seq_len=128"]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- answer parsing and the generator ---------------------------------------------------------
@pytest.mark.parametrize("text,value,marker", [
    ("She has 42 now.\n#### 42", 42, True),
    ("#### 1,234", 1234, True),
    ("The total is $5", 5, False),
    ("#### $1,250.50 dollars in total.", 1250.5, True),
    ("#### 18 apples\n\nThat is the answer, 7 more than before.", 18, True),
    ("3 + 4 = 7 and then 7 * 2 = 14.", 14, False),
    ("#### -3", -3, True),
    ("no number here", None, False),
])
def test_parse_final_answer_seed_formats(text, value, marker):
    assert parse_final_answer(text) == (value, marker)


def test_gsm_problem_reward_on_seed_formats():
    p = GSM8KProblem(question="How many?", answer="20 * 62 = 1240\n#### 1,240", format_credit=0.1)
    assert p.gold == 1240
    assert p.reward(p.transition("20 * 62 = 1240\n#### 1240")) == 1.0
    assert p.reward(p.transition("It costs $1,240.")) == 1.0
    assert p.reward(p.transition("#### 1,240 dollars\nQuestion: next one #### 5")) == 1.0
    assert p.reward(p.transition("#### 1241")) == pytest.approx(0.1)  # format credit only
    assert not solved(0.1) and solved(1.0)
    with pytest.raises(EnvError, match="no final number"):
        GSM8KProblem(question="q", answer="no answer")


def test_generated_problems_are_exact_and_varied():
    rows = generate_problems(40, seed=3, min_steps=1, max_steps=4)
    assert rows == generate_problems(40, seed=3, min_steps=1, max_steps=4)
    assert len({r["question"] for r in rows}) == 40
    assert rows != generate_problems(40, seed=4)
    n_ops = Counter()
    for r in rows:
        *work, final = r["answer"].splitlines()
        value = None
        for line in work:  # every worked line is true arithmetic on the previous value
            m = re.search(r"(\d[\d +*/-]*) = (\d+)", line)
            assert m, line
            assert eval(m.group(1).replace("/", "//")) == int(m.group(2)) == eval(m.group(1))
            if value is not None:
                assert m.group(1).startswith(str(value))
            value = int(m.group(2))
        assert final == f"#### {value}" and value >= 0
        assert parse_final_answer(r["answer"]) == (value, True)
        n_ops[len(work) - ("worth" in r["answer"])] += 1
    assert set(n_ops) == {1, 2, 3, 4}
    assert len({r["question"].split()[0] for r in rows}) > 5  # names vary


# ---- problem sets ------------------------------------------------------------------------------
def _gsm_dir(tmp_path):
    d = tmp_path / "gsm8k"
    d.mkdir()
    for split, n in (("test", 6), ("train", 3)):
        rows = generate_problems(n, seed=len(split))
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_gsm8k_local_jsonl_splits_and_heldout(tmp_path):
    d = _gsm_dir(tmp_path)
    test_rows = _rows(d / "test.jsonl")
    train, held = load_problem_sets("gsm8k", {"path": str(d), "split": "test", "max_examples": 4},
                                    n_heldout=5)
    assert [p.question for p in train] == [r["question"] for r in test_rows[:4]]
    assert [p.question for p in held] == [r["question"] for r in test_rows[4:6]]  # the rest only
    assert not set(train.ids()) & set(held.ids())
    train, held = load_problem_sets("gsm8k", {"path": str(d / "test.jsonl"), "benchmark_split": "train"},
                                    n_heldout=2)
    assert len(train) == 6 and [p.question for p in held] == [r["question"] for r in _rows(d / "train.jsonl")[:2]]
    with pytest.raises(EnvError, match="benchmark_split 'test' is the training file"):
        load_problem_sets("gsm8k", {"path": str(d / "test.jsonl"), "benchmark_split": "test"})
    with pytest.raises(EnvError, match="no dev.jsonl"):
        load_problem_sets("gsm8k", {"path": str(d), "split": "dev"})
    (d / "bad.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{"question": 1}\n')
    with pytest.raises(EnvError, match=r"bad.jsonl:2"):
        load_problem_sets("gsm8k", {"path": str(d), "split": "bad"})
    with pytest.raises(EnvError, match="unknown option"):
        load_problem_sets("gsm8k", {"path": str(d), "splt": "test"})
    with pytest.raises(EnvError, match="max_examples"):
        load_problem_sets("gsm_synth", {"max_examples": 0})


def test_user_problem_set_plugin(tmp_path):
    f = tmp_path / "myset.py"
    f.write_text(
        "from jaxttt.discover.problemset import ProblemSet\n"
        "from jaxttt.discover.envs import ToyStringEnv\n"
        "class Words(ProblemSet):\n"
        "    def __init__(self, words=('AB', 'CD', 'EF')):\n"
        "        super().__init__([ToyStringEnv(target=w) for w in words], name='words')\n")
    train, held = load_problem_sets(f"{f}:Words", {"max_examples": 2}, n_heldout=1)
    assert [p.target for p in train] == ["AB", "CD"] and [p.target for p in held] == ["EF"]
    one, _ = load_problem_sets("jaxttt.discover.envs:ToyStringEnv", {"target": "XY"})
    assert len(one) == 1 and one[0].target == "XY"
    with pytest.raises(EnvError, match="unknown problem set 'gsm9k': use gsm8k, gsm_synth"):
        load_problem_sets("gsm9k", {})
    with pytest.raises(EnvError, match="neither"):
        load_problem_sets("jaxttt.discover.problemset:solved", {})


def test_humaneval_problem_set_slices_tasks():
    train, held = load_problem_sets("humaneval", {"max_examples": 2, "timeout_s": 3.0}, n_heldout=1)
    assert [p.task.task_id for p in train] == ["HumanEval/0", "HumanEval/1"]
    assert [p.task.task_id for p in held] == ["HumanEval/2"] and held[0].options["timeout_s"] == 3.0
    with pytest.raises(EnvError, match="mbpp problem set: .*sanitized MBPP JSON"):
        load_problem_sets("mbpp", {})


# ---- the reuse score ---------------------------------------------------------------------------
def _hand_archive(variant: str = "handoff") -> SetArchive:
    """p0: expanded twice (children 0.2, 0.5); p1: seed 0.3, never expanded; p2: expanded
    five times, best child 0.9 found once, the others 0.1."""
    sa = SetArchive([0.0, 0.3, 0.0], ["a0", "b0", "c0"], variant=variant)
    root = [Pick(p, sa.root(p), 0.0) for p in range(3)]
    sa.expand(root[0], ["a1"], [0.2], 2, 1)
    sa.expand(root[0], ["a2"], [0.5], 2, 2)
    sa.expand(root[2], ["c1"], [0.9], 2, 1)
    for t in range(4):
        sa.expand(root[2], ["c2", ""], [0.1, 0.0], 0, 2 + t, failed=[False, True])
    return sa


def test_reuse_score_matches_the_seed_formula_and_picks_problem_and_state():
    sa = _hand_archive()
    assert sa.total_expansions == 7 and sa.scale() == pytest.approx(0.9)
    # rank prior by best reward: p2 (0.9) 3/6, p0 (0.5) 2/6, p1 (0.3) 1/6
    assert sa.priors() == pytest.approx([2 / 6, 1 / 6, 3 / 6])
    for c in (0.0, 1.0, 10.0):
        want = [0.5 + c * 0.9 * (2 / 6) * math.sqrt(8) / 3,
                0.3 + c * 0.9 * (1 / 6) * math.sqrt(8) / 1,
                0.9 + c * 0.9 * (3 / 6) * math.sqrt(8) / 6]
        assert sa.reuse_scores(c) == pytest.approx(want)
    # c = 0: pure exploitation (Q); c = 10 (scores 3.33, 4.54, 3.02): the never-expanded
    # problem first, the most expanded one last
    assert [k.problem for k in sa.select(3, 0.0)] == [2, 0, 1]
    assert [k.problem for k in sa.select(3, 10.0)] == [1, 0, 2]
    # within a problem, its archive's PUCT choice: in p0 at c = 10, a2 (0.5 + 10·0.5·(3/6)·√3
    # = 4.83) beats the expanded seed a0 (0.5 + 10·0.5·(1/6)·√(1 + 2/3) = 1.58) and a1
    picks = sa.select(3, 10.0)
    assert [k.node.state for k in picks] == ["b0", "a2", sa.archives[2].select(10.0).state]
    assert [k.node.state for k in sa.select(2, 0.0, reuse=False)] == ["c0", "a0"]  # seeds
    # the official PUCT variant counts visits in rollouts (failed ones too): n(p2) = 1 + 4·2
    official = _hand_archive("official")
    assert official.total_expansions == 2 + 9 and official[2].total_expansions == 9
    assert official.reuse_scores(1.0)[2] == pytest.approx(0.9 + 0.9 * 0.5 * math.sqrt(12) / 10)


def test_equal_rewards_spread_visits_over_the_set():
    """Without reward signal, the visit count in the denominator moves selection on: p0 has
    the top prior (ties: lower index) and is picked first; after one expansion p1 scores
    0.3·√2 = 0.42 > p0's 0.4·√2 / 2 = 0.28; within 12 steps every problem is visited."""
    sa = SetArchive([0.0] * 4, list("abcd"))
    seen = []
    for t in range(12):
        k = sa.select(1, 1.0)[0]
        seen.append(k.problem)
        sa.expand(k, [""], [0.0], 2, t)
    assert seen[:2] == [0, 1] and set(seen) == {0, 1, 2, 3}
    assert sa.total_expansions == 12


# ---- end to end --------------------------------------------------------------------------------
FILLER = " ".join(r["question"] for r in generate_problems(3, seed=9))


class LetterProblem(DiscoveryEnv):
    """Solved (reward 1) by an answer containing the letter; otherwise 0. The prompt is as
    long as a GSM one (left-truncated to the same width), so this run and the command's run
    over generated problems share their compiled programs."""

    def __init__(self, *, letter: str):
        super().__init__(letter=letter)
        self.letter = letter

    def problem_description(self) -> str:
        return f"Write {self.letter}:"

    def context_from_archive(self, state, archive):
        return f"{FILLER}\n{self.letter}:"

    def transition(self, action: str) -> str:
        return action.strip()[:40]

    def reward(self, state: str) -> float:
        return float(self.letter in state)


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return ensure_default_data(tmp_path_factory.mktemp("data"), 512, max_bytes=200_000,
                               progress=False)["tokenizer"]


@pytest.fixture(scope="module")
def theta0():
    return nnx.split(Transformer(C.load(C.ModelConfig, "model/tiny.yaml", MODEL), rngs=nnx.Rngs(0)))


def _cfg(**kw) -> DiscoverSetConfig:
    base = dict(steps=3, rollouts=4, groups=3, optim=C.OptimConfig(lr=3e-2, warmup_steps=0,
                schedule="constant"), reward_timeout_s=5.0, reward_workers=1,
                benchmark_max_examples=2, benchmark_max_new_tokens=6, rolling_window=10,
                sampling=C.SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=1.0),
                lora=C.LoRAConfig(rank=4, alpha=8.0))
    return DiscoverSetConfig(**{**base, **kw})


@nnx.jit
def _forward(model, x_BT):
    return model(x_BT)


def _on_mesh(model):
    """Every weight of `model` placed on the 8-device mesh, as the run's model is."""
    nnx.update(model, shard_state(nnx.state(model), make_mesh(C.MeshConfig())))
    return model


@pytest.fixture(scope="module")
def letter_run(tmp_path_factory, tok_path, theta0):
    """Three outer steps over five letter problems, driven step by step: the logits of the
    adapter after every step are kept to check the per-step files against."""
    tok = Tokenizer(tok_path)
    letters = ["e", "t", "a", "Q", "~", "s", "z"]
    problems = ProblemSet([LetterProblem(letter=x) for x in letters[:5]])
    heldout = ProblemSet([LetterProblem(letter=x) for x in letters[5:]])
    run_dir = tmp_path_factory.mktemp("letters")
    cfg = _cfg()
    run = SetRun(nnx.merge(*theta0), tok, problems, heldout, cfg, make_mesh(cfg.mesh), run_dir)
    x_BT = jnp.asarray([tok.encode("e: t: a: Q:")[:12]], jnp.int32)
    logits = {0: np.asarray(_forward(run.trainer.model(), x_BT))}
    run.save_adapters(0)
    for t in range(1, cfg.steps + 1):
        run.step(t)
        logits[t] = np.asarray(_forward(run.trainer.model(), x_BT))
    return run, logits, x_BT


def test_metric_semantics(letter_run):
    run, _, _ = letter_run
    lines = _rows(run.dir / "log.jsonl")
    rollouts = _rows(run.dir / "discovery_log.jsonl")
    P, B, G = len(run.problems), run.cfg.groups, run.cfg.rollouts
    prev = 0.0
    for rec in lines:
        upto = [r for r in rollouts if r["step"] <= rec["step"]]
        ever = {r["problem"] for r in upto if r["reward"] >= 1.0}
        assert rec["best_accuracy_so_far"] == pytest.approx(len(ever) / P)
        assert rec["best_accuracy_so_far"] >= prev
        prev = rec["best_accuracy_so_far"]
        window = upto[-run.cfg.rolling_window:]
        assert rec["rolling_accuracy"] == pytest.approx(np.mean([r["reward"] >= 1 for r in window]))
        assert rec["kl_magnitude"] == pytest.approx(abs(rec["kl"]))
        assert len(rec["selected_examples"]) == B
        scores = [s["score"] for s in rec["selected_examples"]]
        assert scores == sorted(scores, reverse=True)
        # the baseline has drawn exactly as many samples as the method at every step
        assert rec["samples"] == rec["baseline_samples"] == rec["step"] * B * G
    assert 0 < prev < 1  # some letters are written by the random model, some never
    assert any(rec["updated"] for rec in lines) and any(rec["kl_magnitude"] > 0 for rec in lines[1:])
    base = _rows(run.dir / "baseline_log.jsonl")
    per_problem = Counter(r["problem"] for r in base)
    assert sum(per_problem.values()) == len(rollouts)
    assert max(per_problem.values()) - min(per_problem.values()) <= 1  # spread evenly
    assert run.accuracy(run.baseline_best) == pytest.approx(
        len({r["problem"] for r in base if r["reward"] >= 1}) / P)


def test_hotswap_benchmark_runs_on_heldout_only(letter_run):
    run, _, _ = letter_run
    bench = _rows(run.dir / "benchmark_log.jsonl")
    held_ids, train_ids = set(run.heldout.ids()), set(run.problems.ids())
    assert {r["problem_id"] for r in bench} == held_ids and not held_ids & train_ids
    assert Counter(r["step"] for r in bench) == {t: len(run.heldout) for t in (1, 2, 3)}
    for rec in _rows(run.dir / "log.jsonl"):
        (hb,) = rec["hotswap_benchmarks"]
        rewards = [r["reward"] for r in bench if r["step"] == rec["step"]]
        assert hb["accuracy"] == pytest.approx(np.mean([r >= 1 for r in rewards]))
        assert hb["temperature"] == 0.0 and hb["n"] == len(run.heldout)


def test_per_step_adapter_files_restore_identical_logits(letter_run, theta0):
    run, logits, x_BT = letter_run
    adapters = run.dir / "adapters"
    for t, want in logits.items():
        orbax = _on_mesh(lora.load_adapters(nnx.merge(*theta0), adapters / f"step_{t:04d}"))
        np.testing.assert_array_equal(np.asarray(_forward(orbax, x_BT)), want)
        fresh = _on_mesh(lora.add_lora(nnx.merge(*theta0), run.cfg.lora, seed=99))
        st = adapter_files.load_safetensors(fresh, adapters / f"step_{t:04d}_adapters.safetensors")
        np.testing.assert_array_equal(np.asarray(_forward(st, x_BT)), want)
    assert not np.array_equal(logits[0], logits[3])  # the updates changed the policy
    with pytest.raises(ValueError, match="lora_A.weight has shape"):
        small = lora.add_lora(nnx.merge(*theta0), C.LoRAConfig(rank=2, alpha=4.0))
        adapter_files.load_safetensors(small, adapters / "step_0001_adapters.safetensors")


# ---- the command over 8 generated problems ------------------------------------------------------
@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tok_path, theta0):
    run = tmp_path_factory.mktemp("base")
    model = nnx.merge(*theta0)
    save_model_config(run, model.cfg)
    ckpt = Checkpointer(run, async_save=False)
    ckpt.save(0, nnx.state(model, nnx.Param), meta={"tokenizer": str(tok_path)})
    ckpt.close()
    return run


def test_cli_run_over_8_generated_problems_writes_every_output(tmp_path, base_run, capsys):
    cfg_file = tmp_path / "set.yaml"
    cfg_file.write_text("steps: 5\nrollouts: 2\ngroups: 4\noptim: {lr: 0.01}\nbenchmark_max_examples: 8\n"
                        "sampling: {max_new_tokens: 6, temperature: 1.0, top_p: 1.0}\n"
                        "lora: {rank: 4, alpha: 8.0}\nreward_workers: 1\n")
    out = tmp_path / "run"
    # precedence: flags > KEY=VALUE > config file > defaults
    rc = main(["discover-set", "--ckpt", str(base_run), "--out", str(out), "--config", str(cfg_file),
               "--problems", "gsm_synth", "--max-examples", "8", "--outer_steps", "2", "--G", "4",
               "--benchmark_max_examples", "2", "--benchmark-max-new-tokens", "6",
               "--checkpoint_after_outer_step", "false", "--no-progress", "--verbose",
               "rollouts=5", "groups=3", "benchmark_max_examples=6"])
    assert rc == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "generate: rows" in captured.err and "hot-swap benchmark after step 2" in captured.err
    assert summary["n_problems"] == 8 and summary["n_heldout"] == 2 and summary["steps"] == 2
    assert summary["samples"] == summary["baseline_samples"] == 2 * 3 * 4  # steps × B × G
    for name in ("config.yaml", "log.jsonl", "discovery_log.jsonl", "baseline_log.jsonl",
                 "benchmark_log.jsonl", "result.json"):
        assert (out / name).is_file(), name
    files = sorted(p.name for p in (out / "adapters").iterdir())
    assert files == ["peft", "step_0002", "step_0002_adapters.safetensors"]  # only at the end
    assert json.loads((out / "adapters/peft/adapter_config.json").read_text())["r"] == 4
    final = (out / "adapters/peft/adapter_model.safetensors").read_bytes()
    assert final == (out / "adapters/step_0002_adapters.safetensors").read_bytes()
    result = json.loads((out / "result.json").read_text())
    assert [b["step"] for b in result["hotswap_benchmarks"]] == [0, 1, 2]
    assert result["config"]["rollouts"] == 4 and result["config"]["groups"] == 3
    assert result["config"]["benchmark_max_examples"] == 2 and result["config"]["steps"] == 2
    assert len(result["per_problem"]) == 8 and len(result["archives"]) == 8
    lines = _rows(out / "log.jsonl")
    assert [r["step"] for r in lines] == [1, 2]
    assert {"best_accuracy_so_far", "rolling_accuracy", "kl_magnitude", "selected_examples",
            "hotswap_benchmarks", "baseline_best_accuracy_so_far"} <= set(lines[0])
    assert len(_rows(out / "discovery_log.jsonl")) == 24
    assert len(_rows(out / "benchmark_log.jsonl")) == 3 * 2
    rc = main(["discover-set", "--ckpt", str(base_run), "--out", str(tmp_path / "r2"),
               "--problems", "gsm8k", "--no-progress"])
    assert rc == 1 and "option 'path' is required" in capsys.readouterr().err
    rc = main(["discover-set", "--ckpt", str(base_run), "--out", str(tmp_path / "r3"),
               "--checkpoint-after-outer-step", "maybe"])
    assert rc == 1 and "expected true or false" in capsys.readouterr().err
