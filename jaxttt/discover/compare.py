"""TTT-Discover against best-of-N from θ0 at the same number of sampled actions (issue 14).

    table = run_compare(model, tokenizer, spec, "runs/cmp")      # a loaded θ0
    table = run_compare_from_checkpoint("smollm2-135m-instruct", spec, "runs/cmp")

For every seed and preset (`official` = configs/discover/official.yaml, `handoff` =
configs/discover/default.yaml) it calls `loop.run_discover` once: that run draws
`steps × rollouts` TTT actions and, beside them, the loop's own best-of-N baseline
(`DiscoverRun.baseline_step`: `rollouts` actions per step from θ0 with the adapters off, on the
initial prompt, with the run's separate baseline key stream). Both arms sample with the same
settings: temperature 1, top_p 1, top_k 0 (the untruncated policy the TTT gradient is of) and
the same `max_new_tokens`; a config that would make them differ is refused.

The baseline does not depend on the preset (same θ0, prompt, sampler, seed and key stream), so
it is drawn once per seed, in that seed's first preset run, and shared by the presets.

Output directory:
  PRESET/seedS/      the run directories (`loop.run_discover`: log.jsonl, result.json, ...); a
                     finished one (result.json present, same config) is reused on a rerun, an
                     unfinished one (a run killed midway) is renamed seedS.unfinished-K and run
                     again
  compare.json       per-arm mean ± sd (over seeds) of the best reward, per-seed values, the
                     reward-vs-samples curves, sample budgets, TTT seconds per run (the steps'
                     sampling, rewards and updates, compilation included; not the baseline's)
  compare.md         the same as a markdown table
  compare.png        best reward so far vs number of sampled actions (mean over seeds, min–max band)
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jaxttt import config as C
from jaxttt.config import ConfigError, DiscoverConfig

PRESETS = {"official": "discover/official.yaml", "handoff": "discover/default.yaml"}
BASELINE_ARM = "best-of-N (θ0)"
TABLE_JSON, TABLE_MD, PLOT = "compare.json", "compare.md", "compare.png"
# what the comparison fixes itself; a user override of these would break the equal footing
FIXED_KEYS = ("steps", "rollouts", "seed", "baseline", "sampling.temperature", "sampling.top_p",
              "sampling.top_k", "sampling.greedy", "sampling.max_new_tokens", "rollout_policy",
              "hot_swap_eval", "env", "env_options")


@dataclasses.dataclass(frozen=True)
class CompareSpec:
    """One comparison: an env, the presets and seeds, and the per-run budget."""
    env: str
    presets: tuple[str, ...] = ("official", "handoff")
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 4
    rollouts: int = 8
    max_new_tokens: int = 128
    env_options: dict = dataclasses.field(default_factory=dict)
    overrides: tuple[str, ...] = ()  # dotted DiscoverConfig overrides (lr, lora.rank, ...)

    def validate(self) -> None:
        if not self.presets:
            raise ConfigError("give at least one preset (official, handoff)")
        unknown = [p for p in self.presets if p not in PRESETS]
        if unknown:
            raise ConfigError(f"unknown preset {unknown[0]!r}; expected one of "
                              f"{', '.join(PRESETS)}")
        if len(set(self.presets)) != len(self.presets) or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("presets and seeds must not repeat")
        if not self.seeds:
            raise ConfigError("give at least one seed")
        for item in self.overrides:
            key = item.split("=", 1)[0].strip()
            if key in FIXED_KEYS:
                raise ConfigError(f"override {item!r}: {key!r} is set by the "
                                  "comparison itself (use --steps/--rollouts/--seeds/"
                                  "--max-new-tokens/--env; both arms sample at T=1, top_p=1)")


def preset_config(spec: CompareSpec, preset: str, seed: int, *, baseline: bool) -> DiscoverConfig:
    """The preset's DiscoverConfig with the comparison's budget, seed and one sampler for both arms."""
    fixed = [f"steps={spec.steps}", f"rollouts={spec.rollouts}", f"seed={seed}",
             f"baseline={str(baseline).lower()}", "sampling.temperature=1.0", "sampling.top_p=1.0",
             "sampling.top_k=0", "sampling.greedy=false",
             f"sampling.max_new_tokens={spec.max_new_tokens}", "rollout_policy=untruncated",
             "hot_swap_eval=false", "save_every=0"]
    cfg = C.load(DiscoverConfig, PRESETS[preset], list(spec.overrides) + fixed)
    cfg = dataclasses.replace(cfg, env=spec.env, env_options=dict(spec.env_options))
    check_same_sampler(cfg)
    return cfg


def check_same_sampler(cfg: DiscoverConfig) -> None:
    """Refuse a config whose TTT rollouts and baseline samples are drawn differently."""
    from jaxttt.discover.step import rollout_sampling

    sc = cfg.sampling
    baseline = {"temperature": sc.temperature, "top_p": sc.top_p, "top_k": sc.top_k,
                "greedy": sc.greedy}
    ttt = rollout_sampling(cfg)
    if {k: ttt[k] for k in baseline} != baseline:
        raise ConfigError(f"TTT rollouts sample with {ttt} but the baseline "
                          f"with {baseline}; the arms must share one sampler")


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
def run_compare(model, tokenizer, spec: CompareSpec, out_dir: str | Path, *, mesh=None,
                progress: bool = False, source: str | None = None, log=print) -> dict[str, Any]:
    """Every (seed, preset) run of `spec` under `out_dir`, then the table and the plot."""
    from jaxttt.discover.loop import run_discover

    spec.validate()
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    for seed in spec.seeds:
        for i, preset in enumerate(spec.presets):
            cfg = preset_config(spec, preset, seed, baseline=(i == 0))
            run_dir = out / preset / f"seed{seed}"
            if _finished(run_dir, cfg):
                log(f"discover-compare: reusing {run_dir} (finished, same config)")
                continue
            if run_dir.is_dir() and any(run_dir.iterdir()):
                kept = _set_aside(run_dir)
                log(f"discover-compare: {run_dir} holds an unfinished run (no result.json; "
                    f"interrupted?): kept as {kept.name}, running it again")
            log(f"discover-compare: {preset} seed {seed}: {spec.steps} steps x {spec.rollouts} "
                f"rollouts -> {run_dir}")
            s = run_discover(model, tokenizer, cfg, run_dir, mesh=mesh, progress=progress,
                             source=source)
            log(f"discover-compare: {preset} seed {seed}: best {s['best_reward']:.4g}"
                + (f", best-of-N {s['baseline_best_reward']:.4g}" if cfg.baseline else "")
                + f" ({s['wall_s']:.0f} s)")
    table = build_table(out, spec)
    write_outputs(out, table)
    return table


def run_compare_from_checkpoint(ckpt: str | Path, spec: CompareSpec, out_dir: str | Path, *,
                                tokenizer: str | Path | None = None, progress: bool = False,
                                log=print) -> dict[str, Any]:
    """`run_compare` with θ0 (and its tokenizer) loaded once from a model run (`load_run`)."""
    from jaxttt import sharding
    from jaxttt.discover.env import load_env
    from jaxttt.runs import load_run

    spec.validate()
    cfg = preset_config(spec, spec.presets[0], spec.seeds[0], baseline=True)
    load_env(spec.env, spec.env_options)  # a bad env name fails before the model loads
    mesh = sharding.make_mesh(cfg.mesh)
    model, tok, _ = load_run(ckpt, mesh=mesh, tokenizer=tokenizer)
    return run_compare(model, tok, spec, out_dir, mesh=mesh, progress=progress,
                       source=str(ckpt), log=log)


def _set_aside(run_dir: Path) -> Path:
    """Rename an unfinished run directory to the first free `NAME.unfinished-K` (kept, never
    deleted: its logs may tell why it stopped)."""
    k = 1
    while (kept := run_dir.with_name(f"{run_dir.name}.unfinished-{k}")).exists():
        k += 1
    return run_dir.rename(kept)


def _finished(run_dir: Path, cfg: DiscoverConfig) -> bool:
    """A finished run of exactly `cfg` (result.json written); a different config is refused."""
    from jaxttt.discover.loop import RESULT_FILE

    result = run_dir / RESULT_FILE
    if not result.is_file():
        return False
    saved = json.loads(result.read_text()).get("config")
    if saved != json.loads(json.dumps(C.to_dict(cfg))):
        raise ConfigError(f"{run_dir}: holds a finished run with a different config; choose a "
                          "new --out (runs are never overwritten)")
    return True


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------
def run_curves(run_dir: Path) -> dict[str, Any]:
    """Best-so-far curves of one run from its result.json and log.jsonl: samples -> best."""
    from jaxttt.discover.loop import LOG_FILE, RESULT_FILE

    result = json.loads((run_dir / RESULT_FILE).read_text())
    lines = [json.loads(x) for x in (run_dir / LOG_FILE).read_text().splitlines() if x.strip()]
    s0 = float(result["seed_reward"])
    ttt = [(0, s0)] + [(r["samples"], r["best_reward"]) for r in lines]
    base = ([(0, s0)] + [(r["baseline_samples"], r["baseline_best_reward"]) for r in lines]
            if result["config"]["baseline"] else None)
    # steps' wall_s stop before the baseline's samples: TTT time alone (sample, reward, update)
    return {"result": result, "ttt": ttt, "baseline": base,
            "ttt_s": float(sum(r.get("wall_s", 0.0) for r in lines))}


def _stats(values: Sequence[float]) -> dict[str, Any]:
    v = np.asarray(values, np.float64)
    sd = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "sd": sd, "min": float(v.min()), "max": float(v.max()),
            "per_seed": [float(x) for x in v]}


def build_table(out: Path, spec: CompareSpec) -> dict[str, Any]:
    """compare.json's content from the run directories under `out`."""
    arms: dict[str, dict[str, Any]] = {}
    baseline: dict[str, Any] = {"best": [], "curves": [], "samples": [], "wall_s": []}
    first = spec.presets[0]
    for preset in spec.presets:
        arm: dict[str, Any] = {"best": [], "curves": [], "samples": [], "wall_s": []}
        for seed in spec.seeds:
            run = run_curves(out / preset / f"seed{seed}")
            res = run["result"]
            arm["best"].append(res["best_reward"])
            arm["curves"].append(run["ttt"])
            arm["samples"].append(res["samples"])
            arm["wall_s"].append(run["ttt_s"])
            if preset == first:
                baseline["best"].append(res["baseline_best_reward"])
                baseline["curves"].append(run["baseline"])
                baseline["samples"].append(res["baseline_samples"])
                baseline["seed_reward"] = res["seed_reward"]
                baseline["problem_id"] = res["problem_id"]
        arms[f"TTT-Discover ({preset})"] = arm
    arms[BASELINE_ARM] = baseline
    budgets = {a: v["samples"] for a, v in arms.items()}
    if len({tuple(b) for b in budgets.values()}) != 1:
        raise RuntimeError(f"discover-compare: unequal action budgets {budgets}")
    rows = []
    for name, arm in arms.items():
        rows.append({"arm": name, "best_reward": _stats(arm["best"]),
                     "samples_per_seed": arm["samples"][0],
                     "ttt_s": _stats(arm["wall_s"]) if arm["wall_s"] else None,
                     "curves": arm["curves"]})
    base_best = np.asarray(baseline["best"])
    for row in rows:
        if row["arm"] != BASELINE_ARM:
            diff = np.asarray(row["best_reward"]["per_seed"]) - base_best
            row["vs_baseline"] = {"mean_diff": float(diff.mean()),
                                  "wins": int((diff > 0).sum()), "ties": int((diff == 0).sum()),
                                  "losses": int((diff < 0).sum())}
    return {"env": spec.env, "env_options": dict(spec.env_options), "problem_id": baseline.get("problem_id"),
            "seed_reward": baseline.get("seed_reward"), "seeds": list(spec.seeds),
            "presets": {p: PRESETS[p] for p in spec.presets}, "steps": spec.steps,
            "rollouts": spec.rollouts, "max_new_tokens": spec.max_new_tokens,
            "sampler": {"temperature": 1.0, "top_p": 1.0, "top_k": 0},
            "overrides": list(spec.overrides), "rows": rows}


