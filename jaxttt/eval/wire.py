"""Plain data across a process boundary: the only thing a candidate's process can send back.

Values are None, bool, int, float, complex, str, bytes, list, tuple, dict, set and frozenset,
nested at most `MAX_DEPTH` deep, in frames of at most `MAX_FRAME` bytes. `encode` looks at exact
types (`type(x) is int`, never `isinstance`), so a subclass with a forged `__eq__` is refused, not
copied; `decode` parses with `json.loads` and rebuilds genuine built-ins, so whatever bytes arrive
the receiver holds only ordinary values (or gets `WireError`).

Frames are a 4-byte big-endian length and a JSON body. Containers are tagged one-key objects:
{"l": [...]} list, {"t": [...]} tuple, {"s": [...]} set, {"f": [...]} frozenset,
{"d": [[k, v], ...]} dict, {"b": "<hex>"} bytes, {"c": [re, im]} complex; JSON numbers, strings,
true/false/null are themselves (NaN and infinities as JSON's NaN/Infinity).

This file is also sent verbatim to the sandbox's child processes (they run `python -I -S` and
cannot import jaxttt), so it imports only the standard library.
"""
import json
import os

MAX_DEPTH = 64
MAX_FRAME = 16 << 20  # bytes


class WireError(Exception):
    """Malformed, oversized or too deeply nested data."""


_SCALARS = (type(None), bool, int, float, str)
_SEQ_TAGS = {list: "l", tuple: "t", set: "s", frozenset: "f"}
_TAG_TYPES = {"l": list, "t": tuple, "s": set, "f": frozenset}


def to_tree(x, depth=0):
    """A JSON-ready tree for plain data `x`; WireError for anything else."""
    if depth > MAX_DEPTH:
        raise WireError("value nested too deeply")
    t = type(x)
    if t in _SCALARS:
        return x
    if t in _SEQ_TAGS:
        return {_SEQ_TAGS[t]: [to_tree(v, depth + 1) for v in x]}
    if t is dict:
        return {"d": [[to_tree(k, depth + 1), to_tree(v, depth + 1)] for k, v in x.items()]}
    if t is bytes:
        return {"b": x.hex()}
    if t is complex:
        return {"c": [x.real, x.imag]}
    raise WireError("not plain data: " + t.__name__)


def from_tree(node, depth=0):
    """Genuine built-ins from a tree produced by `json.loads`; WireError if malformed."""
    if depth > MAX_DEPTH:
        raise WireError("value nested too deeply")
    t = type(node)
    if t in _SCALARS:
        return node
    if t is not dict or len(node) != 1:
        raise WireError("malformed value")
    (tag, body), = node.items()
    if tag in _TAG_TYPES and type(body) is list:
        try:
            return _TAG_TYPES[tag](from_tree(v, depth + 1) for v in body)
        except TypeError as e:  # an unhashable set member
            raise WireError(str(e)) from None
    if tag == "d" and type(body) is list:
        out = {}
        for pair in body:
            if type(pair) is not list or len(pair) != 2:
                raise WireError("malformed dict item")
            try:
                out[from_tree(pair[0], depth + 1)] = from_tree(pair[1], depth + 1)
            except TypeError as e:  # an unhashable key
                raise WireError(str(e)) from None
        return out
    if tag == "b" and type(body) is str:
        try:
            return bytes.fromhex(body)
        except ValueError:
            raise WireError("malformed bytes") from None
    if tag == "c" and type(body) is list and len(body) == 2 and all(type(v) in (int, float) for v in body):
        return complex(body[0], body[1])
    raise WireError("malformed value")


def encode(x) -> bytes:
    """One frame holding `x` (a dict of plain data, typically)."""
    body = json.dumps(to_tree(x), separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise WireError("frame too large")
    return len(body).to_bytes(4, "big") + body


def decode(body: bytes):
    try:
        tree = json.loads(body)
    except (ValueError, RecursionError) as e:  # also ints longer than the str-conversion limit
        raise WireError("malformed frame: " + type(e).__name__) from None
    return from_tree(tree)


def _read_exact(fd: int, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        b = os.read(fd, min(n - got, 1 << 20))
        if not b:
            raise EOFError("channel closed")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def read_frame(fd: int):
    """The next value on `fd`; EOFError when the peer is gone, WireError when it lies."""
    n = int.from_bytes(_read_exact(fd, 4), "big")
    if n > MAX_FRAME:
        raise WireError("frame too large")
    return decode(_read_exact(fd, n))


def write_frame(fd: int, x) -> None:
    data = memoryview(encode(x))
    while data:
        data = data[os.write(fd, data):]
