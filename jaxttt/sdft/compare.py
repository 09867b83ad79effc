"""SDFT vs SFT on a new skill: new-task accuracy against forgetting, over arms × seeds.

`compare` trains every (arm, seed) cell from the same base checkpoint on the tool-call skill
(`jaxttt.sdft.skill_tool_call`) with `run_sdft`, then measures
  - new-task accuracy: greedy replies to the held-out requests, graded by the skill's parser
    (exact format + the right call), and the format rate alone;
  - forgetting: held-out perplexity and the capability probes (the run's own final evaluation,
    the same one its gates use) and HumanEval pass@1 (greedy, the first `humaneval` tasks,
    run in the confined sandbox).
The base model is measured the same way once. An arm changes only the objective, the KL
direction and whether the gates are on (`ARMS`); everything else comes from the config.

Output directory:
    OUT/compare.json            the settings (a rerun with --resume must match them)
    OUT/data/train.jsonl, test.jsonl   the skill examples (one split for every cell)
    OUT/heldout.bin(.json)      the held-out perplexity set packed with the run's tokenizer
    OUT/base/result.json        the base model's measurements
    OUT/<arm>/seed<k>/run/      the SDFT run directory;  .../result.json  its measurements
    OUT/results.json            every cell, plus mean/sd per arm;  OUT/table.md  the table
    OUT/tradeoff.png            accuracy against perplexity rise and HumanEval pass@1
"""
from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jaxttt import config as C
from jaxttt import runs
from jaxttt.data.chat_prompts import chat_prompt_ids, use_chat
from jaxttt.errors import UserError
from jaxttt.sdft import skill_tool_call as skill
from jaxttt.sdft.data import Example

# arm -> config overrides (objective, KL direction, gates); the rest is the config's
ARMS: dict[str, tuple[str, ...]] = {
    "sft": ("objective=sft", "gate.enabled=false"),
    "sft-gated": ("objective=sft", "gate.enabled=true"),
    "sdft-rev": ("objective=sdft", "kl_direction=reverse", "gate.enabled=false"),
    "sdft-rev-gated": ("objective=sdft", "kl_direction=reverse", "gate.enabled=true"),
    "sdft-fwd": ("objective=sdft", "kl_direction=forward", "gate.enabled=false"),
    "sdft-fwd-gated": ("objective=sdft", "kl_direction=forward", "gate.enabled=true"),
}
METRICS = ("accuracy", "format", "perplexity", "ppl_rise", "probes", "humaneval", "accepted")
SETTINGS_FILE = "compare.json"
RESULT_FILE = "result.json"
HELDOUT_DOCS = 40  # default-corpus validation documents packed for held-out perplexity


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------
def prompt_ids(tok, text: str, max_len: int, chat: bool) -> list[int]:
    """A prompt as the SDFT student sees it (a chat user turn, or `[EOS] + text`)."""
    from jaxttt.eval.report import encode_prompt

    return chat_prompt_ids(tok, text, max_len) if chat else encode_prompt(tok, text, max_len)


def greedy_texts(model, tok, ids: Sequence[list[int]], max_new_tokens: int,
                 batch_size: int = 32) -> list[str]:
    """Greedy completions of the prompt ids, decoded and cut at EOS."""
    import jax

    from jaxttt.sampling import generate

    out: list[str] = []
    for i in range(0, len(ids), batch_size):
        res = generate(model, list(ids[i:i + batch_size]), jax.random.key(0),
                       max_new_tokens=max_new_tokens, greedy=True, eos_id=tok.eos_id,
                       pad_id=tok.pad_id)
        for c in res.completions():
            out.append(tok.decode(c[:c.index(tok.eos_id)] if tok.eos_id in c else c))
    return out


def skill_eval(model, tok, examples: Sequence[Example], *, chat: bool, max_prompt_len: int,
               max_new_tokens: int) -> dict[str, Any]:
    """Held-out new-task accuracy (and a few replies to read)."""
    ids = [prompt_ids(tok, ex.prompt, max_prompt_len, chat) for ex in examples]
    outs = greedy_texts(model, tok, ids, max_new_tokens)
    res = skill.score(outs, examples)
    res["samples"] = [skill.short(o) for o in outs[:4]]
    return res


