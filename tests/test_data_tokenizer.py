"""Tokenizer: E1 special ids, round trips, small-corpus vocab fallback, file errors."""
import hashlib
import re

import pytest

from jaxttt.data.tokenizer import Tokenizer, train_tokenizer

WORDS = ("the quick brown fox jumps over the lazy dog while seven wizards quietly hex "
         "jovial bakers and packing boxes of liquor jugs mix with zebras").split()


def _corpus(path, n_lines=400):
    lines = [" ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(5 + i % 9)) + "."
             for i in range(n_lines)]
    path.write_text("\n\n".join(lines) + "\n")  # blank lines between docs are skipped
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return Tokenizer(train_tokenizer([_corpus(d / "c.txt")], d / "spm", 400))


def test_special_ids_and_vocab(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 400
    assert tok.path.with_suffix(".vocab").is_file()
    assert tok.sha256 == hashlib.sha256(tok.path.read_bytes()).hexdigest()


def test_round_trip_and_bos_eos(tok):
    text = "the lazy dog jumps over seven quiet zebras."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    with_marks = tok.encode(text, bos=True, eos=True)
    assert with_marks == [tok.bos_id] + ids + [tok.eos_id]
    assert tok.decode(with_marks) == text
    assert tok.encode_batch([text, "fox"]) == [ids, tok.encode("fox")]


def test_default_normalization_folds_case(tok):
    # E1's nmt_nfkc_cf: case-folded, so upper and lower case encode alike
    assert tok.encode("The Quick FOX") == tok.encode("the quick fox")


def test_decode_stops_at_pad(tok):
    ids = tok.encode("lazy dog")
    assert tok.decode(ids + [tok.pad_id] * 3 + tok.encode("fox")) == "lazy dog"


def test_code_mode_is_byte_exact(tmp_path):
    src = "def f(X):\n    if X:\n\treturn 'Ünïcode'  # Comment\n\n\nclass A:\n    pass\n"
    (tmp_path / "pkg").mkdir()
    for i in range(20):
        (tmp_path / "pkg" / f"m{i}.py").write_text(src.replace("f(", f"f{i}("))
    tok = Tokenizer(train_tokenizer([tmp_path / "pkg"], tmp_path / "code", 320, code=True))
    assert tok.decode(tok.encode(src)) == src
    unseen = "print('never seen: ∑ 東京')\n"  # byte fallback covers unseen characters
    assert tok.decode(tok.encode(unseen)) == unseen


def test_small_corpus_falls_back_to_feasible_vocab(tmp_path, capsys):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("Hello world.\nThis is a tiny corpus for tokenizer smoke tests.\n")
    tok = Tokenizer(train_tokenizer([corpus], tmp_path / "spm32k", 32000))
    out = capsys.readouterr().out
    m = re.search(r"corpus supports at most (\d+) pieces; using vocab (\d+) instead of 32000", out)
    assert m and m.group(1) == m.group(2)
    assert tok.vocab_size == int(m.group(1)) < 32000
    assert tok.decode(tok.encode("hello world.")) == "hello world."


def test_vocab_below_required_chars_is_clear(tmp_path):
    with pytest.raises(ValueError, match="vocab_size 50 is below"):
        train_tokenizer([_corpus(tmp_path / "c.txt", 20)], tmp_path / "t", 50)


def test_missing_and_corrupt_model_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(ValueError, match="bad.model"):
        Tokenizer(bad)
