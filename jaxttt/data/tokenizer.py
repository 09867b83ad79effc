"""SentencePiece BPE tokenizer: training (handoff E1 defaults) and a thin wrapper.

Special ids (E1): pad=0, unk=1, bos=2, eos=3. `code=True` keeps text byte-exact (identity
normalisation, whitespace and newlines preserved) for source-code corpora; E1's `nmt_nfkc_cf`
folds case and turns newlines into spaces, which would make generated Python unrunnable.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MAX_SENTENCE_CHARS = 2048  # SentencePiece skips sentences over max_sentence_length (4192 B)
_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_LOW = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def train_tokenizer(inputs: Sequence[Path | str], model_prefix: Path | str, vocab_size: int, *,
                    text_field: str = "text", code: bool = False,
                    normalization: str | None = None, character_coverage: float = 0.9995,
                    byte_fallback: bool = True, max_sentences: int = 200_000) -> Path:
    """Train a BPE model on the documents of `inputs` (see `corpus.iter_documents`).

    Writes `<model_prefix>.model` and `.vocab`; returns the `.model` path. A corpus too small
    for `vocab_size` is retrained with the largest vocabulary it supports (printed).
    """
    from jaxttt.data.corpus import iter_documents  # local import: corpus imports nothing here

    def sentences() -> Iterator[str]:
        docs = (d for src in inputs for d in iter_documents(src, text_field=text_field))
        return _capped(_split_sentences(docs), max_sentences)

    kwargs = _trainer_kwargs(code=code, normalization=normalization,
                             character_coverage=character_coverage, byte_fallback=byte_fallback)
    proto = _train_with_fallback(sentences, vocab_size, kwargs)
    return _write_model(proto, Path(model_prefix))


def _trainer_kwargs(*, code: bool, normalization: str | None, character_coverage: float,
                    byte_fallback: bool) -> dict:
    kw = dict(model_type="bpe", pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
              normalization_rule_name=normalization or ("identity" if code else "nmt_nfkc_cf"),
              character_coverage=character_coverage, byte_fallback=byte_fallback,
              max_sentence_length=4 * MAX_SENTENCE_CHARS + 16, minloglevel=2,
              num_threads=max(1, min(4, os.cpu_count() or 1)))
    if code:  # keep indentation and newlines so decode(encode(src)) == src
        kw.update(remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                  user_defined_symbols=["\n"])
    return kw


def _train_with_fallback(sentences, vocab_size: int, kwargs: dict) -> bytes:
    """Train once; on "Vocabulary size too high" retrain with the largest feasible vocab."""
    try:
        return _train_once(sentences(), vocab_size, kwargs)
    except RuntimeError as e:
        msg = str(e)
        if (low := _TOO_LOW.search(msg)):
            raise ValueError(f"tokenizer: vocab_size {vocab_size} is below the {low.group(2)} "
                             "pieces this corpus needs (special ids + characters"
                             f"{' + 256 byte pieces' if kwargs['byte_fallback'] else ''})") from e
        if not (high := _TOO_HIGH.search(msg)):
            raise
        feasible = int(high.group(2))
    print(f"tokenizer: corpus supports at most {feasible} pieces; "
          f"using vocab {feasible} instead of {vocab_size}", flush=True)
    return _train_once(sentences(), feasible, kwargs)


def _train_once(sentences: Iterator[str], vocab_size: int, kwargs: dict) -> bytes:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=sentences, model_writer=buf,
                                   vocab_size=vocab_size, **kwargs)
    return buf.getvalue()


def _split_sentences(docs: Iterable[str]) -> Iterator[str]:
    """Line-aligned chunks of at most MAX_SENTENCE_CHARS (newlines kept inside a chunk)."""
    for doc in docs:
        chunk = ""
        for line in doc.splitlines(keepends=True):
            if chunk and len(chunk) + len(line) > MAX_SENTENCE_CHARS:
                yield from _nonblank(chunk)
                chunk = ""
            chunk += line
            while len(chunk) > MAX_SENTENCE_CHARS:  # a very long line: cut it
                yield from _nonblank(chunk[:MAX_SENTENCE_CHARS])
                chunk = chunk[MAX_SENTENCE_CHARS:]
        yield from _nonblank(chunk)


def _nonblank(s: str) -> Iterator[str]:
    if s.strip():
        yield s


def _capped(it: Iterable[str], n: int) -> Iterator[str]:
    for i, s in enumerate(it):
        if i >= n:
            return
        yield s


def _write_model(proto: bytes, prefix: Path) -> Path:
    """Write `.model` (atomically) and a human-readable `.vocab` (piece<TAB>score)."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    model = prefix.with_name(prefix.name + ".model")
    tmp = model.with_name(model.name + f".tmp{os.getpid()}")
    tmp.write_bytes(proto)
    os.replace(tmp, model)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    lines = (f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}" for i in range(sp.get_piece_size()))
    prefix.with_name(prefix.name + ".vocab").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return model


class Tokenizer:
    """A loaded SentencePiece model with the E1 special ids."""

    def __init__(self, path: Path | str):
        self._path = Path(path)
        if not self._path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self._path}")
        data = self._path.read_bytes()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=data)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on bad protos
            raise ValueError(f"{self._path}: not a valid SentencePiece model ({e})") from e
        self._sha256 = hashlib.sha256(data).hexdigest()

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return self._sp.encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False,
                     eos: bool = False) -> list[list[int]]:
        return self._sp.encode(list(texts), add_bos=bos, add_eos=eos,
                               num_threads=min(4, os.cpu_count() or 1))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, cut at the first pad; bos/eos render as nothing."""
        ids = [int(i) for i in ids]
        if self.pad_id in ids:
            ids = ids[:ids.index(self.pad_id)]
        return self._sp.decode(ids)

    def prompt_ids(self, text: str) -> list[int]:
        """A raw-text prompt as documents start in packed data (EOS separates documents)."""
        return [self.eos_id] + self.encode(text)

    @property
    def chat_template(self) -> None:
        return None  # trained here on raw text: no chat format

    def chat_ids(self, messages, *, add_generation_prompt: bool = True) -> list[int]:
        raise ValueError(f"{self._path}: a SentencePiece tokenizer trained here has no chat "
                         "template (not an instruct model)")

    render_chat = chat_ids

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def sha256(self) -> str:
        return self._sha256

    def __repr__(self) -> str:
        return f"Tokenizer({str(self._path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: Path | str):
    """The tokenizer stored at `path`: the one entry point every command loads tokenizers by.

    A `tokenizer.json` (or a directory holding one) is a Hugging Face tokenizer (its sibling
    tokenizer_config.json gives BOS/EOS/PAD and the chat template); anything else is a
    SentencePiece model. Both answer the same interface: encode/encode_batch/decode,
    prompt_ids, chat_ids/render_chat (instruct models), vocab_size, bos/eos/pad/unk ids.
    """
    p = Path(path)
    if p.suffix == ".json" or (p.is_dir() and (p / "tokenizer.json").is_file()):
        from jaxttt.data.hf_tokenizer import HFTokenizer
        return HFTokenizer(p)
    return Tokenizer(p)
