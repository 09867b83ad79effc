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
    with pytest.raises(C.ConfigError, match="a divisor of n_heads=4"):
        C.load(C.ModelConfig, None, ["n_heads=4", "n_kv_heads=3"])
    with pytest.raises(C.ConfigError, match="mhc.mode"):
        C.load(C.ModelConfig, None, ["mhc.mode=fancy"])
    with pytest.raises(C.ConfigError, match="not found"):
        C.load(C.ModelConfig, "model/nope.yaml")


def test_save_and_reload_round_trip(tmp_path):
    cfg = C.load(C.PretrainConfig, None, ["model=model/tiny.yaml", "steps=3"])
    C.save_yaml(cfg, tmp_path / "c.yaml")
    assert C.load(C.PretrainConfig, tmp_path / "c.yaml") == cfg


# Every range check, each with a value just outside and one on the boundary inside. A bad value
# is a ConfigError naming the key and where it came from (override or file).
P, S, D, M = C.PretrainConfig, C.SDFTConfig, C.DiscoverConfig, C.ModelConfig
BAD = [
    (M, "mhc.mode=fancy"), (M, "mhc.n_streams=0"), (M, "mhc.sinkhorn_iters=0"),
    (M, "mhc.alpha_init=.nan"), (M, "mhc.clamp=0"), (M, "mhc.eps=0"), (M, "mhc.eps=1"),
    (M, "n_kv_heads=3"), (M, "rope_fraction=1.5"), (M, "vocab_size=0"), (M, "n_layers=0"),
    (M, "d_ff=0"), (M, "max_seq_len=0"), (M, "dtype=int8"), (M, "param_dtype=int8"),
    (M, "attention=flash"), (M, "rope_theta=0"), (M, "rope_theta=.inf"), (M, "norm_eps=0"),
    (P, "optim.lr=0"), (P, "optim.lr=.nan"), (P, "optim.lr=.inf"), (P, "optim.b1=1"),
    (P, "optim.b2=1.0"), (P, "optim.b2=-0.1"), (P, "optim.weight_decay=-1"),
    (P, "optim.grad_clip=.nan"), (P, "optim.warmup_steps=-2"), (P, "optim.warmup_frac=2"),
    (P, "optim.schedule=step"), (P, "optim.min_lr_ratio=1.5"),
    (P, "mesh.data=0"), (P, "mesh.data=-2"), (P, "mesh.fsdp=0"), (P, "mesh.tensor=-1"),
    (P, "data.seq_len=0"), (P, "data.batch_size=0"), (P, "data.max_bytes=0"),
    (P, "data.vocab_size=8"), (P, "steps=0"), (P, "grad_accum=0"), (P, "eval_batches=0"),
    (P, "keep=0"), (P, "log_every=0"), (P, "eval_every=-1"), (P, "save_every=-1"),
    (P, "data.seq_len=100000"),
    (S, "objective=rl"), (S, "gate.reference=forever"), (S, "gate.max_ppl_increase=-1.5"),
    (S, "gate.max_probe_drop=.nan"), (S, "kl_coef=-1"), (S, "kl_direction=sideways"),
    (S, "batch_size=0"), (S, "steps_per_block=0"), (S, "blocks=0"), (S, "replay_size=0"),
    (S, "kl_chunk=0"), (S, "max_prompt_len=0"), (S, "eval.seq_len=0"), (S, "keep=0"),
    (S, "ema_decay=1.5"), (S, "eval.windows=0"), (S, "eval.max_new_tokens=0"), (S, "replay_ratio=-0.1"), (S, "sampling.temperature=-1"),
    (S, "sampling.top_p=0"), (S, "sampling.top_p=1.01"), (S, "sampling.top_k=-1"),
    (S, "sampling.max_new_tokens=0"), (S, "mesh.fsdp=0"), (S, "lora.rank=0"),
    (D, "rollouts=1"), (D, "gamma=0"), (D, "beta=-1"), (D, "beta_max=0"), (D, "kl_lambda=-1"),
    (D, "puct_c=-1"), (D, "puct_variant=alphazero"), (D, "archive_size=0"), (D, "steps=0"),
    (D, "children_per_step=-1"), (D, "save_every=-1"), (D, "reward_timeout_s=0"),
    (D, "reward_workers=0"), (D, "lora.dropout=0.1"), (D, "lora.rank=0"), (D, "lora.alpha=0"),
    (D, "lora.targets=[q, x]"), (D, "sampling.temperature=.nan"), (D, "mesh.data=0"),
]
GOOD = [
    (M, ["mhc.mode=none", "rope_fraction=0"]), (P, ["optim.b1=0", "optim.b2=0.999999",
    "optim.warmup_steps=-1", "mesh.data=-1", "keep=1", "eval_every=0", "save_every=0",
    "optim.grad_clip=0"]), (S, ["sampling.temperature=0", "sampling.top_p=1", "ema_decay=1",
    "replay_ratio=0", "kl_coef=0"]), (D, ["rollouts=2", "kl_lambda=0", "puct_c=0",
    "puct_variant=official", "children_per_step=0", "beta=0"]),
]


