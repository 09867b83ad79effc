"""Packing: EOS layout, meta, dtype choice, load_packed checks, default data cache, CLI."""
import argparse
import json

import numpy as np
import pytest

from jaxttt.data import commands, packing
from jaxttt.data.packing import ensure_default_data, load_packed, pack, token_dtype
from jaxttt.data.tokenizer import Tokenizer, train_tokenizer
from test_data_corpus import build_tiny_tfds
from test_data_tokenizer import _corpus


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return train_tokenizer([_corpus(d / "c.txt")], d / "spm", 400)


def _write_packed(path, tokens, vocab_size, dtype="uint16"):
    np.asarray(tokens, dtype=dtype).tofile(path)
    meta = dict(vocab_size=vocab_size, dtype=dtype, n_tokens=len(tokens))
    (path.parent / (path.name + ".json")).write_text(json.dumps(meta))


def test_pack_puts_eos_after_every_document(model, tmp_path):
    docs = ["the lazy dog.", "seven quick zebras jump.", "fox"]
    (tmp_path / "a.txt").write_text("\n".join(docs[:2]) + "\n\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": docs[2]}) + "\n")
    tok = Tokenizer(model)
    meta = pack(model, [tmp_path / "a.txt"], tmp_path / "out.bin", progress=False)
    meta_b = pack(model, [tmp_path / "b.jsonl"], tmp_path / "b.bin", text_field="body",
                  progress=False)
    tokens, loaded = load_packed(tmp_path / "out.bin", expect_vocab=400)
    expected = [t for d in docs[:2] for t in tok.encode(d) + [tok.eos_id]]
    assert tokens.tolist() == expected and tokens.dtype == np.uint16
    assert loaded == meta == json.loads((tmp_path / "out.bin.json").read_text())
    assert (meta["n_docs"], meta["n_tokens"], meta["vocab_size"]) == (2, len(expected), 400)
    assert (meta["dtype"], meta["tokenizer_sha256"]) == ("uint16", tok.sha256)
    assert meta["tokenizer"] == str(model.resolve())
    assert load_packed(tmp_path / "b.bin")[0].tolist() == tok.encode("fox") + [tok.eos_id]
    assert meta_b["n_docs"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # no temp files left behind
        "a.txt", "b.bin", "b.bin.json", "b.jsonl", "out.bin", "out.bin.json"]


def test_pack_with_a_hugging_face_tokenizer(tmp_path):
    """A converted model's tokenizer.json packs a corpus for continued pretraining."""
    from _tiny_hf import write_tokenizer
    from jaxttt.data.tokenizer import load_tokenizer

    vocab = write_tokenizer(tmp_path)
    (tmp_path / "a.txt").write_text("def add(a, b):\nimport os\n")
    meta = pack(tmp_path / "tokenizer.json", [tmp_path / "a.txt"], tmp_path / "o.bin",
                progress=False)
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    expected = [t for d in ("def add(a, b):", "import os") for t in tok.encode(d) + [tok.eos_id]]
    tokens, _ = load_packed(tmp_path / "o.bin", expect_vocab=vocab)
    assert tokens.tolist() == expected
    assert (meta["vocab_size"], meta["tokenizer_sha256"]) == (vocab, tok.sha256)


def test_pack_tfds_source(model, tmp_path):
    name = build_tiny_tfds(tmp_path / "tfds")
    meta = pack(model, [f"tfds:{name}:train:{tmp_path / 'tfds'}"], tmp_path / "t.bin",
                progress=False)
    tokens, _ = load_packed(tmp_path / "t.bin")
    assert meta["n_docs"] == 6 and int((tokens == 3).sum()) == 6 and tokens[-1] == 3
    assert Tokenizer(model).decode(tokens[:np.argmax(tokens == 3)]).startswith("tfds document")


