"""TTT-Discover on one problem (handoff K4, Phase 10): test-time RL on LoRA adapters.

    summary = run_discover(model, tokenizer, cfg, "runs/ttt_toy")           # a loaded θ0
    summary = run_discover_from_checkpoint("runs/pretrain", cfg, "runs/ttt_toy")

Each step t = 1..steps:
  start state s: PUCT over the archive (`cfg.reuse`), else the seed s0 = env.initial_state();
  prompt = env.context_from_archive(s, archive), encoded `[EOS] + text` (the document start,
  as in the packed pretraining data) or, for an instruct model (`cfg.chat`), as one user turn
  of its chat template; left-truncated to leave room for the action;
  N = rollouts actions in ONE batched KV-cache `generate` call (EOS stops a row), sampled as
    `rollout_policy` says (default: the untruncated policy, temperature 1, top_p 1);
  rewards via `safe_reward` (exceptions, hangs, NaN -> 0 and an error string; the run goes on);
  one `DiscoverTrainer.update` (β, LOO advantages, KL shaping, LoRA-only AdamW, one jit);
  archive: `update_after_expand(s, rewards)`, then the top `children_per_step` new states.
Beside it, a same-budget best-of-N baseline draws N actions per step from θ0 (adapters off)
on the initial prompt with its own key stream; `hot_swap_eval` greedily evaluates the current
adapter on the initial prompt after every update (the GSM8K runner's hot-swap benchmark).

Run directory (never reused; a non-empty one is refused):
  config.yaml           the DiscoverConfig
  log.jsonl             one line per step (handoff I3 fields + timing, baseline curve)
  discovery_log.jsonl   every evaluated TTT rollout (handoff G5 fields + step, start_state)
  baseline_log.jsonl    every evaluated baseline sample (same fields)
  adapters/step_XXXX/   orbax adapter trees (`save_adapters`) every save_every steps + at the end
  result.json           best state/reward, baseline best, archive, config, timing summary

Multi-process (`launch/local.py`, `launch/tpu.py`: the same program on every process): every
process holds the same keys, archive and prompts, so each samples the same global rollout
batch, whose rows are sharded over the mesh's batch axes (`jax.set_mesh`) and come back whole
to every process. Each process scores its own share of the actions and the results are
all-gathered (`map_rows`), so rewards, archive and updates stay identical everywhere; process 0
alone writes the run directory (the adapter checkpoints are written by all, as orbax needs).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxttt import config as C
from jaxttt import sharding
from jaxttt.config import DiscoverConfig
from jaxttt.data.chat_prompts import chat_prompt_ids, use_chat
from jaxttt.discover.archive import Archive, Node
from jaxttt.discover.env import INVALID, DiscoveryEnv, load_env, reward_record, safe_reward
from jaxttt.discover.step import DiscoverTrainer, rollout_sampling
from jaxttt.eval.report import encode_prompt
from jaxttt.model import lora
from jaxttt.sampling import generate
from jaxttt.runs import RunDirError, append_jsonl, fresh_run_dir, load_run  # noqa: F401 (RunDirError: API)

CONFIG_FILE = "config.yaml"
LOG_FILE = "log.jsonl"
DISCOVERY_LOG = "discovery_log.jsonl"
BASELINE_LOG = "baseline_log.jsonl"
RESULT_FILE = "result.json"
ADAPTER_DIR = "adapters"


# --------------------------------------------------------------------------------------------
# Processes: every process runs this program; process 0 writes
# --------------------------------------------------------------------------------------------
def is_main() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process gets here (nothing to wait for in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"jaxttt:{name}")


def map_rows(fn, items: Sequence, workers: int = 1) -> list:
    """`[fn(x) for x in items]` (JSON values), each process computing a contiguous share and
    every process getting all results, in order.

    Scoring a share and all-gathering (rather than every process scoring everything) splits the
    slow part (running model-written code) over the hosts and keeps the rewards identical on
    every process even where they could differ (an env timing out on one host only); diverging
    rewards would give the processes different archives, prompts and updates.
    """
    P, p = jax.process_count(), jax.process_index()
    mine = list(items)[len(items) * p // P: len(items) * (p + 1) // P]
    if workers > 1 and len(mine) > 1:
        with ThreadPoolExecutor(min(workers, len(mine))) as pool:
            out = list(pool.map(fn, mine))
    else:
        out = [fn(x) for x in mine]
    return out if P == 1 else _allgather_json(out)


def _allgather_json(rows: list) -> list:
    """Every process's `rows`, concatenated in process order (JSON round trip: floats exact)."""
    blob = np.frombuffer(json.dumps(rows, default=_plain).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.int32(blob.size))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:blob.size] = blob
    blobs = multihost_utils.process_allgather(padded)  # [P, longest]
    return [row for b, n in zip(blobs, sizes) for row in json.loads(bytes(b[:int(n)]))]