@pytest.mark.parametrize("cls,item", BAD, ids=[f"{c.__name__}:{i}" for c, i in BAD])
def test_every_range_check(cls, item):
    key = item.split("=")[0]
    with pytest.raises(C.ConfigError) as e:
        C.load(cls, None, [item])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"command-line override {item!r}: config key "), msg
    assert key.split(".")[-1] in msg, msg


@pytest.mark.parametrize("cls,items", GOOD, ids=[c.__name__ for c, _ in GOOD])
def test_boundary_values_pass(cls, items):
    C.load(cls, None, items)


def test_range_error_names_the_file(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("steps: 10\noptim:\n  b2: 1.5\n")
    with pytest.raises(C.ConfigError) as e:
        C.load(C.PretrainConfig, p)
    assert str(e.value).startswith(f"{p}: config key 'optim.b2'") and "[0, 1)" in str(e.value)
    bad = tmp_path / "broken.yaml"
    bad.write_text("steps: 10\noptim: {lr: 1e-3\n")
    with pytest.raises(C.ConfigError, match=rf"^{bad}:3:1: not valid YAML"):
        C.load(C.PretrainConfig, bad)


def test_every_config_field_has_a_comment():
    """A `# ...` on the field's line(s) or just above it, for every field of every config."""
    import ast
    import inspect

    lines = inspect.getsource(C).splitlines()
    missing, seen = [], 0
    for cls in ast.parse("\n".join(lines)).body:
        if not (isinstance(cls, ast.ClassDef) and cls.name.endswith("Config")):
            continue
        for node in cls.body:
            if isinstance(node, ast.AnnAssign):
                seen += 1
                own = lines[node.lineno - 1:node.end_lineno]
                if not any("#" in ln for ln in own) and not lines[node.lineno - 2].strip().startswith("#"):
                    missing.append(f"{cls.name}.{node.target.id}")
    assert missing == [] and seen > 80  # (the configs have ~120 fields)


def _shipped_config_classes():
    from jaxttt.discover.setrun import DiscoverSetConfig
    from jaxttt.ponder.config import PonderEvalConfig, PonderTrainConfig
    return {"discover": C.DiscoverConfig, "discover/gsm8k_set.yaml": DiscoverSetConfig,
            "model": C.ModelConfig, "pretrain": C.PretrainConfig, "sdft": C.SDFTConfig,
            "ponder": PonderTrainConfig, "ponder/eval.yaml": PonderEvalConfig}


def test_every_shipped_config_loads():
    """Each YAML under configs/ loads and validates as the config its command reads (the README
    and the configs' own comments run them by name)."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "configs"
    classes = _shipped_config_classes()
    paths = sorted(p for p in root.rglob("*.yaml") if p.parent.name != "probes")  # probes: a list
    assert len(paths) >= 20
    for path in paths:
        rel = path.relative_to(root).as_posix()
        cls = classes.get(rel, classes[path.parent.name])
        overrides = ["base=runs/trunk"] if cls.__name__ == "PonderTrainConfig" else []
        cfg = C.load(cls, path, overrides)
        assert isinstance(cfg, cls), rel