def test_pack_empty_input_is_an_error(model, tmp_path):
    (tmp_path / "e.txt").write_text("\n  \n\n")
    with pytest.raises(ValueError, match="gave no tokens"):
        pack(model, tmp_path / "e.txt", tmp_path / "e.bin", progress=False)
    assert not (tmp_path / "e.bin").exists()


def test_token_dtype_choice(tmp_path):
    assert token_dtype(32000) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(128256) == np.uint32
    big = [0, 65535, 70000, 128255]
    _write_packed(tmp_path / "big.bin", big, 128256, dtype="uint32")
    tokens, meta = load_packed(tmp_path / "big.bin", expect_vocab=128256)
    assert tokens.dtype == np.uint32 and tokens.tolist() == big


def test_load_packed_errors_name_the_file(tmp_path):
    f = tmp_path / "d.bin"
    with pytest.raises(FileNotFoundError, match=r"d\.bin\.json"):
        load_packed(f)
    _write_packed(f, [1, 2, 3, 4], 10)
    f.unlink()
    with pytest.raises(FileNotFoundError, match=r"d\.bin"):
        load_packed(f)
    _write_packed(f, [1, 2, 3, 4], 10)
    with pytest.raises(ValueError, match="tokenizer/model vocab mismatch.*10.*expects 12"):
        load_packed(f, expect_vocab=12)
    f.write_bytes(f.read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"d\.bin: size 6 bytes.*4 uint16 tokens = 8 bytes"):
        load_packed(f)
    _write_packed(f, [1, 2, 30, 4], 10)
    with pytest.raises(ValueError, match=r"d\.bin: token id 30 out of range for vocab_size 10"):
        load_packed(f)


def test_out_of_range_found_in_later_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(packing, "_CHECK_CHUNK", 4)
    tokens = [1] * 9 + [12]
    _write_packed(tmp_path / "c.bin", tokens, 12)
    with pytest.raises(ValueError, match="token id 12 out of range.*tokens 8..12"):
        load_packed(tmp_path / "c.bin")


def test_ensure_default_data_builds_once(tmp_path, capsys):
    paths = ensure_default_data(tmp_path, 400, max_bytes=200_000, progress=False)
    assert "building the default corpus" in capsys.readouterr().out
    tok = Tokenizer(paths["tokenizer"])
    train, meta = load_packed(paths["train"], expect_vocab=400)
    val, vmeta = load_packed(paths["val"], expect_vocab=400)
    assert meta["tokenizer_sha256"] == vmeta["tokenizer_sha256"] == tok.sha256
    assert meta["n_tokens"] > 10 * vmeta["n_tokens"] > 0
    first_doc = tok.decode(val[:np.argmax(val == tok.eos_id)])
    assert first_doc == next(packing.corpus.default_documents("val", 200_000))  # exact code
    stamps = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    assert ensure_default_data(tmp_path, 400, max_bytes=200_000) == paths
    assert capsys.readouterr().out == ""  # cached: nothing rebuilt
    assert stamps == {k: p.stat().st_mtime_ns for k, p in paths.items()}


def test_cli_tokenizer_train_and_data_pack(tmp_path):
    parser = argparse.ArgumentParser(prog="jaxttt")
    commands.register(parser.add_subparsers(dest="command", required=True))
    corpus = _corpus(tmp_path / "c.txt", 100)
    args = parser.parse_args(["tokenizer", "train", "--input", str(corpus),
                              "--model-prefix", str(tmp_path / "m"), "--vocab-size", "300"])
    args.func(args)
    assert Tokenizer(tmp_path / "m.model").vocab_size == 300
    args = parser.parse_args(["data", "pack", "--tokenizer", str(tmp_path / "m.model"),
                              "--input", str(corpus), str(corpus), "--output",
                              str(tmp_path / "x.bin"), "--no-progress"])
    args.func(args)
    _, meta = load_packed(tmp_path / "x.bin", expect_vocab=300)
    assert meta["n_docs"] == 200
