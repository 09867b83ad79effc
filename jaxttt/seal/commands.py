"""`jaxttt serve-ttt`, `jaxttt seal-query` and `jaxttt seal-bench`: thin wrappers."""
from __future__ import annotations

import argparse
import json
import os
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve-ttt", help="SEAL's test-time-training server (ZMQ, SEAL's JSON format)",
        description="Load a model once; per request: baseline eval, LoRA fine-tune on the "
                    "request's sequences, adapted eval, then back to the pristine base. "
                    "Stop with {\"cmd\": \"shutdown\"} (or SIGINT/SIGTERM).")
    p.add_argument("--ckpt", required=True,
                   help="run directory, converted model, or a named model "
                        "(smollm2-135m-instruct)")
    _server_args(p)
    p.add_argument("--port", type=int, default=5555, help="0 = any free port (printed)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (* = all)")
    p.add_argument("--log", default=None, help="JSONL log of requests (default: none)")
    p.set_defaults(func=_serve)

    q = subparsers.add_parser("seal-query", help="send one request file to a TTT server")
    q.add_argument("request", nargs="?", default=None, help="JSON request file (- = stdin)")
    q.add_argument("--shutdown", action="store_true", help="ask the server to exit")
    q.add_argument("--port", type=int, default=5555)
    q.add_argument("--host", default="127.0.0.1")
    q.add_argument("--timeout", type=float, default=600.0, help="seconds per attempt")
    q.add_argument("--retries", type=int, default=2)
    q.set_defaults(func=_query)

    b = subparsers.add_parser(
        "seal-bench", help="synthetic knowledge set through serve-ttt: accuracy and latency",
        description="Starts the server in-process on a free loopback port and sends one SEAL "
                    "request per invented-entity passage; prints baseline vs adapter accuracy "
                    "and per-phase latency; writes every reply to --out (JSON).")
    b.add_argument("--ckpt", required=True,
                   help="run directory, converted model, or a named model")
    _server_args(b)
    b.add_argument("--passages", type=int, default=24)
    b.add_argument("--seed", type=int, nargs="+", default=[0],
                   help="one or more seeds; each draws its own passages and seeds its requests' "
                        "adapter init and shuffling (several: one server, spread over seeds)")
    b.add_argument("--epochs", type=int, default=10)
    b.add_argument("--lr", type=float, default=1e-3)
    b.add_argument("--rank", type=int, default=32)
    b.add_argument("--alpha", type=float, default=64.0)
    b.add_argument("--out", default=None, help="JSON report")
    b.add_argument("--plot", default=None,
                   help="PNG of per-passage accuracy, baseline vs adapted (default: none)")
    b.set_defaults(func=_bench)


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the run's)")
    p.add_argument("--grader", default=None,
                   help="module:function grading (questions, predictions) -> list[bool] "
                        "(default: normalised exact/substring match)")
    p.add_argument("--prompt", default="auto", choices=("auto", "base", "chat"),
                   help="answer prompt: chat template when the tokenizer has one (auto)")
    p.add_argument("--lora-targets", default="q,v", help="comma-separated projections")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--keep-adapter-dir", default=None,
                   help="save every request's adapter here (orbax + lora.json)")


def _fail(cmd: str, e: BaseException) -> int:
    print(f"jaxttt {cmd}: error: {e}", file=sys.stderr, flush=True)
    return 1


def build_engine(args: argparse.Namespace):
    """The engine from --ckpt and the server options (user mistakes raise ValueError/UserError)."""
    from jaxttt.seal.engine import EngineConfig, TTTEngine
    from jaxttt.seal.grading import load_grader
    from jaxttt.seal.loading import load_base

    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    from jaxttt.seal.protocol import LORA_TARGETS
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad or not targets:
        raise ValueError(f"--lora-targets: expected names from {','.join(LORA_TARGETS)}, "
                         f"got {args.lora_targets!r}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: expected a positive integer, got "
                         f"{args.max_new_tokens}")
    grader = load_grader(args.grader)
    model, tok = load_base(args.ckpt, tokenizer=args.tokenizer)
    cfg = EngineConfig(max_new_tokens=args.max_new_tokens, prompt_style=args.prompt,
                       lora_targets=targets)
    return TTTEngine(model, tok, grader=grader, cfg=cfg, keep_adapter_dir=args.keep_adapter_dir)


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from jaxttt.seal.server import TTTServer

    engine = build_engine(args)  # user errors: one line from jaxttt.cli.main
    server = TTTServer(engine, host=args.host, port=args.port, log_path=args.log)
    server.bind()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return server.serve(stop)


def _query(args: argparse.Namespace) -> int:
    from jaxttt.seal.client import TTTServerError, query, shutdown

    try:
        if args.shutdown:
            reply = shutdown(host=args.host, port=args.port, timeout_s=args.timeout)
        else:
            if args.request is None:
                raise ValueError("give a request file (or - for stdin), or --shutdown")
            text = sys.stdin.read() if args.request == "-" else open(args.request).read()
            try:
                request = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{args.request}: line {e.lineno}: not JSON ({e.msg})") from None
            reply = query(request, host=args.host, port=args.port, timeout_s=args.timeout,
                          retries=args.retries)
    except TTTServerError as e:
        return _fail("seal-query", e)
    print(json.dumps(reply, indent=1))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from jaxttt.seal.bench import plot_seeds, run_bench, run_seeds

    if args.passages < 1:
        raise ValueError(f"--passages: expected a positive integer, got {args.passages}")
    if any(not 0 <= s < 2**31 for s in args.seed):
        raise ValueError(f"--seed: expected integers in [0, 2**31), got {args.seed}")
    for flag, path in (("--out", args.out), ("--plot", args.plot)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"{flag}: the folder of {path!r} does not exist")
    engine = build_engine(args)
    hparams = dict(finetune_epochs=args.epochs, finetune_lr=args.lr, lora_rank=args.rank,
                   lora_alpha=args.alpha)
    seeds = list(dict.fromkeys(args.seed))
    report = (run_bench(engine, n=args.passages, seed=seeds[0], hparams=hparams)
              if len(seeds) == 1 else
              run_seeds(engine, n=args.passages, seeds=seeds, hparams=hparams))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        print(f"seal-bench: plot {plot_seeds(report, args.plot)}", flush=True)
    return 0