def humaneval_eval(model, tok, n_tasks: int, *, chat: bool, max_new_tokens: int,
                   unsafe_local_exec: bool = False) -> dict[str, Any] | None:
    """Greedy pass@1 on the first `n_tasks` HumanEval tasks (confined sandbox); None if 0."""
    if n_tasks <= 0:
        return None
    from jaxttt.eval import codeeval, sandbox
    from jaxttt.eval.humaneval import load_humaneval

    tasks = dict(itertools.islice(load_humaneval().items(), n_tasks))
    room = model.cfg.max_seq_len - max_new_tokens
    if room < 8:
        raise UserError(f"humaneval max_new_tokens={max_new_tokens} leaves no room for a prompt "
                        f"in max_seq_len={model.cfg.max_seq_len}")
    ids = [_code_prompt(tok, t, chat)[-room:] for t in tasks.values()]
    texts = greedy_texts(model, tok, ids, max_new_tokens, batch_size=max(1, len(ids)))
    samples = [{"task_id": tid, "completion": codeeval.completion_from_output(t, text, chat)}
               for (tid, t), text in zip(tasks.items(), texts)]
    results = codeeval.evaluate_samples(tasks, samples, limits=sandbox.Limits(), workers=2,
                                        unsafe_local_exec=unsafe_local_exec, progress=False)
    s = codeeval.summarize(results, [1])
    return {"pass@1": s["pass@1"], "n_tasks": s["n_tasks"], "n_passed": s["n_passed"]}


def _code_prompt(tok, task, chat: bool) -> list[int]:
    from jaxttt.eval.codeeval import CHAT_INSTRUCTION

    if chat:
        return tok.chat_ids([{"role": "user", "content": CHAT_INSTRUCTION.format(prompt=task.prompt)}])
    return tok.prompt_ids(task.prompt)


def measure(model, tok, cfg: C.SDFTConfig, test: Sequence[Example], *, forgetting: dict,
            humaneval: int, he_tokens: int, skill_tokens: int, unsafe: bool) -> dict[str, Any]:
    """All measurements of one model; `forgetting` = its perplexity/probe evaluation."""
    chat = use_chat(tok, cfg.chat)
    t0 = time.monotonic()
    sk = skill_eval(model, tok, test, chat=chat, max_prompt_len=cfg.max_prompt_len,
                    max_new_tokens=skill_tokens)
    he = humaneval_eval(model, tok, humaneval, chat=chat, max_new_tokens=he_tokens,
                        unsafe_local_exec=unsafe)
    return {"accuracy": sk["accuracy"], "format": sk["format"], "skill": sk,
            "perplexity": forgetting["perplexity"], "probes": forgetting.get("probe/overall"),
            "humaneval": None if he is None else he["pass@1"], "humaneval_detail": he,
            "eval_s": round(time.monotonic() - t0, 1)}


# ---------------------------------------------------------------------------------------------
# Held-out perplexity set
# ---------------------------------------------------------------------------------------------
def pack_heldout(tok, path: Path, n_docs: int = HELDOUT_DOCS) -> Path:
    """The first `n_docs` validation documents of the embedded corpus, packed with `tok` (any
    tokenizer, Hugging Face included), each followed by EOS; + the `.json` meta."""
    from jaxttt.data import corpus
    from jaxttt.data.packing import meta_path, token_dtype

    if path.is_file() and meta_path(path).is_file():  # made by an earlier (or parallel) call
        return path
    docs = list(itertools.islice(corpus.iter_documents("default:val"), n_docs))
    dtype = token_dtype(tok.vocab_size)
    ids = np.concatenate([np.asarray(d + [tok.eos_id], dtype) for d in tok.encode_batch(docs)])
    meta = {"vocab_size": tok.vocab_size, "dtype": dtype.name, "n_tokens": int(ids.size),
            "n_docs": len(docs), "eos_id": tok.eos_id, "sources": [f"default:val (first {n_docs})"],
            "tokenizer": str(tok.path)}
    _atomic(path, ids.tobytes())
    _atomic(meta_path(path), (json.dumps(meta, indent=2) + "\n").encode())
    return path


