"""SDFT update, gated continual loop, eval report and CLI on a tiny CPU model."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxttt import cli
from jaxttt import config as C
from jaxttt.data.packing import ensure_default_data
from jaxttt.data.tokenizer import Tokenizer
from jaxttt.model import lora
from jaxttt.model.transformer import Transformer
from jaxttt.sampling import SampleOutput
from jaxttt.sdft import loop, step
from jaxttt.sdft.data import Example, write_jsonl
from jaxttt.sdft.replay import ReplayBuffer
from jaxttt.sharding import make_mesh
from jaxttt.train.checkpoint import Checkpointer, load_model, save_model_config

EXAMPLES = [Example("Q: 2+2?", "A: 4"), Example("Q: 3+3?", "A: 6"),
            Example("Q: 1+4?", "A: 5"), Example("Q: 2+5?", "A: 7")]
MODEL = C.ModelConfig(vocab_size=512, n_layers=1, d_model=64, n_heads=2, d_head=32, d_ff=128,
                      max_seq_len=256, mhc=C.MHCConfig(mode="none"))


def _cfg(*overrides, heldout="") -> C.SDFTConfig:
    base = ["optim.lr=1e-3", "ema_decay=0.9", "blocks=2", "steps_per_block=2"]
    held = [f"eval.heldout={heldout}"] if heldout else []
    return C.load(C.SDFTConfig, "sdft/tiny.yaml", base + held + list(overrides))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return ensure_default_data(tmp_path_factory.getbasetemp() / "jaxttt-data", 512,
                               max_bytes=200_000, progress=False)


@pytest.fixture(scope="module")
def tok(data):
    return Tokenizer(data["tokenizer"])


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data):
    """A run directory holding a randomly initialised tiny model (what `load_model` reads)."""
    run = tmp_path_factory.mktemp("base")
    save_model_config(run, MODEL)
    ckpt = Checkpointer(run, async_save=False)
    ckpt.save(0, nnx.state(Transformer(MODEL, rngs=nnx.Rngs(0)), nnx.Param),
              meta={"tokenizer": str(data["tokenizer"])})
    ckpt.close()
    return run


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(C.MeshConfig())  # 8 emulated devices: batches are padded to fit


def _trainer(base_run, tok, mesh, *overrides, use_lora=False) -> step.SDFTTrainer:
    model, _ = load_model(base_run, mesh=mesh)
    cfg = _cfg(*overrides)
    if use_lora:
        lora.add_lora(model, C.LoRAConfig(rank=4, alpha=8.0), mesh=mesh)
    return step.SDFTTrainer(model, tok, cfg, mesh)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_trees_equal(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


def _trees_differ(a, b) -> bool:
    return any(not np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b)))


# ---------------------------------------------------------------------------------------------
# The update
# ---------------------------------------------------------------------------------------------
def _naive_kl(trainer, batch) -> float:
    """Σ_rows Σ_l KL(p_s || p_t) with full logits, sliced per F4 (student Cs−1…, teacher Ct−1…)."""
    s_logits = np.asarray(trainer.model()(jnp.asarray(batch["s_tok"])), np.float64)
    t_logits = np.asarray(trainer.teacher_model()(jnp.asarray(batch["t_tok"])), np.float64)
    total = 0.0
    for b, n in enumerate(batch["kl_len"]):
        s = s_logits[b, batch["s_ctx"][b] - 1:batch["s_ctx"][b] - 1 + n]
        t = t_logits[b, batch["t_ctx"][b] - 1:batch["t_ctx"][b] - 1 + n]
        ls = s - np.logaddexp.reduce(s, axis=-1, keepdims=True)
        lt = t - np.logaddexp.reduce(t, axis=-1, keepdims=True)
        total += float(np.sum(np.exp(ls) * (ls - lt)))
    return total


def test_kl_is_the_f4_aligned_full_vocabulary_kl(base_run, tok, mesh):
    tr = _trainer(base_run, tok, mesh)
    batch, stats = tr.rollout(EXAMPLES[:2], jax.random.key(1))
    assert batch["s_tok"].shape[0] % 8 == 0  # padded rows for the 8-device batch axis
    assert stats["gen_len_max"] <= 16 and batch["kl_len"][2:].sum() == 0
    loss = nnx.jit(lambda model, b, t: tr.core.loss_fn(model, b, t))
    obj, aux = loss(tr.model(), batch, tr.teacher)
    assert float(aux["n_tokens"]) == batch["kl_len"].sum() > 0
    assert float(obj) == pytest.approx(_naive_kl(tr, batch), rel=1e-4, abs=1e-6)
    assert float(obj) > 0  # teacher context (template + demonstration) differs from x
    skip2 = dataclasses.replace(tr.core.loss_fn, skip_tokens=2)  # the paper code's skip, N=2
    _, aux2 = nnx.jit(lambda model, b, t: skip2(model, b, t))(tr.model(), batch, tr.teacher)
    assert float(aux2["n_tokens"]) == np.maximum(batch["kl_len"] - 2, 0).sum()


def test_ema_teacher_moves_by_one_minus_tau_and_gets_no_gradient(base_run, tok, mesh):
    tr = _trainer(base_run, tok, mesh)
    batch, _ = tr.rollout(EXAMPLES[:2], jax.random.key(2))
    tr.update(batch)  # teacher now lags the student
    teacher_old = jax.tree.map(jnp.copy, tr.teacher)
    assert _trees_differ(teacher_old, tr.trainable)
    tr.update(batch)
    tau = 0.9
    for t_new, t_old, s in zip(_leaves(tr.teacher), _leaves(teacher_old), _leaves(tr.trainable)):
        np.testing.assert_allclose(t_new, tau * t_old + (1 - tau) * s, rtol=1e-6, atol=1e-7)
    model = tr.model()

    def teacher_loss(t):
        return tr.core.loss_fn(model, batch, t)[0]

    grads = jax.jit(jax.grad(teacher_loss))(tr.teacher)
    assert all(np.all(g == 0) for g in _leaves(grads))


def test_the_update_compiled_during_sampling_serves_every_step(base_run, tok, mesh):
    tr = _trainer(base_run, tok, mesh)
    for i in range(2):  # the second step's teacher comes from the EMA update
        batch, _ = tr.rollout(EXAMPLES[:2], jax.random.key(i))
        tr.update(batch)
    assert not tr.core._pending and len(tr.core._aot) == 1


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_each_kl_direction_decreases_on_a_fixed_batch(base_run, tok, mesh, direction):
    tr = _trainer(base_run, tok, mesh, f"kl_direction={direction}", "ema_decay=1.0")
    batch, _ = tr.rollout(EXAMPLES[:2], jax.random.key(3))
    kls = [tr.update(batch)["kl"] for _ in range(6)]
    assert all(np.isfinite(kls)) and kls[-1] < 0.7 * kls[0], kls


def test_gradient_accumulation_matches_one_big_batch(base_run, tok, mesh):
    one = _trainer(base_run, tok, mesh, "batch_size=4", "grad_accum=1")
    two = _trainer(base_run, tok, mesh, "batch_size=2", "grad_accum=2")
    s_ctx, t_ctx = one.contexts(EXAMPLES)
    ys = [[5, 6, 7], [8, 9, tok.eos_id], [10] * 12, [tok.eos_id]]  # ragged, one empty
    raw = one.sdft_batch(s_ctx, t_ctx, ys)
    m1 = one.update(one.finish(raw, ("kl_len",)))
    m2 = two.update(two.finish(raw, ("kl_len",)))
    assert m1["tokens"] == m2["tokens"] == 3 + 3 + 12
    assert m1["kl"] == pytest.approx(m2["kl"], rel=1e-5)
    for a, b in zip(_leaves(one.trainable), _leaves(two.trainable)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_empty_generations_give_zero_loss_and_no_update(base_run, tok, mesh, monkeypatch):
    real = step.generate

    def eos_first(*args, **kwargs):  # every row stops at once
        out = real(*args, **kwargs)
        tokens = np.full_like(out.tokens, tok.pad_id)
        tokens[:, 0] = tok.eos_id
        return SampleOutput(tokens, np.zeros_like(out.logprobs), np.ones_like(out.lengths))

    monkeypatch.setattr(step, "generate", eos_first)
    tr = _trainer(base_run, tok, mesh)
    before = tr.snapshot()
    m = tr.step(EXAMPLES[:2], jax.random.key(4))
    assert m["loss"] == 0.0 and m["kl"] == 0.0 and m["tokens"] == 0.0
    assert m["grad_norm"] == 0.0 and m["empty_frac"] == 1.0 and m["skipped"] == 1.0
    _assert_trees_equal(tr.trainable, before.trainable)
    _assert_trees_equal(tr.opt_state, before.opt_state)
    _assert_trees_equal(tr.teacher, before.teacher)


def test_a_non_finite_update_is_skipped_and_counted(base_run, tok, mesh):
    """A NaN in the teacher makes the KL NaN: student, optimiser and teacher stay as they were."""
    tr = _trainer(base_run, tok, mesh)
    s_ctx, t_ctx = tr.contexts(EXAMPLES[:2])
    batch = tr.finish(tr.sdft_batch(s_ctx, t_ctx, [[5, 6, 7], [8, 9]]), ("kl_len",))
    tr.teacher = jax.tree.map(lambda x: x * jnp.nan, tr.teacher)
    before = tr.snapshot()
    m = tr.update(batch)
    assert m["skipped"] == 1.0 and not np.isfinite(m["loss"]) and tr.core.skipped == 1
    for a, b in ((tr.trainable, before.trainable), (tr.opt_state, before.opt_state)):
        _assert_trees_equal(a, b)
    assert all(np.isnan(x).all() for x in _leaves(tr.teacher))  # not moved toward the student


def test_snapshot_restore_is_bitwise(base_run, tok, mesh):
    tr = _trainer(base_run, tok, mesh)
    snap = tr.snapshot()
    tr.step(EXAMPLES[:2], jax.random.key(5))
    assert _trees_differ(tr.trainable, snap.trainable)
    tr.restore(snap)
    tr.step(EXAMPLES[:2], jax.random.key(6))  # donation must not invalidate the snapshot
    tr.restore(snap)
    for a, b in ((tr.trainable, snap.trainable), (tr.opt_state, snap.opt_state),
                 (tr.teacher, snap.teacher)):
        _assert_trees_equal(a, b)


def test_lora_student_trains_adapters_only_and_saves_a_plain_model(base_run, tok, mesh, tmp_path):
    tr = _trainer(base_run, tok, mesh, use_lora=True)
    base_before = jax.tree.map(jnp.copy, tr.frozen)
    s_ctx, t_ctx = tr.contexts(EXAMPLES[:2])
    batch = tr.finish(tr.sdft_batch(s_ctx, t_ctx, [[5, 6, 7, 8], [9, 10, tok.eos_id]]),
                       ("kl_len",))
    for _ in range(2):  # B moves on step 1, A from step 2 (B starts at 0)
        assert tr.update(batch)["tokens"] == 7
    _assert_trees_equal(tr.frozen, base_before)
    assert all(_trees_differ(x, jnp.zeros_like(x)) for x in jax.tree.leaves(tr.trainable))
    params = tr.effective_params()
    variables = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert variables and not any(isinstance(v, nnx.LoRAParam) for v in variables)
    save_model_config(tmp_path, MODEL)
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, params)
    ckpt.close()
    merged, _ = load_model(tmp_path)
    toks = jnp.asarray([[3, 40, 41, 42, 43]])
    np.testing.assert_allclose(merged(toks), tr.model()(toks), rtol=1e-4, atol=1e-4)


def test_sft_baseline_lowers_demonstration_nll(base_run, tok, mesh):
    tr = _trainer(base_run, tok, mesh, "objective=sft")
    assert tr.teacher is None
    nlls = [tr.step(EXAMPLES, jax.random.key(0))["nll"] for _ in range(4)]
    assert nlls[-1] < nlls[0]


# ---------------------------------------------------------------------------------------------
# Replay and the gated loop
# ---------------------------------------------------------------------------------------------
def test_replay_fraction_matches_the_ratio():
    stream = loop.ExampleStream([Example(f"q{i}", f"a{i}") for i in range(10)], seed=0)
    buf = ReplayBuffer(capacity=100, seed=0)
    buf.add([Example("old", "x")])
    fracs = [loop.next_batch(stream, buf, 4, 0.3)[1] for _ in range(300)]
    assert np.mean(fracs) == pytest.approx(0.3, abs=0.04)
    assert len(buf) == 100 and buf.n_seen == 1 + 300 * 4  # capped; every new example offered


class _Recorder(step.SDFTTrainer):
    """Keeps the last trainer built by run_sdft and the weights it held before each revert."""
    last = None
    reverted_from: list = []

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        _Recorder.last = self

    def restore(self, snap):
        _Recorder.reverted_from.append(jax.tree.map(jnp.copy, self.trainable))
        super().restore(snap)


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_rejected_blocks_revert_to_the_pre_update_weights_bitwise(base_run, data, tok, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setattr(loop, "SDFTTrainer", _Recorder)
    _Recorder.reverted_from = []
    write_jsonl(tmp_path / "d.jsonl", EXAMPLES)
    cfg = _cfg("gate.max_ppl_increase=-1.0", heldout=data["val"])  # any perplexity "regresses"
    s = loop.run_sdft(base_run, tmp_path / "d.jsonl", tmp_path / "out", cfg, progress=False)
    assert (s["accepted"], s["rejected"], s["checkpoint_step"]) == (0, 2, 0)
    base_params, _ = load_model(base_run)
    tr = _Recorder.last
    assert tr.n_steps == 4 and len(_Recorder.reverted_from) == 2
    assert all(_trees_differ(w, tr.trainable) for w in _Recorder.reverted_from)
    _assert_trees_equal(tr.trainable, nnx.state(base_params, nnx.Param))
    for b in range(2):
        d = json.loads((tmp_path / f"out/block_{b:03d}/gate_decision.json").read_text())
        assert not d["accepted"] and d["reasons"][0].startswith("perplexity: rose")
    gates = [r["gate"] for r in _jsonl(tmp_path / "out/metrics.jsonl") if "gate" in r]
    assert gates == ["rejected", "rejected"]
    saved, _ = load_model(tmp_path / "out")
    _assert_trees_equal(nnx.state(saved, nnx.Param), nnx.state(base_params, nnx.Param))
    assert s["replay_size"] == 0  # the replay buffer was reverted with the weights


def test_accepted_blocks_save_a_loadable_run_and_eval_reports_it(base_run, data, tok, tmp_path,
                                                                 monkeypatch, capsys):
    monkeypatch.setattr(loop, "SDFTTrainer", _Recorder)
    write_jsonl(tmp_path / "d.jsonl", EXAMPLES)
    cfg = _cfg("gate.max_ppl_increase=10", "gate.max_probe_drop=1", heldout=data["val"])
    out = tmp_path / "out"
    s = loop.run_sdft(base_run, tmp_path / "d.jsonl", out, cfg, progress=False)
    assert (s["accepted"], s["rejected"], s["checkpoint_step"]) == (2, 0, 4)
    for name in ("config.yaml", "model.yaml", "summary.json", "block_001/eval_before.json",
                 "block_001/eval_after.json", "block_001/gate_decision.json"):
        assert (out / name).is_file(), name
    rows = _jsonl(out / "metrics.jsonl")
    steps = [r for r in rows if "kl" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("kl", "gen_len_mean", "gen_len_min", "gen_len_max", "replay", "teacher_gap"):
        assert all(np.isfinite(r[key]) for r in steps), key
    assert [r["gate"] for r in rows if "gate" in r] == ["accepted", "accepted"]
    model, meta = load_model(out)
    _assert_trees_equal(nnx.state(model, nnx.Param), _Recorder.last.trainable)
    assert meta["tokenizer"] == str(tok.path) and len(meta["replay"]["items"]) == 8

    # a second continual session starts from this run and replays its buffer at once
    s2 = loop.run_sdft(out, tmp_path / "d.jsonl", tmp_path / "out2",
                       _cfg("blocks=1", "steps_per_block=1", "replay_ratio=1.0",
                            "gate.enabled=false", heldout=data["val"]), progress=False)
    assert _jsonl(tmp_path / "out2/metrics.jsonl")[0]["replay"] == 1.0 and s2["accepted"] == 1

    report = tmp_path / "report.json"
    assert cli.main(["eval", "--run", str(out), "--heldout", str(data["val"]), "--seq-len", "64",
                     "--windows", "8", "--max-new-tokens", "8", "--out", str(report)]) == 0
    rep = json.loads(report.read_text())
    assert [g["accepted"] for g in rep["gates"]] == [True, True]
    assert rep["model"]["step"] == 4 and rep["summary"]["accepted"] == 2
    after = json.loads((out / "block_001/eval_after.json").read_text())
    assert rep["eval"]["perplexity"] == pytest.approx(after["perplexity"], rel=1e-4)
    assert rep["eval"]["probe/overall"] == after["probe/overall"]


def test_cli_errors_name_the_bad_line_and_refuse_to_overwrite(base_run, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "demonstration": "b"}\n{"prompt": "a"}\n')
    args = ["sdft", "--ckpt", str(base_run), "--data", str(bad), "--config", "sdft/tiny.yaml"]
    assert cli.main(args + ["--out", str(tmp_path / "o1")]) == 1  # one line, status 1
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "missing key 'demonstration'" in err
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "keep.txt").write_text("x")
    with pytest.warns(UserWarning, match="skipped 1 bad line"):
        assert cli.main(args + ["--out", str(tmp_path / "o2"), "--skip-bad"]) == 1
    assert "not empty" in capsys.readouterr().err
    assert cli.main(args + ["--out", str(tmp_path / "o3"), "kl_direction=sideways"]) == 1
    assert "kl_direction" in capsys.readouterr().err


@pytest.mark.parametrize("reference, gates", [("block", ["accepted", "accepted"]),
                                              ("session", ["accepted", "rejected"])])
def test_session_reference_bounds_drift_accumulated_over_blocks(base_run, tmp_path, monkeypatch,
                                                                reference, gates):
    ppl = iter([10.0, 10.4, 10.8])  # +4% then +3.8% per block: +8% over the session
    monkeypatch.setattr(loop, "evaluate_config", lambda *a, **k: {"perplexity": next(ppl)})
    write_jsonl(tmp_path / "d.jsonl", EXAMPLES)
    cfg = _cfg("steps_per_block=1", f"gate.reference={reference}")
    s = loop.run_sdft(base_run, tmp_path / "d.jsonl", tmp_path / "out", cfg, progress=False)
    assert ["accepted" if g["accepted"] else "rejected" for g in s["gates"]] == gates
    d = json.loads((tmp_path / "out/block_001/gate_decision.json").read_text())
    assert d["reference"] == reference and d["perplexity_before"] == {"block": 10.4,
                                                                      "session": 10.0}[reference]


def test_default_heldout_is_the_val_split_packed_with_the_runs_tokenizer(tok, tmp_path):
    from jaxttt.data.packing import load_packed, read_meta
    from jaxttt.eval.report import default_heldout

    path = default_heldout(tok, cache=tmp_path)
    assert read_meta(path)["tokenizer_sha256"] == tok.sha256
    assert len(load_packed(path, expect_vocab=tok.vocab_size)[0]) > 1000
    mtime = path.stat().st_mtime_ns
    assert default_heldout(tok, cache=tmp_path) == path and path.stat().st_mtime_ns == mtime


def test_instruct_prompts_go_through_the_chat_template(base_run, tok, mesh, tmp_path):
    """Student and teacher contexts are each one user turn of the instruct tokenizer's chat
    template (then its generation prompt); chat=off and SentencePiece keep `[EOS] text`."""
    from test_discover import chat_tokenizer

    from jaxttt.eval.report import encode_prompt
    from jaxttt.sdft.data import teacher_prompt

    hf = chat_tokenizer(tmp_path)
    turn = lambda text: hf.chat_ids([{"role": "user", "content": text}])  # noqa: E731
    model, _ = load_model(base_run, mesh=mesh)
    tr = step.SDFTTrainer(model, hf, _cfg(), mesh)
    s_ctx, t_ctx = tr.contexts(EXAMPLES[:2])
    assert s_ctx == [turn(ex.prompt) for ex in EXAMPLES[:2]]
    assert t_ctx == [turn(teacher_prompt(ex.prompt, ex.demonstration)) for ex in EXAMPLES[:2]]
    batch, _ = tr.rollout(EXAMPLES[:2], jax.random.key(0))
    assert np.isfinite(tr.update(batch)["kl"])
    off = step.SDFTTrainer(load_model(base_run, mesh=mesh)[0], hf, _cfg("chat=off"), mesh)
    assert off.contexts(EXAMPLES[:1])[0] == [encode_prompt(hf, EXAMPLES[0].prompt, 64)]
    sp_ctx, _ = _trainer(base_run, tok, mesh).contexts(EXAMPLES[:1])
    assert sp_ctx == [[tok.eos_id] + tok.encode(EXAMPLES[0].prompt)]
