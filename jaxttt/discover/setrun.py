"""TTT-Discover over a problem SET (seed 000: the GSM8K runner), on discover's own parts.

    summary = run_discover_set(model, tokenizer, DiscoverSetConfig(), "runs/gsm_set")

Outer step t = 1..steps (the seed's outer loop; its G = `rollouts`, its B = `groups`):
  picks   the `groups` problems with the highest reuse score and a start state in each
          (`SetArchive.select`: the seed's score over problems, PUCT over each problem's states);
  sample  `rollouts` actions per pick from the current adapter (one batched `generate` call);
  reward  each problem's env (`safe_reward`, threads);
  update  ONE `DiscoverTrainer.update` on the [groups, rollouts] rewards: per-group β, LOO
          entropic advantages, KL to θ0, LoRA-only AdamW (exactly discover's step);
  archive per pick: PUCT statistics and the top `children_per_step` new states;
  then    adapter checkpoint (orbax + peft safetensors), hot-swap benchmark of the current
          adapter on the held-out problems, and the same-budget baseline's samples from θ0.

Metric semantics (log.jsonl, one line per outer step):
  best_accuracy_so_far   fraction of the set's problems solved (reward >= solve_threshold) by
                         at least one rollout so far: non-decreasing; historical, not the policy.
  rolling_accuracy       solved fraction of the last `rolling_window` rollouts (rolling_reward:
                         their mean reward).
  kl_magnitude           |mean over the update's actions of log π_θ(a) - log π_θ0(a)|.
  selected_examples      the picks: problem index and id, start state, reuse score.
  hotswap_benchmarks     [{step, accuracy, mean_reward, n, temperature}] of the adapter just
                         updated on the held-out problems (temperature 0 = greedy): the
                         current policy's quality.
  baseline_best_accuracy_so_far  the same for best-of-N from θ0: each outer step it draws as
                         many samples as the method (groups × rollouts), round-robin over the
                         set's initial prompts, so at every step both spent the same budget.
result.json: final_best_accuracy, baseline_best_accuracy, the hot-swap curve (step 0 = θ0),
per-problem bests, the archives, config and timing (step_wall_s excludes step 1's compiles).

Run directory (never reused): config.yaml, log.jsonl, discovery_log.jsonl, baseline_log.jsonl,
benchmark_log.jsonl, adapters/step_XXXX/ (orbax) and adapters/step_XXXX_adapters.safetensors
(peft keys; step_0000 = the untrained adapters, then after every `save_every`-th outer step and
the last), adapters/peft/ (the final adapters as a peft directory: adapter_config.json +
adapter_model.safetensors), result.json.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxttt import config as C
from jaxttt import runs, sharding
from jaxttt.config import DiscoverConfig, _check
from jaxttt.data.chat_prompts import use_chat
from jaxttt.discover import adapter_files
from jaxttt.discover.env import EnvError
from jaxttt.discover.loop import (Rollouts, _fresh_copy, drive, evaluate, prompt_ids,
                                  reward_stats, rollout_records, seed_reward)
from jaxttt.discover.problemset import Pick, ProblemSet, SetArchive, load_problem_sets, solved
from jaxttt.discover.step import DiscoverTrainer, rollout_sampling
from jaxttt.model import lora
from jaxttt.model.export import export_peft
from jaxttt.sampling import generate

log = logging.getLogger("jaxttt.discover.set")

CONFIG_FILE = "config.yaml"
LOG_FILE = "log.jsonl"
DISCOVERY_LOG = "discovery_log.jsonl"
BASELINE_LOG = "baseline_log.jsonl"
BENCHMARK_LOG = "benchmark_log.jsonl"
RESULT_FILE = "result.json"
ADAPTER_DIR = "adapters"
PEFT_DIR = "adapters/peft"


@dataclasses.dataclass(frozen=True)
class DiscoverSetConfig(DiscoverConfig):
    """`DiscoverConfig` (its fields mean the same per group) plus the set's own fields."""
    # problem set: gsm_synth | gsm8k | package.module:Class | path/file.py:Class
    env: str = "gsm_synth"
    # problem set options, e.g. {path: data/gsm8k, split: test, max_examples: 64}
    env_options: dict = dataclasses.field(default_factory=lambda: {"max_examples": 32})
    steps: int = 10  # outer steps (the seed's outer_steps)
    rollouts: int = 8  # samples per selected problem (the seed's G)
    groups: int = 8  # problems selected per outer step (the seed's B); one group each
    save_every: int = 1  # adapter checkpoint every N outer steps (1 = checkpoint_after_outer_step)
    hot_swap_eval: bool = True  # benchmark the adapter on held-out problems after every update
    benchmark_max_examples: int = 64  # held-out problems in the hot-swap benchmark
    benchmark_temperature: float = 0.0  # 0 = greedy
    benchmark_max_new_tokens: int = 256  # tokens generated per benchmark answer
    solve_threshold: float = 1.0  # reward at which a problem counts as solved
    rolling_window: int = 100  # rollouts behind rolling_accuracy

    def validate(self) -> None:
        super().validate()
        _check(self.groups >= 1, "groups", "a positive integer")
        _check(self.benchmark_max_examples >= 0, "benchmark_max_examples", "a non-negative integer")
        _check(self.benchmark_temperature >= 0, "benchmark_temperature", "a number >= 0")
        _check(self.benchmark_max_new_tokens >= 1, "benchmark_max_new_tokens", "a positive integer")
        _check(math.isfinite(self.solve_threshold), "solve_threshold", "a finite number")
        _check(self.rolling_window >= 1, "rolling_window", "a positive integer")


