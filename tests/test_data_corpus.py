"""Document sources: txt, jsonl, .py directories, TFDS (without TensorFlow), default corpus."""
import functools
import sys

import pytest

from jaxttt.data import corpus
from jaxttt.data.corpus import iter_documents, parse_tfds_spec


def test_txt_one_document_per_line(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first doc\n\n   \nsecond doc\nthird\n")
    assert list(iter_documents(f)) == ["first doc", "second doc", "third"]


def test_jsonl_field_and_errors_name_line(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "a"}\n\n{"body": "b", "text": "c"}\n')
    assert list(iter_documents(f)) == ["a", "c"]
    with pytest.raises(ValueError, match=r"a\.jsonl:1: missing field 'body'"):
        list(iter_documents(f, text_field="body"))
    f.write_text('{"text": "ok"}\n{"text": "broken\n')
    with pytest.raises(ValueError, match=r"a\.jsonl:2: malformed JSON"):
        list(iter_documents(f))
    f.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match=r"a\.jsonl:1: field 'text' is int"):
        list(iter_documents(f))


def test_directory_of_py_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.py").write_text("x = 1\n")
    (tmp_path / "sub" / "a.py").write_text("def f():\n    pass\n")
    (tmp_path / "notes.md").write_text("ignored")
    assert list(iter_documents(tmp_path)) == ["x = 1\n", "def f():\n    pass\n"]


def test_missing_and_unsupported_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.txt"):
        list(iter_documents(tmp_path / "nothere.txt"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match=r"x\.csv: unsupported"):
        list(iter_documents(tmp_path / "x.csv"))


def test_parse_tfds_spec():
    assert parse_tfds_spec("tfds:wikipedia/20230601.en:train") == (
        "wikipedia/20230601.en", "train", None)
    assert parse_tfds_spec("tfds:c4:train[:10%]:gs://bkt/tfds") == (
        "c4", "train[:10%]", "gs://bkt/tfds")
    assert parse_tfds_spec("tfds:lm1b:test:/data") == ("lm1b", "test", "/data")
    with pytest.raises(ValueError, match="tfds:NAME"):
        parse_tfds_spec("tfds:onlyname")


@functools.cache
def _tiny_tfds_builder():
    """A minimal ArrayRecord TFDS builder (defined once: TFDS registers builders by name)."""
    import tensorflow_datasets as tfds

    class JaxtttTinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(6), "test": self._generate_examples(2)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"text": f"tfds document {i} ünïcode"}

    return JaxtttTinyText


def build_tiny_tfds(data_dir) -> str:
    """Build the tiny dataset under `data_dir` without TensorFlow; returns its TFDS name."""
    _tiny_tfds_builder()(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return "jaxttt_tiny_text"


def test_tfds_data_source_without_tensorflow(tmp_path):
    name = build_tiny_tfds(tmp_path)
    docs = list(iter_documents(f"tfds:{name}:train:{tmp_path}"))
    assert sorted(docs) == sorted(f"tfds document {i} ünïcode" for i in range(6))
    assert len(list(iter_documents(f"tfds:{name}:train[:3]:{tmp_path}"))) == 3
    with pytest.raises(ValueError, match="no field 'body'"):
        list(iter_documents(f"tfds:{name}:test:{tmp_path}", text_field="body"))
    assert "tensorflow" not in sys.modules  # really read without TensorFlow


def test_default_corpus_is_deterministic_capped_and_clean():
    files = corpus.default_corpus_files(max_bytes=300_000)
    assert files == corpus.default_corpus_files(max_bytes=300_000) == sorted(files)
    assert 0 < sum(f.stat().st_size for f in files) <= 300_000
    rels = [f.relative_to(corpus.stdlib_root()).parts for f in files]
    assert not any({"test", "tests", "site-packages", "idlelib"} & set(r) for r in rels)
    assert all(r[-1].endswith(".py") for r in rels)
    # a small cap spans many modules, not just the alphabetically first ones
    assert len({r[0][0].lower() for r in rels}) > 5


def test_default_split_is_disjoint_and_complete():
    kw = dict(max_bytes=1_000_000)
    train, val = corpus.default_split_files("train", **kw), corpus.default_split_files("val", **kw)
    assert val and train and not set(train) & set(val)
    assert sorted(train + val) == corpus.default_corpus_files(**kw)
    assert len(val) == len(train + val) // corpus.VAL_EVERY
    assert len(corpus.default_split_files("val", max_bytes=100_000)) == 1  # small cap: still one
    docs = list(iter_documents("default:val:1000000"))
    assert docs == [f.read_text() for f in val]
    with pytest.raises(ValueError, match="'train' or 'val'"):
        corpus.default_split_files("test")
