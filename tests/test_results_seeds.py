"""Seeds and budgets for the README's results: `seal-bench --seed A B` and
`ponder eval --budget B1 B2` on tiny random models.

SEAL (a live server on a 1-layer random model): each seed draws its own passages and seeds its
requests (adapter init, shuffling); the spread over seeds is the per-seed question accuracy.
Ponder: every budget's policies are decided on the same scored tables (here tables drawn from a
known model of the chunks); recovery vs budget is mean ± sd over seeds.
"""
from __future__ import annotations

import json
import statistics

import jax
import numpy as np
import pytest
from flax import nnx

from jaxttt import cli
from jaxttt import config as C
from jaxttt.config import MHCConfig, ModelConfig
from jaxttt.data.tokenizer import Tokenizer, train_tokenizer
from jaxttt.model.transformer import Transformer
from jaxttt.ponder import evaluate as E
from jaxttt.ponder.actions import N_STATIC, SIGNAL_FEATURE
from jaxttt.ponder.config import ACTIONS, PonderEvalConfig
from jaxttt.ponder.ppo import ChunkTable, normalise
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
class _TableRunner:
    """Executes an action by reading the seed's scored table (the real per-action programs and
    their agreement with the table are tested in test_ponder_e2e)."""

    def __init__(self, losses_CA):
        self.losses_CA = losses_CA

    def run(self, x, y, actions_C):
        return self.losses_CA[np.arange(len(actions_C)), actions_C]


def _scored(seed: int, C: int = 64) -> dict:
    """What `score_seed` returns, from a known model of the chunks: the update's gain grows with
    the reconstruction signal, a second inner step helps a little, a fourth hurts a little."""
    rng = np.random.default_rng(seed)

    def table():
        signal = rng.normal(size=C)
        gain = 0.02 * (1 + signal) + 0.005 * rng.normal(size=C)
        skip = 4.0 + 0.3 * rng.normal(size=C)
        losses = np.stack([skip, skip - gain, skip - 1.05 * gain, skip - gain + 0.002], -1)
        feats = rng.normal(size=(C, N_STATIC))
        feats[:, SIGNAL_FEATURE] = signal
        return losses.astype(np.float32), feats.astype(np.float32), signal

    (lt, ft, _), (lv, fv, sv) = table(), table()
    ft, fv = normalise(ft, fv)
    return {"x": np.zeros((C, 4), np.int32), "y": np.zeros((C, 4), np.int32), "losses": lv,
            "signal": sv, "table_t": ChunkTable(lt, ft, None), "table": ChunkTable(lv, fv, sv),
            "flops": {**{a: 1e6 * (1 + i) for i, a in enumerate(ACTIONS)}, "signal": 1e5,
                      "features": 2e5}}


def test_ponder_budgets_decide_on_one_scoring_and_report_seed_spread(tmp_path):
    """What `ponder eval --budget 1.5 2.5` does after scoring each seed once."""
    small = ["chunks=64", "train_chunks=64", "episode_len=16", "ppo_iters=2", "ppo_episodes=2",
             "bootstrap=20", "calib_chunks=8"]
    budgets = (1.5, 2.5)
    ecfgs = [C.load(PonderEvalConfig, None, small + [f"budget={b}"]) for b in budgets]
    scored = [_scored(s) for s in range(3)]
    dims = dict(d_model=32, n_heads=2, d_head=16, mini_batch=8)
    summaries = [E.summarise([E.decide_seed(_TableRunner(sc["losses"]), sc, ecfg, seed=s,
                                            progress=lambda m: None)
                              for s, sc in enumerate(scored)], ecfg, ttt_dims=dims)
                 for ecfg in ecfgs]
    rec = json.loads(E.write_recovery(summaries, tmp_path).read_text())
    assert rec["budgets"] == list(budgets) and rec["seeds"] == 3
    assert rec["target_rate"] == pytest.approx([0.25, 0.75])  # UPDATE_1 costs 3, SKIP 1
    for i, (b, summ) in enumerate(zip(budgets, summaries)):
        m = summ["methods"]
        assert m["SKIP"]["loss_per_seed"] == pytest.approx([sc["losses"][:, 0].mean()
                                                            for sc in scored])
        assert m["oracle"]["update_rate"] <= rec["target_rate"][i] + 1e-9
        assert m["ppo"]["cost"] <= b + 1e-9  # the hard budget holds at each budget
        for name in ("random", "gated", "gated_lag1", "ppo", "oracle"):
            # recovery per seed is (SKIP - method) / (SKIP - oracle) of that seed's losses
            want = [(m["SKIP"]["loss_per_seed"][s] - m[name]["loss_per_seed"][s])
                    / (m["SKIP"]["loss_per_seed"][s] - m["oracle"]["loss_per_seed"][s])
                    for s in range(3)]
            assert m[name]["recovery_per_seed"] == pytest.approx(want)
            assert m[name]["recovery_seed_mean"] == pytest.approx(np.mean(want))
            assert m[name]["recovery_seed_sd"] == pytest.approx(np.std(want, ddof=1))
            assert rec["methods"][name]["mean"][i] == m[name]["recovery_seed_mean"]
            assert rec["methods"][name]["sd"][i] == m[name]["recovery_seed_sd"]
            assert rec["methods"][name]["per_seed"][i] == m[name]["recovery_per_seed"]
        assert m["oracle"]["recovery_seed_sd"] == pytest.approx(0.0)
        # the signal predicts the gain here, so the gate beats random at the same rate
        assert m["gated"]["recovery_seed_mean"] > m["random"]["recovery_seed_mean"]
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