# --------------------------------------------------------------------------------------------
# Sampling many prompts in one call
# --------------------------------------------------------------------------------------------
def sample_groups(model: nnx.Module, tokenizer, prompts: Sequence[str], counts: Sequence[int],
                  key: jax.Array, cfg: DiscoverConfig, *, use_lora: bool = True, ttt: bool = False,
                  temperature: float | None = None, max_new_tokens: int | None = None,
                  max_rows: int | None = None) -> list[Rollouts]:
    """`counts[i]` actions for `prompts[i]`, batched through `generate` in calls of at most
    `max_rows` rows. Sampled like discover's `sample_rollouts`: `ttt` rollouts as
    `cfg.rollout_policy` says, others with `cfg.sampling`; a `temperature` overrides both (0 =
    greedy). One `Rollouts` per prompt (its sample_s: its share of the generation time)."""
    sc = cfg.sampling
    how = rollout_sampling(cfg) if ttt else {"temperature": sc.temperature, "top_p": sc.top_p,
                                             "top_k": sc.top_k, "greedy": sc.greedy}
    if temperature is not None:
        how = {**how, "temperature": temperature, "greedy": temperature == 0}
    max_new = max_new_tokens or sc.max_new_tokens
    chat = use_chat(tokenizer, cfg.chat)
    ids = [prompt_ids(tokenizer, p, model.cfg.max_seq_len, max_new, chat=chat) for p in prompts]
    rows = [i for i, n in enumerate(counts) for _ in range(n)]
    chunk = max_rows or len(rows)
    completions: list[list[int]] = []
    lengths: list[int] = []
    t0 = time.perf_counter()
    for c, start in enumerate(range(0, len(rows), chunk)):
        part = rows[start:start + chunk]
        out = generate(model, [ids[i] for i in part], jax.random.fold_in(key, c),
                       max_new_tokens=max_new, **how, eos_id=tokenizer.eos_id,
                       pad_id=tokenizer.pad_id, use_lora=use_lora)
        completions += out.completions()
        lengths += out.lengths.tolist()
        log.debug("generate: rows %d-%d of %d, %d new tokens", start, start + len(part), len(rows),
                  int(out.lengths.sum()))
    secs = time.perf_counter() - t0
    result, at = [], 0
    for i, n in enumerate(counts):
        comp = completions[at:at + n]
        actions = [tokenizer.decode([t for t in c if t != tokenizer.eos_id]) for c in comp]
        share = secs * n / max(len(rows), 1)
        result.append(Rollouts(prompts[i], ids[i], comp, actions, int(sum(lengths[at:at + n])), share))
        at += n
    return result


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
class SetRun:
    """State of one run over a problem set: trainer, per-problem archives, metrics, files."""

    def __init__(self, model: nnx.Module, tokenizer, problems: ProblemSet, heldout: ProblemSet,
                 cfg: DiscoverSetConfig, mesh: Mesh, run_dir: Path):
        self.tok, self.problems, self.heldout, self.cfg, self.dir = tokenizer, problems, heldout, cfg, run_dir
        t0 = time.perf_counter()
        adapted = lora.add_lora(_fresh_copy(model), cfg.lora, seed=cfg.seed, mesh=mesh)
        self.trainer = DiscoverTrainer(adapted, cfg, mesh, pad_id=tokenizer.pad_id)
        log.debug("load: LoRA rank %d on %s, trainer ready in %.2fs", cfg.lora.rank,
                  ",".join(cfg.lora.targets), time.perf_counter() - t0)
        seeds = [(env.initial_state(), env) for env in problems]
        rewards = [seed_reward(env, s, cfg.reward_timeout_s)[0] for s, env in seeds]
        self.archive = SetArchive(rewards, [s for s, _ in seeds], cfg.archive_size, cfg.puct_variant)
        self.initial_prompts = [env.context_from_archive(s, None) for s, env in seeds]
        self.bench_prompts = [env.context_from_archive(env.initial_state(), None) for env in heldout]
        self.best = list(rewards)  # per problem, best reward of the method so far
        self.best_state = [s for s, _ in seeds]
        self.baseline_best = list(rewards)
        self.recent: collections.deque = collections.deque(maxlen=cfg.rolling_window)
        self.baseline_next = 0  # round-robin pointer of the baseline over the set
        self.samples = self.baseline_samples = 0
        root = jax.random.key(cfg.seed)
        self.ttt_key, self.base_key, self.eval_key = (jax.random.fold_in(root, i) for i in range(3))
        self.records: list[dict] = []
        self.benchmarks: list[dict] = []
        self.last_adapter: str | None = None

    # ---------------------------------------------------------------- metrics
    def accuracy(self, best: Sequence[float]) -> float:
        return sum(solved(r, self.cfg.solve_threshold) for r in best) / len(best)

    # ---------------------------------------------------------------- one outer step
    def step(self, t: int) -> dict[str, Any]:
        cfg, t0 = self.cfg, time.perf_counter()
        picks = self.archive.select(cfg.groups, cfg.puct_c, reuse=cfg.reuse)
        prompts = [self.problems[k.problem].context_from_archive(k.node.state, self.archive[k.problem])
                   for k in picks]
        ros = sample_groups(self.trainer.model(), self.tok, prompts, [cfg.rollouts] * len(picks),
                            jax.random.fold_in(self.ttt_key, t), cfg, ttt=True)
        log.debug("step %d: prompt tokens %s, %d rollouts in %.2fs", t,
                  [len(r.prompt_ids) for r in ros], len(picks) * cfg.rollouts,
                  sum(r.sample_s for r in ros))
        t_reward = time.perf_counter()
        for i, (k, ro) in enumerate(zip(picks, ros)):
            evaluate(self.problems[k.problem], ro, cfg.reward_timeout_s, cfg.reward_workers)
            log.debug("step %d: rewards of group %d/%d (problem %d): mean %.3f, solved %d/%d", t,
                      i + 1, len(picks), k.problem, float(np.mean(ro.rewards)),
                      sum(solved(r, cfg.solve_threshold) for r in ro.rewards), len(ro.rewards))
        reward_s = time.perf_counter() - t_reward
        m, update_s = self.update(ros)
        log.debug("step %d: LoRA update (θ and θ0 log-probs, one jit) %.2fs, loss %.4g, kl %.3g",
                  t, update_s, m["loss"], m["kl"])
        for k, ro in zip(picks, ros):
            self.archive.expand(k, ro.states, ro.rewards, cfg.children_per_step, t,
                                [e is not None for e in ro.errors])
            self.note(k.problem, ro)
            runs.append_jsonl(self.dir / DISCOVERY_LOG, rollout_records(
                self.problems[k.problem], ro, step=t, problem=k.problem, start_state=k.node.id))
        record = self.record(t, picks, ros, m, reward_s, update_s)
        record.update(self.after_update(t))
        record["wall_s"] = time.perf_counter() - t0
        runs.append_jsonl(self.dir / LOG_FILE, [record])
        self.records.append(record)
        return record

    def update(self, ros: Sequence[Rollouts]) -> tuple[dict[str, Any], float]:
        """One discover update: groups = picks, group-major rows."""
        t0 = time.perf_counter()
        prompts = [ro.prompt_ids for ro in ros for _ in ro.completions]
        completions = [c for ro in ros for c in ro.completions]
        m = self.trainer.update(prompts, completions, np.asarray([ro.rewards for ro in ros]))
        return m, time.perf_counter() - t0

    def note(self, p: int, ro: Rollouts) -> None:
        """Per-problem best and the rolling window, from one group's rollouts."""
        for s, r in zip(ro.states, ro.rewards):
            if s and r > self.best[p]:
                self.best[p], self.best_state[p] = float(r), s
            self.recent.append((solved(r, self.cfg.solve_threshold), r))
        self.samples += len(ro.rewards)

    def record(self, t: int, picks: Sequence[Pick], ros: Sequence[Rollouts], m: dict,
               reward_s: float, update_s: float) -> dict[str, Any]:
        rewards = [r for ro in ros for r in ro.rewards]
        sample_s = sum(ro.sample_s for ro in ros)
        tokens = sum(ro.n_tokens for ro in ros)
        return {"step": t, "best_accuracy_so_far": self.accuracy(self.best),
                "rolling_accuracy": float(np.mean([s for s, _ in self.recent])),
                "rolling_reward": float(np.mean([r for _, r in self.recent])),
                "kl_magnitude": abs(m["kl"]),
                "selected_examples": [k.to_json(self.problems[k.problem].problem_id) for k in picks],
                **reward_stats(rewards),
                "solved_in_step": sum(solved(r, self.cfg.solve_threshold) for r in rewards),
                "beta": m["beta"], "n_valid_groups": m["n_valid_groups"], "updated": m["updated"],
                "loss": m["loss"], "kl": m["kl"], "grad_norm": m["grad_norm"],
                "sample_s": sample_s, "reward_s": reward_s, "update_s": update_s,
                "rollout_tokens": tokens, "rollout_tokens_per_s": tokens / max(sample_s, 1e-9),
                "prompt_tokens_mean": float(np.mean([len(ro.prompt_ids) for ro in ros])),
                "n_errors": sum(ro.n_errors for ro in ros), "samples": self.samples,
                "adapter": None}

    def after_update(self, t: int) -> dict[str, Any]:
        """Checkpoint, hot-swap benchmark and baseline samples for outer step t."""
        out: dict[str, Any] = {}
        every = self.cfg.save_every
        if (every and t % every == 0) or t == self.cfg.steps:
            t0 = time.perf_counter()
            out["adapter"] = self.save_adapters(t)
            out["ckpt_s"] = time.perf_counter() - t0
        if self.cfg.hot_swap_eval and len(self.heldout):
            out["hotswap_benchmarks"] = [self.benchmark(t)]
        if self.cfg.baseline:
            out.update(self.baseline_step(t))
        return out

    # ---------------------------------------------------------------- side channels
    def save_adapters(self, t: int) -> str:
        """Orbax tree adapters/step_XXXX/ and adapters/step_XXXX_adapters.safetensors."""
        rel = f"{ADAPTER_DIR}/step_{t:04d}"
        model = self.trainer.model()
        lora.save_adapters(model, self.dir / rel)
        adapter_files.save_safetensors(model, self.dir / f"{rel}_adapters.safetensors")
        self.last_adapter = rel
        log.debug("checkpoint: %s (orbax + safetensors)", rel)
        return rel

    def benchmark(self, t: int) -> dict[str, Any]:
        """The current adapter on the held-out problems' initial prompts (one sample each)."""
        cfg, t0 = self.cfg, time.perf_counter()
        ros = sample_groups(self.trainer.model(), self.tok, self.bench_prompts, [1] * len(self.heldout),
                            jax.random.fold_in(self.eval_key, t), cfg,
                            temperature=cfg.benchmark_temperature,
                            max_new_tokens=cfg.benchmark_max_new_tokens,
                            max_rows=cfg.groups * cfg.rollouts)
        rewards, lines = [], []
        for env, ro in zip(self.heldout, ros):
            evaluate(env, ro, cfg.reward_timeout_s)
            rewards.append(ro.rewards[0])
            lines += rollout_records(env, ro, step=t)
        runs.append_jsonl(self.dir / BENCHMARK_LOG, lines)
        rec = {"step": t, "accuracy": self.accuracy(rewards), "mean_reward": float(np.mean(rewards)),
               "n": len(rewards), "temperature": cfg.benchmark_temperature,
               "wall_s": time.perf_counter() - t0}
        self.benchmarks.append(rec)
        log.debug("hot-swap benchmark after step %d: accuracy %.3f on %d held-out problems (%.2fs)",
                  t, rec["accuracy"], rec["n"], rec["wall_s"])
        return rec

    def baseline_step(self, t: int) -> dict[str, Any]:
        """As many θ0 samples as the method drew this step, round-robin over the set."""
        P, budget = len(self.problems), self.step_budget()
        order = [(self.baseline_next + i) % P for i in range(budget)]
        self.baseline_next = (self.baseline_next + budget) % P
        counts = collections.Counter(order)
        chosen = sorted(counts)
        ros = sample_groups(self.trainer.model(), self.tok, [self.initial_prompts[p] for p in chosen],
                            [counts[p] for p in chosen], jax.random.fold_in(self.base_key, t),
                            self.cfg, use_lora=False, max_rows=self.cfg.groups * self.cfg.rollouts)
        for p, ro in zip(chosen, ros):
            evaluate(self.problems[p], ro, self.cfg.reward_timeout_s, self.cfg.reward_workers)
            self.baseline_best[p] = max([self.baseline_best[p]] + [r for s, r in zip(ro.states, ro.rewards) if s])
            runs.append_jsonl(self.dir / BASELINE_LOG, rollout_records(self.problems[p], ro, step=t, problem=p))
        self.baseline_samples += budget
        return {"baseline_best_accuracy_so_far": self.accuracy(self.baseline_best),
                "baseline_samples": self.baseline_samples}

    def step_budget(self) -> int:
        """Samples the method drew in the current step."""
        return min(self.cfg.groups, len(self.problems)) * self.cfg.rollouts

    # ---------------------------------------------------------------- end of run
    def summary(self, total_s: float, source: str | None) -> dict[str, Any]:
        steady = self.records[1:] or self.records
        return {"run_dir": str(self.dir), "problems": self.problems.name,
                "n_problems": len(self.problems), "n_heldout": len(self.heldout),
                "source": source, "steps": len(self.records), "samples": self.samples,
                "final_best_accuracy": self.accuracy(self.best),
                "baseline_best_accuracy": (self.accuracy(self.baseline_best) if self.cfg.baseline
                                           else None),
                "baseline_samples": self.baseline_samples,
                "hotswap_benchmarks": self.benchmarks,
                "final_hotswap_accuracy": self.benchmarks[-1]["accuracy"] if self.benchmarks else None,
                "final_adapter": self.last_adapter, "wall_s": total_s,
                "first_step_wall_s": self.records[0]["wall_s"] if self.records else None,
                "step_wall_s": _mean(r["wall_s"] for r in steady),
                "step_wall_s_std": float(np.std([r["wall_s"] for r in steady])) if steady else None,
                "rollout_tokens_per_s": _mean(r["rollout_tokens_per_s"] for r in steady),
                "n_errors": sum(r["n_errors"] for r in self.records),
                "n_updates": self.trainer.n_updates}

    def write_result(self, summary: dict[str, Any]) -> None:
        per_problem = [{"problem": p, "problem_id": env.problem_id, "best_reward": self.best[p],
                        "solved": solved(self.best[p], self.cfg.solve_threshold),
                        "best_state": self.best_state[p], "baseline_best_reward": self.baseline_best[p],
                        "expansions": self.archive[p].total_expansions}
                       for p, env in enumerate(self.problems)]
        result = {**summary, "per_problem": per_problem, "archives": self.archive.to_json(),
                  "config": C.to_dict(self.cfg)}
        (self.dir / RESULT_FILE).write_text(json.dumps(result, indent=2, ensure_ascii=False))
        export_peft(self.trainer.model(), self.dir / PEFT_DIR)


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else math.nan


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def run_discover_set(model: nnx.Module, tokenizer, cfg: DiscoverSetConfig, out_dir: str | Path, *,
                     problems: ProblemSet | None = None, heldout: ProblemSet | None = None,
                     mesh: Mesh | None = None, progress: bool = False,
                     source: str | None = None) -> dict[str, Any]:
    """TTT-Discover from θ0 over a problem set (default: `load_problem_sets(cfg.env,
    cfg.env_options)`); writes the run directory and returns the summary (final_best_accuracy,
    baseline_best_accuracy, hotswap_benchmarks, step_wall_s, ...)."""
    cfg.validate()
    run_dir = runs.fresh_run_dir(out_dir)
    if problems is None:
        t0 = time.perf_counter()
        problems, loaded = load_problem_sets(cfg.env, cfg.env_options, n_heldout=cfg.benchmark_max_examples)
        heldout = loaded if heldout is None else heldout
        log.debug("load: problem set %s: %d problems, %d held-out (%.2fs)", problems.name,
                  len(problems), len(heldout), time.perf_counter() - t0)
    heldout = heldout if heldout is not None else ProblemSet([], name="none")
    if not len(problems):
        raise EnvError(f"problem set {cfg.env!r} is empty")
    mesh = mesh if mesh is not None else sharding.make_mesh(cfg.mesh)
    runs.save_run_config(cfg, run_dir, CONFIG_FILE)
    t0 = time.perf_counter()
    run = SetRun(model, tokenizer, problems, heldout, cfg, mesh, run_dir)
    if cfg.save_every:
        run.save_adapters(0)
    if cfg.hot_swap_eval and len(heldout):
        run.benchmark(0)
    return drive(run, cfg.steps, t0, progress=progress, source=source, desc="discover-set",
                 show=_show)


