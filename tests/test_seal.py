"""SEAL TTT server: wire format, validation, masking, grading, and a live server on a tiny model.

The live tests share one server (a thread on a free loopback port) over a 1-layer random model
whose attention is scaled up so its greedy answers depend on the question; clients are real
pyzmq REQ sockets replaying SEAL's payloads.
"""
import json
import threading
from pathlib import Path

import jax
import numpy as np
import pytest
import zmq
from flax import nnx

from jaxttt import config as C
from jaxttt.data.tokenizer import Tokenizer, train_tokenizer
from jaxttt.model.transformer import Transformer
from jaxttt.seal import grading, knowledge, prompts
from jaxttt.seal.engine import EngineConfig, TTTEngine
from jaxttt.seal.protocol import (Limits, Question, RequestError, TTTRequest, build_reply,
                                  decode_frames, parse_request)
from jaxttt.seal.server import TTTServer

MODEL = C.ModelConfig(vocab_size=512, n_layers=1, d_model=64, n_heads=2, d_head=32, d_ff=128,
                      max_seq_len=256, mhc=C.MHCConfig(mode="none"))
REPLY_TYPES = {"baseline_accuracy": float, "adapter_accuracy": float, "adapter_gain": float,
               "baseline_texts": str, "adapter_texts": str, "baseline_correct": bool,
               "adapter_correct": bool, "gains": int}
ITEMS = knowledge.make_knowledge_set(4, seed=1)


# ---- protocol (no model) ---------------------------------------------------------------------
def test_defaults_are_seals():
    req = parse_request({"train_sequences": ["a"], "eval_questions": []}, Limits())
    assert (req.lora_rank, req.lora_alpha, req.lora_dropout, req.finetune_epochs,
            req.finetune_lr, req.batch_size, req.gradient_accumulation_steps,
            req.end_mask_substring, req.skip_training, req.lora_targets) == \
        (32, 64.0, 0.0, 10, 1e-3, 1, 1, None, False, ("q", "v"))
    # SEAL's query_server sends "" for no masking; an empty list is base-only
    assert parse_request({"end_mask_substring": ""}, Limits()).end_mask_substring is None
    assert parse_request({"train_sequences": []}, Limits()).base_only
    assert parse_request({"cmd": "shutdown"}, Limits()) == "shutdown"
    assert TTTRequest(train_sequences=("a",) * 5, batch_size=2, finetune_epochs=3).steps() == 9


@pytest.mark.parametrize("msg, field", [
    ({"lora_rank": "32"}, "lora_rank"), ({"lora_rank": True}, "lora_rank"),
    ({"lora_rank": 0}, "lora_rank"), ({"finetune_lr": -1}, "finetune_lr"),
    ({"lora_dropout": 1.0}, "lora_dropout"), ({"skip_training": 1}, "skip_training"),
    ({"train_sequences": "abc"}, "train_sequences"), ({"train_sequences": ["a", 3]},
                                                      "train_sequences[1]"),
    ({"eval_questions": [{"question": "q"}]}, "eval_questions[0].answer"),
    ({"eval_questions": [{"question": "q", "answer": 5}]}, "eval_questions[0].answer"),
    ({"eval_questions": {"question": "q"}}, "eval_questions"),
    ({"end_mask_substring": 3}, "end_mask_substring"), ({"lora_targets": ["qq"]}, "lora_targets"),
    ({"lora_rnak": 8}, "lora_rnak"), ({"cmd": "reboot"}, "cmd"),
    ({"finetune_epochs": 101}, "finetune_epochs"),
    ({"train_sequences": ["x"] * 513}, "train_sequences"),
])
def test_bad_fields_are_named(msg, field):
    with pytest.raises(RequestError, match=rf"^{__import__('re').escape(field)}: "):
        parse_request(msg, Limits())


@pytest.mark.parametrize("frames, why", [
    ([b"{not json"], "not JSON"), ([b"\xff\xfe"], "not UTF-8"), ([b"[1, 2]"], "a list"),
    ([b"{}", b"{}"], "2 frames"), ([b'{"a": NaN}'], "NaN"), ([b"x" * 2000], "bytes exceeds"),
    ([b"[" * 100_000], "nested too deeply"),
])
def test_malformed_frames(frames, why):
    with pytest.raises(RequestError, match=why):
        decode_frames(frames, Limits(max_request_bytes=1000 if len(frames[0]) == 2000 else
                                     1 << 20))


