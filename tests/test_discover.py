"""TTT-Discover loop: the jitted LoRA-only update, F3 log-probs, end-to-end runs and the CLI."""
import dataclasses
import functools
import json
import math
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxttt import config as C
from jaxttt.cli import main
from jaxttt.data.packing import ensure_default_data
from jaxttt.data.tokenizer import Tokenizer
from jaxttt.discover.env import DiscoveryEnv
from jaxttt.discover.loop import RunDirError, run_discover
from jaxttt.discover.step import (DiscoverTrainer, build_batch, make_loss, masked_logprob_sums,
                                  rollout_sampling)
from jaxttt.model import lora
from jaxttt.model.transformer import Transformer
from jaxttt.sharding import make_mesh
from jaxttt.train.checkpoint import Checkpointer, save_model_config

MODEL = ["n_layers=1", "d_model=64", "n_heads=2", "d_head=32", "d_ff=128", "vocab_size=512",
         "max_seq_len=128"]
I3_FIELDS = {"problem", "step", "beta", "best_reward", "r_mean", "r_std", "r_max", "start_state",
             "adapter", "n_valid_groups", "loss", "wall_s", "rollout_tokens_per_s", "n_errors",
             "baseline_best_reward"}
G5_FIELDS = {"problem_id", "prompt", "action", "state", "reward", "timestamp", "env_version", "step"}


# ---- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = ensure_default_data(tmp_path_factory.mktemp("data"), 512, max_bytes=200_000,
                               progress=False)["tokenizer"]
    assert Tokenizer(path).vocab_size <= 512
    return path


@pytest.fixture(scope="module")
def tok(tok_path):
    return Tokenizer(tok_path)


@pytest.fixture(scope="module")
def theta0():
    """(graphdef, state) of a random-init tiny θ0, created once (eager init is slow on CPU)."""
    return nnx.split(Transformer(C.load(C.ModelConfig, "model/tiny.yaml", MODEL), rngs=nnx.Rngs(0)))


def _base(theta0) -> Transformer:
    return nnx.merge(*theta0)  # a fresh module tree sharing θ0's arrays


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tok_path, theta0):
    """A pretraining-style run directory holding θ0 and its tokenizer."""
    run = tmp_path_factory.mktemp("base")
    model = _base(theta0)
    save_model_config(run, model.cfg)
    ckpt = Checkpointer(run, async_save=False)
    ckpt.save(0, nnx.state(model, nnx.Param), meta={"tokenizer": str(tok_path)})
    ckpt.close()
    return run


def _cfg(lr=1e-2, weight_decay=0.0, **kw) -> C.DiscoverConfig:
    optim = dataclasses.replace(C.DiscoverConfig().optim, lr=lr, weight_decay=weight_decay)
    base = dict(steps=2, rollouts=4, optim=optim, save_every=1, reward_timeout_s=2.0,
                sampling=C.SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=1.0),
                lora=C.LoRAConfig(rank=4, alpha=8.0))
    return C.DiscoverConfig(**{**base, **kw})


def _trainer(theta0, cfg=None):
    cfg = cfg or _cfg()
    model = lora.add_lora(_base(theta0), cfg.lora, seed=0)
    return DiscoverTrainer(model, cfg, make_mesh(cfg.mesh), pad_id=0)


def _rows(n=4, prompt_len=20, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [[3] + rng.integers(4, 500, prompt_len - 1).tolist()] * n
    completions = [rng.integers(4, 500, int(k)).tolist() for k in rng.integers(1, 8, n)]
    return prompts, completions


REWARDS = np.array([[0.0, 1.0, 0.2, 0.5]])


def _copy(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def _leaves_equal(a, b) -> list[bool]:
    return [np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]


@functools.partial(nnx.jit, static_argnames="use_lora")
def _logits(model, toks, use_lora):
    return model(toks, use_lora=use_lora)


# ---- the update -----------------------------------------------------------------------------
def test_update_changes_only_adapters(theta0):
    tr = _trainer(theta0)
    frozen, adapters = _copy(tr.frozen), _copy(tr.lora)
    m = tr.update(*_rows(), REWARDS)
    assert m["updated"] and m["n_valid_groups"] == 1 and m["beta"][0] > 0 and m["grad_norm"] > 0
    assert all(_leaves_equal(frozen, tr.frozen))
    same = _leaves_equal(adapters, tr.lora)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tr.lora)]
    assert len(paths) == 14  # 7 targets x (A, B) in the single layer
    for path, unchanged in zip(paths, same):  # B moved; A's gradient is 0 while B = 0
        assert unchanged == ("lora_a" in path), path


