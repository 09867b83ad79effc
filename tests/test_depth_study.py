"""`jaxttt depth-study`: spike counting and H_res drift maths, and the command end to end."""
import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from jaxttt import cli
from jaxttt import config as C
from jaxttt.eval import mhc_stats
from jaxttt.model.transformer import Transformer
from jaxttt.train import depth_study as D


# --------------------------------------------------------------------------------------------
# Gradient-norm spikes
# --------------------------------------------------------------------------------------------
def test_spikes_compare_with_the_running_median_of_the_steps_before():
    g = [1.0] * 25 + [5.0] + [1.0] * 5 + [None, float("nan"), 2.9] + [1.0] * 3
    s = D.grad_spikes(g, window=20, factor=3.0)
    assert s["count"] == 1 and s["steps"] == [25]  # 2.9 < 3 x median 1: not a spike
    assert s["max_ratio"] == pytest.approx(5.0) and s["max_norm"] == 5.0
    assert s["non_finite"] == 2
    # the first `window` steps have no reference: a huge first step is not counted
    assert D.grad_spikes([100.0] + [1.0] * 30, window=20)["count"] == 0


def test_slow_growth_is_not_a_spike_but_a_jump_is():
    steady = [1.02 ** i for i in range(200)]  # x7 over the run, 2% per step
    assert D.grad_spikes(steady, window=20, factor=3.0)["count"] == 0
    jumps = list(steady)
    jumps[100] *= 10
    jumps[150] *= 3.5
    assert D.grad_spikes(jumps, window=20, factor=3.0)["steps"] == [100, 150]


def test_spikes_of_an_empty_or_all_nan_series():
    s = D.grad_spikes([None] * 5, window=2)
    assert s["count"] == 0 and s["non_finite"] == 5 and math.isnan(s["max_norm"])


# --------------------------------------------------------------------------------------------
# H_res drift
# --------------------------------------------------------------------------------------------
def test_stochastic_deviation_on_hand_made_matrices():
    perm = np.eye(3)[[2, 0, 1]]
    assert D.stochastic_deviation(perm) == {"row_dev": 0.0, "col_dev": 0.0, "min_entry": 0.0}
    m = np.array([[0.5, 0.7], [0.5, 0.3]])  # columns sum to 1, rows to 1.2 and 0.8
    d = D.stochastic_deviation(m[None])
    assert d["row_dev"] == pytest.approx(0.2) and d["col_dev"] == pytest.approx(0.0)
    assert D.stochastic_deviation(np.array([[1.2, -0.2], [-0.2, 1.2]]))["min_entry"] == -0.2


def test_composite_applies_later_sublayers_on_the_left():
    a = np.array([[1.0, 2.0], [0.0, 1.0]])
    b = np.array([[0.0, 1.0], [1.0, 0.0]])
    p = D.composite(np.stack([a, b]))
    np.testing.assert_allclose(p[0], a)
    np.testing.assert_allclose(p[1], b @ a)
    assert not np.allclose(b @ a, a @ b)  # the order is really tested


def test_amax_gain_is_the_largest_absolute_row_and_column_sum():
    fwd, bwd = D.amax_gain(np.array([[1.0, -2.0], [0.5, 0.5]]))
    assert fwd == pytest.approx(3.0) and bwd == pytest.approx(2.5)


def test_products_of_doubly_stochastic_maps_keep_gain_one_and_others_grow():
    # Birkhoff: convex combinations of permutation matrices are exactly the doubly stochastic ones
    rng = np.random.default_rng(0)
    perms_P44 = np.stack([np.eye(4)[rng.permutation(4)] for _ in range(6)])
    w_SXP = rng.dirichlet(np.ones(6), size=(16, 5))  # 16 sublayers, 5 tokens
    ds = np.einsum("sxp,pnm->sxnm", w_SXP, perms_P44)
    drift = D.h_res_drift(ds)
    assert drift["gain_fwd"] == pytest.approx(1.0) and drift["gain_bwd"] == pytest.approx(1.0)
    assert drift["row_dev"] < 1e-12 and drift["col_dev"] < 1e-12 and drift["min_entry"] == 0.0
    grow = np.broadcast_to(1.1 * np.eye(4), (16, 5, 4, 4))  # each sublayer amplifies by 1.1
    g = D.h_res_drift(grow)
    np.testing.assert_allclose(g["gain_fwd_by_depth"], 1.1 ** np.arange(1, 17), rtol=1e-9)
    assert g["gain_bwd"] == pytest.approx(1.1 ** 16) and g["layer_gain_max"] == pytest.approx(1.1)
    assert g["row_dev"] == pytest.approx(0.1)


