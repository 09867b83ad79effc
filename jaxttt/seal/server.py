"""The ZMQ REP loop: one request at a time, exactly one reply per request.

A REP socket fair-queues the requests of every connected REQ client and routes each reply
back to its sender, so concurrent clients are served one after another without sharing state
(every round starts from the pristine base, see engine.py). Whatever a request holds (bad
JSON, several frames, wrong types, a failing grader, an out-of-memory error) it gets one reply
and the loop carries on; {"cmd": "shutdown"} gets {"status": "bye"} and ends the loop.
Binds 127.0.0.1 by default (SEAL binds every interface). Each request appends one line to
the JSONL log: kind, sizes, timings, accuracies or the error.
"""
from __future__ import annotations

import functools
import threading
import time
from pathlib import Path
from typing import Any, Callable

import zmq

from jaxttt.runs import append_jsonl
from jaxttt.seal import protocol
from jaxttt.seal.engine import TTTEngine

BYE = {"status": "bye"}


class TTTServer:
    def __init__(self, engine: TTTEngine, *, host: str = "127.0.0.1", port: int = 5555,
                 log_path: str | Path | None = None,
                 echo: Callable[[str], None] | None = functools.partial(print, flush=True)):
        self.engine = engine
        self.host, self.port = host, port
        self.log_path = Path(log_path).absolute() if log_path else None
        self.echo = echo or (lambda _: None)
        self.ctx = zmq.Context()
        self.sock: zmq.Socket | None = None
        self.served = 0

    def bind(self) -> int:
        """Bind the REP socket (port 0 = a free port); returns the port."""
        sock = self.ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 1000)
        addr = f"tcp://{self.host}"
        try:
            if self.port == 0:
                self.port = sock.bind_to_random_port(addr)
            else:
                sock.bind(f"{addr}:{self.port}")
        except zmq.ZMQError as e:
            sock.close(0)
            raise OSError(f"cannot bind tcp://{self.host}:{self.port}: {e}") from None
        self.sock = sock
        return self.port

    def serve(self, stop: threading.Event | None = None, poll_ms: int = 200) -> int:
        """Serve until a shutdown request (returns 0) or `stop` is set (returns 0)."""
        if self.sock is None:
            self.bind()
        self.echo(f"serve-ttt: listening on tcp://{self.host}:{self.port}")
        try:
            while not (stop is not None and stop.is_set()):
                if not self.sock.poll(poll_ms, zmq.POLLIN):
                    continue
                frames = self.sock.recv_multipart()
                reply, done = self.handle(frames)
                self.sock.send(protocol.encode_reply(reply))
                if done:
                    break
        finally:
            self.close()
        return 0

    def handle(self, frames: list[bytes]) -> tuple[dict, bool]:
        """(reply, is_shutdown) for one message; never raises an Exception."""
        t0 = time.perf_counter()
        n = self.served
        self.served += 1
        entry: dict[str, Any] = {"request": n, "time": time.time(),
                                 "bytes": sum(len(f) for f in frames)}
        try:
            msg = protocol.decode_frames(frames, self.engine.limits)
            req = protocol.parse_request(msg, self.engine.limits, self.engine.cfg.lora_targets)
            if req == protocol.SHUTDOWN:
                self._log({**entry, "kind": "shutdown"})
                return dict(BYE), True
            result = self.engine.run(req)
            reply = result.reply
            if req.return_timings:
                reply = {**reply, "timings": result.timings}
            entry.update(kind="base" if req.base_only else "ttt",
                         n_train=len(req.train_sequences), n_questions=len(req.eval_questions),
                         **{k: reply[k] for k in ("baseline_accuracy", "adapter_accuracy",
                                                  "adapter_gain")},
                         timings=result.timings, train=result.train)
            self.echo(f"serve-ttt: #{n} {entry['kind']} q={len(req.eval_questions)} "
                      f"base {reply['baseline_accuracy']:.3f} adapter "
                      f"{reply['adapter_accuracy']:.3f} ({result.timings['total_s']:.2f}s)")
        except Exception as e:  # every failure is one error reply; the server carries on
            reply = protocol.error_reply(e)
            entry.update(kind="error", error=reply["error"])
            self.echo(f"serve-ttt: #{n} error {reply['error'][:200]}")
        entry["wall_s"] = time.perf_counter() - t0
        self._log(entry)
        return reply, False

    def _log(self, entry: dict) -> None:
        if self.log_path is None:
            return
        try:
            append_jsonl(self.log_path, [entry])
        except OSError as e:  # a full disk must not cost the client its reply
            self.echo(f"serve-ttt: cannot write {self.log_path}: {e}")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.ctx.term()
