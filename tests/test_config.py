"""Config loading: presets, overrides, clear errors."""
import pytest

from jaxttt import config as C


def test_presets_load_and_bench_shape():
    b = C.load(C.ModelConfig, "model/bench.yaml")
    assert (b.vocab_size, b.n_layers, b.d_model, b.n_heads, b.d_head, b.d_ff, b.mhc.n_streams) == \
        (8192, 4, 256, 4, 64, 704, 4)
    for name in ("tiny", "120m", "350m", "900m"):
        C.load(C.ModelConfig, f"model/{name}.yaml").validate()


def test_overrides_nested_and_typed():
    cfg = C.load(C.PretrainConfig, None, ["model=model/tiny.yaml", "model.mhc.mode=none",
                                          "optim.lr=1e-3", "steps=7", "model.remat=true"])
    assert cfg.model.d_model == 128 and cfg.model.mhc.mode == "none" and cfg.model.mhc.streams == 1
    assert cfg.optim.lr == 1e-3 and cfg.steps == 7 and cfg.model.remat is True


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("n_layers: 2\nd_modle: 64\n")
    with pytest.raises(C.ConfigError) as e:
        C.load(C.ModelConfig, p)
    assert "d_modle" in str(e.value) and str(p) in str(e.value)


def test_unknown_nested_override_and_bad_types(tmp_path):
    with pytest.raises(C.ConfigError, match="mdoe"):
        C.load(C.ModelConfig, None, ["mhc.mdoe=hc"])
    with pytest.raises(C.ConfigError, match="n_layers"):
        C.load(C.ModelConfig, None, ["n_layers=two"])
    with pytest.raises(C.ConfigError, match="KEY=VALUE"):
        C.load(C.ModelConfig, None, ["n_layers"])
    p = tmp_path / "nested.yaml"
    p.write_text("model:\n  mhc:\n    n_stream: 2\n")
    with pytest.raises(C.ConfigError) as e:
        C.load(C.PretrainConfig, p)
    assert "model.mhc.n_stream" in str(e.value) and str(p) in str(e.value)


def test_invariants_are_validated():
    with pytest.raises(C.ConfigError, match="n_heads \\* d_head"):
        C.load(C.ModelConfig, None, ["d_model=100"])
    with pytest.raises(C.ConfigError, match="mhc.mode"):
        C.load(C.ModelConfig, None, ["mhc.mode=fancy"])
    with pytest.raises(C.ConfigError, match="not found"):
        C.load(C.ModelConfig, "model/nope.yaml")


def test_save_and_reload_round_trip(tmp_path):
    cfg = C.load(C.PretrainConfig, None, ["model=model/tiny.yaml", "steps=3"])
    C.save_yaml(cfg, tmp_path / "c.yaml")
    assert C.load(C.PretrainConfig, tmp_path / "c.yaml") == cfg