def markdown(table: dict[str, Any]) -> str:
    """The table as markdown: one row per arm, best reward mean ± sd over seeds."""
    n = len(table["seeds"])
    opts = table.get("env_options") or {}
    env = table["env"] + (f" ({', '.join(f'{k}={v}' for k, v in opts.items())})" if opts else "")
    head = (f"**{env}** — {table['steps']} steps × {table['rollouts']} actions "
            f"(max_new_tokens {table['max_new_tokens']}, T=1, top_p=1), seeds "
            f"{', '.join(map(str, table['seeds']))}; seed-state reward {table['seed_reward']:.4g}\n\n")
    lines = ["| arm | actions / seed | best reward, mean ± sd (n=%d) | min–max | per seed | "
             "vs best-of-N (W/T/L) | TTT s / run |" % n, "|---|---|---|---|---|---|---|"]
    for row in table["rows"]:
        b = row["best_reward"]
        vs = row.get("vs_baseline")
        vs_s = f"{vs['wins']}/{vs['ties']}/{vs['losses']}" if vs else "—"
        wall = f"{row['ttt_s']['mean']:.0f}" if row["ttt_s"] else "—"
        lines.append(f"| {row['arm']} | {row['samples_per_seed']} | {b['mean']:.4g} ± {b['sd']:.2g} "
                     f"| {b['min']:.4g}–{b['max']:.4g} | "
                     f"{', '.join(format(x, '.4g') for x in b['per_seed'])} | {vs_s} | {wall} |")
    return head + "\n".join(lines) + "\n"


def plot(table: dict[str, Any], path: Path) -> None:
    """Best reward so far vs sampled actions: mean over seeds, min–max band, one line per arm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for row in table["rows"]:
        curves = row["curves"]
        x = np.asarray([p[0] for p in curves[0]], np.float64)
        y = np.asarray([[p[1] for p in c] for c in curves], np.float64)
        style = "--" if row["arm"] == BASELINE_ARM else "-"
        ax.plot(x, y.mean(0), style, marker="o", ms=3, label=f"{row['arm']} (n={len(curves)})")
        ax.fill_between(x, y.min(0), y.max(0), alpha=0.15)
    ax.set_xlabel("sampled actions (count)")
    ax.set_ylabel("best reward so far (env units)")
    opts = "".join(f" {k}={v}" for k, v in (table.get("env_options") or {}).items())
    ax.set_title(f"{table['env']}{opts}: mean over {len(table['seeds'])} seeds, band = min–max",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out: Path, table: dict[str, Any]) -> None:
    (out / TABLE_JSON).write_text(json.dumps(table, indent=2, ensure_ascii=False,
                                             default=_json_default))
    (out / TABLE_MD).write_text(markdown(table))
    plot(table, out / PLOT)


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    raise TypeError(type(x).__name__)