def _plain(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else str(x)


# --------------------------------------------------------------------------------------------
# Rollouts: sampling and rewards
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Rollouts:
    """N actions sampled for one prompt, and what the env made of them."""
    prompt: str
    prompt_ids: list[int]
    completions: list[list[int]]  # token ids, EOS included when generated
    actions: list[str]
    n_tokens: int
    sample_s: float
    states: list[str] = dataclasses.field(default_factory=list)
    rewards: list[float] = dataclasses.field(default_factory=list)
    errors: list[str | None] = dataclasses.field(default_factory=list)
    reward_s: float = 0.0

    @property
    def n_errors(self) -> int:
        """Env faults (exceptions, timeouts, bad rewards), not merely invalid actions."""
        return sum(e is not None and not e.startswith(INVALID) for e in self.errors)

    @property
    def n_invalid(self) -> int:
        return sum(e is not None and e.startswith(INVALID) for e in self.errors)


def prompt_ids(tokenizer, text: str, max_seq_len: int, max_new_tokens: int, *,
               chat: bool = False) -> list[int]:
    """`[EOS] + encode(text)` (with `chat`: one user turn of the tokenizer's chat template),
    left-truncated so that the action still fits in max_seq_len."""
    room = max_seq_len - max_new_tokens
    if room < 2:
        raise ValueError(f"config key 'sampling.max_new_tokens': {max_new_tokens} leaves no room "
                         f"for a prompt in the model's max_seq_len={max_seq_len}")
    return chat_prompt_ids(tokenizer, text, room) if chat else encode_prompt(tokenizer, text, room)


def action_prompt_ids(tokenizer, prompt: str, cfg: DiscoverConfig, max_seq_len: int) -> list[int]:
    """The token ids actions for `prompt` are sampled from (and trained on)."""
    return prompt_ids(tokenizer, prompt, max_seq_len, cfg.sampling.max_new_tokens,
                      chat=use_chat(tokenizer, cfg.chat))


def sample_rollouts(model: nnx.Module, tokenizer, prompt: str, n: int, key: jax.Array,
                    cfg: DiscoverConfig, *, use_lora: bool = True, greedy: bool = False,
                    ttt: bool = False, mesh: Mesh | None = None) -> Rollouts:
    """`n` actions for `prompt` in one batched `generate` call; actions decoded without EOS.
    `ttt`: the training rollouts, sampled as `cfg.rollout_policy` says; otherwise (baseline,
    evaluation) with `cfg.sampling`. Under `mesh` the n rows are split over its batch axes
    (when they divide n) and every process gets all of them back."""
    sc = cfg.sampling
    how = rollout_sampling(cfg) if ttt else {"temperature": sc.temperature, "top_p": sc.top_p,
                                             "top_k": sc.top_k, "greedy": sc.greedy}
    ids = action_prompt_ids(tokenizer, prompt, cfg, model.cfg.max_seq_len)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        out = generate(model, [ids] * n, key, max_new_tokens=sc.max_new_tokens,
                       **{**how, "greedy": greedy or how["greedy"]}, eos_id=tokenizer.eos_id,
                       pad_id=tokenizer.pad_id, use_lora=use_lora)
    completions = out.completions()
    secs = time.perf_counter() - t0
    actions = [tokenizer.decode([i for i in c if i != tokenizer.eos_id]) for c in completions]
    return Rollouts(prompt, ids, completions, actions, int(out.lengths.sum()), secs)


def evaluate(env: DiscoveryEnv, ro: Rollouts, timeout_s: float, workers: int = 1,
             start_state: str | None = None) -> Rollouts:
    """Fill states, rewards and errors with `safe_reward` (`workers` concurrent calls); with
    `start_state` (the archive state the actions were sampled from) via `env.transition_from`.
    With several processes each scores its share of the actions (`map_rows`)."""
    t0 = time.perf_counter()

    def one(action: str):
        return safe_reward(env, action, timeout_s, start_state)

    results = map_rows(one, ro.actions, workers)
    ro.states, ro.rewards, ro.errors = (list(x) for x in zip(*results))
    ro.reward_s = time.perf_counter() - t0
    return ro


def seed_reward(env: DiscoveryEnv, state: str, timeout_s: float) -> tuple[float, str | None]:
    """R(s0) with safe_reward's protection, calling env.reward on the state itself."""
    as_state = types.SimpleNamespace(transition=lambda s: s, reward=env.reward)
    def score(s: str):
        return safe_reward(as_state, s, timeout_s)  # type: ignore[arg-type]

    [(_, reward, error)] = map_rows(score, [state])  # one process scores, all get it
    return reward, error


@dataclasses.dataclass
class Best:
    """Running best (reward, state) and the number of samples behind it."""
    reward: float
    state: str
    samples: int = 0

    def update(self, states: Sequence[str], rewards: Sequence[float]) -> None:
        for s, r in zip(states, rewards):
            if s and r > self.reward:
                self.reward, self.state = float(r), s
        self.samples += len(rewards)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def rollout_records(env: DiscoveryEnv, ro: Rollouts, **extra: Any) -> list[dict]:
    """G5 lines (`reward_record`) for every evaluated action, plus `extra` and the sample index."""
    return [{**reward_record(env, ro.prompt, a, s, r, e), **extra, "sample": i}
            for i, (a, s, r, e) in enumerate(zip(ro.actions, ro.states, ro.rewards, ro.errors))]


def reward_stats(rewards: Sequence[float]) -> dict[str, float]:
    r = np.asarray(rewards, np.float64)
    return {"r_mean": float(r.mean()), "r_std": float(r.std()), "r_max": float(r.max()),
            "r_min": float(r.min())}


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
class DiscoverRun:
    """State of one TTT-Discover run: trainer, archive, baseline, keys and output files."""

    def __init__(self, model: nnx.Module, tokenizer, env: DiscoveryEnv, cfg: DiscoverConfig,
                 mesh: Mesh, run_dir: Path):
        self.tok, self.env, self.cfg, self.dir = tokenizer, env, cfg, run_dir
        adapted = lora.add_lora(_fresh_copy(model), cfg.lora, seed=cfg.seed, mesh=mesh)
        self.trainer = DiscoverTrainer(adapted, cfg, mesh, pad_id=tokenizer.pad_id)
        self.seed_state = env.initial_state()
        self.seed_reward, self.seed_error = seed_reward(env, self.seed_state, cfg.reward_timeout_s)
        self.archive = Archive(cfg.archive_size, variant=cfg.puct_variant)
        self.seed_id = self.archive.add_seed(self.seed_state, self.seed_reward)
        self.initial_prompt = env.context_from_archive(self.seed_state, self.archive)
        self.best = Best(self.seed_reward, self.seed_state)
        self.baseline = Best(self.seed_reward, self.seed_state)
        root = jax.random.key(cfg.seed)
        self.ttt_key, self.base_key, self.eval_key = (jax.random.fold_in(root, i) for i in range(3))
        self.records: list[dict] = []
        self.last_adapter: str | None = None

    # ---------------------------------------------------------------- one step
    def start_node(self) -> Node:
        if self.cfg.reuse:
            return self.archive.select(self.cfg.puct_c)
        return self.archive.nodes[self.seed_id]

    def step(self, t: int) -> dict[str, Any]:
        """One TTT step (sample, reward, update, archive) + baseline/eval; returns its log line."""
        t0 = time.perf_counter()
        node = self.start_node()
        prompt = self.env.context_from_archive(node.state, self.archive)
        ids = action_prompt_ids(self.tok, prompt, self.cfg, self.trainer.max_seq_len)
        self.trainer.precompile(len(ids), self.cfg.rollouts)  # compiles while sampling
        ro = sample_rollouts(self.trainer.model(), self.tok, prompt, self.cfg.rollouts,
                             jax.random.fold_in(self.ttt_key, t), self.cfg, ttt=True,
                             mesh=self.trainer.mesh)
        evaluate(self.env, ro, self.cfg.reward_timeout_s, self.cfg.reward_workers, node.state)
        t_update = time.perf_counter()
        m = self.trainer.update([ro.prompt_ids] * len(ro.completions), ro.completions,
                                np.asarray([ro.rewards]))
        update_s = time.perf_counter() - t_update
        self.expand(node, ro, t)
        record = self._record(t, node, ro, m, time.perf_counter() - t0, update_s)
        self.write(DISCOVERY_LOG, rollout_records(self.env, ro, step=t, start_state=node.id))
        record.update(self._after_update(t))
        self.write(LOG_FILE, [record])
        self.records.append(record)
        return record

    def write(self, name: str, records: list[dict]) -> None:
        """Append to a log of the run directory (process 0 only; the others hold the same)."""
        if is_main():
            append_jsonl(self.dir / name, records)

    def expand(self, node: Node, ro: Rollouts, t: int) -> None:
        """Archive bookkeeping after sampling from `node`: statistics first, then children."""
        self.archive.update_after_expand(node.id, ro.rewards, [e is not None for e in ro.errors])
        self.archive.add_top_children(node.id, ro.states, ro.rewards, self.cfg.children_per_step, t)
        self.best.update(ro.states, ro.rewards)

    def _record(self, t: int, node: Node, ro: Rollouts, m: dict, wall_s: float,
                update_s: float) -> dict[str, Any]:
        """The I3 line: problem, step, beta, best_reward, reward stats, start_state, ..."""
        return {"problem": self.env.problem_id, "step": t, "beta": m["beta"][0],
                "best_reward": self.best.reward, **reward_stats(ro.rewards),
                "start_state": node.id, "start_reward": node.reward, "adapter": None,
                "n_valid_groups": m["n_valid_groups"], "updated": m["updated"],
                "loss": m["loss"], "kl": m["kl"], "grad_norm": m["grad_norm"],
                "wall_s": wall_s, "sample_s": ro.sample_s, "reward_s": ro.reward_s,
                "update_s": update_s, "rollout_tokens": ro.n_tokens,
                "rollout_tokens_per_s": ro.n_tokens / max(ro.sample_s, 1e-9),
                "n_errors": ro.n_errors, "n_invalid": ro.n_invalid,
                "first_error": next((e for e in ro.errors if e and not e.startswith(INVALID)), None),
                "archive_size": len(self.archive), "samples": self.best.samples}

    def _after_update(self, t: int) -> dict[str, Any]:
        """Adapter checkpoint, hot-swap evaluation and the baseline's samples for step t."""
        out: dict[str, Any] = {}
        every = self.cfg.save_every
        if (every and t % every == 0) or t == self.cfg.steps:
            out["adapter"] = self.save_adapters(t)
        if self.cfg.hot_swap_eval:
            out["eval_reward"] = self.hot_swap_eval(t)
        if self.cfg.baseline:
            out.update(self.baseline_step(t))
        return out

    # ---------------------------------------------------------------- side channels
    def save_adapters(self, t: int) -> str:
        rel = f"{ADAPTER_DIR}/step_{t:04d}"
        lora.save_adapters(self.trainer.model(), self.dir / rel)
        self.last_adapter = rel
        return rel

    def hot_swap_eval(self, t: int) -> float:
        """Greedy action of the current adapter on the initial prompt, scored by the env."""
        ro = sample_rollouts(self.trainer.model(), self.tok, self.initial_prompt, 1,
                             jax.random.fold_in(self.eval_key, t), self.cfg, greedy=True,
                             mesh=self.trainer.mesh)
        return float(evaluate(self.env, ro, self.cfg.reward_timeout_s).rewards[0])

    def baseline_step(self, t: int) -> dict[str, Any]:
        """`rollouts` samples from θ0 on the initial prompt: the equal-budget best-of-N curve."""
        ro = sample_rollouts(self.trainer.model(), self.tok, self.initial_prompt,
                             self.cfg.rollouts, jax.random.fold_in(self.base_key, t), self.cfg,
                             use_lora=False, mesh=self.trainer.mesh)
        evaluate(self.env, ro, self.cfg.reward_timeout_s, self.cfg.reward_workers)
        self.baseline.update(ro.states, ro.rewards)
        self.write(BASELINE_LOG, rollout_records(self.env, ro, step=t))
        stats = reward_stats(ro.rewards)
        return {"baseline_best_reward": self.baseline.reward, "baseline_r_mean": stats["r_mean"],
                "baseline_r_max": stats["r_max"], "baseline_samples": self.baseline.samples}

    # ---------------------------------------------------------------- end of run
    def summary(self, total_s: float, source: str | None) -> dict[str, Any]:
        steady = self.records[1:] or self.records  # step 1 includes compilation
        return {"run_dir": str(self.dir), "problem_id": self.env.problem_id,
                "env": self.cfg.env, "env_version": f"{type(self.env).__name__}/{self.env.version}",
                "source": source, "steps": len(self.records), "samples": self.best.samples,
                "seed_state": self.seed_state, "seed_reward": self.seed_reward,
                "seed_error": self.seed_error,
                "best_reward": self.best.reward, "best_state": self.best.state,
                "baseline_best_reward": self.baseline.reward if self.cfg.baseline else None,
                "baseline_best_state": self.baseline.state if self.cfg.baseline else None,
                "baseline_samples": self.baseline.samples,
                "eval_reward": self.records[-1].get("eval_reward") if self.records else None,
                "final_adapter": self.last_adapter, "wall_s": total_s,
                "first_step_wall_s": self.records[0]["wall_s"] if self.records else None,
                "step_wall_s": _mean(r["wall_s"] for r in steady),
                "rollout_tokens_per_s": _mean(r["rollout_tokens_per_s"] for r in steady),
                "n_errors": sum(r["n_errors"] for r in self.records),
                "n_updates": self.trainer.n_updates}

    def write_result(self, summary: dict[str, Any]) -> None:
        if not is_main():
            return
        result = {**summary, "problem": self.env.problem_description(),
                  "archive": self.archive.to_json(), "config": C.to_dict(self.cfg)}
        (self.dir / RESULT_FILE).write_text(json.dumps(result, indent=2, ensure_ascii=False))


def env_spec(env: DiscoveryEnv) -> str:
    """`module:Class` of an env object (what `load_env` accepts when the module is importable)."""
    return f"{type(env).__module__}:{type(env).__qualname__}"


def _fresh_copy(model: nnx.Module) -> nnx.Module:
    """A new module tree sharing `model`'s arrays (adding adapters leaves the caller's alone)."""
    if lora.has_lora(model):
        raise ValueError("run_discover needs the base model θ0, got one that already carries "
                         "LoRA adapters (merge or drop them first)")
    return nnx.merge(*nnx.split(model))


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else math.nan


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def run_discover(model: nnx.Module, tokenizer, cfg: DiscoverConfig, out_dir: str | Path, *,
                 env: DiscoveryEnv | None = None, mesh: Mesh | None = None,
                 progress: bool = False, source: str | None = None) -> dict[str, Any]:
    """Run TTT-Discover from base model θ0 on `env` (default: `load_env(cfg.env,
    cfg.env_options)`); writes the run directory `out_dir` and returns its summary dict
    (best_reward, baseline_best_reward, step_wall_s, rollout_tokens_per_s, ...)."""
    cfg.validate()
    use_chat(tokenizer, cfg.chat)  # chat=on without a chat template: one line, nothing written
    run_dir = fresh_run_dir(out_dir)
    barrier("run_dir")  # every process has checked it before process 0 writes into it
    if env is None:
        env = load_env(cfg.env, cfg.env_options)
    else:  # config.yaml and result.json then name the env actually used
        cfg = dataclasses.replace(cfg, env=env_spec(env), env_options=dict(env.options))
    mesh = mesh if mesh is not None else sharding.make_mesh(cfg.mesh)
    if is_main():
        C.save_yaml(cfg, run_dir / CONFIG_FILE)
    t0 = time.perf_counter()
    return drive(DiscoverRun(model, tokenizer, env, cfg, mesh, run_dir), cfg.steps, t0,
                 progress=progress and is_main(), source=source)


def drive(run, steps: int, t0: float, *, progress: bool, source: str | None,
          desc: str = "discover", show=None) -> dict[str, Any]:
    """Steps 1..`steps` of a run (`step`, `summary`, `write_result`) with a progress bar whose
    postfix `show(bar, record)` writes (default: discover's); the summary it writes and returns
    counts wall time from `t0`."""
    show = show or _show
    bar = _progress(steps, progress, desc)
    for t in range(1, steps + 1):
        show(bar, run.step(t))
    if bar is not None:
        bar.close()
    summary = run.summary(time.perf_counter() - t0, source)
    run.write_result(summary)
    return summary


def run_discover_from_checkpoint(ckpt: str | Path, cfg: DiscoverConfig, out_dir: str | Path, *,
                                 tokenizer: str | Path | None = None, env: DiscoveryEnv | None = None,
                                 progress: bool = False) -> dict[str, Any]:
    """`run_discover` with θ0 (and, unless given, the tokenizer) from a model run (`load_run`)."""
    cfg.validate()
    fresh_run_dir(out_dir)  # fail before loading anything
    mesh = sharding.make_mesh(cfg.mesh)
    model, tok, _ = load_run(ckpt, mesh=mesh, tokenizer=tokenizer)
    return run_discover(model, tok, cfg, out_dir, env=env, mesh=mesh,
                        progress=progress, source=str(ckpt))


def _progress(total: int, enabled: bool, desc: str = "discover"):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)


def _show(bar, rec: dict[str, Any]) -> None:
    """Progress-bar postfix (best vs baseline, β, tokens/s); env errors are always reported
    (by process 0)."""
    if rec["n_errors"] and is_main():
        msg = (f"discover: step {rec['step']}: {rec['n_errors']} env errors scored 0, "
               f"first: {rec['first_error']}")
        if bar is not None:
            bar.write(msg)
        else:
            print(msg, flush=True)
    if bar is None:
        return
    post = {"best": f"{rec['best_reward']:.3f}", "beta": f"{rec['beta']:.3g}",
            "tok/s": f"{rec['rollout_tokens_per_s']:.0f}"}
    if "baseline_best_reward" in rec:
        post["base"] = f"{rec['baseline_best_reward']:.3f}"
    if "eval_reward" in rec:
        post["eval"] = f"{rec['eval_reward']:.3f}"
    bar.set_postfix(post, refresh=False)
    bar.update(1)
