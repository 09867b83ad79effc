"""`jaxttt tokenizer train` and `jaxttt data pack`: thin argparse wrappers over the library."""
from __future__ import annotations

import argparse

from jaxttt.data.corpus import __doc__ as SOURCES_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `tokenizer` and `data` command groups to the `jaxttt` parser."""
    _register_tokenizer(subparsers)
    _register_data(subparsers)


def _register_tokenizer(subparsers) -> None:
    group = subparsers.add_parser("tokenizer", help="SentencePiece tokenizer").add_subparsers(
        dest="tokenizer_command", required=True)
    p = group.add_parser("train", help="train a BPE tokenizer (handoff Phase 1)",
                         epilog=SOURCES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="corpus sources (see below)")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--text-field", default="text", help="jsonl/TFDS field holding the text")
    p.add_argument("--code", action="store_true",
                   help="keep case, whitespace and newlines exactly (source-code corpora)")
    p.set_defaults(func=_tokenizer_train)


def _register_data(subparsers) -> None:
    group = subparsers.add_parser("data", help="packed token datasets").add_subparsers(
        dest="data_command", required=True)
    p = group.add_parser("pack", help="pack documents into a .bin token stream (Phase 2)",
                         epilog=SOURCES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model")
    p.add_argument("--input", nargs="+", required=True, help="corpus sources (see below)")
    p.add_argument("--output", required=True, help="X.bin (meta goes to X.bin.json)")
    p.add_argument("--text-field", default="text", help="jsonl/TFDS field holding the text")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_data_pack)


def _tokenizer_train(args: argparse.Namespace) -> None:
    from jaxttt.data.tokenizer import Tokenizer, train_tokenizer

    path = train_tokenizer(args.input, args.model_prefix, args.vocab_size,
                           text_field=args.text_field, code=args.code)
    print(f"wrote {path} (vocab {Tokenizer(path).vocab_size})")


def _data_pack(args: argparse.Namespace) -> None:
    from jaxttt.data.packing import pack

    meta = pack(args.tokenizer, args.input, args.output, text_field=args.text_field,
                progress=not args.no_progress)
    print(f"wrote {args.output}: {meta['n_tokens']} {meta['dtype']} tokens from "
          f"{meta['n_docs']} documents")