def test_the_precompiled_update_is_the_one_run(theta0):
    prompts, completions = _rows(prompt_len=20)
    tr = _trainer(theta0)
    tr.precompile(len(prompts[0]), len(prompts))  # before sampling: shapes from the prompt only
    m = tr.update(prompts, completions, REWARDS)
    assert not tr.core._pending and len(tr.core._aot) == 1  # the shapes matched: no other compile
    ref = _trainer(theta0)
    assert ref.update(prompts, completions, REWARDS)["loss"] == m["loss"]
    assert all(_leaves_equal(ref.lora, tr.lora))


def test_base_logprobs_unaffected_after_updates(theta0):
    tr = _trainer(theta0)
    toks = jnp.asarray([list(range(3, 19))])
    base_logits = np.asarray(_logits(tr.model(), toks, use_lora=False))
    np.testing.assert_array_equal(np.asarray(_logits(tr.model(), toks, use_lora=True)), base_logits)
    prompts, completions = _rows()
    for i in range(3):
        tr.update(prompts, completions, REWARDS + i)
    assert tr.n_updates == 3
    np.testing.assert_array_equal(np.asarray(_logits(tr.model(), toks, use_lora=False)), base_logits)
    assert np.abs(np.asarray(_logits(tr.model(), toks, use_lora=True)) - base_logits).max() > 1e-4


def test_equal_rewards_give_zero_gradient_and_no_update(theta0):
    tr = _trainer(theta0, _cfg(weight_decay=0.1))
    prompts, completions = _rows()
    tr.update(prompts, completions, REWARDS)  # B != 0 now, so every adapter has a gradient path
    adv = tr.advantages(np.full((1, 4), 0.7))
    assert not bool(adv.valid_G[0]) and float(adv.beta_G[0]) == 0.0
    np.testing.assert_array_equal(np.asarray(adv.A_GN), 0.0)
    adapters, opt = _copy(tr.lora), _copy(tr.opt_state)
    m = tr.update(prompts, completions, np.full((1, 4), 0.7))
    assert not m["updated"] and m["n_valid_groups"] == 0
    assert m["loss"] == 0.0 and m["grad_norm"] == 0.0  # exactly zero, KL term included
    assert all(_leaves_equal(adapters, tr.lora)) and all(_leaves_equal(opt, tr.opt_state))


def test_a_huge_reward_never_writes_non_finite_adapters(theta0):
    """1e300 is inf in float32: the advantages are NaN, the update is skipped, adapters intact."""
    tr = _trainer(theta0)
    prompts, completions = _rows()
    tr.update(prompts, completions, REWARDS)
    adapters, opt = _copy(tr.lora), _copy(tr.opt_state)
    m = tr.update(prompts, completions, np.array([[0.0, 1e300, 0.2, 0.5]]))
    assert not m["updated"] and tr.core.skipped == 1 and tr.n_updates == 1
    assert all(_leaves_equal(adapters, tr.lora)) and all(_leaves_equal(opt, tr.opt_state))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_copy(tr.lora)))


def test_rollouts_are_untruncated_unless_asked():
    cfg = _cfg(sampling=C.SamplingConfig(max_new_tokens=16, temperature=0.7, top_p=0.9, top_k=5))
    assert rollout_sampling(cfg) == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "greedy": False}
    for policy in ("truncated", "importance"):
        got = rollout_sampling(dataclasses.replace(cfg, rollout_policy=policy))
        assert (got["temperature"], got["top_p"], got["top_k"]) == (0.7, 0.9, 5)
    assert make_loss(dataclasses.replace(cfg, rollout_policy="importance")).importance == (0.7, 0.9, 5)
    assert make_loss(cfg).importance is None


