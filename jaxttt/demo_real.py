"""Part two of `jaxttt demo`: the main job on a real pretrained model.

    model (named: fetched + converted once into the cache; hf:DIR / gguf:FILE: converted into
    the demo's directory; a run directory as it is)
    -> TTT-Discover on a real problem beside best-of-N from θ0 at the same number of samples
    -> gated SDFT consolidation of the discoveries into the model (θ_continual)
    -> one SEAL request through the real ZMQ server (free loopback port, in-process)
    -> PonderTTT: outer loop on the frozen model, then the method table on held-out chunks
    -> HumanEval pass@1 of θ0 and θ_continual (confined sandbox)

Every stage calls the library's own loop; this module only chooses budgets and collects
numbers. Outputs go under OUT/real/. `report_section` and `figures` render them for report.md.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
NO_MODEL = "none"  # `--model none`: part one only


@dataclasses.dataclass(frozen=True)
class RealPlan:
    env: str = "humaneval:HumanEval/30"
    discover_steps: int = 3
    rollouts: int = 8
    discover_new_tokens: int = 96
    discover_lr: float = 1e-4
    lora_rank: int = 8
    min_reward: float = 0.5
    sdft_steps: int = 2
    sdft_batch: int = 2
    sdft_new_tokens: int = 64
    sdft_lr: float = 1e-4
    gate_windows: int = 4
    seal_epochs: int = 3
    seal_lr: float = 3e-3
    seal_new_tokens: int = 24
    ponder_steps: int = 4
    ponder_batch: int = 8
    ponder_chunks: int = 8
    chunk_len: int = 64
    ppo_iters: int = 2
    # short tasks (a solution fits in the token budget), the discovery problem among them
    humaneval_tasks: tuple[str, ...] = ("HumanEval/0", "HumanEval/2", "HumanEval/7",
                                        "HumanEval/23", "HumanEval/28", "HumanEval/30",
                                        "HumanEval/35", "HumanEval/53")
    humaneval_new_tokens: int = 128


QUICK = RealPlan(discover_steps=2, rollouts=4, discover_new_tokens=16, min_reward=0.0,
                 sdft_steps=1, sdft_new_tokens=8, gate_windows=2, seal_epochs=1,
                 seal_new_tokens=8, ponder_steps=2, ponder_chunks=8, chunk_len=32, ppo_iters=1,
                 humaneval_tasks=("HumanEval/2", "HumanEval/23"), humaneval_new_tokens=16)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
def prepare_model(spec: str, out: Path) -> tuple[Path | None, str | None]:
    """(run directory of `spec`, None), or (None, why part two is skipped) when a named model
    cannot be fetched or the kernel cannot confine model-written code (part two runs it).
    A bad path or checkpoint is the user's error and raises."""
    from jaxttt.eval import sandbox
    from jaxttt.model import named
    from jaxttt.runs import resolve_named
    from jaxttt.train.checkpoint import find_run_dir

    if spec == NO_MODEL:
        return None, "--model none"
    is_named = spec in named.NAMED and not Path(spec).exists()
    is_source = spec.startswith(("hf:", "gguf:"))
    run = None if is_named or is_source else Path(find_run_dir(spec)[0]).absolute()
    problem = sandbox.confinement_problem()
    if problem is not None:  # checked before a download or conversion that could not be used
        return None, (f"the sandbox cannot confine model-written code here ({problem}); "
                      "part two runs HumanEval code")
    if is_named:
        try:
            return Path(resolve_named(spec)), None
        except named.NamedModelError as e:
            return None, str(e)
    if is_source:
        from jaxttt.model.pretrained import convert_to_run
        return convert_to_run(spec, out / "real" / "model"), None
    return run, None


# --------------------------------------------------------------------------------------------
# Data: the embedded corpus in the model's own tokenizer
# --------------------------------------------------------------------------------------------
DATA_BYTES = {"val": 4_000_000, "train": 400_000}  # val: the default held-out split


