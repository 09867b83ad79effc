"""grain loader: F1 shift, shapes, seeding, epochs, resumable state, per-process sharding."""
import json
import sys

import numpy as np
import pytest

from jaxttt.data.loader import WindowSource, get_state, make_loader, set_state

T = 8  # seq_len


@pytest.fixture
def bin_path(tmp_path):
    """tokens[i] = i (vocab 1000): every window is identified by its first token x[0] = i*T."""
    path = tmp_path / "toy.bin"
    n_tokens = 40 * T + 3  # 40 windows, 2 spare tokens
    np.arange(n_tokens, dtype=np.uint16).tofile(path)
    meta = dict(vocab_size=1000, dtype="uint16", n_tokens=n_tokens)
    (tmp_path / "toy.bin.json").write_text(json.dumps(meta))
    return path


def _take(it, n):
    return [next(it) for _ in range(n)]


def _window_ids(batch):
    return (batch["x"][:, 0] // T).tolist()


def test_source_windows_are_shifted_pairs(bin_path):
    src = WindowSource(bin_path, T)
    assert len(src) == 40
    item = src[3]
    assert item["x"].dtype == item["y"].dtype == np.int32
    np.testing.assert_array_equal(item["x"], np.arange(3 * T, 4 * T))
    np.testing.assert_array_equal(item["y"], np.arange(3 * T + 1, 4 * T + 1))  # F1: y = x + 1


def test_batches_shapes_and_shift(bin_path):
    it = make_loader(bin_path, seq_len=T, global_batch=4, seed=0, process_index=0,
                     process_count=1)
    for batch in _take(it, 3):
        assert set(batch) == {"x", "y"}
        assert batch["x"].shape == batch["y"].shape == (4, T)
        assert batch["x"].dtype == np.int32
        np.testing.assert_array_equal(batch["y"][:, :-1], batch["x"][:, 1:])
        assert (batch["x"][:, 0] % T == 0).all()  # non-overlapping window starts


def test_seed_determinism_and_epoch_permutation(bin_path):
    def ids(seed, n=10, **kw):
        it = make_loader(bin_path, seq_len=T, global_batch=4, seed=seed, process_index=0,
                         process_count=1, **kw)
        return [i for b in _take(it, n) for i in _window_ids(b)]

    first = ids(seed=1)
    assert first == ids(seed=1) != ids(seed=2)
    assert sorted(first) == list(range(40))  # one epoch = every window exactly once
    two_epochs = ids(seed=1, n=20)
    assert sorted(two_epochs[40:]) == list(range(40)) and two_epochs[40:] != first  # reshuffled
    assert ids(seed=1, n=10, shuffle=False) == list(range(40))
    finite = make_loader(bin_path, seq_len=T, global_batch=16, seed=0, process_index=0,
                         process_count=1, num_epochs=1)
    assert len(list(finite)) == 2  # 40 windows -> 2 full batches of 16, remainder dropped


def test_state_round_trip_is_bitwise(bin_path):
    kw = dict(seq_len=T, global_batch=4, seed=7, process_index=0, process_count=1)
    it = make_loader(bin_path, **kw)
    _take(it, 5)
    state = json.loads(json.dumps(get_state(it)))  # survives a JSON checkpoint
    assert state["step"] == 5
    after = _take(it, 5)
    resumed = make_loader(bin_path, **kw)
    set_state(resumed, state)
    for a, b in zip(after, _take(resumed, 5)):
        for k in ("x", "y"):
            assert a[k].tobytes() == b[k].tobytes()


def test_state_from_another_stream_is_rejected(bin_path):
    it = make_loader(bin_path, seq_len=T, global_batch=4, seed=7, process_index=0,
                     process_count=1)
    state = get_state(it)
    other = make_loader(bin_path, seq_len=T, global_batch=4, seed=8, process_index=0,
                        process_count=1)
    with pytest.raises(ValueError, match="seed=7 in the state, 8 here"):
        set_state(other, state)


def test_processes_get_disjoint_rows_of_the_global_batch(bin_path):
    kw = dict(seq_len=T, global_batch=6, seed=3)
    single = _take(make_loader(bin_path, process_index=0, process_count=1, **kw), 8)
    p0 = _take(make_loader(bin_path, process_index=0, process_count=2, **kw), 8)
    p1 = _take(make_loader(bin_path, process_index=1, process_count=2, **kw), 8)
    for g, a, b in zip(single, p0, p1):
        assert a["x"].shape == (3, T)
        assert not set(_window_ids(a)) & set(_window_ids(b))
        for k in ("x", "y"):  # stacking the local batches gives the global batch exactly
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), g[k])


def test_resume_on_a_different_process_count(bin_path):
    kw = dict(seq_len=T, global_batch=4, seed=5)
    single = make_loader(bin_path, process_index=0, process_count=1, **kw)
    _take(single, 3)
    state, want = get_state(single), next(single)
    halves = []
    for p in range(2):
        it = make_loader(bin_path, process_index=p, process_count=2, **kw)
        set_state(it, state)
        halves.append(next(it)["x"])
    np.testing.assert_array_equal(np.concatenate(halves), want["x"])


def test_too_small_dataset_and_bad_batch(bin_path, tmp_path):
    with pytest.raises(ValueError, match=r"toy\.bin has 323 tokens.*seq_len\+1 = 401"):
        make_loader(bin_path, seq_len=400, global_batch=2, seed=0, process_index=0,
                    process_count=1)
    with pytest.raises(ValueError, match="not divisible by process_count 4"):
        make_loader(bin_path, seq_len=T, global_batch=6, seed=0, process_index=0,
                    process_count=4)
    with pytest.raises(ValueError, match="expects 999"):
        make_loader(bin_path, seq_len=T, global_batch=2, seed=0, process_index=0,
                    process_count=1, expect_vocab=999)


def test_defaults_to_the_jax_process(bin_path):
    it = make_loader(bin_path, seq_len=T, global_batch=2, seed=0)
    assert next(it)["x"].shape == (2, T)  # single-process test run: local batch = global
    assert "jax" in sys.modules