def test_reply_gains_and_rounding():
    r = build_reply(["a", "b", "c"], [True, False, True], ["a", "b", "c"], [False, True, True])
    assert r["gains"] == [-1, 1, 0]
    assert r["baseline_accuracy"] == 0.6667 and r["adapter_gain"] == 0.0
    assert build_reply([], [], [], [])["baseline_accuracy"] == 0.0


def test_default_grader_normalises():
    q = [Question("Who?", "The Vel-Ark Guild"), Question("Year?", "1650"),
         Question("Town?", "Rin"), Question("Who?", "Bob")]
    got = grading.substring_grader(q, ["It was vel ark guild, of course.", "in 16500",
                                       "Brinmor", "   "])
    assert got == [True, False, False, False]  # whole words only; empty is wrong
    with pytest.raises(ValueError, match="module:function"):
        grading.load_grader("nocolon")
    with pytest.raises(TypeError, match="expected 2 booleans"):
        grading.run_grader(lambda qs, ps: [1, 0], q[:2], ["a", "b"])
    assert grading.load_grader("jaxttt.seal.grading:substring_grader") is \
        grading.substring_grader


# ---- tokenizer-level masking -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    lines = []
    for item in knowledge.make_knowledge_set(30, seed=0) + ITEMS:
        req = knowledge.to_request(item)
        lines += req["train_sequences"] + [q["question"] + "\n" + q["answer"]
                                           for q in req["eval_questions"]]
    lines += [prompts.ANSWER_TEMPLATE_BASE.format(question="Who?")] * 3
    corpus = tmp_path_factory.mktemp("seal") / "corpus.txt"
    corpus.write_text("\n".join(lines))
    return Tokenizer(train_tokenizer([str(corpus)], corpus.with_name("tok"), 512, code=True))


def test_end_mask_substring_masks_through_first_match(tok):
    text = "Title\nQuestion: who? Answer: Bob. Answer: again"
    (ids, k), = prompts.train_rows(tok, [text], 256, "Answer:")
    assert ids[-1] == tok.eos_id
    assert "Answer:" in tok.decode(ids[:k]) and "Answer:" not in tok.decode(ids[:k - 1])
    batch = prompts.pack_rows([(ids, k)], 64, pad_id=0)
    trained = np.flatnonzero(batch["mask"][0])
    # trained targets are exactly tokens k .. end (incl. EOS); nothing before, no padding
    np.testing.assert_array_equal(batch["targets"][0][trained], ids[k:])
    (ids0, k0), = prompts.train_rows(tok, [text], 256, "not there")
    assert k0 == 0 and prompts.pack_rows([(ids0, 0)], 64, 0)["mask"].sum() == len(ids0) - 1
    (cut, _), = prompts.train_rows(tok, [text * 20], 16, None)
    assert len(cut) == 16 and cut[-1] == tok.eos_id


def test_lora_dropout_key_comes_with_the_batch():
    """The trainer carries no RNG state: each step's batch brings the dropout key."""
    from jaxttt.model import lora
    from jaxttt.seal.engine import _loss_fn

    model = Transformer(MODEL, rngs=nnx.Rngs(0))
    lora.add_lora(model, C.LoRAConfig(rank=4, alpha=8.0, dropout=0.5, targets=("q", "v")))
    for _, m in nnx.iter_modules(model):
        if getattr(m, "lora_b", None) is not None:  # non-zero B: the adapters matter
            m.lora_b[...] = jax.random.normal(jax.random.key(1), m.lora_b.shape)
    batch = prompts.pack_rows([([5, 6, 7, 8, 9, 10], 0)] * 2, 8, pad_id=0)

    @jax.jit
    def pure_loss(graphdef, state, b):  # as inside the trainer: a merged copy, traced
        return _loss_fn(nnx.merge(graphdef, state), b)[0]

    def loss(key_row):
        b = {**batch, "dropout_key": np.array([key_row] * 2, np.uint32)}
        return float(pure_loss(*nnx.split(model), b))

    model.train()
    assert loss([1, 2]) == loss([1, 2]) != loss([3, 4])
    model.eval()  # answering: no dropout, whatever the key
    assert loss([1, 2]) == loss([3, 4])