def corpus_bins(tok, out: Path) -> dict[str, Path]:
    """OUT/real/data/{val,train}.bin: the default corpus's splits in the model's tokenizer.

    (`jaxttt.data.packing.pack` opens SentencePiece models only, so the library's default
    held-out data cannot be built for a Hugging Face tokenizer yet; these bins are passed
    explicitly to the SDFT gates and PonderTTT.)"""
    import numpy as np

    from jaxttt.data import corpus
    from jaxttt.data.packing import meta_path, token_dtype

    d = out / "real" / "data"
    d.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, max_bytes in DATA_BYTES.items():
        docs = list(corpus.default_documents(split, max_bytes))
        dtype = token_dtype(tok.vocab_size)
        ids = np.concatenate([np.asarray(x + [tok.eos_id], dtype) for x in tok.encode_batch(docs)])
        paths[split] = d / f"{split}.bin"
        ids.tofile(paths[split])
        meta_path(paths[split]).write_text(json.dumps({
            "tokenizer": str(tok.path), "tokenizer_sha256": tok.sha256,
            "vocab_size": tok.vocab_size, "dtype": dtype.name, "n_tokens": int(ids.size),
            "n_docs": len(docs), "eos_id": tok.eos_id,
            "sources": [f"default:{split}:{max_bytes}"], "text_field": "text"}, indent=2))
    return paths


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------
def discover(model_run: Path, out: Path, plan: RealPlan, progress: bool) -> dict:
    from jaxttt import config as C
    from jaxttt.discover.loop import run_discover_from_checkpoint

    cfg = C.load(C.DiscoverConfig, "discover/default.yaml", [
        f"env={plan.env}", f"steps={plan.discover_steps}", f"rollouts={plan.rollouts}",
        f"sampling.max_new_tokens={plan.discover_new_tokens}", f"optim.lr={plan.discover_lr}",
        f"lora.rank={plan.lora_rank}", f"lora.alpha={2 * plan.lora_rank}", "save_every=0",
        "reward_workers=2", "rollout_policy=importance"])
    # one sampler for both arms (T=1, top_p=0.95: at top_p=1 SmolLM2-135M's code is almost all
    # tail noise); the TTT gradient is corrected with truncated importance weights
    return run_discover_from_checkpoint(model_run, cfg, out / "real" / "discover",
                                        progress=progress)


def consolidate(model_run: Path, discover_run: Path, out: Path, plan: RealPlan, data: dict,
                progress: bool) -> dict:
    from jaxttt import config as C
    from jaxttt.sdft.consolidate import consolidate as run

    cfg = C.load(C.SDFTConfig, "sdft/tiny.yaml", [
        "blocks=1", f"steps_per_block={plan.sdft_steps}", f"batch_size={plan.sdft_batch}",
        f"sampling.max_new_tokens={plan.sdft_new_tokens}", f"optim.lr={plan.sdft_lr}",
        f"lora={{rank: {plan.lora_rank}, alpha: {2 * plan.lora_rank}, dropout: 0.0}}",
        "max_prompt_len=256", f"eval.windows={plan.gate_windows}", "eval.seq_len=128", "keep=1",
        f"eval.heldout={data['val']}"])
    best = json.loads((discover_run / "result.json").read_text())["best_reward"]
    return run([discover_run], model_run, out / "real" / "continual", cfg,
               min_reward=min(plan.min_reward, best), progress=progress)


def seal_request(model, tok, out: Path, plan: RealPlan) -> dict:
    """One SEAL request (passage 0 of the synthetic knowledge set) through the ZMQ server."""
    from jaxttt.seal.bench import run_bench
    from jaxttt.seal.engine import EngineConfig, TTTEngine

    engine = TTTEngine(model, tok, cfg=EngineConfig(max_new_tokens=plan.seal_new_tokens))
    report = run_bench(engine, n=1, seed=0, hparams={
        "finetune_epochs": plan.seal_epochs, "finetune_lr": plan.seal_lr})
    path = out / "real" / "seal.json"
    path.write_text(json.dumps(report, indent=1))
    return report["requests"][0]