def test_update_descends_the_reinforce_loss(theta0):
    """With λ = 0 the loss is -mean(A · log π_θ) on fixed A: a small step lowers it."""
    tr = _trainer(theta0, _cfg(lr=1e-3, kl_lambda=0.0))
    prompts, completions = _rows()
    first = tr.update(prompts, completions, REWARDS)
    second = tr.update(prompts, completions, REWARDS)  # reports the loss at the updated adapters
    assert second["loss"] < first["loss"]
    assert first["kl"] == 0.0 and second["kl"] != 0.0  # θ = θ0 before the first update


def test_masked_logprob_sums_follow_f3_indexing():
    """Σ_{t=C}^{S-1} log p(x_t | x_<t), with logits at t-1 predicting x_t (handoff F3)."""
    prompts = [[3, 7, 9], [3, 5], [3, 8, 8, 8]]
    completions = [[11, 12, 3], [13], [14, 15]]
    batch = build_batch(prompts, completions, pad_id=0, width=8, rows_multiple=4)
    logits_RWV = jax.random.normal(jax.random.key(0), (4, 8, 16))
    got = np.asarray(masked_logprob_sums(logits_RWV, batch["targets"], batch["mask"]))
    logp = np.asarray(jax.nn.log_softmax(logits_RWV, axis=-1))
    for b, (p, c) in enumerate(zip(prompts, completions)):
        seq = p + c
        want = sum(logp[b, t - 1, seq[t]] for t in range(len(p), len(seq)))
        assert got[b] == pytest.approx(want, rel=1e-5)
    assert got[3] == 0.0  # the mesh padding row is fully masked


def test_chunked_logprobs_equal_full_logits_in_value_and_gradient():
    """Chunked log-probs from hidden states = token_logprobs of the full logits where masked
    in (chunks that do not divide T included), 0 elsewhere; the same gradients."""
    from jaxttt.model.transformer import chunked_token_logprobs, token_logprobs
    k = jax.random.split(jax.random.key(1), 3)
    h_BTD = jax.random.normal(k[0], (3, 13, 8))
    w_DV = jax.random.normal(k[1], (8, 40))
    targets_BT = jax.random.randint(k[2], (3, 13), 0, 40)
    mask_BT = jnp.zeros((3, 13)).at[0, 9:].set(1).at[1, 2:5].set(1)  # row 2: a prompt only
    full = lambda h, w: token_logprobs(h @ w, targets_BT) * mask_BT
    for chunk in (1, 4, 5, 64):
        got = chunked_token_logprobs(h_BTD, w_DV, targets_BT, mask_BT, chunk)
        np.testing.assert_allclose(got, full(h_BTD, w_DV), rtol=1e-5, atol=1e-5)
        g_got = jax.grad(lambda h, w: jnp.sum(
            chunked_token_logprobs(h, w, targets_BT, mask_BT, chunk) ** 2), (0, 1))(h_BTD, w_DV)
        g_want = jax.grad(lambda h, w: jnp.sum(full(h, w) ** 2), (0, 1))(h_BTD, w_DV)
        for a, b in zip(g_got, g_want):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(chunked_token_logprobs(h_BTD, w_DV, targets_BT, mask_BT, 4))[2] == 0)


@pytest.mark.parametrize("importance,remat", [(None, True), ((0.8, 0.9, 5), True),
                                               ((0.8, 0.9, 5), False)])