# ---- a live server ---------------------------------------------------------------------------
def _sharp_model() -> Transformer:
    """Random init with attention values/outputs scaled up, so that greedy answers depend on
    the whole prompt (at 0.02 init every answer is the same repeated token)."""
    model = Transformer(MODEL, rngs=nnx.Rngs(0))
    for block in model.blocks:
        for lin in (block.attn.v, block.attn.o):
            lin.kernel[...] = lin.kernel[...] * 30.0
    return model


@pytest.fixture(scope="module")
def server(tok, tmp_path_factory):
    engine = TTTEngine(_sharp_model(), tok, cfg=EngineConfig(max_new_tokens=16),
                       keep_adapter_dir=tmp_path_factory.mktemp("adapters"))
    log = tmp_path_factory.mktemp("log") / "requests.jsonl"
    srv = TTTServer(engine, port=0, log_path=log, echo=None)
    srv.bind()
    srv.result = {}
    srv.thread = threading.Thread(target=lambda: srv.result.setdefault("rc", srv.serve()),
                                  daemon=True)
    srv.thread.start()
    yield srv
    srv.thread.join(timeout=5)
    if srv.thread.is_alive():  # a failed test left it running: stop it
        _ask_raw(srv.port, [b'{"cmd": "shutdown"}'], timeout_s=60)
        srv.thread.join(timeout=30)


def _ask_raw(port: int, frames: list[bytes], timeout_s: float = 300) -> dict:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        sock.send_multipart(frames)
        assert sock.poll(int(timeout_s * 1000)), "no reply from the server"
        return json.loads(sock.recv())
    finally:
        sock.close(0)


def _ask(port: int, msg: dict) -> dict:
    return _ask_raw(port, [json.dumps(msg).encode()])


def _payload(item, **kw) -> dict:
    """SEAL's query_server payload for one item (every field it sends)."""
    base = dict(lora_rank=8, lora_alpha=16, lora_dropout=0, finetune_epochs=3, finetune_lr=1e-3,
                batch_size=2, gradient_accumulation_steps=1, end_mask_substring="")
    return knowledge.to_request(item, **{**base, **kw})


def _params(engine) -> dict:
    return {"/".join(map(str, k)): np.asarray(v)
            for k, v in nnx.to_flat_state(nnx.state(engine.fresh_model()))}


def test_training_request_reply_and_pristine_base(server):
    before = _params(server.engine)
    base_only = _ask(server.port, _payload(ITEMS[0], skip_training=True))
    reply = _ask(server.port, {**_payload(ITEMS[0]), "return_timings": True})
    assert "error" not in reply, reply
    for key, typ in REPLY_TYPES.items():
        val = reply[key]
        assert all(isinstance(v, typ) for v in val) if isinstance(val, list) else \
            isinstance(val, typ), key
    n = len(ITEMS[0]["questions"])
    assert all(len(reply[k]) == n for k in REPLY_TYPES if isinstance(reply[k], list))
    assert reply["gains"] == [int(a) - int(b) for a, b in zip(reply["adapter_correct"],
                                                              reply["baseline_correct"])]
    assert set(reply["timings"]) == {"baseline_eval_s", "finetune_s", "adapted_eval_s",
                                     "total_s"}
    # the base-only reply of the same questions equals this request's baseline
    assert base_only["baseline_texts"] == reply["baseline_texts"]
    after = _params(server.engine)  # bitwise the pristine base: same arrays, no adapters
    assert after.keys() == before.keys() and not any("lora" in k for k in after)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    assert _ask(server.port, _payload(ITEMS[0], skip_training=True)) == base_only
    log = [json.loads(line) for line in server.log_path.read_text().splitlines()]
    ttt = [e for e in log if e["kind"] == "ttt"][-1]
    epoch_loss = ttt["train"]["epoch_loss"]
    assert ttt["train"]["steps"] == 3 * 3 and epoch_loss[-1] < epoch_loss[0], epoch_loss
    assert ttt["train"]["lr_first"] == pytest.approx(1e-3)
    assert ttt["train"]["lr_last"] == pytest.approx(1e-3 / 9, rel=1e-5)  # linear decay to 0
    assert Path(ttt["train"]["adapter_dir"], "lora.json").is_file()
    peft = json.loads(Path(ttt["train"]["peft_dir"], "adapter_config.json").read_text())
    assert (peft["r"], peft["lora_alpha"], peft["target_modules"]) == (8, 16, ["q_proj", "v_proj"])