def ponder(model_run: Path, out: Path, plan: RealPlan, data: dict) -> dict:
    """`ponder train` on the frozen model, then `ponder eval`'s method table (one seed)."""
    from jaxttt import config as C
    from jaxttt.ponder import evaluate as E
    from jaxttt.ponder.actions import ChunkRunner
    from jaxttt.ponder.config import PonderEvalConfig, PonderTrainConfig
    from jaxttt.ponder.train import load_ponder, train
    from jaxttt.runs import fresh_run_dir

    root = out / "real"
    tcfg = C.load(PonderTrainConfig, "ponder/smollm2.yaml", [  # zero_out: starts as the trunk
        f"base={model_run}", f"steps={plan.ponder_steps}", f"batch_size={plan.ponder_batch}",
        f"chunk_len={plan.chunk_len}", f"log_every={max(plan.ponder_steps // 3, 1)}",
        "save_every=0", "keep=1", f"optim.warmup_steps={max(plan.ponder_steps // 4, 1)}",
        f"train={data['train']}"])
    run = train(tcfg, root / "ponder-train")
    n = plan.ponder_chunks
    ecfg = C.load(PonderEvalConfig, "ponder/eval.yaml", [
        f"chunks={n}", f"train_chunks={n}", f"batch_size={plan.ponder_batch}",
        f"calib_chunks={max(n // 4, 1)}", f"episode_len={n // 2}", f"ppo_iters={plan.ppo_iters}",
        "ppo_episodes=4", "bootstrap=200", f"val={data['val']}", f"train={data['train']}"])
    model, tok, tcfg, _ = load_ponder(run)
    dims = dict(d_model=model.trunk.cfg.d_model, n_heads=model.ttt.n_heads,
                d_head=model.ttt.d_head, mini_batch=model.ttt.mini_batch)
    seed = E.evaluate_seed(ChunkRunner(model), tok, tcfg, ecfg, seed=0)
    summary = E.summarise([seed], ecfg, ttt_dims=dims)
    ev = fresh_run_dir(root / "ponder-eval")
    E.pareto_plot(summary, ev / "pareto.png")
    E.write_results(summary, ev, {"runs": [str(run)], "eval_config": C.to_dict(ecfg),
                                  "chunk_len": tcfg.chunk_len})
    return {"run_dir": str(run), "eval_dir": str(ev), "chunks": n, "chunk_len": tcfg.chunk_len,
            "methods": {m: {k: r[k] for k in ("loss", "ppl", "update_rate", "cost", "recovery")}
                        for m, r in summary["methods"].items()}}