def test_discover_loss_matches_the_full_logits_formula(theta0, importance, remat):
    """The chunked DiscoverLoss = shaped_reinforce_loss on full [R, W, V] logits (value and
    adapter gradients), with and without capped importance weights and rematerialisation."""
    from jaxttt.discover.step import (DiscoverLoss, make_loss, sampler_logprobs,
                                      shaped_reinforce_loss)
    assert make_loss(_cfg(remat=remat)).remat is remat
    from jaxttt.model.transformer import token_logprobs
    model = lora.add_lora(_base(theta0), _cfg().lora, seed=0)
    lora_state = nnx.state(model, nnx.LoRAParam)
    nnx.update(model, jax.tree.map(lambda x: x + 0.05, lora_state))  # θ != θ0
    prompts, completions = _rows()
    b = build_batch(prompts, completions, pad_id=0, width=32, rows_multiple=1)
    b = {k: jnp.asarray(v) for k, v in b.items()}
    b["adv"] = jnp.asarray([0.5, -1.0, 0.25, 0.25])
    b["weight"] = jnp.asarray([0.25, 0.25, 0.25, 0.0])

    def reference(m, b):
        logits = m(b["tokens"], use_lora=True)
        base = jax.lax.stop_gradient(token_logprobs(m(b["tokens"], use_lora=False), b["targets"]))
        log_q = None if importance is None else sampler_logprobs(
            jax.lax.stop_gradient(logits), b["targets"], *importance) * b["mask"]
        return shaped_reinforce_loss(token_logprobs(logits, b["targets"]), base, b["mask"],
                                     b["adv"], b["weight"], 0.1, "per_token_centered", log_q)

    chunked = DiscoverLoss(0.1, "per_token_centered", importance, chunk=8, remat=remat)
    grad = lambda fn: nnx.grad(lambda m: fn(m, b)[0], argnums=nnx.DiffState(0, nnx.LoRAParam))
    (l1, a1), (l2, a2) = chunked(model, b), reference(model, b)
    np.testing.assert_allclose(l1, l2, rtol=1e-4, atol=1e-6)
    for k in a2:
        np.testing.assert_allclose(a1[k], a2[k], rtol=1e-4, atol=1e-5)
    for x, y in zip(jax.tree.leaves(grad(chunked)(model)), jax.tree.leaves(grad(reference)(model))):
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-6)


def test_an_update_without_signal_runs_no_program_and_counts_a_skip(theta0, monkeypatch):
    tr = _trainer(theta0)
    prompts, completions = _rows()
    monkeypatch.setattr(tr.core, "step", lambda *a, **k: pytest.fail("forward pass ran"))
    m = tr.update(prompts, completions, np.full((1, 4), 0.3))
    assert not m["updated"] and tr.core.skipped == 1 and tr.n_updates == 0
    assert m["lr"] == pytest.approx(float(tr.core.current_lr()))


# ---- end-to-end -----------------------------------------------------------------------------
# Dense rewards (a random-init model still gets a spread) and short prompts: at most 6 ASCII
# letters of state keep every prompt in one 32-token bucket, so the run compiles once.
USER_ENV = textwrap.dedent("""
    from jaxttt.discover.env import DiscoveryEnv

    class VowelEnv(DiscoveryEnv):
        version = "vowel-1"

        def __init__(self, *, n: int = 4):
            super().__init__(n=n)
            self.n = n

        def problem_description(self):
            return f"Write {self.n} vowels."

        def context_from_archive(self, state, archive):
            return f"Write {self.n} vowels. Best so far:\\n{state}"

        def transition(self, action):
            return "".join(c for c in action if c.isascii() and c.isalpha())[:6]

        def reward(self, state):
            return min(sum(c in "aeiouAEIOU" for c in state), self.n) / self.n
""")
_NS: dict = {}
exec(USER_ENV, _NS)
VowelEnv = _NS["VowelEnv"]


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_run_writes_every_output_and_refuses_an_existing_dir(theta0, tok, tmp_path):
    model = _base(theta0)
    out = tmp_path / "ttt"
    cfg = _cfg(hot_swap_eval=True)
    summary = run_discover(model, tok, cfg, out, env=VowelEnv(n=3))
    assert not lora.has_lora(model)  # the caller's θ0 is left alone
    assert {"best_reward", "baseline_best_reward", "step_wall_s", "rollout_tokens_per_s"} <= set(summary)
    assert summary["samples"] == summary["baseline_samples"] == 2 * 4

    log = _lines(out / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2]
    assert all(I3_FIELDS | {"eval_reward"} <= set(r) for r in log)
    assert [r["adapter"] for r in log] == ["adapters/step_0001", "adapters/step_0002"]
    assert log[-1]["best_reward"] == summary["best_reward"]
    assert log[-1]["baseline_best_reward"] == summary["baseline_best_reward"]

    disc = _lines(out / "discovery_log.jsonl")
    assert len(disc) == 8 and all(G5_FIELDS <= set(r) for r in disc)
    assert summary["best_reward"] == max([r["reward"] for r in disc] + [summary["seed_reward"]])
    assert len(_lines(out / "baseline_log.jsonl")) == 8

    result = json.loads((out / "result.json").read_text())
    assert result["best_reward"] == summary["best_reward"]
    assert result["baseline_best_reward"] == summary["baseline_best_reward"]
    assert result["archive"]["total_expansions"] == 2 and result["config"]["rollouts"] == 4
    saved = C.load(C.DiscoverConfig, out / "config.yaml")
    assert saved.env.endswith(":VowelEnv") and saved.env_options == {"n": 3}
    assert dataclasses.replace(saved, env=cfg.env, env_options={}) == cfg
    assert result["env"] == saved.env and result["env_version"] == "VowelEnv/vowel-1"

    restored = lora.load_adapters(_base(theta0), out / "adapters" / "step_0002")
    lora_state = lora.lora_state(restored)
    assert any(np.abs(np.asarray(x)).max() > 0 for p, x in
               jax.tree_util.tree_leaves_with_path(lora_state) if "lora_b" in jax.tree_util.keystr(p))

    with pytest.raises(RunDirError, match="not empty"):
        run_discover(model, tok, cfg, out)




