"""Seeds and budgets for the README's results: `seal-bench --seed A B` and
`ponder eval --budget B1 B2` on tiny random models.

SEAL: each seed draws its own passages and seeds its requests (adapter init, shuffling), and the
spread over seeds is the per-seed question accuracy. Ponder: the chunks are scored once and every
budget's policies are decided on the same tables; recovery vs budget is mean ± sd over seeds.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxttt import cli
from jaxttt import config as C
from jaxttt.config import MHCConfig, ModelConfig
from jaxttt.data.packing import pack
from jaxttt.data.tokenizer import Tokenizer, train_tokenizer
from jaxttt.model.transformer import Transformer
from jaxttt.ponder import evaluate as E
from jaxttt.ponder.actions import ChunkRunner
from jaxttt.ponder.config import PonderEvalConfig, PonderTrainConfig
from jaxttt.ponder.model import attach
from jaxttt.seal import bench, knowledge
from jaxttt.seal.engine import EngineConfig, TTTEngine
from jaxttt.seal.protocol import Limits, parse_request


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """`ponder eval` turns on the persistent XLA cache under $JAXTTT_CACHE: keep it private."""
    mp = pytest.MonkeyPatch()
    mp.setenv("JAXTTT_CACHE", str(tmp_path_factory.mktemp("jaxttt_cache")))
    old = jax.config.jax_compilation_cache_dir
    yield
    jax.config.update("jax_compilation_cache_dir", old)
    mp.undo()


# ---- SEAL ------------------------------------------------------------------------------------
def test_seal_bench_seeds_draw_passages_seed_requests_and_spread(tmp_path, monkeypatch):
    lines = []
    for item in knowledge.make_knowledge_set(12, seed=0):
        req = knowledge.to_request(item)
        lines += req["train_sequences"] + [q["question"] + "\n" + q["answer"]
                                           for q in req["eval_questions"]]
    (tmp_path / "c.txt").write_text("\n".join(lines))
    tok = Tokenizer(train_tokenizer([str(tmp_path / "c.txt")], tmp_path / "tok", 512, code=True))
    mcfg = ModelConfig(vocab_size=512, n_layers=1, d_model=64, n_heads=2, d_head=32, d_ff=128,
                       max_seq_len=256, mhc=MHCConfig(mode="none"))
    engine = TTTEngine(Transformer(mcfg, rngs=nnx.Rngs(0)), tok,
                       cfg=EngineConfig(max_new_tokens=4, prompt_style="base"))
    sent = []
    real = knowledge.to_request
    monkeypatch.setattr(bench.knowledge, "to_request",
                        lambda item, **kw: sent.append(real(item, **kw)) or sent[-1])
    report = bench.run_seeds(engine, n=1, seeds=[3, 4], echo=lambda *_: None,
                             hparams=dict(finetune_epochs=1, lora_rank=2, lora_alpha=4.0))

    # each seed's passages are the knowledge set of that seed, and the seeds differ
    titles = [[r["title"] for r in run["requests"]] for run in report["per_seed"]]
    assert titles == [[it["title"] for it in knowledge.make_knowledge_set(1, s)] for s in (3, 4)]
    assert titles[0] != titles[1]
    # the seed reaches the wire (adapter init, dropout, shuffling) next to the hyper-parameters
    assert [parse_request(r, Limits()).seed for r in sent] == [3, 4]
    assert all(parse_request(r, Limits()).lora_rank == 2 for r in sent)
    # the spread is over seeds of each seed's question accuracy, from the graded flags
    for key, flag in (("baseline_accuracy", "baseline_correct"),
                      ("adapter_accuracy", "adapter_correct")):
        acc = [float(np.mean([c for r in run["requests"] for c in r[flag]]))
               for run in report["per_seed"]]
        st = report["across_seeds"][key]
        assert st["per_seed"] == pytest.approx(acc)
        assert st["mean"] == pytest.approx(statistics.fmean(acc))
        assert st["sd"] == pytest.approx(statistics.stdev(acc))
        assert st["questions"] == 6 and st["correct"] == round(sum(acc) * 3)
    png = bench.plot_seeds(report, tmp_path / "seal.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seal_bench_bad_seed_is_one_line_before_loading(tmp_path, capsys):
    assert cli.main(["seal-bench", "--ckpt", str(tmp_path / "none"), "--seed", "0", "-1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--seed" in err and "-1" in err


# ---- PonderTTT -------------------------------------------------------------------------------
def test_ponder_budgets_share_one_scoring_and_report_seed_spread(tmp_path):
    """What `ponder eval --budget B1 B2` runs: score each seed once, decide per budget."""
    src = Path(__file__).resolve().parents[1] / "jaxttt"
    text = "\n".join(p.read_text() for p in sorted(src.rglob("*.py"))[:20])
    (tmp_path / "a.txt").write_text(text)
    tok_path = train_tokenizer([tmp_path / "a.txt"], tmp_path / "tok", 512, code=True)
    pack(tok_path, [tmp_path / "a.txt"], tmp_path / "a.bin", progress=False)
    tok = Tokenizer(tok_path)
    mcfg = ModelConfig(vocab_size=tok.vocab_size, n_layers=2, d_model=32, n_heads=2, d_head=16,
                       d_ff=64, max_seq_len=64, mhc=MHCConfig(mode="none"))
    tcfg = C.load(PonderTrainConfig, None, ["chunk_len=32", "ttt.mini_batch=8", "ttt.n_heads=2"])
    runner = ChunkRunner(attach(Transformer(mcfg, rngs=nnx.Rngs(0)), tcfg.ttt, seed=0))
    small = [f"val={tmp_path / 'a.bin'}", f"train={tmp_path / 'a.bin'}", "chunks=16",
             "train_chunks=8", "episode_len=8", "ppo_iters=1", "ppo_episodes=1", "bootstrap=10",
             "batch_size=16", "calib_chunks=4"]
    budgets = (1.5, 2.5)
    ecfgs = [C.load(PonderEvalConfig, None, small + [f"budget={b}"]) for b in budgets]
    scored = [E.score_seed(runner, tok, tcfg, ecfgs[0], seed=s, block=s, progress=lambda m: None)
              for s in (0, 1)]
    dims = dict(d_model=32, n_heads=2, d_head=16, mini_batch=8)
    summaries = [E.summarise([E.decide_seed(runner, sc, ecfg, seed=s, progress=lambda m: None)
                              for s, sc in enumerate(scored)], ecfg, ttt_dims=dims)
                 for ecfg in ecfgs]
    rec = json.loads(E.write_recovery(summaries, tmp_path).read_text())
    assert rec["budgets"] == list(budgets) and rec["seeds"] == 2
    assert rec["target_rate"] == pytest.approx([0.25, 0.75])  # UPDATE_1 costs 3, SKIP 1
    skip = summaries[0]["methods"]["SKIP"]["loss_per_seed"]
    for i, (b, summ) in enumerate(zip(budgets, summaries)):
        m = summ["methods"]
        assert m["SKIP"]["loss_per_seed"] == skip  # one scoring: fixed actions agree exactly
        assert m["oracle"]["update_rate"] <= rec["target_rate"][i] + 1e-9
        assert m["ppo"]["cost"] <= b + 1e-9  # the hard budget holds at each budget
        for name in ("random", "gated", "ppo", "oracle"):
            per = [r for r in m[name]["recovery_per_seed"] if np.isfinite(r)]
            assert m[name]["recovery_seed_mean"] == pytest.approx(np.mean(per))
            assert m[name]["recovery_seed_sd"] == pytest.approx(np.std(per, ddof=1))
            assert rec["methods"][name]["mean"][i] == m[name]["recovery_seed_mean"]
            assert rec["methods"][name]["sd"][i] == m[name]["recovery_seed_sd"]
            # recovery per seed is (SKIP - method) / (SKIP - oracle) of that seed's losses
            for s in range(2):
                gap = m["SKIP"]["loss_per_seed"][s] - m["oracle"]["loss_per_seed"][s]
                if gap > 0:
                    assert m[name]["recovery_per_seed"][s] == pytest.approx(
                        (m["SKIP"]["loss_per_seed"][s] - m[name]["loss_per_seed"][s]) / gap)
    gated = [summ["methods"]["gated"]["update_rate"] for summ in summaries]
    assert gated[1] > gated[0]  # the gate spends more at the larger budget
    assert (tmp_path / "recovery.png").read_bytes()[:4] == b"\x89PNG"


def test_ponder_eval_bad_budget_in_a_list_is_one_line(tmp_path, capsys):
    out = tmp_path / "e"
    assert cli.main(["ponder", "eval", "--run", str(tmp_path / "nope"), "--out", str(out),
                     "--budget", "2.0", "20"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "budget" in err and "20" in err
    assert not out.exists()