def test_skip_training_twice_then_malformed_then_ok(server):
    req = _payload(ITEMS[1], skip_training=True)
    first, second = _ask(server.port, req), _ask(server.port, req)
    assert first == second and first["adapter_texts"] == first["baseline_texts"]
    assert first["gains"] == [0] * len(ITEMS[1]["questions"]) and first["adapter_gain"] == 0.0
    for frames in ([b"{oops"], [b"\xff"], [b"{}", b"{}"], [b""], [b"1" * (17 << 20)]):
        err = _ask_raw(server.port, frames)
        assert list(err) == ["error"] and err["error"].startswith("RequestError: message:")
    for bad, field in (({"lora_rank": "8"}, "lora_rank"), ({"finetune_lr": None}, "finetune_lr"),
                       ({"eval_questions": [{"question": 1, "answer": "x"}]},
                        "eval_questions[0].question")):
        err = _ask(server.port, {**req, **bad})
        assert err["error"].startswith(f"RequestError: {field}: "), err
    assert _ask(server.port, req) == first  # still serving, same answers


def test_statelessness_across_training_requests(server):
    req = _payload(ITEMS[2])
    a = _ask(server.port, req)
    _ask(server.port, _payload(ITEMS[3], seed=7))  # another round in between
    b = _ask(server.port, req)
    assert a["baseline_texts"] == b["baseline_texts"]
    assert a == b  # same seed: the whole round is reproducible
    assert len(set(a["baseline_texts"])) > 1  # answers depend on the question


def test_two_concurrent_clients(server):
    reqs = [_payload(ITEMS[i], skip_training=True) for i in (1, 3)]
    alone = [_ask(server.port, r) for r in reqs]
    got: dict[int, dict] = {}
    barrier = threading.Barrier(2)

    def client(i):
        barrier.wait()
        for _ in range(3):
            got.setdefault(i, [])
            got[i].append(_ask(server.port, reqs[i]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert alone[0]["baseline_texts"] != alone[1]["baseline_texts"]
    for i in range(2):
        assert got[i] == [alone[i]] * 3


def test_client_query_retries_and_raises(server):
    from jaxttt.seal.client import TTTServerError, query

    req = _payload(ITEMS[1], skip_training=True)
    assert query(req, port=server.port) == _ask(server.port, req)
    with pytest.raises(TTTServerError, match="lora_rank: expected an integer"):
        query({**req, "lora_rank": -1}, port=server.port)
    with pytest.raises(TTTServerError, match=r"no reply .*\(after 2 attempts\)"):
        query(req, port=_free_port(), timeout_s=0.2, retries=2)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shutdown_says_bye(server):
    assert _ask(server.port, {"cmd": "shutdown"}) == {"status": "bye"}
    server.thread.join(timeout=30)
    assert not server.thread.is_alive() and server.result["rc"] == 0 and server.sock is None


# ---- the command in its own process ----------------------------------------------------------
def test_cli_process_serves_and_exits_zero(tok, tmp_path):
    import subprocess
    import sys

    from jaxttt.train.checkpoint import Checkpointer, save_model_config

    run = tmp_path / "run"
    run.mkdir()
    save_model_config(run, MODEL)
    ckpt = Checkpointer(run, async_save=False)
    ckpt.save(0, nnx.state(Transformer(MODEL, rngs=nnx.Rngs(0)), nnx.Param),
              meta={"tokenizer": str(tok.path)})
    ckpt.close()
    bad = subprocess.run([sys.executable, "-m", "jaxttt.cli", "serve-ttt", "--ckpt",
                          str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert bad.stderr.startswith("jaxttt serve-ttt: error:")
    port = _free_port()  # the server binds it a moment later
    log = tmp_path / "log.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "jaxttt.cli", "serve-ttt", "--ckpt", str(run),
                             "--port", str(port), "--log", str(log)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        err = _ask_raw(port, [b"\x00not json"], timeout_s=120)
        assert err["error"].startswith("RequestError: message: not UTF-8") or \
            err["error"].startswith("RequestError: message: not JSON"), err
        assert _ask(port, {"cmd": "shutdown"}) == {"status": "bye"}
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [json.loads(x)["kind"] for x in log.read_text().splitlines()] == ["error", "shutdown"]
    assert f"listening on tcp://127.0.0.1:{port}" in proc.stdout.read()
