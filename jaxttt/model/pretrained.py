"""`jaxttt convert`: a pretrained checkpoint -> an ordinary run directory.

    RUN/model.yaml                 the ModelConfig (mhc.mode=none, or mHC with --mhc-streams)
    RUN/checkpoints/0/             orbax params + meta {"step": 0, "tokenizer": ..., "source"}
    RUN/tokenizer/tokenizer.json   the checkpoint's tokenizer (+ tokenizer_config.json with
                                   BOS/EOS/PAD and the chat template)
    RUN/convert.json               provenance: source, seconds, peak host memory

so `load_model`, `load_run`, the sampler and every `--ckpt`/`--run` option accept it. Sources:
`hf:DIR`, `gguf:FILE`, or a name in jaxttt.model.named.NAMED (fetched once into the cache).
"""
from __future__ import annotations

import dataclasses
import json
import resource
import shutil
import time
from pathlib import Path

import jax

from jaxttt.config import MeshConfig, MHCConfig, ModelConfig
from jaxttt.model import named
from jaxttt.model.convert import ConvertError, GGUFSource, HFSource, load_params, open_source

TOKENIZER_DIR = "tokenizer"


def source_spec(src: str, *, download: bool = True) -> str:
    """`hf:DIR` / `gguf:FILE` as given; a named model resolved to its cached file."""
    if src in named.NAMED:
        from jaxttt.runs import cache_root
        return named.fetch(src, cache_root(), download=download)
    return src


def convert_to_run(src: str, out: str | Path, *, mhc_streams: int = 0, mhc_mode: str = "mhc",
                   mesh=None) -> Path:
    """Convert `src` into the new run directory `out` (refused if it holds anything)."""
    from jaxttt.runs import fresh_run_dir

    t0 = time.time()
    source = open_source(source_spec(src))
    cfg = source.model_config()
    if mhc_streams:
        if mhc_streams < 2:
            raise ConvertError(f"--mhc-streams {mhc_streams}: expected at least 2 streams")
        cfg = dataclasses.replace(cfg, mhc=MHCConfig(mode=mhc_mode, n_streams=mhc_streams))
    cfg.validate()
    out = fresh_run_dir(out)
    try:
        _write_run(out, cfg, source, src, mesh, t0)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # it was empty: nothing of the user's is lost
        raise
    return out


def _write_run(out: Path, cfg: ModelConfig, source, src: str, mesh, t0: float) -> None:
    from jaxttt.data.tokenizer import load_tokenizer
    from jaxttt.train.checkpoint import Checkpointer, save_model_config

    tok_file = write_source_tokenizer(source, out / TOKENIZER_DIR)
    tok = load_tokenizer(tok_file)  # checks BOS/EOS/PAD against the vocabulary
    if tok.vocab_size > cfg.vocab_size:
        raise ConvertError(f"{source.label}: tokenizer has {tok.vocab_size} tokens but the model's "
                           f"vocab_size is {cfg.vocab_size}")
    mesh = mesh or conversion_mesh()
    _, params, _ = load_params(cfg, source, mesh)
    save_model_config(out, cfg)
    ckpt = Checkpointer(out, keep=1, async_save=False)
    try:
        ckpt.save(0, params, meta={"tokenizer": str(tok_file.relative_to(out)), "source": src},
                  force=True)
    finally:
        ckpt.close()
    prov = {"source": src, "resolved": source.label, "seconds": round(time.time() - t0, 1),
            "peak_host_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "mhc": dataclasses.asdict(cfg.mhc)}
    (out / "convert.json").write_text(json.dumps(prov, indent=1) + "\n")


def conversion_mesh():
    """Every local device on the fsdp axis: each holds 1/n of every large parameter."""
    from jaxttt.sharding import make_mesh
    return make_mesh(MeshConfig(data=1, fsdp=jax.device_count(), tensor=1))


def write_source_tokenizer(source, directory: Path) -> Path:
    """The source's tokenizer as RUN/tokenizer/{tokenizer.json, tokenizer_config.json}."""
    from jaxttt.data import hf_tokenizer as H

    if isinstance(source, GGUFSource):
        fields = {k: f.contents() for k, f in source.reader.fields.items()
                  if k.startswith("tokenizer.")}
        tok, cfg = H.gguf_tokenizer(fields, str(source.path))
        return H.write_tokenizer(directory, tok, cfg)
    assert isinstance(source, HFSource)
    tj = source.dir / H.TOKENIZER_JSON
    if not tj.is_file():
        raise ConvertError(f"{tj}: not found (the converter reads Hugging Face fast tokenizers; "
                           "save one with transformers' tokenizer.save_pretrained)")
    cfg = H.hf_tokenizer_config(source.dir, source.config_json)
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tj, directory / H.TOKENIZER_JSON)
    (directory / H.TOKENIZER_CONFIG).write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    return directory / H.TOKENIZER_JSON


def named_run_dir(name: str) -> Path:
    from jaxttt.runs import cache_root
    return cache_root() / "runs" / name


def ensure_named_run(name: str) -> Path:
    """The converted run of named model `name` under the cache root, converting it once."""
    if name not in named.NAMED:
        raise ConvertError(f"unknown model {name!r}; named models: {', '.join(named.NAMED)}")
    out = named_run_dir(name)
    if (out / "model.yaml").is_file():
        return out
    return convert_to_run(name, out)
