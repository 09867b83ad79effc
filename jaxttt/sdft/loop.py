"""Gated continual SDFT (handoff Phases 7-8, K3, I2; blueprint runs/continual convention).

`run_sdft` trains in blocks. Per block: evaluate (held-out perplexity + capability probes) ->
`steps_per_block` SDFT updates with replay -> evaluate -> gate against the block's own
before-eval (`gate.reference=block`, the handoff's rule) or against the session's first eval
(`session`: small per-block regressions cannot add up). A rejected block is reverted
to the pre-block student, teacher, optimiser state and replay buffer, bit for bit (copies kept
in memory); an accepted block is saved as an orbax checkpoint. The output directory:

    OUT/config.yaml                 the SDFTConfig
    OUT/model.yaml                  the ModelConfig (OUT is a run `load_model` accepts)
    OUT/checkpoints/<step>/         step 0 = the starting weights, then every accepted block;
                                    meta: tokenizer, replay buffer, gate history, source run
    OUT/block_000/eval_before.json  evaluation before the block
    OUT/block_000/eval_after.json   evaluation after it
    OUT/block_000/gate_decision.json accept/reject, reasons, deltas
    OUT/metrics.jsonl               one line per update (I2) and one per gate decision
    OUT/summary.json                the returned summary

A LoRA student (`cfg.lora`) trains adapters only; its checkpoints hold the merged weights,
so every checkpoint is a plain model. The replay buffer starts from the source run's saved
buffer (when it has one) plus `replay_sources`, so a chain of SDFT sessions keeps replaying.

Multi-process (`launch/local.py`, `launch/tpu.py`: the same program on every process): the
example stream, replay buffer and sampling keys are seeded identically, so every process builds
the same global batch; the rollouts are sampled under the mesh (rows over its batch axes when
they divide the batch) and the trainer places each process's rows. Checkpoints are written by
every process (orbax); everything else in OUT by process 0 only.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from jaxttt import config as C
from jaxttt import runs
from jaxttt.data.chat_prompts import use_chat
from jaxttt.eval.gates import PPL_KEY, decide, write_decision
from jaxttt.eval.report import evaluate_config, resolve_probes
from jaxttt.model.lora import add_lora
from jaxttt.sdft.data import Example, load_jsonl
from jaxttt.sdft.replay import ReplayBuffer
from jaxttt.sdft.step import SDFTTrainer
from jaxttt.sharding import make_mesh
from jaxttt.train.checkpoint import Checkpointer, save_model_config

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
class ExampleStream:
    """Endless seeded stream over the examples: a fresh permutation every epoch."""

    def __init__(self, examples: Sequence[Example], seed: int):
        if not examples:
            raise ValueError("no SDFT examples to train on")
        self.examples = list(examples)
        self._rng = np.random.default_rng(seed)
        self._order: list[int] = []

    def take(self, n: int) -> list[Example]:
        out = []
        while len(out) < n:
            if not self._order:
                self._order = self._rng.permutation(len(self.examples)).tolist()
            out.append(self.examples[self._order.pop()])
        return out


def make_replay(cfg: C.SDFTConfig, meta: dict, sources: Sequence[str | Path] = ()) -> ReplayBuffer:
    """Buffer seeded from the source run's saved buffer (if any) and from JSONL `sources`."""
    buf = ReplayBuffer(capacity=cfg.replay_size, seed=cfg.seed)
    saved = meta.get("replay") or {}
    buf.add([Example.from_dict(d) for d in saved.get("items", [])])
    for src in sources or ():
        buf.add(load_jsonl(src)[0])
    return buf


