"""SDFT parts that need no model: data, token KL + alignment, EMA teacher, replay buffer."""
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxttt.sdft import kl
from jaxttt.sdft.data import Example, load_jsonl, student_prompt, teacher_prompt, write_jsonl
from jaxttt.sdft.ema import ema_init, ema_update
from jaxttt.sdft.replay import ReplayBuffer

DIRECTIONS = ("reverse", "forward")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def test_teacher_prompt_is_the_paper_template():
    expected = ("<Question>\nWhat is 2+2?\n\nThis is an example for a response to the question:\n"
                "<Demonstration>\n4\n\nNow answer with a response of your own, including the "
                "thinking process:\n")
    assert teacher_prompt("What is 2+2?", "4") == expected
    assert student_prompt("What is 2+2?") == "What is 2+2?"


def _write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_load_jsonl_keeps_extra_keys_and_skips_blank_lines(tmp_path):
    p = _write(tmp_path, ['{"prompt": "a", "demonstration": "b", "reward": 0.5}', "",
                          '{"prompt": "c", "demonstration": "d"}'])
    examples, n_bad = load_jsonl(p)
    assert n_bad == 0
    assert examples == [Example("a", "b", {"reward": 0.5}), Example("c", "d", {})]
    out = tmp_path / "out.jsonl"
    assert write_jsonl(out, examples) == 2
    assert load_jsonl(out)[0] == examples


@pytest.mark.parametrize("bad_line, message", [
    ('{"prompt": "a", "demonstration": ', "not valid JSON"),
    ('["a", "b"]', "expected a JSON object"),
    ('{"prompt": "a"}', "missing key 'demonstration'"),
    ('{"prompt": 3, "demonstration": "b"}', "key 'prompt' must be a string"),
    ('{"prompt": "a", "demonstration": "  "}', "'demonstration' is empty"),
])
def test_load_jsonl_bad_line_names_file_and_line(tmp_path, bad_line, message):
    p = _write(tmp_path, ['{"prompt": "a", "demonstration": "b"}', "", bad_line])
    with pytest.raises(ValueError) as err:
        load_jsonl(p)
    assert f"{p}:3" in str(err.value) and message in str(err.value)


