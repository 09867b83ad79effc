"""The wire format of SEAL's `TTT_server.py`, validated field by field.

A request is ONE JSON object (one ZMQ frame):
    train_sequences              list[str]   []     sequences to fine-tune on ([] = base only)
    eval_questions               list[dict]  []     {title, context, question, answer}: str each
                                                    (question already carries its "Topic:" line)
    lora_rank                    int         32
    lora_alpha                   number      64     adapter scale = alpha / rank
    lora_dropout                 number      0      in [0, 1)
    finetune_epochs              int         10
    finetune_lr                  number      1e-3   peak of a linear decay to 0 (AdamW)
    batch_size                   int         1      sequences per micro-batch
    gradient_accumulation_steps  int         1      micro-batches per optimizer update
    end_mask_substring           str|null    null   labels up to and including its first match
                                                    are masked ("" = none, as SEAL's clients send)
    skip_training                bool        false
  extensions (not sent by SEAL's clients):
    lora_targets                 list[str]   server default (q, v)
    seed                         int         0      adapter init, dropout and shuffling
    return_timings               bool        false  add "timings" (seconds per phase) to the reply
or {"cmd": "shutdown"}. The reply is the object `build_reply` makes, {"status": "bye"} for a
shutdown, or {"error": "Type: message"}; the message names the offending field.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
QUESTION_KEYS = ("title", "context", "question", "answer")


class RequestError(ValueError):
    """A request that cannot be served; the message names the field and what was expected."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-request ceilings (a request over one gets an error reply naming it)."""

    max_request_bytes: int = 16 << 20
    max_train_sequences: int = 512
    max_eval_questions: int = 512
    max_train_tokens: int = 1 << 18  # summed over the (truncated) training sequences
    max_epochs: int = 100
    max_steps: int = 10_000  # optimizer updates in one request
    max_rank: int = 256
    max_batch_rows: int = 256  # batch_size * gradient_accumulation_steps


@dataclasses.dataclass(frozen=True)
class Question:
    question: str
    answer: str
    title: str = ""
    context: str = ""