def test_cli_runs_a_user_env_end_to_end(base_run, tmp_path, capsys):
    env_file = tmp_path / "my_env.py"
    env_file.write_text(USER_ENV)
    out = tmp_path / "cli_run"
    argv = ["discover", "--ckpt", str(base_run), "--env", f"{env_file}:VowelEnv", "--out", str(out),
            "--config", "discover/tiny.yaml", "--steps", "2", "--rollouts", "4", "--seed", "3",
            "--env-option", "n=6", "--no-progress", "sampling.max_new_tokens=16", "lora.rank=4",
            "lora.alpha=8", "hot_swap_eval=false"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):])["samples"] == 8
    result = json.loads((out / "result.json").read_text())
    assert result["env"] == f"{env_file}:VowelEnv" and result["env_version"] == "VowelEnv/vowel-1"
    assert result["problem"] == "Write 6 vowels."
    assert result["config"]["seed"] == 3 and result["config"]["env_options"] == {"n": 6}
    assert result["samples"] == 8 and result["final_adapter"] == "adapters/step_0002"
    assert (out / "adapters" / "step_0002" / "lora.json").is_file()
    assert main(argv) == 1
    assert "not empty" in capsys.readouterr().err


class FaultyEnv(DiscoveryEnv):
    """Every 4th action raises, every 4th gives NaN, every 4th hangs; the rest score 0.5."""
    version = "faulty-1"

    def __init__(self):
        super().__init__()
        self.calls, self.lock = 0, threading.Lock()

    def problem_description(self) -> str:
        return "Say anything at all, please:"

    def context_from_archive(self, state, archive) -> str:
        return self.problem_description() + "\n"

    def initial_state(self) -> str:
        return "seed"

    def transition(self, action: str) -> str:
        with self.lock:
            self.calls += 1
            kind = self.calls % 4
        if kind == 1:
            raise RuntimeError("parser exploded")
        return {2: "nan", 3: "hang"}.get(kind, "ok")

    def reward(self, state: str) -> float:
        if state == "hang":
            time.sleep(1.0)
        return {"nan": math.nan, "seed": 0.1}.get(state, 0.5)


def test_faulty_env_scores_zero_and_the_run_goes_on(theta0, tok, tmp_path, capsys):
    model = _base(theta0)
    cfg = _cfg(reward_timeout_s=0.3, baseline=False, reward_workers=1)
    summary = run_discover(model, tok, cfg, tmp_path / "faulty", env=FaultyEnv())
    assert summary["steps"] == 2 and summary["n_errors"] == 6
    assert summary["seed_reward"] == 0.1 and summary["best_reward"] == 0.5
    disc = _lines(tmp_path / "faulty" / "discovery_log.jsonl")
    errors = [r["error"] for r in disc]
    assert sum("parser exploded" in (e or "") for e in errors) == 2
    assert sum("finite" in (e or "") for e in errors) == 2
    assert sum((e or "").startswith("timeout") for e in errors) == 2
    assert all(r["reward"] == 0.0 for r in disc if r["error"])
    assert all(r["reward"] == 0.5 for r in disc if not r["error"])
    log = _lines(tmp_path / "faulty" / "log.jsonl")
    assert [r["n_errors"] for r in log] == [3, 3] and all(r["n_valid_groups"] == 1 for r in log)
    assert "env errors scored 0" in capsys.readouterr().out