def test_load_jsonl_skip_bad_counts_and_warns(tmp_path):
    p = _write(tmp_path, ['{"prompt": "a", "demonstration": "b"}', "{oops", '{"prompt": "x"}'])
    with pytest.warns(UserWarning, match="skipped 2 bad line"):
        examples, n_bad = load_jsonl(p, skip_bad=True)
    assert (len(examples), n_bad) == (1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_jsonl(_write(tmp_path, ['{"prompt": "a", "demonstration": "b"}']), skip_bad=True)[1] == 0


# ---------------------------------------------------------------------------------------------
# Token KL
# ---------------------------------------------------------------------------------------------
def _np_kl(s, t, direction):
    s, t = s.astype(np.float64), t.astype(np.float64)
    ls = s - s.max(-1, keepdims=True)
    ls -= np.log(np.exp(ls).sum(-1, keepdims=True))
    lt = t - t.max(-1, keepdims=True)
    lt -= np.log(np.exp(lt).sum(-1, keepdims=True))
    if direction == "reverse":
        return (np.exp(ls) * (ls - lt)).sum(-1)
    return (np.exp(lt) * (lt - ls)).sum(-1)


def _logits(seed, shape, scale=3.0):
    """Random float32 test data (NumPy: no per-shape compile of jax.random)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_token_kl_zero_for_identical_logits(direction):
    z = _logits(0, (2, 5, 37))
    np.testing.assert_allclose(kl.token_kl(z, z, direction), 0.0, atol=1e-6)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_token_kl_matches_float64_numpy(direction):
    s, t = _logits(1, (3, 7, 101)), _logits(2, (3, 7, 101))
    got = kl.token_kl(s, t, direction)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, _np_kl(np.asarray(s), np.asarray(t), direction), atol=1e-5)
    assert float(jnp.min(got)) >= 0.0


def test_token_kl_bf16_inputs_computed_in_float32():
    s, t = _logits(3, (4, 64)), _logits(4, (4, 64))
    got = kl.token_kl(s.astype(jnp.bfloat16), t.astype(jnp.bfloat16))
    want = _np_kl(np.asarray(s.astype(jnp.bfloat16).astype(jnp.float32)),
                  np.asarray(t.astype(jnp.bfloat16).astype(jnp.float32)), "reverse")
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_directions_differ_and_bad_direction_rejected():
    s, t = _logits(5, (6, 20)), _logits(6, (6, 20))
    assert not np.allclose(kl.token_kl(s, t, "reverse"), kl.token_kl(s, t, "forward"))
    with pytest.raises(ValueError, match="reverse"):
        kl.token_kl(s, t, "backward")


def test_masked_mean():
    x = jnp.array([[1.0, 2.0, 100.0], [3.0, jnp.nan, jnp.nan]])
    m = jnp.array([[True, True, False], [True, False, False]])
    assert float(kl.masked_mean(x, m)) == pytest.approx(2.0)
    assert float(kl.masked_mean(x, jnp.zeros_like(m))) == 0.0


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("T, chunk", [(13, 4), (8, 8), (5, 64), (1, 3)])
def test_chunked_equals_unchunked(direction, T, chunk):
    s, t = _logits(7, (2, T, 50)), _logits(8, (2, T, 50))
    mask = jnp.asarray(np.random.default_rng(9).random((2, T)) < 0.7)
    want = jnp.where(mask, kl.token_kl(s, t, direction), 0.0)
    np.testing.assert_allclose(kl.chunked_token_kl(s, t, mask, direction, chunk), want, atol=1e-6)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_from_hidden_equals_from_logits(direction):
    B, T, D, V = 2, 11, 8, 40
    hs, ht = _logits(10, (B, T, D), 1.0), _logits(11, (B, T, D), 1.0)
    ws, wt = _logits(12, (D, V), 1.0), _logits(13, (D, V), 1.0)
    mask = jnp.arange(T)[None, :] < jnp.array([[T], [6]])
    for w_teacher in (None, wt):
        w_t = ws if w_teacher is None else w_teacher
        want = kl.chunked_token_kl(hs @ ws, ht @ w_t, mask, direction, 4)
        got = kl.chunked_kl_from_hidden(hs, ht, ws, mask, direction, 4, w_teacher_DV=w_teacher)
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert float(jnp.abs(jnp.where(mask, 0.0, got)).max()) == 0.0


def test_reverse_kl_gradient_only_to_student_and_matches_a2():
    """A2: d/dz Σ p_s (l_s − l_t) = p_s ⊙ ((l_s − l_t) − KL); the teacher gets no gradient."""
    s, t = _logits(14, (3, 9, 30)), _logits(15, (3, 9, 30))
    mask = jnp.ones((3, 9), bool)
    loss = lambda s, t: jnp.sum(kl.chunked_token_kl(s, t, mask, "reverse", 4))
    g_s, g_t = jax.grad(loss, argnums=(0, 1))(s, t)
    assert float(jnp.abs(g_t).max()) == 0.0
    ls, lt = jax.nn.log_softmax(s), jax.nn.log_softmax(t)
    k = jnp.sum(jnp.exp(ls) * (ls - lt), -1, keepdims=True)
    np.testing.assert_allclose(g_s, jnp.exp(ls) * ((ls - lt) - k), atol=1e-5)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_chunked_gradients_equal_unchunked(direction):
    B, T, D, V = 2, 10, 6, 24
    hs, ht, w = _logits(16, (B, T, D), 1.0), _logits(17, (B, T, D), 1.0), _logits(18, (D, V), 1.0)
    mask = jnp.arange(T)[None, :] < jnp.array([[7], [10]])

    def full(hs, ht, w):  # token_kl stops the teacher path (ht @ w) itself
        return kl.masked_mean(kl.token_kl(hs @ w, ht @ w, direction), mask)

    def chunked(hs, ht, w):
        return kl.masked_mean(kl.chunked_kl_from_hidden(hs, ht, w, mask, direction, 3), mask)

    g_full = jax.grad(full, argnums=(0, 1, 2))(hs, ht, w)
    g_chunk = jax.grad(chunked, argnums=(0, 1, 2))(hs, ht, w)
    assert float(jnp.abs(g_chunk[1]).max()) == 0.0
    for a, b in zip(g_chunk, g_full):
        np.testing.assert_allclose(a, b, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Alignment (F4)
# ---------------------------------------------------------------------------------------------
def test_alignment_picks_positions_predicting_y_for_different_context_lengths():
    # Row 0: Cs=3, Ct=7, L=4. Row 1: Cs=2, Ct=5, L=0 (EOS first: fully masked, no dummy token).
    cs, ct, gl, l_max = jnp.array([3, 2]), jnp.array([7, 5]), jnp.array([4, 0]), 4
    Ts, Tt = 8, 12
    s_pos, s_mask = kl.align_positions(cs, gl, Ts, l_max)
    t_pos, t_mask = kl.align_positions(ct, gl, Tt, l_max)
    np.testing.assert_array_equal(s_pos[0], [2, 3, 4, 5])
    np.testing.assert_array_equal(t_pos[0], [6, 7, 8, 9])
    np.testing.assert_array_equal(s_mask, [[True] * 4, [False] * 4])
    np.testing.assert_array_equal(t_mask, s_mask)
    np.testing.assert_array_equal(kl.gen_mask(gl, l_max), s_mask)
    # gather_aligned returns exactly those rows: encode position t of row b as 100*b + t.
    x_s = (100 * jnp.arange(2)[:, None] + jnp.arange(Ts)[None, :])[..., None].astype(jnp.float32)
    x_t = (100 * jnp.arange(2)[:, None] + jnp.arange(Tt)[None, :])[..., None].astype(jnp.float32)
    np.testing.assert_array_equal(kl.gather_aligned(x_s, cs - 1, l_max)[0, :, 0], [2, 3, 4, 5])
    np.testing.assert_array_equal(kl.gather_aligned(x_t, ct - 1, l_max)[0, :, 0], [6, 7, 8, 9])
    np.testing.assert_array_equal(kl.gather_aligned(x_s, cs - 1, l_max)[1, :, 0], [101, 102, 103, 104])


def test_aligned_kl_is_zero_when_states_agree_on_y_and_not_when_shifted():
    """Student `ctx(3) + y(4) + pad`, teacher `ctx(7) + y(4) + pad`: different contexts, same
    hidden states at the positions predicting y -> KL exactly 0 there; off by one -> KL > 0."""
    D, V, L = 6, 16, 4
    w = _logits(20, (D, V), 1.0)
    h_y = _logits(21, (L, D), 1.0)
    h_s = _logits(22, (2, 8, D), 1.0).at[0, 2:6].set(h_y)
    h_t = _logits(23, (2, 12, D), 1.0).at[0, 6:10].set(h_y)
    args = (jnp.array([3, 2]), jnp.array([7, 5]), jnp.array([4, 0]), L)
    kl_BL, mask = kl.aligned_kl_from_hidden(h_s, h_t, w, *args, "reverse", 3)
    np.testing.assert_array_equal(mask, [[True] * 4, [False] * 4])
    np.testing.assert_allclose(kl_BL, 0.0, atol=1e-6)
    shifted, _ = kl.aligned_kl_from_hidden(h_s, h_t, w, jnp.array([4, 2]), *args[1:], "reverse", 3)
    assert float(shifted[0].min()) > 1e-3


# ---------------------------------------------------------------------------------------------
# EMA teacher
# ---------------------------------------------------------------------------------------------
def test_ema_moves_teacher_by_one_minus_tau_toward_student():
    student = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    teacher = ema_init(nnx.state(student, nnx.Param))
    t0 = jax.tree.map(np.asarray, teacher)
    # Change the student as an optimiser step would.
    nnx.update(student, jax.tree.map(lambda p: p + 1.0, nnx.state(student, nnx.Param)))
    s1 = jax.tree.map(np.asarray, nnx.state(student, nnx.Param))
    tau = 0.9
    teacher = ema_update(teacher, nnx.state(student, nnx.Param), tau)
    jax.tree.map(lambda t, a, s: np.testing.assert_allclose(t, tau * a + (1 - tau) * s, rtol=1e-6),
                 teacher, t0, s1)
    jax.tree.map(lambda t, a: np.testing.assert_allclose(t - a, 0.1, rtol=1e-5), teacher, t0)
    # τ = 1 freezes the teacher; τ = 0 copies the student.
    frozen = ema_update(ema_init(teacher), s1, 1.0)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), frozen, teacher)
    copied = ema_update(ema_init(teacher), s1, 0.0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), copied, s1)


def test_ema_keeps_teacher_dtype():
    teacher = {"w": jnp.zeros(3, jnp.bfloat16)}
    out = ema_update(teacher, {"w": jnp.ones(3, jnp.float32)}, 0.5)
    assert out["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(out["w"].astype(jnp.float32), 0.5)


# ---------------------------------------------------------------------------------------------
# Replay
# ---------------------------------------------------------------------------------------------
def _examples(n, start=0):
    return [Example(f"p{i}", f"d{i}", {"i": i}) for i in range(start, start + n)]


def test_replay_mix_ratio_within_tolerance():
    buf = ReplayBuffer(capacity=100, seed=0)
    new = _examples(8, start=1000)
    assert buf.mix(new, 0.5).n_replay == 0  # empty buffer: nothing to replay
    buf.add(_examples(50))
    n_replay = n_total = 0
    for _ in range(2000):
        mixed = buf.mix(new, 0.2)
        assert len(mixed.examples) == 8
        from_buffer = sum(ex.meta["i"] < 1000 for ex in mixed.examples)
        assert from_buffer == mixed.n_replay
        n_replay, n_total = n_replay + from_buffer, n_total + 8
    assert abs(n_replay / n_total - 0.2) < 0.01
    assert buf.mix(new, 0.0).n_replay == 0
    assert buf.mix(new, 1.0).n_replay == 8


def test_replay_reservoir_keeps_capacity_and_is_uniform():
    first_half = 0
    for seed in range(200):
        buf = ReplayBuffer(capacity=10, seed=seed)
        buf.add(_examples(100))
        assert len(buf) == 10 and buf.n_seen == 100
        first_half += sum(ex.meta["i"] < 50 for ex in buf.items)
    assert abs(first_half / 2000 - 0.5) < 0.05


def test_replay_sample_distinct_when_possible():
    buf = ReplayBuffer(capacity=20, seed=1)
    buf.add(_examples(5))
    assert len({ex.prompt for ex in buf.sample(5)}) == 5
    assert len(buf.sample(12)) == 12
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(capacity=3).sample(1)


def test_replay_state_round_trip_is_exact():
    buf = ReplayBuffer(capacity=16, seed=3)
    buf.add(_examples(40))
    buf.mix(_examples(4, 500), 0.5)
    state = json.loads(json.dumps(buf.state_dict()))  # must survive JSON
    restored = ReplayBuffer.from_state_dict(state)
    assert restored.items == buf.items and restored.n_seen == buf.n_seen
    for step in range(20):
        a, b = buf.mix(_examples(4, 600 + step), 0.5), restored.mix(_examples(4, 600 + step), 0.5)
        assert a == b
        buf.add(_examples(3, 700 + 3 * step))
        restored.add(_examples(3, 700 + 3 * step))
    assert restored.items == buf.items
    assert restored.state_dict() == buf.state_dict()
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(capacity=17).load_state_dict(state)