@dataclasses.dataclass(frozen=True)
class TTTRequest:
    train_sequences: tuple[str, ...] = ()
    eval_questions: tuple[Question, ...] = ()
    lora_rank: int = 32
    lora_alpha: float = 64.0
    lora_dropout: float = 0.0
    finetune_epochs: int = 10
    finetune_lr: float = 1e-3
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    end_mask_substring: str | None = None
    skip_training: bool = False
    lora_targets: tuple[str, ...] = ("q", "v")
    seed: int = 0
    return_timings: bool = False

    @property
    def base_only(self) -> bool:
        return self.skip_training or not self.train_sequences

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps

    def steps(self) -> int:
        """Optimizer updates: epochs x ceil(sequences / (batch_size x accumulation))."""
        return self.finetune_epochs * -(-len(self.train_sequences) // self.rows_per_step)


SHUTDOWN = "shutdown"


# ------------------------------------------------------------------------------ frames
def decode_frames(frames: list[bytes], limits: Limits) -> dict:
    """The request object of one ZMQ message (a single frame of UTF-8 JSON)."""
    if len(frames) != 1:
        raise RequestError(f"message: expected one frame holding a JSON object, got "
                           f"{len(frames)} frames")
    raw = frames[0]
    if len(raw) > limits.max_request_bytes:
        raise RequestError(f"message: {len(raw)} bytes exceeds the server's limit of "
                           f"{limits.max_request_bytes} bytes")
    try:
        msg = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        raise RequestError(f"message: not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise RequestError(f"message: not JSON ({e.msg} at line {e.lineno} column {e.colno})") \
            from None
    except RecursionError:
        raise RequestError("message: JSON nested too deeply") from None
    if not isinstance(msg, dict):
        raise RequestError(f"message: expected a JSON object, got {_jtype(msg)}")
    return msg


def _reject_constant(name: str):
    raise RequestError(f"message: {name} is not valid JSON (numbers must be finite)")


# ------------------------------------------------------------------------------ fields
def parse_request(msg: dict, limits: Limits,
                  default_targets: tuple[str, ...] = ("q", "v")) -> TTTRequest | str:
    """A validated `TTTRequest`, or SHUTDOWN for {"cmd": "shutdown"}."""
    if "cmd" in msg:
        if msg["cmd"] == SHUTDOWN:
            return SHUTDOWN
        raise RequestError(f"cmd: expected \"shutdown\" (or no cmd), got {msg['cmd']!r:.80}")
    known = {f.name for f in dataclasses.fields(TTTRequest)}
    unknown = sorted(k for k in msg if k not in known)
    if unknown:
        raise RequestError(f"{unknown[0]:.80}: unknown field (expected some of "
                           f"{', '.join(sorted(known))})")
    d = TTTRequest(lora_targets=default_targets)
    req = TTTRequest(
        train_sequences=_str_list(msg, "train_sequences", limits.max_train_sequences),
        eval_questions=_questions(msg, limits.max_eval_questions),
        lora_rank=_int(msg, "lora_rank", d.lora_rank, 1, limits.max_rank),
        lora_alpha=_num(msg, "lora_alpha", d.lora_alpha, lo=0.0, lo_open=True),
        lora_dropout=_num(msg, "lora_dropout", d.lora_dropout, lo=0.0, hi=1.0, hi_open=True),
        finetune_epochs=_int(msg, "finetune_epochs", d.finetune_epochs, 1, limits.max_epochs),
        finetune_lr=_num(msg, "finetune_lr", d.finetune_lr, lo=0.0, hi=1.0, lo_open=True),
        batch_size=_int(msg, "batch_size", d.batch_size, 1, limits.max_batch_rows),
        gradient_accumulation_steps=_int(msg, "gradient_accumulation_steps",
                                         d.gradient_accumulation_steps, 1, limits.max_batch_rows),
        end_mask_substring=_opt_str(msg, "end_mask_substring"),
        skip_training=_bool(msg, "skip_training", d.skip_training),
        lora_targets=_targets(msg, d.lora_targets),
        seed=_int(msg, "seed", 0, 0, 2**31 - 1),
        return_timings=_bool(msg, "return_timings", False),
    )
    if req.rows_per_step > limits.max_batch_rows:
        raise RequestError(f"batch_size x gradient_accumulation_steps: {req.rows_per_step} "
                           f"exceeds the server's limit of {limits.max_batch_rows}")
    if not req.base_only and req.steps() > limits.max_steps:
        raise RequestError(f"finetune_epochs: {req.finetune_epochs} epochs make {req.steps()} "
                           f"updates, over the server's limit of {limits.max_steps}")
    return req


def _jtype(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def _bad(field: str, expected: str, value: Any) -> RequestError:
    shown = json.dumps(value)[:60] if not isinstance(value, (list, dict)) else _jtype(value)
    return RequestError(f"{field}: expected {expected}, got {shown}")


def _int(msg: dict, key: str, default: int, lo: int, hi: int) -> int:
    v = msg.get(key, default)
    if isinstance(v, float) and v.is_integer():  # 32.0 from a float-typed client
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad(key, f"an integer in [{lo}, {hi}]", v)
    return v


def _num(msg: dict, key: str, default: float, *, lo: float, hi: float = math.inf,
         lo_open: bool = False, hi_open: bool = False) -> float:
    v = msg.get(key, default)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok:
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise _bad(key, f"a number in {interval}", v)
    return float(v)


def _bool(msg: dict, key: str, default: bool) -> bool:
    v = msg.get(key, default)
    if not isinstance(v, bool):
        raise _bad(key, "true or false", v)
    return v


def _opt_str(msg: dict, key: str) -> str | None:
    v = msg.get(key)
    if v is not None and not isinstance(v, str):
        raise _bad(key, "a string or null", v)
    return v or None


def _str_list(msg: dict, key: str, max_len: int) -> tuple[str, ...]:
    v = msg.get(key)
    if v is None:
        return ()
    if not isinstance(v, list):
        raise _bad(key, "a list of strings", v)
    if len(v) > max_len:
        raise RequestError(f"{key}: {len(v)} items exceeds the server's limit of {max_len}")
    for i, s in enumerate(v):
        if not isinstance(s, str):
            raise _bad(f"{key}[{i}]", "a string", s)
    return tuple(v)


def _questions(msg: dict, max_len: int) -> tuple[Question, ...]:
    v = msg.get("eval_questions")
    if v is None:
        return ()
    if not isinstance(v, list):
        raise _bad("eval_questions", "a list of {title, context, question, answer} objects", v)
    if len(v) > max_len:
        raise RequestError(f"eval_questions: {len(v)} items exceeds the server's limit of "
                           f"{max_len}")
    out = []
    for i, q in enumerate(v):
        where = f"eval_questions[{i}]"
        if not isinstance(q, dict):
            raise _bad(where, "an object with question and answer strings", q)
        for key in ("question", "answer"):
            if key not in q:
                raise RequestError(f"{where}.{key}: missing (expected a string)")
        for key, val in q.items():
            if key in QUESTION_KEYS and not isinstance(val, str):
                raise _bad(f"{where}.{key}", "a string", val)
        out.append(Question(**{k: q[k] for k in QUESTION_KEYS if k in q}))
    return tuple(out)


def _targets(msg: dict, default: tuple[str, ...]) -> tuple[str, ...]:
    v = msg.get("lora_targets")
    if v is None:
        return default
    if (not isinstance(v, list) or not v
            or not all(isinstance(t, str) and t in LORA_TARGETS for t in v)):
        raise _bad("lora_targets", f"a non-empty list from {list(LORA_TARGETS)}", v)
    return tuple(dict.fromkeys(v))


# ------------------------------------------------------------------------------ replies
def build_reply(base_texts: list[str], base_ok: list[bool], adapter_texts: list[str],
                adapter_ok: list[bool]) -> dict:
    """SEAL's reply: accuracies (4 decimals), texts, verdicts and per-question gains."""
    n = len(base_ok)
    base_acc = sum(base_ok) / n if n else 0.0
    adapter_acc = sum(adapter_ok) / n if n else 0.0
    gains = [int(a) - int(b) for b, a in zip(base_ok, adapter_ok)]
    return {
        "baseline_accuracy": round(base_acc, 4),
        "adapter_accuracy": round(adapter_acc, 4),
        "adapter_gain": round(adapter_acc - base_acc, 4),
        "baseline_texts": list(base_texts),
        "adapter_texts": list(adapter_texts),
        "baseline_correct": [bool(x) for x in base_ok],
        "adapter_correct": [bool(x) for x in adapter_ok],
        "gains": gains,
    }


def error_reply(exc: BaseException) -> dict:
    msg = str(exc) or repr(exc)
    return {"error": f"{type(exc).__name__}: {msg[:2000]}"}


def encode_reply(reply: dict) -> bytes:
    """UTF-8 JSON of a reply; never raises (an unencodable reply becomes an error reply)."""
    try:
        return json.dumps(reply, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        return json.dumps(error_reply(e)).encode("utf-8")
