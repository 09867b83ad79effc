"""`jaxttt pretrain` and `jaxttt sample`: thin argparse wrappers over the library."""
from __future__ import annotations

import argparse

from jaxttt.config import SamplingConfig

_SAMPLING = SamplingConfig()


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `pretrain` and `sample` to the `jaxttt` parser."""
    p = subparsers.add_parser(
        "pretrain", help="pretrain the mHC decoder (handoff Phase 5-6)",
        description="Train, or resume the run in run_dir from its latest checkpoint. SIGTERM "
                    "saves at the end of the current step and exits with status 0.")
    p.add_argument("--config", default=None, help="YAML, e.g. configs/pretrain/tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. steps=100 model.mhc.mode=none")
    p.set_defaults(func=_pretrain)

    s = subparsers.add_parser("sample", help="sample continuations from a run's checkpoint")
    s.add_argument("--run", required=True, help="run directory (or one of its checkpoints)")
    s.add_argument("--prompt", required=True, help="text to continue (may be empty)")
    s.add_argument("--max-new-tokens", type=int, default=_SAMPLING.max_new_tokens)
    s.add_argument("--temperature", type=float, default=_SAMPLING.temperature)
    s.add_argument("--top-p", type=float, default=_SAMPLING.top_p)
    s.add_argument("--top-k", type=int, default=_SAMPLING.top_k, help="0 = off")
    s.add_argument("--greedy", action="store_true", help="argmax decoding")
    s.add_argument("--num-samples", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    s.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the model's chat template")
    s.set_defaults(func=_sample)


def _pretrain(args: argparse.Namespace) -> int:
    from jaxttt import config as C
    from jaxttt.errors import UserError
    from jaxttt.runs import config_for_resume
    from jaxttt.train.loop import NonFiniteLossError, pretrain

    cfg = config_for_resume(C.load(C.PretrainConfig, args.config, args.overrides), args.config)
    try:
        run_dir = pretrain(cfg)
    except NonFiniteLossError as e:  # names the step and the last good checkpoint
        raise UserError(str(e)) from None
    print(f"run directory: {run_dir}", flush=True)
    return 0


def _sample(args: argparse.Namespace) -> int:
    import jax

    from jaxttt import config as C
    from jaxttt.errors import UserError
    from jaxttt.runs import load_run
    from jaxttt.sampling import generate

    names = ("max_new_tokens", "temperature", "top_p", "top_k", "greedy")
    sc = C.load(C.SamplingConfig, None, [f"{k}={getattr(args, k)}" for k in names])  # ranges
    if args.num_samples < 1:
        raise UserError(f"--num-samples: expected a positive integer, got {args.num_samples}")
    model, tok, meta = load_run(args.run, step=args.step)
    if args.chat:  # an instruct model: the checkpoint's own template; print the answer only
        prompt = tok.chat_ids([{"role": "user", "content": args.prompt}])
    else:  # the document start the model was trained with (EOS here, BOS for most checkpoints)
        prompt = tok.prompt_ids(args.prompt)
    out = generate(model, [prompt] * args.num_samples, jax.random.key(args.seed),
                   max_new_tokens=sc.max_new_tokens, temperature=sc.temperature,
                   top_p=sc.top_p, top_k=sc.top_k, greedy=sc.greedy,
                   eos_id=tok.eos_id, pad_id=tok.pad_id)
    for i, ids in enumerate(out.completions()):
        print(f"--- sample {i + 1} (step {meta['step']}) ---")
        print(tok.decode(ids if args.chat else prompt + ids))
    return 0
