"""The one trainer core (jaxttt/train/trainer.py) and the custom VJPs it differentiates through.

Maths properties: accumulation == one big batch, a skipped update is a bitwise no-op,
adapter-only / base-only training leaves the rest bitwise unchanged, the schedule's shape, and
every custom VJP equals autodiff of its plain formula."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxttt import config as C
from jaxttt import sharding
from jaxttt.model import lora
from jaxttt.model.mhc import aggregate, mix_streams
from jaxttt.model.transformer import Transformer, cross_entropy, tied_unembed
from jaxttt.train import trainer
from jaxttt.train.trainer import (ADAPTERS, BASE_PARAMS, Trainer, decay_mask, lr_schedule,
                                  update_count, warmup_steps)

TINY = ["n_layers=1", "d_model=32", "n_heads=2", "d_head=16", "d_ff=64", "vocab_size=64",
        "max_seq_len=64", "mhc.mode=none"]
OPTIM = C.OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant")


def tiny_model(*overrides: str, seed: int = 0) -> Transformer:
    return Transformer(C.load(C.ModelConfig, None, TINY + list(overrides)), rngs=nnx.Rngs(seed))


def lm_loss(model, batch):
    """Mean next-token cross-entropy (the pretraining loss)."""
    return cross_entropy(model(batch["x"]), batch["y"]), {}


def lm_sum_loss(model, batch):
    """Σ masked next-token NLL with its token count: a token-weighted ("sum") loss."""
    nll_BT = -jax.nn.log_softmax(model(batch["x"]))
    nll_BT = jnp.take_along_axis(nll_BT, batch["y"][..., None], -1)[..., 0]
    m_BT = batch["mask"]
    return jnp.sum(nll_BT * m_BT), {"nll": jnp.sum(nll_BT * m_BT), "n_tokens": jnp.sum(m_BT)}


def lm_batch(rows: int = 8, width: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    t = np.random.default_rng(seed).integers(0, 64, (rows, width + 1)).astype(np.int32)
    return {"x": t[:, :-1], "y": t[:, 1:]}


def leaves(state) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def mesh8():
    return sharding.make_mesh(C.MeshConfig(fsdp=2, tensor=2))


def mesh1():
    return sharding.single_device_mesh()


# --------------------------------------------------------------------------------------------
# Optimizer pieces
# --------------------------------------------------------------------------------------------
def test_schedules_warmup_and_cap():
    optim = C.OptimConfig(lr=1.0, warmup_steps=2000, min_lr_ratio=0.1)
    assert warmup_steps(optim, 100) == 10  # capped at warmup_frac = 10% of the run
    sched = lr_schedule(optim, total_steps=100)
    assert float(sched(0)) == pytest.approx(0.1) and float(sched(9)) == pytest.approx(1.0)
    assert float(sched(55)) == pytest.approx(0.55, abs=1e-6)  # half-way down the cosine
    assert float(sched(100)) == pytest.approx(0.1) and float(sched(500)) == pytest.approx(0.1)
    lin = lr_schedule(C.OptimConfig(lr=1.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0), 10)
    assert [round(float(lin(s)), 6) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    whole = C.OptimConfig(lr=1.0, warmup_steps=-1, warmup_frac=0.25)
    assert warmup_steps(whole, 40) == 10 and float(lr_schedule(whole, 40)(4)) == pytest.approx(0.5)
    flat = lr_schedule(C.OptimConfig(lr=2.0, warmup_steps=0, schedule="constant"), 10)
    assert [float(flat(s)) for s in (0, 5, 1000)] == [2.0, 2.0, 2.0]


def test_decay_mask_skips_norms_and_mhc_gates():
    model = nnx.eval_shape(lambda: tiny_model("mhc.mode=mhc"))
    _, params = nnx.split(model, nnx.Param)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): bool(v)
            for path, v in jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]}
    assert flat["embed"] and flat["blocks/0/attn/q/kernel"] and flat["blocks/0/attn_res/mapping/phi"]
    for name in ("final_norm/scale", "blocks/0/attn_norm/scale", "blocks/0/attn_res/mapping/alpha",
                 "blocks/0/attn_res/mapping/b_res", "blocks/0/mlp_res/mapping/norm/scale"):
        assert not flat[name], name


@pytest.mark.parametrize("field,value", [("lr", 0.0), ("lr", math.inf), ("b1", 1.0), ("b2", -0.1),
                                         ("weight_decay", -1.0), ("warmup_steps", -2),
                                         ("warmup_frac", 1.5), ("schedule", "step"),
                                         ("min_lr_ratio", 2.0)])
def test_optim_ranges_are_checked(field, value):
    with pytest.raises(C.ConfigError, match=f"optim.{field}"):
        C.load(C.PretrainConfig, None, [f"optim.{field}={value}"])


# --------------------------------------------------------------------------------------------
# The update
# --------------------------------------------------------------------------------------------
def test_accumulation_equals_one_big_batch():
    """A=2 micro-batches of 4 rows == one batch of 8 rows, for a mean and a token-sum loss."""
    batch = lm_batch()
    mask = (np.random.default_rng(1).random(batch["y"].shape) < 0.6).astype(np.float32)
    out = {}
    for loss_fn, reduction, extra in ((lm_loss, "mean", {}),
                                      (lm_sum_loss, "sum", {"mask": mask})):
        for A in (1, 2):
            model = tiny_model()
            tr = Trainer(model, loss_fn, OPTIM, mesh=mesh8(), total_steps=10, grad_accum=A,
                         reduction=reduction)
            m = tr.step({**batch, **extra})
            out[reduction, A] = (m, leaves(nnx.state(model, nnx.Param)), tr.update_count)
        (m1, p1, n1), (m2, p2, n2) = out[reduction, 1], out[reduction, 2]
        assert n1 == n2 == 1 and m1["skipped"] == m2["skipped"] == 0
        assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5)
        assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)
        for a, b in zip(p1, p2):  # Adam's first step ~ lr·sign(g): compare at 0.1% of lr
            np.testing.assert_allclose(a, b, atol=1e-5)
    assert out["sum", 1][0]["n_tokens"] == mask.sum()
    assert out["sum", 1][0]["nll"] == pytest.approx(out["sum", 1][0]["loss"], rel=1e-6)


def test_nonfinite_and_empty_updates_are_skipped_bitwise():
    model = tiny_model()
    tr = Trainer(model, lm_sum_loss, OPTIM, mesh=mesh1(), total_steps=10, reduction="sum")
    batch = {**lm_batch(), "mask": np.ones((8, 16), np.float32)}
    tr.step(batch)
    before = leaves((nnx.state(model, nnx.Param), tr.opt_state))
    nan = {**batch, "mask": batch["mask"] * np.float32("nan")}
    empty = {**batch, "mask": np.zeros_like(batch["mask"])}
    for bad in (nan, empty):
        m = tr.step(bad)
        assert m["skipped"] == 1.0
        for a, b in zip(before, leaves((nnx.state(model, nnx.Param), tr.opt_state))):
            np.testing.assert_array_equal(a, b)
    assert tr.skipped == 2 and tr.update_count == 1
    assert tr.step(batch)["skipped"] == 0.0 and tr.update_count == 2 and tr.skipped == 2


def test_adapter_only_and_base_only_training():
    """wrt=ADAPTERS leaves the base bitwise unchanged; BASE_PARAMS leaves the adapters alone."""
    for wrt, frozen, trained in ((ADAPTERS, BASE_PARAMS, ADAPTERS),
                                 (BASE_PARAMS, ADAPTERS, BASE_PARAMS)):
        model = lora.add_lora(tiny_model(), C.LoRAConfig(rank=4))
        nnx.update(model, jax.tree.map(lambda x: x + 0.01, nnx.state(model, nnx.LoRAParam)))
        fixed = leaves(nnx.state(model, frozen))
        start = leaves(nnx.state(model, trained))
        tr = Trainer(model, lm_loss, OPTIM, mesh=mesh1(), total_steps=10, wrt=wrt)
        tr.step(lm_batch())
        for a, b in zip(fixed, leaves(nnx.state(model, frozen))):
            np.testing.assert_array_equal(a, b)
        assert all(not np.array_equal(a, b) for a, b in zip(start, leaves(nnx.state(model, trained))))
    everything = Trainer(lora.add_lora(tiny_model(), C.LoRAConfig(rank=4)), lm_loss, OPTIM,
                         mesh=mesh1(), total_steps=10, wrt=nnx.Param)
    assert any(isinstance(v, nnx.LoRAParam) for v in jax.tree.leaves(
        everything.params, is_leaf=lambda x: isinstance(x, nnx.Variable)))  # nnx.Param includes them


def test_compile_reset_and_state_round_trip(capsys):
    model = tiny_model()
    tr = Trainer(model, lm_loss, OPTIM, mesh=mesh1(), total_steps=10)
    tr.compile(lm_batch())
    assert "compiled train step (per device)" in capsys.readouterr().out
    m = tr.step(lm_batch())
    assert set(m) >= {"loss", "grad_norm", "lr", "skipped"} and m["lr"] == pytest.approx(1e-2)
    params, opt = jax.tree.map(jnp.copy, (tr.params, tr.opt_state))
    after1 = tr.step(lm_batch(seed=1))
    tr.set_state(params, opt)
    again = tr.step(lm_batch(seed=1))
    assert again["loss"] == after1["loss"]
    tr.reset()
    assert tr.update_count == 0 and int(update_count(tr.opt_state)) == 0


def test_precompile_compiles_in_the_background_and_steps_as_the_jit_does():
    pre = Trainer(tiny_model(), lm_loss, OPTIM, mesh=mesh8(), total_steps=7)
    pre.precompile(lm_batch())
    pre.precompile(lm_batch(seed=3))  # the same shapes, under way: not a second compile
    assert len(pre._pending) == 1
    got = [pre.step(lm_batch(seed=s)) for s in range(2)]
    assert not pre._pending and len(pre._aot) == 1
    assert trainer._jitted(pre._static(None))._cache_size() == 0  # the jit compiled nothing
    ref = Trainer(tiny_model(), lm_loss, OPTIM, mesh=mesh8(), total_steps=7)
    assert [ref.step(lm_batch(seed=s)) for s in range(2)] == got
    for a, b in zip(leaves(pre.params), leaves(ref.params)):
        np.testing.assert_array_equal(a, b)
    pre.precompile(lm_batch(rows=16))  # another shape: another executable
    pre.step(lm_batch(rows=16))
    assert len(pre._aot) == 2


def test_a_failed_background_compile_raises_at_the_step():
    def broken(model, batch):
        raise ValueError("loss_fn: no such batch key 'z'")

    tr = Trainer(tiny_model(), broken, OPTIM, mesh=mesh1(), total_steps=10)
    tr.precompile(lm_batch())  # returns at once; the error surfaces where the update is run
    with pytest.raises(ValueError, match="no such batch key"):
        tr.step(lm_batch())


# --------------------------------------------------------------------------------------------
# Custom VJPs against autodiff of the plain formula
# --------------------------------------------------------------------------------------------
def _check_vjp(custom, plain, *args):
    out_c, vjp_c = jax.vjp(custom, *args)
    out_p, vjp_p = jax.vjp(plain, *args)
    np.testing.assert_allclose(out_c, out_p, rtol=1e-5, atol=1e-6)
    g = jax.random.normal(jax.random.key(9), out_c.shape, out_c.dtype)
    for a, b in zip(vjp_c(g), vjp_p(g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_custom_vjps_match_autodiff():
    k = jax.random.split(jax.random.key(0), 4)
    B, T, N, D, V = 2, 5, 4, 8, 11
    h_BTNN = jax.random.normal(k[0], (B, T, N, N))
    x_BTND = jax.random.normal(k[1], (B, T, N, D))
    _check_vjp(mix_streams, lambda h, x: jnp.einsum("btij,btjd->btid", h, x), h_BTNN, x_BTND)
    h_pre_BTN = jax.random.normal(k[2], (B, T, N))
    _check_vjp(aggregate, lambda h, x: jnp.einsum("btn,btnd->btd", h, x), h_pre_BTN, x_BTND)
    h_BTD = jax.random.normal(k[3], (B, T, D))
    emb_VD = jax.random.normal(k[0], (V, D))
    _check_vjp(tied_unembed, lambda h, e: jnp.einsum("btd,vd->btv", h, e), h_BTD, emb_VD)


def test_misuse_is_one_clear_error():
    model = tiny_model()
    tr = Trainer(model, lm_loss, OPTIM, mesh=mesh1(), total_steps=10, grad_accum=3)
    with pytest.raises(ValueError, match=r"batch\['x'\] has shape \(8, 16\).*grad_accum=3"):
        tr.step(lm_batch())
    no_count = Trainer(model, lm_loss, OPTIM, mesh=mesh1(), total_steps=10, reduction="sum")
    with pytest.raises(ValueError, match="n_tokens"):
        no_count.step(lm_batch())
    with pytest.raises(ValueError, match="no variables selected"):
        Trainer(model, lm_loss, OPTIM, mesh=mesh1(), total_steps=10, wrt=ADAPTERS)


def test_remat_update_holds_one_block_of_activations():
    """With model.remat, an optimizer step's temporaries stay near one block's activations: the
    backward recomputes block by block. (jax.checkpoint alone let XLA:CPU schedule every block's
    recompute before the backward pass, holding as much as no remat at all.)"""
    deep = ["n_layers=4", "max_seq_len=128"]
    batch = lm_batch(rows=4, width=128)

    def temp_bytes(remat: bool) -> int:
        model = lora.add_lora(tiny_model(*deep, f"remat={remat}"), C.LoRAConfig(rank=4))
        tr = Trainer(model, lm_loss, OPTIM, mesh=mesh1(), total_steps=10, wrt=ADAPTERS)
        return tr.compile(batch, verbose=False).memory_analysis().temp_size_in_bytes

    kept, rematerialised = temp_bytes(False), temp_bytes(True)
    assert rematerialised < 0.5 * kept, (rematerialised, kept)


def test_cpu_update_program_has_no_ynn_fusions(monkeypatch):
    """On XLA:CPU (jaxlib 0.10) the update compiles without YNNPACK fusions, whose cache loads
    are quadratic; the option is set only for jax versions known to have it."""
    model = tiny_model()
    tr = Trainer(model, lm_loss, OPTIM, mesh=mesh1(), total_steps=10)
    text = tr.compile(lm_batch(rows=2, width=32), verbose=False).as_text()
    known = tuple(int(x) for x in jax.__version__.split(".")[:2]) in trainer.CPU_UPDATE_OPTIONS
    assert ('"kind":"__ynn_fusion"' in text) == (not known)  # a fusion's backend config
    monkeypatch.setattr(jax, "__version__", "0.99.0")
    assert trainer.update_compiler_options() is None
