"""Hugging Face `tokenizers` behind the Tokenizer interface (see jaxttt.data.tokenizer).

Loaded from a `tokenizer.json` with its sibling `tokenizer_config.json` (special tokens, chat
template, add_bos_token), or built from the byte-level BPE vocabulary and merges embedded in a
GGUF file. BOS/EOS/PAD are the checkpoint's; a checkpoint without a PAD token pads with EOS
(the sampler then lets EOS be drawn: a pad equal to EOS is never masked).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence

from jaxttt.data.chat import render_chat
from jaxttt.errors import UserError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIALS = ("bos_token", "eos_token", "pad_token", "unk_token")

# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) -> the split regex before byte-level BPE
_GPT2 = None  # ByteLevel's own GPT-2 regex
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
           r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
          r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE = {"default": (False, _GPT2), "gpt2": (False, _GPT2), "smollm": (True, _GPT2),
            "starcoder": (True, _GPT2), "llama-bpe": (False, _LLAMA3), "qwen2": (False, _QWEN2)}


class TokenizerError(UserError, ValueError):
    """A tokenizer file is missing, malformed or inconsistent; the message names it."""


def _token_str(v) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


class HFTokenizer:
    """A `tokenizers.Tokenizer` with the checkpoint's special tokens and chat template."""

    def __init__(self, path: Path | str):
        import tokenizers

        p = Path(path)
        self._path = p / TOKENIZER_JSON if p.is_dir() else p
        if not self._path.is_file():
            raise TokenizerError(f"{self._path}: tokenizer file not found")
        data = self._path.read_bytes()
        try:
            self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise TokenizerError(f"{self._path}: not a Hugging Face tokenizer.json ({e})") from None
        self._sha256 = hashlib.sha256(data).hexdigest()
        self.config = _read_config(self._path.parent)
        self._ids = {k: self._special_id(k) for k in SPECIALS}

    def _special_id(self, key: str) -> int | None:
        tok = _token_str(self.config.get(key))
        if tok is None:
            return None
        i = self._tok.token_to_id(tok)
        if i is None:
            raise TokenizerError(f"{self._path.parent / TOKENIZER_CONFIG}: {key} {tok!r} is not in "
                                 f"the vocabulary of {self._path.name}")
        return i

    # ------------------------------------------------------------ the Tokenizer interface
    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, bos, eos)

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False,
                     eos: bool = False) -> list[list[int]]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, bos, eos) for e in encs]

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        head = [self.bos_id] if bos and self.bos_id is not None else []
        tail = [self.eos_id] if eos and self.eos_id is not None else []
        return head + list(ids) + tail

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Text of `ids`, cut at the first pad (when pad is not EOS); special tokens dropped."""
        ids = [int(i) for i in ids]
        if self.pad_id != self.eos_id and self.pad_id in ids:
            ids = ids[:ids.index(self.pad_id)]
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def prompt_ids(self, text: str) -> list[int]:
        """A raw-text prompt as the model saw documents start (BOS when the checkpoint adds one)."""
        return self.encode(text, bos=self.add_bos)

    def chat_ids(self, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
        """The checkpoint's chat template applied to `messages`, tokenised. The template's own
        text has its special tokens parsed; message contents are plain text, so a special-token
        string inside a message (e.g. a model-written `<|im_end|>`) never becomes a control token."""
        marks = [f"\x00jaxttt-message-{i}\x00" for i in range(len(messages))]
        masked = [{**m, "content": mark} for m, mark in zip(messages, marks)]
        rest = self.render_chat(masked, add_generation_prompt=add_generation_prompt)
        ids: list[int] = []
        for mark, message in zip(marks, messages):
            head, found, rest = rest.partition(mark)
            if not found:
                raise TokenizerError(f"{self._path.parent}: the chat template does not place each "
                                     "message's content once, in order")
            ids += self.encode(head) + self._plain_ids(str(message.get("content", "")))
        return ids + self.encode(rest)

    def _plain_ids(self, text: str) -> list[int]:
        """Ids of `text` with special-token strings tokenised as ordinary text."""
        self._tok.encode_special_tokens = True
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = False

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise TokenizerError(f"{self._path.parent}: the tokenizer has no chat template "
                                 "(not an instruct model)")
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=self._tokstr("bos_token"), eos_token=self._tokstr("eos_token"))

    def _tokstr(self, key: str) -> str:
        return _token_str(self.config.get(key)) or ""

    @property
    def chat_template(self) -> str | None:
        return self.config.get("chat_template")

    @property
    def add_bos(self) -> bool:
        """Whether documents start with BOS: tokenizer_config's add_bos_token, else what the
        tokenizer's own post-processor does (Llama 3 adds <|begin_of_text|> there)."""
        if self.bos_id is None:
            return False
        if "add_bos_token" in self.config:
            return bool(self.config["add_bos_token"])
        return self._tok.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        pad = self._ids["pad_token"]
        return pad if pad is not None else self.eos_id

    @property
    def unk_id(self) -> int | None:
        return self._ids["unk_token"]

    @property
    def bos_id(self) -> int | None:
        return self._ids["bos_token"]

    @property
    def eos_id(self) -> int:
        if self._ids["eos_token"] is None:
            raise TokenizerError(f"{self._path.parent / TOKENIZER_CONFIG}: no eos_token")
        return self._ids["eos_token"]

    @property
    def path(self) -> Path:
        return self._path

    @property
    def sha256(self) -> str:
        return self._sha256

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def save(self, directory: Path | str) -> Path:
        """Write tokenizer.json and tokenizer_config.json into `directory`; returns the json."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / TOKENIZER_JSON).write_bytes(self._path.read_bytes())
        (d / TOKENIZER_CONFIG).write_text(json.dumps(self.config, indent=2, ensure_ascii=False))
        return d / TOKENIZER_JSON

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self._path)!r}, vocab_size={self.vocab_size})"


def _read_config(directory: Path) -> dict:
    """tokenizer_config.json (optional) with a chat_template.jinja beside it folded in."""
    f = directory / TOKENIZER_CONFIG
    cfg = {}
    if f.is_file():
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{f}: not valid JSON ({e})") from None
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        cfg["chat_template"] = named.get("default")
    jinja = directory / "chat_template.jinja"
    if not cfg.get("chat_template") and jinja.is_file():
        cfg["chat_template"] = jinja.read_text(encoding="utf-8")
    return cfg


def hf_tokenizer_config(directory: Path, model_config: dict | None = None) -> dict:
    """A checkpoint directory's tokenizer config with special tokens filled from config.json /
    generation_config.json ids where tokenizer_config.json leaves them out."""
    import tokenizers

    cfg = _read_config(directory)
    tok = tokenizers.Tokenizer.from_file(str(directory / TOKENIZER_JSON))
    ids = dict(model_config or {})
    gen = directory / "generation_config.json"
    if gen.is_file():
        ids = {**json.loads(gen.read_text()), **ids}
    for key in SPECIALS:
        i = ids.get(key + "_id")
        if isinstance(i, list):
            i = i[0] if i else None
        if _token_str(cfg.get(key)) is None and isinstance(i, int):
            cfg[key] = tok.id_to_token(i)
    return cfg


def gguf_tokenizer(fields: dict, where: str):
    """(tokenizers.Tokenizer, tokenizer config dict) from GGUF `tokenizer.ggml.*` metadata.

    `fields` maps metadata keys to values. Only byte-level BPE (`tokenizer.ggml.model = gpt2`)
    is supported; the pre-tokenizer follows `tokenizer.ggml.pre`.
    """
    import tokenizers
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(f"{where}: tokenizer.ggml.model = {kind!r} is not supported "
                             "(expected gpt2, a byte-level BPE)")
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE:
        raise TokenizerError(f"{where}: tokenizer.ggml.pre = {pre!r} is not supported (expected "
                             f"one of {'|'.join(GGUF_PRE)})")
    tokens = list(fields["tokenizer.ggml.tokens"])
    types = list(fields.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges,
                                          ignore_merges=pre == "llama-bpe"))
    digits, regex = GGUF_PRE[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if regex is not None:
        steps.append(pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex is None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
               if ty in (3, 4)]  # CONTROL, USER_DEFINED
    tok.add_special_tokens(special)
    cfg = {"add_bos_token": bool(fields.get("tokenizer.ggml.add_bos_token", False))}
    for key, field in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                       ("pad_token", "padding_token_id"), ("unk_token", "unknown_token_id")):
        i = fields.get(f"tokenizer.ggml.{field}")
        if i is not None and 0 <= int(i) < len(tokens):
            cfg[key] = tokens[int(i)]
    if fields.get("tokenizer.chat_template"):
        cfg["chat_template"] = fields["tokenizer.chat_template"]
    return tok, cfg


def write_tokenizer(directory: Path | str, tok, config: dict) -> Path:
    """Save a `tokenizers.Tokenizer` and its config as tokenizer.json + tokenizer_config.json."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / TOKENIZER_JSON))
    (d / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return d / TOKENIZER_JSON