def next_batch(stream: ExampleStream, buf: ReplayBuffer, n: int, ratio: float):
    """Mix n new examples with replay, then remember the new ones. -> (examples, replay fraction)."""
    new = stream.take(n)
    mixed = buf.mix(new, ratio)
    buf.add(new)
    return mixed.examples, mixed.n_replay / n


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def is_main() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process gets here (nothing to wait for in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"jaxttt:{name}")


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as JSON (process 0 only: the other processes hold the same values)."""
    if not is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
class _Run:
    """State of one `run_sdft` call (kept small: the trainer holds the arrays)."""

    def __init__(self, out: Path, cfg: C.SDFTConfig, trainer: SDFTTrainer, tok,
                 eval_fn: Callable[[], dict], source_meta: dict, ckpt_src: str):
        self.out, self.cfg, self.trainer, self.tok, self.eval_fn = out, cfg, trainer, tok, eval_fn
        self.source, self.ckpt_src = source_meta, ckpt_src
        if is_main():
            C.save_yaml(cfg, out / "config.yaml")
            save_model_config(out, trainer.model_cfg)
        self.ckpt = Checkpointer(out, keep=cfg.keep)
        self.log = runs.JsonlWriter(out / METRICS_FILE) if is_main() else None
        self.gates: list[dict] = []

    def write(self, record: dict) -> None:
        """One metrics.jsonl line (process 0 only)."""
        if self.log is not None:
            self.log.write(record)

    def save(self, buf: ReplayBuffer, block: int) -> None:
        meta = {"tokenizer": str(self.tok.path), "kind": "sdft", "objective": self.cfg.objective,
                "block": block, "source": self.ckpt_src, "source_step": self.source.get("step"),
                "replay": buf.state_dict(), "gates": list(self.gates)}
        self.ckpt.save(self.trainer.n_steps, self.trainer.effective_params(), meta=meta, force=True)

    def close(self) -> None:
        self.ckpt.close()
        if self.log is not None:
            self.log.close()


def _block_dir(out: Path, block: int) -> Path:
    return out / f"block_{block:03d}"


def _train_block(run: _Run, stream: ExampleStream, buf: ReplayBuffer, block: int,
                 key: jax.Array, bar: tqdm) -> list[dict]:
    """`steps_per_block` updates; returns their metric records (also logged)."""
    cfg, records = run.cfg, []
    n = cfg.batch_size * cfg.grad_accum
    for _ in range(cfg.steps_per_block):
        examples, replay = next_batch(stream, buf, n, cfg.replay_ratio)
        t0 = time.perf_counter()
        m = run.trainer.step(examples, jax.random.fold_in(key, run.trainer.n_steps))
        rec = {"step": run.trainer.n_steps, "block": block, **m, "replay": replay,
               "time_s": round(time.perf_counter() - t0, 4)}
        run.write(rec)
        records.append(rec)
        bar.update(1)
        bar.set_postfix_str(_postfix(rec, run.gates), refresh=False)
    return records


def _postfix(rec: dict, gates: list[dict]) -> str:
    obj = f"kl={rec['kl']:.4f}" if "kl" in rec else f"nll={rec['nll']:.3f}"
    marks = "".join("A" if g["accepted"] else "R" for g in gates[-8:])
    return f"{obj} gates={marks or '-'}"


def _gate(run: _Run, block: int, before: dict, after: dict, records: list[dict]) -> bool:
    """Decide (`before` = the reference eval), write gate_decision.json and the metrics line."""
    d = decide(before, after, run.cfg.gate)
    kls = [r.get("kl", r.get("nll")) for r in records]
    info = {"block": block, "step": run.trainer.n_steps, "mean_objective": float(np.mean(kls)),
            "reference": run.cfg.gate.reference,
            f"{PPL_KEY}_before": before[PPL_KEY], f"{PPL_KEY}_after": after[PPL_KEY]}
    if is_main():
        write_decision(_block_dir(run.out, block), d, **info)
    entry = {**info, "accepted": d.accepted, "reasons": d.reasons}
    run.gates.append(entry)
    run.write({"step": run.trainer.n_steps, "block": block,
               "gate": "accepted" if d.accepted else "rejected", "reasons": d.reasons})
    return d.accepted


def run_blocks(run: _Run, stream: ExampleStream, buf: ReplayBuffer, *, progress: bool) -> dict:
    cfg = run.cfg
    key = jax.random.key(cfg.seed)
    before = run.eval_fn()
    initial = before
    bar = tqdm(total=cfg.blocks * cfg.steps_per_block, desc="sdft", unit="step",
               disable=not (progress and is_main()))
    with bar:
        for block in range(cfg.blocks):
            bdir = _block_dir(run.out, block)
            write_json(bdir / "eval_before.json", before)
            snap, buf_state = run.trainer.snapshot(), buf.state_dict()
            records = _train_block(run, stream, buf, block, key, bar)
            after = run.eval_fn()
            write_json(bdir / "eval_after.json", after)
            ref = initial if cfg.gate.reference == "session" else before
            if _gate(run, block, ref, after, records):
                run.save(buf, block)
                before = after
            else:  # revert: weights, teacher, optimiser and replay buffer as before the block
                run.trainer.restore(snap)
                buf.load_state_dict(buf_state)
            bar.set_postfix_str(_postfix(records[-1], run.gates))
    accepted = sum(g["accepted"] for g in run.gates)
    return {"out_dir": str(run.out), "steps": run.trainer.n_steps, "blocks": cfg.blocks,
            "accepted": accepted, "rejected": cfg.blocks - accepted, "gates": run.gates,
            "eval_initial": initial, "eval_final": before,
            "checkpoint_step": run.ckpt.latest_step()}


def run_sdft(ckpt: str | Path, data_path: str | Path, out_dir: str | Path, cfg: C.SDFTConfig, *,
             replay_sources: Sequence[str | Path] | None = None,
             tokenizer: str | Path | None = None, skip_bad: bool = False, mesh=None,
             keep_files: Sequence[str] = (), progress: bool = True) -> dict:
    """Gated SDFT of the model in run `ckpt` on the examples of `data_path`, into `out_dir`.

    `keep_files`: names already in `out_dir` that belong to this run (e.g. the dataset
    `consolidate` wrote there). Returns the summary (also written to OUT/summary.json).
    """
    cfg.validate()
    examples, n_bad = load_jsonl(data_path, skip_bad=skip_bad)
    out = runs.fresh_run_dir(out_dir, keep=keep_files)
    barrier("run_dir")  # every process has checked it before process 0 writes into it
    stream = ExampleStream(examples, cfg.seed)
    probes = resolve_probes(cfg.eval.probes)
    mesh = mesh or make_mesh(cfg.mesh)
    model, tok, meta = runs.load_run(ckpt, mesh=mesh, tokenizer=tokenizer)
    use_chat(tok, cfg.chat)  # chat=on without a chat template: one clear line before training
    if cfg.lora is not None:
        add_lora(model, cfg.lora, seed=cfg.seed, mesh=mesh)
    buf = make_replay(cfg, meta, replay_sources or ())
    trainer = SDFTTrainer(model, tok, cfg, mesh)
    del model  # the trainer owns (and donates) its buffers now

    def eval_fn() -> dict:
        return evaluate_config(trainer.model(), tok, cfg.eval, probes=probes, mesh=mesh)

    run = _Run(out, cfg, trainer, tok, eval_fn, meta, str(Path(ckpt).absolute()))
    try:
        run.save(buf, block=-1)  # step 0: the known-good starting point
        summary = run_blocks(run, stream, buf, progress=progress)
    finally:
        run.close()
    summary.update(data=str(data_path), n_examples=len(examples), n_skipped=n_bad,
                   replay_size=len(buf), tokenizer=str(tok.path), objective=cfg.objective)
    write_json(out / SUMMARY_FILE, summary)
    return summary