def test_mean_sd_ignores_missing_values():
    assert D.mean_sd([1.0, 2.0, 3.0, None, float("nan")]) == (2.0, 1.0)
    assert D.mean_sd([4.0]) == (4.0, 0.0)
    assert all(math.isnan(x) for x in D.mean_sd([None]))


def test_per_token_h_res_averages_to_the_layer_stats():
    cfg = C.load(C.ModelConfig, "model/tiny.yaml", ["n_layers=2", "d_model=32", "n_heads=2",
                                                    "d_head=16", "d_ff=64", "vocab_size=64",
                                                    "mhc.alpha_init=0.5"])
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    toks = np.asarray(jax.random.randint(jax.random.key(1), (2, 8), 4, cfg.vocab_size))
    h = D.h_res_per_token(model, toks)
    assert h.shape == (4, 16, 4, 4)
    assert np.ptp(h, axis=1).max() > 1e-4  # really per token: the dynamic part varies
    np.testing.assert_allclose(h.mean(axis=1), mhc_stats.h_res_by_layer(model, toks), atol=1e-5)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
TINY = ["model.n_layers=1", "model.d_model=64", "model.n_heads=2", "model.d_head=32",
        "model.d_ff=128", "model.vocab_size=512", "data.seq_len=32", "data.batch_size=8",
        "eval_batches=1", "eval_every=4", "optim.warmup_steps=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    """A small slice of the embedded corpus; its train split doubles as the held-out set (the
    small val split has fewer windows than the 8 emulated devices)."""
    from jaxttt.data.packing import ensure_default_data

    paths = ensure_default_data(tmp_path_factory.mktemp("data"), 512, max_bytes=200_000,
                                progress=False)
    return [f"data.train={paths['train']}", f"data.val={paths['train']}",
            f"data.tokenizer={paths['tokenizer']}"]


def test_depth_study_command_writes_table_json_and_plots(tmp_path, monkeypatch, capsys, data):
    monkeypatch.setenv("JAXTTT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "study"
    rc = cli.main(["depth-study", "--steps", "4", "--seeds", "0", "--modes", "mhc", "none",
                   "--out", str(out), *TINY, *data])
    assert rc == 0
    printed = capsys.readouterr().out
    table = (out / "table.md").read_text()
    assert "| mhc | 1 |" in table and "| none | 1 |" in table and "| mhc | 1 |" in printed
    assert table.splitlines()[-1].endswith("| n/a | n/a | n/a | n/a |")  # no H_res in `none`
    for name in D.PLOTS.values():
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    study = json.loads((out / "study.json").read_text())
    runs = {r["mode"]: r for r in study["runs"]}
    assert set(runs) == {"mhc", "none"} and "h_res" not in runs["none"]
    for r in runs.values():
        assert r["steps"] == 4 and len(r["curve"]["grad_norm"]) == 4
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"])
    assert len(runs["mhc"]["h_res"]["gain_fwd_by_depth"]) == 2  # 1 block: attention, MLP
    assert runs["mhc"]["h_res"]["gain_fwd"] == pytest.approx(1.0, abs=1e-3)  # Sinkhorn
    assert study["table"]["mhc"]["val_loss"][0] == pytest.approx(runs["mhc"]["val_loss"])
    # rerunning the same study trains nothing new and re-measures the same numbers
    assert cli.main(["depth-study", "--steps", "4", "--seeds", "0", "--modes", "mhc", "none",
                     "--out", str(out), *TINY, *data]) == 0
    again = {r["mode"]: r for r in json.loads((out / "study.json").read_text())["runs"]}
    assert again["mhc"]["h_res"] == runs["mhc"]["h_res"]
    assert again["none"]["curve"] == runs["none"]["curve"]


@pytest.mark.parametrize("argv, expected", [
    (["--layers", "0"], "--layers: expected a positive integer"),
    (["--seeds", "0", "0"], "each value once"),
    (["model.n_heads=x"], "key 'n_heads': expected an integer"),
])
def test_depth_study_bad_input_is_one_line(tmp_path, capsys, argv, expected):
    assert cli.main(["depth-study", "--out", str(tmp_path / "s"), *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s").exists()  # nothing written for a rejected study