def run_discover_set_from_checkpoint(ckpt: str | Path, cfg: DiscoverSetConfig, out_dir: str | Path, *,
                                     tokenizer: str | Path | None = None,
                                     progress: bool = False) -> dict[str, Any]:
    """`run_discover_set` with θ0 and its tokenizer from a run (`runs.load_run`)."""
    cfg.validate()
    runs.fresh_run_dir(out_dir)  # fail before loading anything
    problems, heldout = load_problem_sets(cfg.env, cfg.env_options, n_heldout=cfg.benchmark_max_examples)
    mesh = sharding.make_mesh(cfg.mesh)
    t0 = time.perf_counter()
    log.debug("load: model and tokenizer from %s", ckpt)
    model, tok, _ = runs.load_run(ckpt, mesh=mesh, tokenizer=tokenizer)
    log.debug("load: model (%d layers, d %d) and tokenizer (%d pieces) ready in %.2fs",
              model.cfg.n_layers, model.cfg.d_model, tok.vocab_size, time.perf_counter() - t0)
    return run_discover_set(model, tok, cfg, out_dir, problems=problems, heldout=heldout,
                            mesh=mesh, progress=progress, source=str(ckpt))


def _show(bar, rec: dict[str, Any]) -> None:
    if bar is None:
        return
    post = {"best_acc": f"{rec['best_accuracy_so_far']:.3f}",
            "roll": f"{rec['rolling_accuracy']:.3f}"}
    if "baseline_best_accuracy_so_far" in rec:
        post["base"] = f"{rec['baseline_best_accuracy_so_far']:.3f}"
    if rec.get("hotswap_benchmarks"):
        post["hotswap"] = f"{rec['hotswap_benchmarks'][-1]['accuracy']:.3f}"
    bar.set_postfix(post, refresh=False)
    bar.update(1)