def humaneval(ckpt: Path, name: str, out: Path, plan: RealPlan, progress: bool) -> dict:
    """Greedy pass@1 of `ckpt` on the plan's HumanEval tasks, run in the confined sandbox."""
    from jaxttt.eval import codeeval, sandbox
    from jaxttt.eval.humaneval import load_humaneval

    every = load_humaneval()
    tasks = {t: every[t] for t in plan.humaneval_tasks}
    samples, info = codeeval.generate_completions(
        tasks, str(ckpt), n=1, temperature=0.0, max_new_tokens=plan.humaneval_new_tokens,
        batch_size=len(tasks), progress=progress)
    results = codeeval.evaluate_samples(tasks, samples, limits=sandbox.Limits(timeout_s=6.0),
                                        workers=2, progress=progress)
    d = out / "real" / f"humaneval-{name}"
    d.mkdir(parents=True)
    (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    summary = {**codeeval.summarize(results, [1]), **info,
               "passed": {r["task_id"]: bool(r["passed"]) for r in results}}
    (d / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def run_part_two(model_run: Path, out: Path, plan: RealPlan, stages, progress: bool) -> dict:
    """Every stage on the model in `model_run`; returns the summary's `real` entry."""
    from jaxttt.runs import load_run

    def load():
        model, tok, _ = load_run(model_run)
        return model, tok, corpus_bins(tok, out)

    model, tok, data = stages("real model: load it, the embedded corpus in its tokenizer", load)
    disc = stages(f"real model: TTT-Discover on {plan.env} + best-of-N", discover,
                  model_run, out, plan, progress)
    cont = stages("real model: consolidate the discoveries with gated SDFT", consolidate,
                  model_run, Path(disc["run_dir"]), out, plan, data, progress)
    seal = stages("real model: one SEAL request through the TTT server", seal_request,
                  model, tok, out, plan)
    del model
    pond = stages("real model: PonderTTT (outer loop, then the method table)", ponder,
                  model_run, out, plan, data)

    def both():
        return {"theta0": humaneval(model_run, "theta0", out, plan, progress),
                "continual": humaneval(Path(cont["out_dir"]), "continual", out, plan, progress)}

    he = stages("real model: HumanEval pass@1, θ0 and θ_continual", both)
    seal_keys = ("title", "baseline_accuracy", "adapter_accuracy", "adapter_gain",
                 "baseline_texts", "adapter_texts", "timings", "client_s")
    return {"model_run": str(model_run), "discover": disc, "continual": _brief(cont),
            "seal": {k: seal.get(k) for k in seal_keys}, "ponder": pond, "humaneval": he}


def _brief(cont: dict) -> dict:
    keys = ("out_dir", "steps", "blocks", "accepted", "rejected", "gates", "eval_initial",
            "eval_final", "consolidation")
    return {k: cont.get(k) for k in keys}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
PONDER_ROWS = ("SKIP", "UPDATE_1", "random", "gated", "ppo", "oracle")


def report_section(real: dict, plan: dict | None, model: str) -> list[str]:
    """The part-two lines of report.md (a plain statement when it was skipped)."""
    if "skipped" in real:
        return ["## Part two: the real model — skipped", "", f"Model `{model}`: {real['skipped']}",
                ""]
    return ([f"## Part two: the real model (`{model}`)", "",
             f"Run directory of the model: `{real['model_run']}`.", ""] + _discover(real) +
            _continual(real) + _seal(real) + _ponder(real) + _humaneval(real, plan))


def _discover(r: dict) -> list[str]:
    d = r["discover"]
    return ["### TTT-Discover vs best-of-N", "",
            f"Env `{d['env']}` (problem {d['problem_id']}), {d['steps']} steps, "
            f"{d['samples']} sampled actions for each method; reward = fraction of the task's "
            "asserts passed in the confined sandbox.", "",
            "| method | best reward |", "|---|---|",
            f"| TTT-Discover (LoRA, entropic, PUCT) | {d['best_reward']:.3f} |",
            f"| best-of-N from θ0, same samples | {d['baseline_best_reward']:.3f} |", "",
            f"Step wall time {d['step_wall_s'] or 0:.1f} s (first step {d['first_step_wall_s'] or 0:.1f} s "
            f"with compilation), rollouts {d['rollout_tokens_per_s'] or 0:.0f} tokens/s.", ""]


def _continual(r: dict) -> list[str]:
    c = r["continual"]
    stats = c.get("consolidation") or {}
    gates = ", ".join("accepted" if g["accepted"] else "reverted" for g in c["gates"]) or "-"
    a, b = c["eval_initial"], c["eval_final"]
    return ["### Gated SDFT consolidation", "",
            f"{stats.get('kept', 0)} demonstration(s) from {stats.get('rows', 0)} logged rollouts; "
            f"{c['steps']} update(s) in {c['blocks']} block(s): {gates}.", "",
            "| model | held-out ppl | probe score |", "|---|---|---|",
            f"| θ0 | {a['perplexity']:.2f} | {a.get('probe/overall', float('nan')):.2f} |",
            f"| θ_continual | {b['perplexity']:.2f} | {b.get('probe/overall', float('nan')):.2f} |", ""]


def _seal(r: dict) -> list[str]:
    s = r["seal"]
    t = s.get("timings") or {}
    return ["### SEAL: one request through the TTT server", "",
            f"Passage `{s['title']}` (invented entity, 3 questions), LoRA fine-tune on its "
            "restatements through the ZMQ server:", "",
            "| | accuracy |", "|---|---|",
            f"| base model | {s['baseline_accuracy']:.3f} |",
            f"| adapted (LoRA) | {s['adapter_accuracy']:.3f} |", "",
            f"Server timings: baseline {t.get('baseline_eval_s', 0):.1f} s, fine-tune "
            f"{t.get('finetune_s', 0):.1f} s, adapted {t.get('adapted_eval_s', 0):.1f} s.", ""]


def _ponder(r: dict) -> list[str]:
    p = r["ponder"]
    rows = ["### PonderTTT on the frozen model", "",
            f"{p['chunks']} held-out chunks of {p['chunk_len']} tokens (one seed); recovery = "
            "(SKIP − method)/(SKIP − oracle).", "",
            "| method | loss (nats/token) | update rate | nominal cost | recovery |",
            "|---|---|---|---|---|"]
    for m in PONDER_ROWS:
        v = p["methods"][m]
        rows.append(f"| {m} | {v['loss']:.4f} | {v['update_rate']:.2f} | {v['cost']:.2f} | "
                    f"{v['recovery']:.2f} |")
    return rows + [""]


def _humaneval(r: dict, plan: dict | None) -> list[str]:
    he = r["humaneval"]
    tasks = ", ".join((plan or {}).get("humaneval_tasks", []))
    return ["### HumanEval pass@1 (greedy)", "", f"Tasks: {tasks}.", "",
            "| model | pass@1 | passed |", "|---|---|---|"] + \
        [f"| {name} | {s['pass@1']:.3f} | {s['n_passed']}/{s['n_tasks']} |"
         for name, s in (("θ0", he["theta0"]), ("θ_continual", he["continual"]))] + [""]


def figures(out: Path, real: dict) -> list[str]:
    """Part two's plots (paths relative to `out`)."""
    from jaxttt.eval import plots

    if "skipped" in real:
        return []
    made = [plots.save(plots.discover_rewards(real["discover"]["run_dir"]),
                       out / "real_discover_rewards.png").name,
            plots.save(plots.gate_history(real["continual"]["out_dir"]),
                       out / "real_gates.png").name,
            plots.save(_accuracy_bars(real), out / "real_accuracy.png").name]
    pareto = Path(real["ponder"]["eval_dir"]) / "pareto.png"
    if pareto.is_file():
        made.append(str(pareto.relative_to(out)))
    return made


def _accuracy_bars(real: dict):
    """SEAL accuracy (base vs adapted) and HumanEval pass@1 (θ0 vs θ_continual)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, he = real["seal"], real["humaneval"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.4))
    a.bar(["base", "adapted"], [s["baseline_accuracy"], s["adapter_accuracy"]],
          color=["#999999", "#1f77b4"])
    a.set_title("SEAL: one passage, 3 questions")
    b.bar(["θ0", "θ_continual"], [he["theta0"]["pass@1"], he["continual"]["pass@1"]],
          color=["#999999", "#2ca02c"])
    b.set_title(f"HumanEval, {he['theta0']['n_tasks']} tasks (greedy)")
    a.set_ylabel("accuracy (fraction of questions)")
    b.set_ylabel("pass@1 (fraction of tasks)")
    for ax in (a, b):
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("model")
    fig.tight_layout()
    return fig