class BuildOnEnv(DiscoveryEnv):
    """An action only means something at its start state: the new state is start + "+"."""
    version = "build-on-1"

    def problem_description(self) -> str:
        return "Extend it:"

    def context_from_archive(self, state, archive) -> str:
        return f"Extend it: {state}\n"

    def initial_state(self) -> str:
        return "s"

    def transition(self, action: str) -> str:
        return ""  # without a start state nothing can be built (invalid, reward 0)

    def transition_from(self, start_state: str, action: str) -> str:
        return start_state + "+"

    def reward(self, state: str) -> float:
        return float(state.count("+"))


def test_rewards_see_the_archive_start_state(theta0, tok, tmp_path):
    cfg = _cfg(steps=3, baseline=False, hot_swap_eval=False, save_every=0)
    summary = run_discover(_base(theta0), tok, cfg, tmp_path / "build", env=BuildOnEnv())
    states = {n["id"]: n["state"] for n in
              json.loads((tmp_path / "build" / "result.json").read_text())["archive"]["nodes"]}
    disc = _lines(tmp_path / "build" / "discovery_log.jsonl")
    assert len(disc) == 12 and not any(r["error"] for r in disc)
    assert all(r["state"] == states[r["start_state"]] + "+" for r in disc)
    assert all(r["reward"] == r["state"].count("+") for r in disc)
    assert [r["reward"] for r in disc if r["step"] == 1] == [1.0] * 4
    assert summary["best_reward"] == max(r["reward"] for r in disc)


# ---- instruct models: prompts through the chat template ----------------------------------------
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def chat_tokenizer(d):
    """A tiny byte-level BPE saved as an instruct checkpoint's tokenizer (ChatML template)."""
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers

    from jaxttt.data.tokenizer import load_tokenizer
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"])
    tok.train_from_iterator(["Extend it: s++ and write 4 vowels, please."] * 20, trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<pad>",
        "chat_template": CHATML, "add_bos_token": False}))
    return load_tokenizer(d)


def test_instruct_prompts_are_one_chat_user_turn(theta0, tok, tmp_path):
    from jaxttt.data.chat_prompts import chat_prompt_ids
    from jaxttt.discover.loop import sample_rollouts
    from jaxttt.errors import UserError
    from jaxttt.eval.report import encode_prompt

    hf = chat_tokenizer(tmp_path)
    text = "Extend it: s+\n"
    turn = hf.chat_ids([{"role": "user", "content": text}])
    header = hf.encode("<|im_start|>assistant\n")
    assert turn[-len(header):] == header and hf.decode(turn).count(text) == 1
    for chat, want in (("auto", turn), (True, turn), ("off", encode_prompt(hf, text, 128 - 16))):
        ro = sample_rollouts(_base(theta0), hf, text, 2, jax.random.key(0), _cfg(chat=chat), ttt=True)
        assert ro.prompt_ids == want and len(ro.completions) == 2
    ro = sample_rollouts(_base(theta0), tok, text, 2, jax.random.key(0), _cfg(), ttt=True)
    assert ro.prompt_ids == encode_prompt(tok, text, 128 - 16)  # SentencePiece: as before

    long = "write 4 vowels, please. " * 40  # cut from the left of the text, never the template
    ids = chat_prompt_ids(hf, long, 48)
    head = hf.chat_ids([{"role": "user", "content": ""}])[:-len(header) - 2]
    assert len(ids) <= 48 and ids[:len(head)] == head and ids[-len(header):] == header
    with pytest.raises(UserError, match="'chat': 'on'.*no chat template"):
        run_discover(_base(theta0), tok, _cfg(chat="on"), tmp_path / "no_template", env=VowelEnv())
    assert not (tmp_path / "no_template").exists()
