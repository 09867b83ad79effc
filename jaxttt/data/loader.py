"""grain pipeline over a packed .bin: shuffled windows, sharded per JAX process, resumable.

Item i is the window tokens[i*T : i*T + T + 1] (non-overlapping, (n_tokens-1)//T of them);
x = window[:-1], y = window[1:] (handoff F1). The global stream is
  windows -> shuffle(seed, reshuffled each epoch) -> repeat -> global batches of G rows,
and process p of P takes rows [p*b, (p+1)*b) of every global batch (b = G // P), so the
processes' rows are disjoint and together are exactly the single-process global batch.
Iterator state is the global step, valid for any process count.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import grain
import numpy as np

from jaxttt.data.packing import load_packed


class WindowSource:
    """Random-access source: {"x": int32[T], "y": int32[T]} for window i (grain protocol)."""

    def __init__(self, bin_path: Path | str, seq_len: int, *, expect_vocab: int | None = None):
        self.path = Path(bin_path)
        tokens, meta = load_packed(self.path, expect_vocab=expect_vocab)
        if meta["n_tokens"] < seq_len + 1:
            raise ValueError(f"Dataset too small for seq_len: {self.path} has {meta['n_tokens']} "
                             f"tokens, a window needs seq_len+1 = {seq_len + 1}")
        self.seq_len, self.meta = seq_len, meta
        self._n = (meta["n_tokens"] - 1) // seq_len
        self._tokens: np.memmap | None = tokens

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        start = (int(i) % self._n) * self.seq_len
        window_T = np.asarray(self._tokens_mm()[start:start + self.seq_len + 1], dtype=np.int32)
        return {"x": window_T[:-1], "y": window_T[1:]}

    def _tokens_mm(self) -> np.memmap:
        if self._tokens is None:  # after unpickling in a worker process
            self._tokens = np.memmap(self.path, dtype=self.meta["dtype"], mode="r",
                                     shape=(self.meta["n_tokens"],))
        return self._tokens

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}

    def __repr__(self) -> str:
        return f"WindowSource({str(self.path)!r}, seq_len={self.seq_len}, windows={self._n})"


class _ProcessRows(grain.MapDataset):
    """Element j of process p = global element (j//b)*G + p*b + j%b (its rows of each batch)."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int,
                 process_count: int):
        super().__init__(parent)
        self._G, self._b = global_batch, global_batch // process_count
        self._offset = process_index * self._b

    def __len__(self) -> int:
        return len(self._parent) // self._G * self._b

    def __getitem__(self, j):
        if isinstance(j, slice):
            return self.slice(j)
        step, row = divmod(j, self._b)
        return self._parent[step * self._G + self._offset + row]

    def __str__(self) -> str:
        return f"_ProcessRows(G={self._G}, b={self._b}, offset={self._offset})"


class Batches:
    """Iterator of local batches {"x": int32[b, T], "y": int32[b, T]}; see get_state/set_state."""

    def __init__(self, dataset: grain.IterDataset, signature: dict):
        self._dataset, self.signature = dataset, signature
        self._it = iter(dataset)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)


def make_loader(bin_path: Path | str, *, seq_len: int, global_batch: int, seed: int,
                process_index: int | None = None, process_count: int | None = None,
                num_epochs: int | None = None, shuffle: bool = True,
                expect_vocab: int | None = None, num_threads: int = 2) -> Batches:
    """This process's share of the global batches of `bin_path` (forever if num_epochs=None)."""
    p, n_proc = _process(process_index, process_count)
    if global_batch % n_proc:
        raise ValueError(f"global_batch {global_batch} is not divisible by process_count {n_proc}")
    source = WindowSource(bin_path, seq_len, expect_vocab=expect_vocab)
    if num_epochs is not None and len(source) * num_epochs < global_batch:
        raise ValueError(f"{bin_path}: {len(source)} windows of seq_len {seq_len} x {num_epochs} "
                         f"epochs cannot fill one global batch of {global_batch}")
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)  # index_shuffle, reseeded with seed+epoch every epoch
    ds = _ProcessRows(ds.repeat(num_epochs), global_batch, p, n_proc)
    ds = ds.batch(global_batch // n_proc, drop_remainder=True)
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4)
    signature = dict(path=str(Path(bin_path).resolve()), n_tokens=source.meta["n_tokens"],
                     seq_len=seq_len, global_batch=global_batch, seed=seed, shuffle=shuffle,
                     num_epochs=num_epochs)
    return Batches(ds.to_iter_dataset(read), signature)


def _process(index: int | None, count: int | None) -> tuple[int, int]:
    if index is None or count is None:
        import jax  # only when the caller did not say

        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is not in [0, process_count={count})")
    return index, count


def get_state(batches: Batches) -> dict[str, Any]:
    """JSON-serialisable position: the global step reached plus what the stream depends on."""
    state = batches._it.get_state()
    return {"step": int(state["next_index"]), **batches.signature}


def set_state(batches: Batches, state: dict[str, Any]) -> None:
    """Resume `batches` at `state` (from get_state), checking it describes the same stream."""
    for key, value in batches.signature.items():
        if key != "path" and state.get(key) != value:
            raise ValueError(f"loader state does not match this loader: {key}={state.get(key)!r} "
                             f"in the state, {value!r} here ({batches.signature['path']})")
    batches._it.set_state({"next_index": int(state["step"])})
