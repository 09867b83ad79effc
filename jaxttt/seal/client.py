"""A client for the TTT server that speaks SEAL's format, with `query_server.py`'s retries.

    reply = query({"train_sequences": [...], "eval_questions": [...]}, port=5555)
    shutdown(port=5555)

Each attempt opens a fresh REQ socket (a REQ socket that timed out cannot send again), waits
up to `timeout_s` for the reply and retries on a timeout, as SEAL's `send_round_trip` does.
An error reply raises `TTTServerError` (retried only with `retry_errors=True`: SEAL retries
it, but a validation error never heals by itself).
"""
from __future__ import annotations

import json
from typing import Any

import zmq


class TTTServerError(RuntimeError):
    """The server replied {"error": ...}, or never replied."""


def _round_trip(ctx: zmq.Context, endpoint: str, payload: bytes, timeout_s: float) -> dict | None:
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(payload)
        if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            return None
        return json.loads(sock.recv())
    finally:
        sock.close(0)


def query(request: dict[str, Any], *, host: str = "127.0.0.1", port: int = 5555,
          timeout_s: float = 600.0, retries: int = 2, retry_errors: bool = False,
          ctx: zmq.Context | None = None) -> dict:
    """Send one request and return its reply (raises TTTServerError after `retries` tries)."""
    ctx = ctx or zmq.Context.instance()
    endpoint = f"tcp://{host}:{port}"
    payload = json.dumps(request).encode("utf-8")
    last = "no reply"
    for attempt in range(1, max(1, retries) + 1):
        reply = _round_trip(ctx, endpoint, payload, timeout_s)
        if reply is None:
            last = f"no reply from {endpoint} within {timeout_s:g}s"
            continue
        if isinstance(reply, dict) and "error" in reply:
            last = f"server error: {reply['error']}"
            if retry_errors:
                continue
            raise TTTServerError(last)
        return reply
    raise TTTServerError(f"{last} (after {max(1, retries)} attempts)")


def shutdown(*, host: str = "127.0.0.1", port: int = 5555, timeout_s: float = 30.0,
             ctx: zmq.Context | None = None) -> dict:
    """Ask the server to exit; returns its {"status": "bye"}."""
    return query({"cmd": "shutdown"}, host=host, port=port, timeout_s=timeout_s, retries=1,
                 ctx=ctx)