def _atomic(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all (readers in a parallel --resume never see half a file)."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------
def _settings(ckpt, config, overrides, seeds, arms, n_train, n_test, data_seed, humaneval,
              he_tokens, skill_tokens) -> dict[str, Any]:
    return {"ckpt": str(ckpt), "config": str(config), "overrides": list(overrides),
            "seeds": list(seeds), "arms": list(arms), "n_train": n_train, "n_test": n_test,
            "data_seed": data_seed, "humaneval": humaneval, "humaneval_max_new_tokens": he_tokens,
            "skill_max_new_tokens": skill_tokens}


def _prepare_out(out: Path, settings: dict, resume: bool) -> Path:
    """A fresh OUT, or (resume) one whose compare.json has the same settings but seeds/arms."""
    path = out / SETTINGS_FILE
    if resume and path.is_file():
        old = json.loads(path.read_text())
        fixed = [k for k in settings if k not in ("seeds", "arms") and old.get(k) != settings[k]]
        if fixed:
            raise UserError(f"{path}: --resume with different settings ({', '.join(fixed)}); "
                            "use a new --out")
    else:
        out = runs.fresh_run_dir(out)
    _atomic(path, (json.dumps(settings, indent=2) + "\n").encode())
    return out


def _cell(out: Path, name: str, fn: Callable[[], dict], log: Callable[[str], None]) -> dict:
    """`fn()` written to OUT/name/result.json, or the result already there (resume)."""
    path = out / name / RESULT_FILE
    if path.is_file():
        log(f"{name}: done before, reusing {path}")
        return json.loads(path.read_text())
    t0 = time.monotonic()
    res = {**fn(), "wall_s": round(time.monotonic() - t0, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2, default=str) + "\n")
    log(f"{name}: accuracy {res['accuracy']:.3f} format {res['format']:.3f} ppl "
        f"{res['perplexity']:.3f} probes {res['probes']} humaneval {res['humaneval']} "
        f"({res['wall_s']:.0f} s)")
    return res


def compare(ckpt: str | Path, out_dir: str | Path, *, seeds: Sequence[int] = (0, 1, 2),
            arms: Sequence[str] = ("sft", "sdft-rev"), config: str = "sdft/skill_tool_call.yaml",
            overrides: Sequence[str] = (), n_train: int = 200, n_test: int = 30,
            data_seed: int = 0, humaneval: int = 10, he_tokens: int = 256,
            skill_tokens: int = 48, resume: bool = False, unsafe_local_exec: bool = False,
            progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the grid into `out_dir`; returns {"base", "cells", "arms" (mean/sd), "table"}."""
    from jaxttt.eval.report import evaluate_config, resolve_probes
    from jaxttt.sdft.loop import run_sdft

    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise UserError(f"unknown arm {bad[0]!r} (known: {', '.join(ARMS)})")
    cfg0 = C.load(C.SDFTConfig, config, list(overrides))  # bad config: one line, nothing written
    cfg0.validate()
    settings = _settings(ckpt, config, overrides, seeds, arms, n_train, n_test, data_seed,
                         humaneval, he_tokens, skill_tokens)
    out = _prepare_out(Path(out_dir).absolute(), settings, resume)
    train, test = skill.make_split(data_seed, n_train, n_test)
    (out / "data").mkdir(exist_ok=True)
    for name, exs in (("train", train), ("test", test)):
        text = "".join(json.dumps(e.to_dict(), ensure_ascii=False) + "\n" for e in exs)
        _atomic(out / "data" / f"{name}.jsonl", text.encode())

    model, tok, _ = runs.load_run(ckpt)
    heldout = cfg0.eval.heldout or str(pack_heldout(tok, out / "heldout.bin"))
    common = [*overrides, f"eval.heldout={heldout}"]
    kw = dict(humaneval=humaneval, he_tokens=he_tokens, skill_tokens=skill_tokens,
              unsafe=unsafe_local_exec)

    def base() -> dict:
        cfg = C.load(C.SDFTConfig, config, common)
        ev = evaluate_config(model, tok, cfg.eval, probes=resolve_probes(cfg.eval.probes))
        return {**measure(model, tok, cfg, test, forgetting=ev, **kw), "accepted": None}

    base_res = _cell(out, "base", base, log)
    del model
    cells = []
    for seed, arm in itertools.product(seeds, arms):
        def one(arm=arm, seed=seed) -> dict:
            cfg = C.load(C.SDFTConfig, config, [*common, *ARMS[arm], f"seed={seed}"])
            run_dir = out / arm / f"seed{seed}" / "run"
            s = run_sdft(ckpt, out / "data" / "train.jsonl", run_dir, cfg, progress=progress)
            m, t, _ = runs.load_run(run_dir)
            res = measure(m, t, cfg, test, forgetting=s["eval_final"], **kw)
            return {**res, "accepted": s["accepted"], "blocks": s["blocks"], "steps": s["steps"]}

        res = _cell(out, f"{arm}/seed{seed}", one, log)
        cells.append({"arm": arm, "seed": seed, **res})
    return finish(out, base_res, cells, arms)


# ---------------------------------------------------------------------------------------------
# Table and plot
# ---------------------------------------------------------------------------------------------
def mean_sd(values: Sequence[float | None]) -> tuple[float, float, int] | None:
    """(mean, sample sd (0 for one value), n) of the non-missing values; None if none."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0, len(xs)


def aggregate(base: dict, cells: Sequence[dict], arms: Sequence[str]) -> dict[str, dict]:
    """Per arm: mean/sd over seeds of every metric; ppl_rise = relative rise over the base."""
    agg = {}
    for arm in arms:
        rows = [c for c in cells if c["arm"] == arm]
        if not rows:
            continue
        vals = {m: [c.get(m) for c in rows] for m in METRICS if m != "ppl_rise"}
        vals["ppl_rise"] = [c["perplexity"] / base["perplexity"] - 1.0 for c in rows]
        agg[arm] = {m: mean_sd(v) for m, v in vals.items()}
        agg[arm]["seeds"] = [c["seed"] for c in rows]
    return agg


def _fmt(ms, pct: bool = False, digits: int = 3) -> str:
    if ms is None:
        return "–"
    m, s, _ = ms
    k = 100.0 if pct else 1.0
    return f"{m * k:.{1 if pct else digits}f} ± {s * k:.{1 if pct else digits}f}"


def table(base: dict, agg: dict[str, dict], blocks: int | None) -> str:
    """Markdown: one row for the base model, one per arm (mean ± sd over seeds)."""
    head = ("| arm | seeds | new-task accuracy | format | held-out ppl | ppl rise % | "
            "probes | HumanEval pass@1 | blocks accepted |")
    lines = [head, "|" + "---|" * 9]
    fmt1 = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    lines.append(f"| base | – | {fmt1(base['accuracy'])} | {fmt1(base['format'])} | "
                 f"{base['perplexity']:.3f} | 0 | {fmt1(base['probes'])} | "
                 f"{fmt1(base['humaneval'])} | – |")
    for arm, a in agg.items():
        acc = a["accepted"]
        acc_s = "–" if acc is None else f"{acc[0]:.1f} / {blocks}"
        lines.append(f"| {arm} | {len(a['seeds'])} | {_fmt(a['accuracy'])} | {_fmt(a['format'])} | "
                     f"{_fmt(a['perplexity'])} | {_fmt(a['ppl_rise'], pct=True)} | "
                     f"{_fmt(a['probes'])} | {_fmt(a['humaneval'])} | {acc_s} |")
    return "\n".join(lines) + "\n"


def plot(base: dict, agg: dict[str, dict], path: Path) -> Path:
    """Accuracy (x) against the held-out perplexity rise and HumanEval pass@1 (y), mean ± sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxttt.eval.plots import save

    panels = [("ppl_rise", "held-out perplexity rise (%)", 100.0),
              ("humaneval", "HumanEval pass@1 (greedy)", 1.0),
              ("probes", "capability probes passed (fraction)", 1.0)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (key, label, k) in zip(axes, panels):
        b = 0.0 if key == "ppl_rise" else base.get(key)
        if b is not None:
            ax.scatter([base["accuracy"] * 100], [b * k], marker="*", s=120, color="k", label="base")
        for i, (arm, a) in enumerate(agg.items()):
            if a["accuracy"] is None or a[key] is None:
                continue
            (xm, xs, _), (ym, ys, _) = a["accuracy"], a[key]
            ax.errorbar([xm * 100], [ym * k], xerr=[xs * 100], yerr=[ys * k], fmt="o",
                        capsize=3, color=f"C{i}", label=arm)
        ax.set_xlabel("new-task accuracy on held-out requests (%)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("SDFT vs SFT: tool-call skill against forgetting (mean ± sd over seeds)",
                 fontsize=10)
    return save(fig, path)


def report(out_dir: str | Path) -> dict[str, Any]:
    """Table, results.json and plot from the cells finished so far in `out_dir` (any arms and
    seeds, e.g. cells run by several parallel `--resume` processes)."""
    out = Path(out_dir)
    base_path = out / "base" / RESULT_FILE
    if not base_path.is_file():
        raise UserError(f"{out}: no {base_path.relative_to(out)} (not an sdft-compare output, "
                        "or its base model is not measured yet)")
    cells = []
    for arm in ARMS:
        paths = sorted((out / arm).glob(f"seed*/{RESULT_FILE}"),
                       key=lambda p: int(p.parent.name[len("seed"):]))
        cells += [{"arm": arm, "seed": int(p.parent.name[len("seed"):]),
                   **json.loads(p.read_text())} for p in paths]
    arms = [a for a in ARMS if any(c["arm"] == a for c in cells)]
    return finish(out, json.loads(base_path.read_text()), cells, arms)


def finish(out: Path, base: dict, cells: Sequence[dict], arms: Sequence[str]) -> dict[str, Any]:
    agg = aggregate(base, cells, arms)
    blocks = next((c.get("blocks") for c in cells if c.get("blocks")), None)
    md = table(base, agg, blocks)
    (out / "table.md").write_text(md)
    result = {"base": base, "cells": list(cells), "arms": agg, "table": md}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    if agg:
        plot(base, agg, out / "tradeoff.png")
    return result
