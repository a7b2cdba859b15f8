"""Folders and globs of text files (issue 18): split by file, chunking with a stride, dedupe, errors.

Each test fails on the code before text-file sources existed (a glob or directory was read as a hub
id or refused as a directory; raw text was cut into disjoint blocks whose first tokens were never targets).
"""

from __future__ import annotations

import hashlib
import random

import pytest

from tests.toy_tokenizers import byte_bpe_tokenizer
from tunelab.config.schema import DataConfig, DataSource
from tunelab.data.pipeline import prepare_data
from tunelab.data.text_files import find_text_files, split_files
from tunelab.data.tokenize import IGNORE_INDEX, DataStats, Tokenizer, chunk_document
from tunelab.errors import DataError

WORDS = ["capital", "France", "Paris", "Spain", "Madrid", "printer", "paper", "tray", "driver", "today"]


def _tree(root, num_files=12):
    """A corpus of ``num_files`` distinct text files in nested folders (plus files the glob must not see)."""
    for i in range(num_files):
        folder = root / "corpus" / f"pkg{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        words = " ".join(random.Random(i).choices(WORDS, k=40 + 7 * i))
        (folder / f"mod{i}.py").write_text(f"# file {i}\n{words}\n")
    (root / "corpus" / "notes.txt").write_text("not python")
    return root / "corpus"


def _cfg(train, **kw):
    return DataConfig(train=DataSource(path=str(train)), **kw)


def test_split_is_by_file_deterministic_and_follows_the_path_hash(tmp_path):
    corpus = _tree(tmp_path)
    train, held = split_files(f"{corpus}/**/*.py", 0.25)
    keys = lambda files: {f.key for f in files}  # noqa: E731
    assert not keys(train) & keys(held) and len(keys(train) | keys(held)) == 12 and len(held) == 3
    ranked = sorted(keys(train) | keys(held), key=lambda k: hashlib.sha256(k.encode()).digest())
    assert keys(held) == set(ranked[:3])  # the smallest SHA-256 of the relative path
    # the same split from another location and another pattern spelling (the relative paths decide)
    moved = tmp_path / "elsewhere"
    corpus.rename(moved)
    assert keys(split_files(f"{moved}/**/*.py", 0.25)[1]) == keys(held)
    # through the pipeline: every chunk comes from a file of its own split, and no file is in both
    data = prepare_data(_cfg(f"{moved}/**/*.py", val_fraction=0.25, max_seq_len=32), byte_bpe_tokenizer(), seed=0)
    train_sources = {e.source for e in data.train}
    held_sources = {e.source for e in data.validation}
    assert train_sources and held_sources and not train_sources & held_sources
    assert {s.rsplit("/", 2)[-2] + "/" + s.rsplit("/", 1)[-1] for s in held_sources} == keys(held)
    other_seed = prepare_data(_cfg(f"{moved}/**/*.py", val_fraction=0.25, max_seq_len=32), byte_bpe_tokenizer(), seed=5)
    assert {e.source for e in other_seed.validation} == held_sources


def test_validation_glob_files_are_taken_out_of_train_and_directories_read_every_file(tmp_path):
    corpus = _tree(tmp_path)
    (corpus / "__pycache__").mkdir()
    (corpus / "__pycache__" / "x.pyc").write_bytes(b"\0\1binary")
    (corpus / ".hidden").write_text("secret")
    cfg = DataConfig(train=DataSource(path=str(corpus)), validation=DataSource(path=f"{corpus}/pkg0/*.py"),
                     max_seq_len=32)
    data = prepare_data(cfg, byte_bpe_tokenizer(), seed=0)
    held = {e.source for e in data.validation}
    assert held == {f"{corpus}/pkg0/mod{i}.py" for i in (0, 3, 6, 9)}
    assert not held & {e.source for e in data.train}
    assert f"{corpus}/notes.txt" in {e.source for e in data.train}  # a directory: every non-hidden file
    assert len(find_text_files(str(corpus))) == 13  # not __pycache__/x.pyc, not .hidden


