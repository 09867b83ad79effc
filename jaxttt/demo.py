"""`jaxttt demo`: the whole stack end to end on CPU, on embedded defaults.

corpus (stdlib sources) → tokenizer → packed .bin → pretrain a tiny mHC model and the same
model with `mhc.mode=none` → evaluate and sample → TTT-Discover on a built-in env with its
best-of-N baseline → consolidate the discoveries with gated SDFT → evaluate again (part one);
then the same loops on a real pretrained model, `--model` (default SmolLM2-135M-Instruct,
fetched into the cache on first use; jaxttt/demo_real.py) → `runs/demo-<time>/report.md` with
the numbers and PNG plots, and `summary.json`. `--quick` is the small version the tests run.
When the model cannot be fetched, one line says what to do and part one runs alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from jaxttt.demo_real import DEFAULT_MODEL

DISCOVER_ENV = "toy"
DISCOVER_TARGET = "return"  # a word the stdlib-trained model can learn to say


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    pretrain_steps: int = 150
    batch_size: int = 16
    seq_len: int = 128
    discover_steps: int = 16
    rollouts: int = 16
    sdft_blocks: int = 2
    sdft_steps_per_block: int = 4
    min_reward: float = 0.5


QUICK = DemoPlan(pretrain_steps=12, batch_size=8, seq_len=64, discover_steps=2, rollouts=8,
                 sdft_blocks=1, sdft_steps_per_block=2, min_reward=0.0)


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the whole stack end to end on CPU (report.md)")
    p.add_argument("--quick", action="store_true", help="a much smaller run (used by the tests)")
    p.add_argument("--out", default="", help="run directory (default runs/demo-<time>)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="part two's model: a named model (fetched on first use), a run "
                        "directory, hf:DIR or gguf:FILE; `none` = part one only "
                        f"(default {DEFAULT_MODEL})")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_main)


def _main(args) -> None:
    out = run_demo(quick=args.quick, out=args.out or None, progress=not args.no_progress,
                   model=args.model)
    print(f"demo: report at {out / 'report.md'}")


def new_run_dir(out: str | Path | None) -> Path:
    """A fresh directory: never reuses (and so never overwrites) an earlier run."""
    from jaxttt.runs import fresh_run_dir, run_name

    if out is None:
        base = run_name("demo")
        out, i = Path(base), 1
        while out.exists():
            out, i = Path(f"{base}-{i}"), i + 1

    return fresh_run_dir(out)


class Stages:
    """Times each stage and prints a banner, so a long run shows where it is. The times live
    in `times`, which the summary holds (so a later stage's time lands there too)."""

    def __init__(self, total: int):
        self.total, self.n, self.times = total, 0, {}

    def __call__(self, name: str, fn, *a, **kw):
        self.n += 1
        print(f"\n=== [{self.n}/{self.total}] {name}", flush=True)
        t0 = time.perf_counter()
        result = fn(*a, **kw)
        self.times[name] = round(time.perf_counter() - t0, 1)
        print(f"=== {name}: {self.times[name]} s", flush=True)
        return result


def _pretrain(out: Path, plan: DemoPlan, mode: str) -> Path:
    from jaxttt import config as C
    from jaxttt.train.loop import pretrain

    cfg = C.load(C.PretrainConfig, "pretrain/tiny.yaml", [
        f"steps={plan.pretrain_steps}", f"data.batch_size={plan.batch_size}",
        f"data.seq_len={plan.seq_len}", f"model.mhc.mode={mode}",
        f"eval_every={max(plan.pretrain_steps // 4, 1)}", f"save_every={plan.pretrain_steps}",
        f"log_every={max(plan.pretrain_steps // 8, 1)}", f"optim.warmup_steps={plan.pretrain_steps // 10}",
        f"run_dir={out / f'pretrain-{mode}'}"])
    return pretrain(cfg)


def _evaluate(run: Path) -> dict:
    from jaxttt.eval.report import evaluate, greedy_completions
    from jaxttt.runs import load_run

    model, tok, _ = load_run(run)
    report = evaluate(model, tok, probes="probes/default.yaml", seq_len=64, max_windows=16)
    prompts = ["def ", "import ", "class ", "    return "]
    report["samples"] = dict(zip(prompts, greedy_completions(model, tok, prompts, max_new_tokens=24)))
    return report


def _discover(out: Path, pretrain_run: Path, plan: DemoPlan, progress: bool) -> dict:
    from jaxttt import config as C
    from jaxttt.discover.loop import run_discover_from_checkpoint

    cfg = C.load(C.DiscoverConfig, "discover/tiny.yaml", [
        f"steps={plan.discover_steps}", f"rollouts={plan.rollouts}", f"env={DISCOVER_ENV}",
        f"env_options={{target: {DISCOVER_TARGET}}}", f"save_every={plan.discover_steps}"])
    return run_discover_from_checkpoint(pretrain_run, cfg, out / "discover", progress=progress)


def _consolidate(out: Path, pretrain_run: Path, discover_run: Path, plan: DemoPlan,
                 progress: bool) -> dict:
    from jaxttt import config as C
    from jaxttt.sdft.consolidate import consolidate

    cfg = C.load(C.SDFTConfig, "sdft/tiny.yaml", [
        f"blocks={plan.sdft_blocks}", f"steps_per_block={plan.sdft_steps_per_block}"])
    # never ask for more than was found: the best discovery always makes a demonstration
    best = json.loads((discover_run / "result.json").read_text())["best_reward"]
    return consolidate([discover_run], pretrain_run, out / "continual", cfg,
                       min_reward=min(plan.min_reward, best), progress=progress)


def run_demo(*, quick: bool = False, out: str | Path | None = None, progress: bool = True,
             model: str = DEFAULT_MODEL) -> Path:
    """Run every stage into a new run directory; returns it (report.md inside)."""
    from jaxttt import demo_real
    from jaxttt.runs import enable_compile_cache

    enable_compile_cache()
    plan = QUICK if quick else DemoPlan()
    real_plan = demo_real.QUICK if quick else demo_real.RealPlan()
    out = new_run_dir(out)
    stages = Stages(total=14)
    t0 = time.perf_counter()
    model_run, skipped = stages(f"part two's model: {model}", demo_real.prepare_model, model, out)
    if skipped is not None:
        stages.total -= 6
        print(f"demo: part two skipped (part one runs alone): {skipped}", flush=True)
    summary = run_part_one(out, plan, stages, progress)
    summary.update(model=model, real_plan=dataclasses.asdict(real_plan),
                   real={"skipped": skipped} if skipped is not None else {"pending": True})
    summary["stage_seconds"] = stages.times
    _write_summary(out, summary, t0)
    if model_run is not None:
        write_report(out, summary)  # part one's report is on disk before part two starts
        summary["real"] = demo_real.run_part_two(model_run, out, real_plan, stages, progress)
        _write_summary(out, summary, t0)
    stages("report", write_report, out, summary)
    _write_summary(out, summary, t0)
    return out


def run_part_one(out: Path, plan: DemoPlan, stages: Stages, progress: bool) -> dict:
    """The tiny models from the embedded corpus: pretrain, evaluate, discover, consolidate."""
    runs = {m: stages(f"pretrain ({m})", _pretrain, out, plan, m) for m in ("mhc", "none")}
    evals = {m: stages(f"evaluate ({m})", _evaluate, runs[m]) if m == "mhc" else _evaluate(runs[m])
             for m in ("mhc", "none")}
    disc = stages("TTT-Discover + best-of-N baseline", _discover, out, runs["mhc"], plan, progress)
    cont = stages("consolidate discoveries with gated SDFT", _consolidate, out, runs["mhc"],
                  Path(disc["run_dir"]), plan, progress)
    final = stages("evaluate the continual model", _evaluate, Path(cont["out_dir"]))
    return {"plan": dataclasses.asdict(plan), "runs": {k: str(v) for k, v in runs.items()},
            "eval": evals, "discover": disc, "continual": _brief(cont), "final_eval": final}


def _write_summary(out: Path, summary: dict, t0: float) -> None:
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


def _brief(cont: dict) -> dict:
    keys = ("out_dir", "steps", "blocks", "accepted", "rejected", "gates", "eval_initial",
            "eval_final", "consolidation")
    return {k: cont.get(k) for k in keys}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def write_report(out: Path, summary: dict) -> Path:
    """report.md with headline numbers and PNG plots (loss, reward vs baseline, gates, H_res;
    part two's when it ran)."""
    from jaxttt import demo_real

    real = summary.get("real") or {"skipped": "not run"}
    figures = _figures(out, summary)
    if "pending" not in real:
        figures += demo_real.figures(out, real)
    part_two = [] if "pending" in real else \
        demo_real.report_section(real, summary.get("real_plan"), summary.get("model", ""))
    lines = ["# jaxttt demo report", "", f"Run directory: `{out.name}` — wall time "
             f"{summary['wall_s']:.0f} s.", "", "## Part one: tiny models from the embedded corpus",
             ""] + _pretrain_section(summary) + \
        _discover_section(summary) + _continual_section(summary) + part_two + \
        ["## Plots", ""] + [f"![{name}]({name})" for name in figures] + \
        ["", "## Stage times (s)", "", "| stage | s |", "|---|---|"] + \
        [f"| {k} | {v} |" for k, v in summary["stage_seconds"].items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


def _final_loss(run: str) -> dict:
    from jaxttt.runs import read_jsonl

    rows = read_jsonl(Path(run) / "metrics.jsonl")
    train = [r["loss"] for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    return {"first": train[0], "last": train[-1], "val_ppl": val[-1]["val_ppl"] if val else None}


def _pretrain_section(s: dict) -> list[str]:
    rows = ["## Pretraining (tiny model, embedded stdlib corpus)", "",
            "| residual | loss first → last | val ppl | held-out ppl | probe score |",
            "|---|---|---|---|---|"]
    for mode, run in s["runs"].items():
        f, ev = _final_loss(run), s["eval"][mode]
        rows.append(f"| {mode} | {f['first']:.3f} → {f['last']:.3f} | {f['val_ppl']:.1f} | "
                    f"{ev['perplexity']:.1f} | {ev.get('probe/overall', float('nan')):.2f} |")
    rows += ["", "Greedy samples (mHC):", ""]
    rows += [f"- `{p!r}` → `{c!r}`" for p, c in s["eval"]["mhc"]["samples"].items()]
    return rows + [""]


def _discover_section(s: dict) -> list[str]:
    d = s["discover"]
    return ["## TTT-Discover", "", f"Env `{d['env']}` (problem {d['problem_id']}), "
            f"{d['steps']} steps, {d['samples']} sampled actions for each method.", "",
            "| method | best reward |", "|---|---|",
            f"| TTT-Discover (LoRA, entropic, PUCT) | {d['best_reward']:.3f} |",
            f"| best-of-N from θ0, same samples | {d['baseline_best_reward']:.3f} |", "",
            f"Best state: `{d['best_state']!r}`; step wall time {d['step_wall_s'] or 0:.2f} s, "
            f"rollouts {d['rollout_tokens_per_s'] or 0:.0f} tokens/s.", ""]


def _continual_section(s: dict) -> list[str]:
    c, f = s["continual"], s["final_eval"]
    gates = ", ".join("accepted" if g["accepted"] else "reverted" for g in c["gates"]) or "-"
    stats = c.get("consolidation") or {}
    return ["## Consolidation (gated SDFT)", "",
            f"{stats.get('kept', 0)} demonstrations from {stats.get('rows', 0)} logged rollouts; "
            f"{c['blocks']} block(s): {gates}.", "",
            "| model | held-out ppl | probe score |", "|---|---|---|",
            f"| θ0 (mHC) | {s['eval']['mhc']['perplexity']:.2f} | "
            f"{s['eval']['mhc'].get('probe/overall', float('nan')):.2f} |",
            f"| θ_continual | {f['perplexity']:.2f} | {f.get('probe/overall', float('nan')):.2f} |", ""]


def _figures(out: Path, s: dict) -> list[str]:
    from jaxttt.eval import mhc_stats, plots
    from jaxttt.runs import load_run

    made = []
    made.append(plots.save(plots.loss_curves(s["runs"]), out / "loss_curves.png").name)
    made.append(plots.save(plots.discover_rewards(s["discover"]["run_dir"]),
                           out / "discover_rewards.png").name)
    made.append(plots.save(plots.archive_tree(s["discover"]["run_dir"]), out / "archive.png").name)
    made.append(plots.save(plots.gate_history(s["continual"]["out_dir"]), out / "gates.png").name)
    model, tok, _ = load_run(s["runs"]["mhc"])
    toks = [tok.encode("def main():\n    return 0\n")[:32]]
    h = mhc_stats.h_res_by_layer(model, __import__("numpy").asarray(toks))
    made.append(plots.save(plots.h_res_heatmaps(h), out / "h_res.png").name)
    return made
