"""Evaluation reports (handoff Phase 12): held-out perplexity + capability probes -> one dict.

The same `evaluate` runs before and after every SDFT block (its flat `perplexity` and
`probe/*` keys are what `eval.gates.decide` compares) and behind `jaxttt eval`.

Prompts are encoded as `[EOS] + tokens`: the packed corpus separates documents with EOS
(packing.py adds no BOS), so EOS is the start-of-document context the model was trained on,
and every context is non-empty (the SDFT alignment needs C >= 1).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax

from jaxttt.config import CONFIGS_DIR, EvalConfig
from jaxttt.data.tokenizer import Tokenizer
from jaxttt.eval.gates import PPL_KEY
from jaxttt.eval.perplexity import perplexity
from jaxttt.eval.probes import Probe, load_probes, probe_metrics, score_probes
from jaxttt.sharding import batch_shards

def encode_prompt(tokenizer: Tokenizer, text: str, max_len: int | None = None) -> list[int]:
    """`[EOS] + encode(text)`, left-truncated to the last `max_len` tokens (the start marker kept)."""
    ids = tokenizer.encode(text)
    if max_len is not None and len(ids) + 1 > max_len:
        ids = ids[len(ids) + 1 - max_len:]
    return [tokenizer.eos_id] + ids


def default_heldout(tokenizer: Tokenizer, *, cache: Path | str | None = None) -> Path:
    """The default corpus's val split packed with `tokenizer` (built once, cached by its sha).

    `cache` defaults to $JAXTTT_CACHE/data (else ~/.cache/jaxttt/data), where pretraining
    builds the default corpus. If `ensure_default_data` already built that split with this
    very tokenizer, its val.bin is reused; otherwise the val documents are packed with
    `tokenizer` (no tokenizer is trained).
    """
    from jaxttt.data import corpus
    from jaxttt.data.packing import _locked, default_data_dir, pack, read_meta
    from jaxttt.runs import cache_root

    cache = Path(cache) if cache is not None else cache_root() / "data"  # as pretraining's
    max_bytes = corpus.DEFAULT_MAX_BYTES
    default_val = default_data_dir(cache, tokenizer.vocab_size, max_bytes) / "val.bin"
    out = cache / f"heldout-{tokenizer.sha256[:16]}" / "val.bin"
    for path in (default_val, out):
        if _packed_with(path, tokenizer, read_meta):
            return path
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out.parent / ".lock"):
        if not _packed_with(out, tokenizer, read_meta):
            pack(tokenizer.path, [f"default:val:{max_bytes}"], out, progress=False)
    return out


def _packed_with(path: Path, tokenizer: Tokenizer, read_meta) -> bool:
    try:
        return path.is_file() and read_meta(path).get("tokenizer_sha256") == tokenizer.sha256
    except (FileNotFoundError, ValueError):
        return False


def resolve_probes(spec: str | Path | Sequence[Probe] | None) -> list[Probe]:
    """Probes from a YAML path (as given, or relative to configs/), a list, or None (= none)."""
    if spec is None or spec == "":
        return []
    if not isinstance(spec, (str, Path)):
        return list(spec)
    path = Path(spec)
    if not path.is_file() and (CONFIGS_DIR / path).is_file():
        path = CONFIGS_DIR / path
    if not path.is_file():
        raise FileNotFoundError(f"probe file not found: {spec} (also looked in {CONFIGS_DIR})")
    return load_probes(path)


def greedy_completions(model, tokenizer: Tokenizer, prompts: Sequence[str], *,
                       max_new_tokens: int, max_prompt_len: int | None = None) -> list[str]:
    """Greedy continuations of `prompts` (one compiled call), decoded and cut at EOS."""
    from jaxttt.sampling import generate

    ids = [encode_prompt(tokenizer, p, max_prompt_len) for p in prompts]
    out = generate(model, ids, jax.random.key(0), max_new_tokens=max_new_tokens, greedy=True,
                   eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    return [tokenizer.decode(_strip_eos(c, tokenizer.eos_id)) for c in out.completions()]


def _strip_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


def _batch_mesh(mesh, heldout: Path, seq_len: int, batch_size: int, max_windows: int):
    """`mesh` when the eval batches split evenly over its batch axes, else None (unsharded)."""
    from jaxttt.data.loader import WindowSource

    if mesh is None:
        return None
    rows = min(batch_size, len(WindowSource(heldout, seq_len)), max_windows)
    return mesh if rows % batch_shards(mesh) == 0 else None


def evaluate_config(model, tokenizer: Tokenizer, cfg: EvalConfig, *,
                    probes: Sequence[Probe] | None = None, mesh=None) -> dict[str, Any]:
    """`evaluate` with the settings of one EvalConfig (`probes`: already loaded ones)."""
    return evaluate(model, tokenizer, heldout_bin=cfg.heldout or None, seq_len=cfg.seq_len,
                    probes=cfg.probes or None if probes is None else probes,
                    max_windows=cfg.windows, batch_size=cfg.batch_size,
                    max_new_tokens=cfg.max_new_tokens, mesh=mesh)


def evaluate(model, tokenizer: Tokenizer, *, heldout_bin: str | Path | None = None,
             seq_len: int = 128, probes: str | Path | Sequence[Probe] | None = None,
             extra: Mapping[str, Any] | None = None, max_windows: int = 32, batch_size: int = 8,
             max_new_tokens: int = 24, mesh=None) -> dict[str, Any]:
    """Perplexity on a fixed held-out packed set, plus greedy probe scores.

    Returns a flat dict: `perplexity`, `loss`, `tokens`, `heldout`, `probe/overall` and
    `probe/<name>` (0/1) when probes are given, `probe_completions` (name -> text), and the
    entries of `extra`. `heldout_bin=None` uses `default_heldout(tokenizer)`.
    """
    heldout = Path(heldout_bin) if heldout_bin else default_heldout(tokenizer)
    ppl = perplexity(model, heldout, seq_len=seq_len, batch_size=batch_size,
                     max_windows=max_windows,
                     mesh=_batch_mesh(mesh, heldout, seq_len, batch_size, max_windows))
    report: dict[str, Any] = {PPL_KEY: ppl["perplexity"], "loss": ppl["loss"],
                              "tokens": ppl["tokens"], "heldout": str(heldout),
                              "seq_len": seq_len}
    probe_list = resolve_probes(probes)
    if probe_list:
        scores = score_probes(probe_list, lambda ps: greedy_completions(
            model, tokenizer, ps, max_new_tokens=max_new_tokens))
        report.update(probe_metrics(scores))
        report["probe_completions"] = scores["completions"]
    report.update(extra or {})
    if not math.isfinite(report[PPL_KEY]):
        report["warning"] = "held-out perplexity is not finite"
    return report
