"""`jaxttt depth-study`: mHC vs HC vs plain residual with depth (jaxttt.train.depth_study)."""
from __future__ import annotations

import argparse

DEFAULT_CONFIG = "pretrain/depth_8.yaml"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "depth-study", help="mHC vs HC vs plain residual on a deep narrow model (loss, "
                            "grad-norm spikes, H_res drift)",
        description="Pretrain the same model once per residual mode and seed (identical data, "
                    "schedule and learning rate), then write study.json, table.md (mean ± sd "
                    "over seeds) and plots into --out. Rerunning with the same --out resumes "
                    "unfinished runs and re-measures finished ones.")
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help=f"pretraining YAML (default configs/{DEFAULT_CONFIG})")
    p.add_argument("--layers", type=int, default=None, help="model.n_layers (default: the config's)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run "
                                                           "(default: the config's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--modes", nargs="+", default=["mhc", "hc", "none"],
                   choices=["mhc", "hc", "none"], help="residual modes (model.mhc.mode)")
    p.add_argument("--out", default="", help="study directory (default runs/depth-study-<time>)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides for every run, e.g. optim.lr=3e-3 data.batch_size=16")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jaxttt.errors import UserError
    from jaxttt.runs import run_name
    from jaxttt.train.depth_study import Study, run_study

    for flag, value in (("--layers", args.layers), ("--steps", args.steps)):
        if value is not None and value < 1:
            raise UserError(f"{flag}: expected a positive integer, got {value}")
    if len(set(args.seeds)) != len(args.seeds) or len(set(args.modes)) != len(args.modes):
        raise UserError("--seeds/--modes: each value once, got "
                        f"seeds {args.seeds} and modes {args.modes}")
    extra = [f"model.n_layers={args.layers}"] * (args.layers is not None) + \
        [f"steps={args.steps}"] * (args.steps is not None)
    study = Study(config=args.config, out=Path(args.out or run_name("depth-study")),
                  modes=tuple(args.modes), seeds=tuple(args.seeds),
                  overrides=tuple(args.overrides) + tuple(extra))
    summary = run_study(study)
    if summary is None:  # preempted: the runs saved their state
        return 0
    print((study.out / "table.md").read_text(), end="")
    print(f"depth study: {len(summary['runs'])} runs; table, study.json and plots in {study.out}")
    return 0
