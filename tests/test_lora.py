"""LoRA adapter trees: only adapters train, exact save/load, merge, reset, base switch."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxttt import config as C
from jaxttt.model import lora
from jaxttt.model.transformer import Transformer, cross_entropy


def _model(seed=0, targets=("q", "k", "v", "o", "gate", "up", "down")):
    cfg = C.load(C.ModelConfig, "model/tiny.yaml", ["n_layers=1"])
    m = Transformer(cfg, rngs=nnx.Rngs(seed))
    return lora.add_lora(m, C.LoRAConfig(rank=4, alpha=8.0, targets=targets), seed=seed)


TOKS = jnp.arange(1, 17).reshape(1, 16)


@nnx.jit(static_argnums=1)
def fwd(m, use_lora):
    return m(TOKS, use_lora=use_lora)


@nnx.jit
def _update(m, opt):
    loss = lambda mod: cross_entropy(mod(TOKS[:, :-1]), TOKS[:, 1:])  # noqa: E731
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)
    opt.update(m, grads)


def _train_step(m, steps=2):
    """Two Adam steps on adapters only (B starts at 0, so A first moves on the second step)."""
    opt = nnx.Optimizer(m, optax.adam(1e-2), wrt=nnx.LoRAParam)
    for _ in range(steps):
        _update(m, opt)


def test_fresh_adapters_do_not_change_outputs():
    m = _model()
    np.testing.assert_allclose(fwd(m, True), fwd(m, False), atol=1e-6)  # B = 0 at creation


def test_training_step_changes_only_adapters():
    m = _model()
    base_before = jax.tree.map(jnp.copy, nnx.state(m, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    lora_before = jax.tree.map(jnp.copy, lora.lora_state(m))
    _train_step(m)
    base_after = nnx.state(m, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(base_after)):
        np.testing.assert_array_equal(a, b)
    changed = [not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(lora_before), jax.tree.leaves(lora.lora_state(m)))]
    assert all(changed)
    assert float(jnp.abs(fwd(m, True) - fwd(m, False)).max()) > 0  # adapters now matter


def test_base_logprobs_unaffected_by_adapters():
    m = _model()
    base = fwd(m, False)
    _train_step(m)
    np.testing.assert_array_equal(fwd(m, False), base)


def test_save_load_round_trip_exact_and_small(tmp_path):
    m = _model()
    _train_step(m)
    path = lora.save_adapters(m, tmp_path / "adapter")
    fresh = Transformer(m.cfg, rngs=nnx.Rngs(0))  # same base weights, no adapters
    lora.load_adapters(fresh, path)
    np.testing.assert_array_equal(fwd(fresh, True), fwd(m, True))
    adapter_bytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    n_base = sum(x.size for x in jax.tree.leaves(nnx.state(fresh, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))))
    assert adapter_bytes < 0.5 * n_base * 4


def test_load_rejects_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="lora.json"):
        lora.load_adapters(_model(), tmp_path / "nope")


def test_merge_equivalent_and_reset():
    m = _model()
    _train_step(m)
    adapted = fwd(m, True)
    lora.reset(m)
    np.testing.assert_allclose(fwd(m, True), fwd(m, False), atol=1e-6)
    m2 = _model()
    _train_step(m2)
    adapted2 = fwd(m2, True)
    np.testing.assert_array_equal(adapted2, adapted)
    lora.merge(m2)
    assert not lora.has_lora(m2) and not jax.tree.leaves(lora.lora_state(m2))
    np.testing.assert_allclose(fwd(m2, True), adapted, atol=1e-4)


def test_targets_select_projections():
    m = _model(targets=("q", "v"))
    tagged = {m_.tag for _, m_ in nnx.iter_modules(m) if getattr(m_, "lora_a", None) is not None}
    assert tagged == {"q", "v"}
    with pytest.raises(C.ConfigError, match="lora.targets"):
        C.LoRAConfig(targets=("qq",)).validate()
