"""`jaxttt ponder train` / `ponder eval` on a random tiny trunk: exact resume, the method table,
the grouped per-action execution, user errors as one line."""
from __future__ import annotations

import json
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
from jaxttt.ponder.config import PonderTrainConfig
from jaxttt.ponder.model import attach
from jaxttt.ponder.train import METRICS, load_ponder, train
from jaxttt.train.checkpoint import Checkpointer, save_model_config

SMALL = ["chunk_len=32", "ttt.mini_batch=8", "ttt.n_heads=2", "batch_size=8", "log_every=2",
         "optim.warmup_steps=0", "train_actions=[1,2]", "steps=6", "save_every=3"]


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """`ponder` commands turn on the persistent XLA cache under $JAXTTT_CACHE: keep it private
    to this module and put the global setting back afterwards."""
    mp = pytest.MonkeyPatch()
    mp.setenv("JAXTTT_CACHE", str(tmp_path_factory.mktemp("jaxttt_cache")))
    old = jax.config.jax_compilation_cache_dir
    yield
    jax.config.update("jax_compilation_cache_dir", old)
    mp.undo()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """A tokenizer, train/val packs of some of this repository's Python source, and a random
    2-layer trunk saved as a pretraining run."""
    root = tmp_path_factory.mktemp("ponder")
    src = Path(__file__).resolve().parents[1] / "jaxttt"
    text = "\n".join(p.read_text() for p in sorted(src.rglob("*.py"))[:40])
    (root / "a.txt").write_text(text[: len(text) * 3 // 4])
    (root / "b.txt").write_text(text[len(text) * 3 // 4:])
    tok_path = train_tokenizer([root / "a.txt"], root / "tok", 512, code=True)
    pack(tok_path, [root / "a.txt"], root / "train.bin", progress=False)
    pack(tok_path, [root / "b.txt"], root / "val.bin", progress=False)
    tok = Tokenizer(tok_path)
    mcfg = ModelConfig(vocab_size=tok.vocab_size, n_layers=2, d_model=32, n_heads=2, d_head=16,
                       d_ff=64, max_seq_len=64, mhc=MHCConfig(mode="none"))
    trunk = Transformer(mcfg, rngs=nnx.Rngs(0))
    run = root / "trunk"
    run.mkdir()
    save_model_config(run, mcfg)
    ck = Checkpointer(run, async_save=False)
    ck.save(1, nnx.state(trunk, nnx.Param), meta={"tokenizer": str(tok_path)}, force=True)
    ck.close()
    return {"run": run, "train": root / "train.bin", "val": root / "val.bin", "root": root}


def _cfg(base, *extra) -> PonderTrainConfig:
    return C.load(PonderTrainConfig, None, SMALL + [f"base={base['run']}", f"train={base['train']}",
                                                    *extra])


def _ttt_leaves(run):
    model, *_ = load_ponder(run)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model.ttt, nnx.Param))]


def test_resume_is_exact_and_only_the_ttt_layer_learns(base, tmp_path):
    cfg = _cfg(base)
    full = train(cfg, tmp_path / "full", say=lambda m: None)
    part = train(cfg, tmp_path / "part", stop_after=3, say=lambda m: None)
    train(cfg, part, say=lambda m: None)  # resumes at step 3
    for a, b in zip(_ttt_leaves(full), _ttt_leaves(part)):
        np.testing.assert_array_equal(a, b)
    rows = lambda r: [json.loads(x) for x in (r / METRICS).read_text().splitlines()]  # noqa: E731
    assert [x["loss"] for x in rows(full)] == [x["loss"] for x in rows(part)]
    assert [x["step"] for x in rows(part)] == list(range(1, 7))
    # the TTT layer moved away from its seeded initialisation
    model, *_ = load_ponder(full)
    init = attach(model.trunk, cfg.ttt, seed=cfg.seed).ttt
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(
        jax.tree.leaves(nnx.state(model.ttt, nnx.Param)), jax.tree.leaves(nnx.state(init, nnx.Param)))]
    assert max(moved) > 0


def test_cli_train_then_eval_writes_the_method_table(base, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["ponder", "train", "--ckpt", str(base["run"]), "--out", str(run), *SMALL,
                     f"train={base['train']}"]) == 0  # the same compiled update as above
    out = tmp_path / "eval"
    args = ["ponder", "eval", "--run", str(run), "--budget", "2.0", "--out", str(out), "--seeds", "2",
            f"val={base['val']}", f"train={base['train']}", "chunks=32", "train_chunks=32",
            "episode_len=16", "ppo_iters=3", "ppo_episodes=4", "bootstrap=50", "batch_size=16",
            "calib_chunks=8"]
    assert cli.main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert (out / "pareto.png").stat().st_size > 0
    m = res["methods"]
    assert set(m) >= {"SKIP", "UPDATE_1", "UPDATE_2", "UPDATE_4", "random", "oracle", "gated",
                      "gated_lag1", "ppo", "ppo_lag1", "oracle_best"}
    for name, r in m.items():
        assert {"loss", "cost", "update_rate", "recovery"} <= set(r)
        assert r["loss_ci95"][0] <= r["loss"] <= r["loss_ci95"][1] + 1e-9
        assert m["oracle_best"]["loss"] <= r["loss"] + 1e-9
    assert m["SKIP"]["cost"] == 1.0 and m["UPDATE_4"]["cost"] == 12.0 and m["UPDATE_1"]["update_rate"] == 1
    assert m["ppo"]["cost"] <= 2.0 + 1e-9  # the hard budget holds
    assert m["oracle"]["recovery"] == pytest.approx(1.0) and m["SKIP"]["recovery"] == 0
    f = res["flops_per_chunk_hlo"]
    assert f["SKIP"] < f["UPDATE_1"] < f["UPDATE_2"] < f["UPDATE_4"]
    assert f["ttt/SKIP"] < f["ttt/UPDATE_1"] < f["ttt/UPDATE_2"] < f["ttt/UPDATE_4"] < f["UPDATE_4"]
    # the gate's actions re-run with rows grouped by action (SKIP rows never enter an update
    # program) give the losses of the all-actions table
    assert res["executed_check_max_abs"] < 1e-4
    assert "gated" in capsys.readouterr().out
    # user mistakes: one line, nothing overwritten
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not empty" in err
    assert cli.main(["ponder", "train", "--ckpt", str(base["run"]), "--out", str(run), *SMALL,
                     f"train={base['train']}", "steps=5"]) == 1
    assert "different settings" in capsys.readouterr().err
    assert cli.main(["ponder", "train", "--ckpt", str(tmp_path / "nope"), "--out",
                     str(tmp_path / "r2")]) == 1
    assert "nope" in capsys.readouterr().err and not (tmp_path / "r2").exists()
    assert cli.main(["ponder", "eval", "--run", str(base["run"]), "--out", str(tmp_path / "e2")]) == 1
    assert "not a `ponder train` run" in capsys.readouterr().err and not (tmp_path / "e2").exists()
