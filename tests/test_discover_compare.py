"""discover-compare: TTT-Discover vs best-of-N from θ0 at an equal action budget (tiny model)."""
import json

import numpy as np
import pytest
from flax import nnx

from jaxttt import config as C
from jaxttt.cli import main
from jaxttt.config import ConfigError
from jaxttt.data.packing import ensure_default_data
from jaxttt.discover.compare import (BASELINE_ARM, CompareSpec, build_table, markdown,
                                     preset_config)
from jaxttt.discover.step import rollout_sampling
from jaxttt.model.transformer import Transformer
from jaxttt.train.checkpoint import Checkpointer, save_model_config

MODEL = ["n_layers=1", "d_model=64", "n_heads=2", "d_head=32", "d_ff=128", "vocab_size=512",
         "max_seq_len=64"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A model run directory holding a random tiny θ0 and its tokenizer."""
    tok = ensure_default_data(tmp_path_factory.mktemp("data"), 512, max_bytes=200_000,
                              progress=False)["tokenizer"]
    model = Transformer(C.load(C.ModelConfig, "model/tiny.yaml", MODEL), rngs=nnx.Rngs(0))
    run = tmp_path_factory.mktemp("base")
    save_model_config(run, model.cfg)
    ckpt = Checkpointer(run, async_save=False)
    ckpt.save(0, nnx.state(model, nnx.Param), meta={"tokenizer": str(tok)})
    ckpt.close()
    return run


@pytest.mark.parametrize("preset", ["official", "handoff"])
def test_both_arms_share_one_sampler_and_budget(preset):
    spec = CompareSpec(env="toy", steps=3, rollouts=4, max_new_tokens=12,
                       overrides=("optim.lr=1e-3",))
    cfg = preset_config(spec, preset, seed=5, baseline=True)
    ttt = rollout_sampling(cfg)
    sc = cfg.sampling
    assert (ttt["temperature"], ttt["top_p"], ttt["top_k"]) == (sc.temperature, sc.top_p, sc.top_k)
    assert (sc.temperature, sc.top_p, sc.top_k, sc.max_new_tokens) == (1.0, 1.0, 0, 12)
    assert (cfg.steps, cfg.rollouts, cfg.seed, cfg.optim.lr) == (3, 4, 5, 1e-3)
    assert cfg.puct_variant == preset  # the preset file really was loaded


def test_overrides_that_would_break_the_equal_footing_are_refused():
    with pytest.raises(ConfigError, match="sampling.top_p"):
        CompareSpec(env="toy", overrides=("sampling.top_p=0.9",)).validate()
    with pytest.raises(ConfigError, match="unknown preset 'fancy'"):
        CompareSpec(env="toy", presets=("fancy",)).validate()


def _fake_run(d, rewards_ttt, rewards_base, rollouts=2, baseline=True, seed_reward=0.1):
    """A finished run directory as loop.run_discover writes it (only what the table reads)."""
    d.mkdir(parents=True)
    best_t = best_b = seed_reward
    lines = []
    for t, (rt, rb) in enumerate(zip(rewards_ttt, rewards_base), 1):
        best_t, best_b = max(best_t, rt), max(best_b, rb)
        lines.append({"step": t, "samples": t * rollouts, "best_reward": best_t,
                      "baseline_samples": t * rollouts, "baseline_best_reward": best_b,
                      "wall_s": 0.5 * t})
    (d / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    n = len(lines) * rollouts
    (d / "result.json").write_text(json.dumps({
        "seed_reward": seed_reward, "best_reward": best_t, "samples": n, "wall_s": 1.0,
        "baseline_best_reward": best_b, "baseline_samples": n, "problem_id": "p",
        "config": {"baseline": baseline}}))


def test_table_statistics_and_win_counts(tmp_path):
    spec = CompareSpec(env="toy", presets=("official",), seeds=(0, 1, 2), steps=2, rollouts=2)
    ttt, base = [[0.2, 0.5], [0.9, 0.3], [0.0, 0.4]], [[0.3, 0.3], [0.95, 0.1], [0.4, 0.0]]
    for s in range(3):
        _fake_run(tmp_path / "official" / f"seed{s}", ttt[s], base[s])
    table = build_table(tmp_path, spec)
    rows = {r["arm"]: r for r in table["rows"]}
    t, b = rows["TTT-Discover (official)"], rows[BASELINE_ARM]
    assert t["best_reward"]["per_seed"] == [0.5, 0.9, 0.4]
    assert b["best_reward"]["per_seed"] == [0.3, 0.95, 0.4]
    assert t["best_reward"]["mean"] == pytest.approx(0.6)
    assert t["best_reward"]["sd"] == pytest.approx(np.std([0.5, 0.9, 0.4], ddof=1))
    assert t["vs_baseline"] == {"mean_diff": pytest.approx((0.2 - 0.05 + 0.0) / 3), "wins": 1, "ties": 1,
                                "losses": 1}
    # curves start at the seed state's reward and never decrease
    assert t["curves"][0] == [(0, 0.1), (2, 0.2), (4, 0.5)]
    assert all(np.all(np.diff([p[1] for p in c]) >= 0) for c in b["curves"])
    assert t["ttt_s"]["per_seed"] == [1.5, 1.5, 1.5]  # the steps' own wall time, summed
    assert markdown(table).count("\n| ") == 3  # header + two arms


def test_an_unequal_budget_is_an_error(tmp_path):
    spec = CompareSpec(env="toy", presets=("official", "handoff"), seeds=(0,), steps=2)
    _fake_run(tmp_path / "official" / "seed0", [0.1, 0.2], [0.1, 0.2])
    _fake_run(tmp_path / "handoff" / "seed0", [0.1, 0.2, 0.3], [0.1, 0.2, 0.3], baseline=False)
    with pytest.raises(RuntimeError, match="unequal action budgets"):
        build_table(tmp_path, spec)


def test_cli_end_to_end_on_a_tiny_model(base_run, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["discover-compare", "--ckpt", str(base_run), "--env", "toy", "--env-option",
            "target=AB", "--preset", "official", "--seeds", "3", "--steps", "2", "--rollouts", "4",
            "--max-new-tokens", "6", "--out", str(out), "--no-progress", "optim.lr=1e-2",
            "lora.rank=4"]
    assert main(argv) == 0
    for name in ("compare.json", "compare.md", "compare.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads((out / "compare.json").read_text())
    rows = {r["arm"]: r for r in table["rows"]}
    assert set(rows) == {"TTT-Discover (official)", BASELINE_ARM}
    result = json.loads((out / "official" / "seed3" / "result.json").read_text())
    assert result["samples"] == result["baseline_samples"] == 2 * 4  # equal action budget
    assert rows[BASELINE_ARM]["samples_per_seed"] == rows["TTT-Discover (official)"]["samples_per_seed"] == 8
    assert result["config"]["sampling"]["top_p"] == 1.0 and result["config"]["seed"] == 3
    assert len((out / "official" / "seed3" / "baseline_log.jsonl").read_text().splitlines()) == 8
    assert rows[BASELINE_ARM]["best_reward"]["per_seed"] == [result["baseline_best_reward"]]
    assert "| TTT-Discover (official) | 8 |" in capsys.readouterr().out
    # a rerun reuses the finished run (nothing is sampled again) and rewrites the same table
    (out / "compare.json").unlink()
    assert main(argv) == 0
    assert "reusing" in capsys.readouterr().out
    assert json.loads((out / "compare.json").read_text())["rows"] == table["rows"]
    # a run killed midway (no result.json) is kept under a new name and run again
    run = out / "official" / "seed3"
    (run / "result.json").unlink()
    log = (run / "log.jsonl").read_bytes()
    assert main(argv) == 0
    assert "unfinished" in capsys.readouterr().out
    assert (out / "official" / "seed3.unfinished-1" / "log.jsonl").read_bytes() == log
    again = {r["arm"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert {a: r["best_reward"] for a, r in again.items()} == \
        {a: r["best_reward"] for a, r in rows.items()}  # timings differ, results do not


def test_cli_bad_override_is_one_line(base_run, tmp_path, capsys):
    code = main(["discover-compare", "--ckpt", str(base_run), "--env", "toy", "--out",
                 str(tmp_path / "x"), "sampling.temperature=0.7"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "sampling.temperature" in err
    assert not (tmp_path / "x").exists()