def test_package_source_names_files_by_package(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "toypkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from toypkg.sub.core import run\n")
    (pkg / "sub" / "core.py").write_text("def run():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    files = find_text_files("package:toypkg/**/*.py")
    assert [(f.key, f.name) for f in files] == [("__init__.py", "package:toypkg/__init__.py"),
                                                ("sub/core.py", "package:toypkg/sub/core.py")]
    with pytest.raises(DataError, match="package 'nosuchpkg_x' is not installed"):
        find_text_files("package:nosuchpkg_x/**/*.py")


def test_chunks_cover_every_token_once_with_the_stride_and_never_cross_documents():
    ids = list(range(100, 137))  # 37 tokens
    labels = [IGNORE_INDEX] + ids[1:]
    for max_len, stride in ((8, None), (8, 7), (8, 3), (8, 1), (10, 6), (40, None)):
        chunks = chunk_document(ids, labels, max_len, stride)
        step = max_len - 1 if stride is None else stride
        targets = [t for _, labs in chunks for t in labs if t != IGNORE_INDEX]
        assert targets == ids[1:]  # every token but the first is a target exactly once, in order
        for k, (chunk_ids, labs) in enumerate(chunks):
            assert chunk_ids == ids[k * step: k * step + max_len] and 0 < len(chunk_ids) <= max_len
            assert labs[0] == IGNORE_INDEX and len(labs) == len(chunk_ids)
        assert chunks[-1][0][-1] == ids[-1]
    with pytest.raises(ValueError, match="stride"):
        chunk_document(ids, labels, 8, 8)
    # through the Tokenizer: two documents never share a chunk; EOS ends each document once
    tok = byte_bpe_tokenizer()
    encode, stats = Tokenizer(tok, 16, "truncate", "all", stride=10), DataStats()
    docs = ["Paris " * 30, "Madrid " * 30]
    out = [(d, chunk) for d in docs for chunk in encode({"text": d, "source": d[:5]}, stats)]
    for doc, chunk in out:
        whole = tok(doc, add_special_tokens=False).input_ids + [tok.eos_token_id]
        assert any(whole[i:i + len(chunk.input_ids)] == chunk.input_ids for i in range(len(whole)))
        assert chunk.source == doc[:5]
    assert [c.input_ids[-1] for _, c in out].count(tok.eos_token_id) == 2


def test_exact_duplicate_chunks_are_removed_and_counted(tmp_path):
    corpus = _tree(tmp_path, num_files=4)
    text = (corpus / "pkg0" / "mod0.py").read_text()
    (corpus / "pkg1" / "copy.py").write_text(text)  # a whole duplicate file: all its chunks repeat
    data = prepare_data(_cfg(f"{corpus}/**/*.py", max_seq_len=16), byte_bpe_tokenizer(), seed=0)
    reference = prepare_data(_cfg(f"{corpus}/pkg0/*.py", max_seq_len=16), byte_bpe_tokenizer(), seed=0)
    num_chunks = sum(e.source.endswith("mod0.py") for e in reference.train)
    assert data.train_stats.num_duplicates == num_chunks > 0
    assert data.train_stats.summary()["duplicate_chunks_removed"] == num_chunks
    assert not any(e.source.endswith("copy.py") for e in data.train)
    keys = [tuple(e.input_ids) for e in data.train]
    assert len(keys) == len(set(keys)) == data.train_stats.num_examples
    # a held-out chunk equal to a training chunk is removed from the held-out split too
    held = prepare_data(DataConfig(train=DataSource(path=f"{corpus}/pkg0/*.py"),
                                   validation=DataSource(path=f"{corpus}/pkg1/*.py"), max_seq_len=16),
                        byte_bpe_tokenizer(), seed=0)
    assert held.validation_stats.num_duplicates == num_chunks
    assert not {tuple(e.input_ids) for e in held.validation} & {tuple(e.input_ids) for e in held.train}


def test_errors_name_the_pattern_and_the_file(tmp_path):
    corpus = _tree(tmp_path, num_files=2)
    tok = byte_bpe_tokenizer()
    with pytest.raises(DataError, match=r"'.*/\*\*/\*\.rs' matched no files"):
        prepare_data(_cfg(f"{corpus}/**/*.rs"), tok, 0)
    (corpus / "pkg0" / "blob.py").write_bytes(b"abc\0def")
    with pytest.raises(DataError, match=r"blob\.py: binary file \(NUL byte at byte 3\)"):
        prepare_data(_cfg(f"{corpus}/**/*.py"), tok, 0)
    (corpus / "pkg0" / "blob.py").write_bytes("caf\u00e9 ok\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"blob\.py: not UTF-8 text \(.* at byte 3\)"):
        prepare_data(_cfg(f"{corpus}/**/*.py"), tok, 0)
    with pytest.raises(DataError, match="matched 1 file and data.val_fraction=0.5"):
        prepare_data(_cfg(f"{corpus}/pkg1/*.py", val_fraction=0.5), tok, 0)
    (corpus / "pkg0" / "blob.py").write_text("   \n")  # empty documents: the held-out split is left empty
    with pytest.raises(DataError, match="no held-out example left"):
        prepare_data(DataConfig(train=DataSource(path=f"{corpus}/pkg1/*.py"),
                                validation=DataSource(path=f"{corpus}/pkg0/blob.py*")), tok, 0)
    with pytest.raises(DataError, match="every one of its 1 file"):
        prepare_data(DataConfig(train=DataSource(path=f"{corpus}/pkg1/*.py"),
                                validation=DataSource(path=f"{corpus}/pkg1/*")), tok, 0)
    with pytest.raises(DataError, match="data.format must be 'text' or 'auto'"):
        prepare_data(_cfg(f"{corpus}/**/*.py", format="messages"), tok, 0)


def test_a_symlink_loop_matches_each_file_once_and_one_source_file_gets_a_glob_hint(tmp_path):
    # A loop (corpus/pkg0/loop -> corpus) made '**' match one file dozens of times (breaker, issue 18).
    corpus = _tree(tmp_path, num_files=6)
    (corpus / "pkg0" / "loop").symlink_to(corpus, target_is_directory=True)
    keys = [f.key for f in find_text_files(f"{corpus}/**/*.py")]
    assert sorted(keys) == sorted(f"pkg{i % 3}/mod{i}.py" for i in range(6))
    one = corpus / "pkg1" / "mod1.py"
    with pytest.raises(DataError, match=r"unsupported file type '\.py'.*a folder or a glob .*one file: '.*mod1\.p\[y\]'"):
        prepare_data(_cfg(one), byte_bpe_tokenizer(), 0)
    assert [f.key for f in find_text_files(f"{corpus}/pkg1/mod1.p[y]")] == ["mod1.py"]
