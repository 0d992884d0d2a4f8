"""prepare(): token shards checked against direct tokenizer passes, naive layouts and hand counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cogni_mamba.cli import main
from cogni_mamba.data import prepare, read_meta
from cogni_mamba.data.prepare import PrepareError
from cogni_mamba.errors import CogniError

TS_SEP = "<|endoftext|>"


class ByteTokenizer:
    """Test stand-in: one id per UTF-8 byte, EOS = 256 (independent of cogni_mamba.tokenizer)."""

    eos_id = 256

    def __init__(self, vocab_size: int = 320, fingerprint: str = "bytes-test"):
        self.vocab_size, self.fingerprint = vocab_size, fingerprint

    def encode_batch(self, texts):
        return [list(t.encode("utf-8")) for t in texts]


def shard(out: Path, split: str) -> np.ndarray:
    meta = json.loads((out / "meta.json").read_text())
    return np.fromfile(out / f"{split}.bin", dtype=meta["dtype"]).astype(np.int64)


def split_on(tokens: np.ndarray, eos: int) -> list[tuple[int, ...]]:
    """Naive: the documents of a shard, cutting after every EOS (the shard must end with EOS)."""
    assert tokens.size == 0 or tokens[-1] == eos
    docs, current = [], []
    for t in tokens.tolist():
        if t == eos:
            docs.append(tuple(current))
            current = []
        else:
            current.append(t)
    return docs


def write_docs(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(f"{d}\n{TS_SEP}\n" for d in docs), encoding="utf-8")
    return path


def no_outputs(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


# --- layout, counts and EOS -------------------------------------------------------------------

def test_train_shard_is_documents_each_followed_by_eos(tmp_path):
    docs = ["Once upon a time.", "A cat sat.\nThe end.", "Ünïcode — ok ✓"]
    src = write_docs(tmp_path / "s.txt", docs)
    meta = prepare([f"tinystories:{src}"], ByteTokenizer(), tmp_path / "out", val_fraction=0.0, progress=False)
    expected = [b for d in docs for b in [*d.encode(), 256]]  # hand-built: bytes then EOS, per document
    assert shard(tmp_path / "out", "train").tolist() == expected
    assert shard(tmp_path / "out", "val").size == 0
    assert meta["dtype"] == "uint16"
    assert meta["splits"]["train"] == {"tokens": len(expected), "documents": 3,
                                       "text_bytes": sum(len(d.encode()) for d in docs)}


def _reference_gpt2(gpt2_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.BPE.from_file(str(gpt2_dir / "vocab.json"), str(gpt2_dir / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def test_token_counts_match_a_direct_gpt2_pass(shared_data, tmp_path):
    tokenizer_mod = pytest.importorskip("cogni_mamba.tokenizer", reason="cogni_mamba.tokenizer not written yet")
    tok = tokenizer_mod.load_tokenizer(shared_data / "gpt2")
    ref = _reference_gpt2(shared_data / "gpt2")
    assert ref.encode("Hello world").ids == [15496, 995]  # the README's known encoding
    raw = (shared_data / "tinystories" / "TinyStories-sample.txt").read_text(encoding="utf-8")
    docs = [d.strip() for d in raw.split(TS_SEP) if d.strip()]
    expected = sorted(tuple(e.ids) for e in ref.encode_batch(docs))

    meta = prepare([f"tinystories:{shared_data / 'tinystories' / 'TinyStories-sample.txt'}"], tok,
                   tmp_path / "ts", val_fraction=0.1, progress=False)
    got = split_on(shard(tmp_path / "ts", "train"), 50256) + split_on(shard(tmp_path / "ts", "val"), 50256)
    assert sorted(got) == expected
    total = sum(len(e) for e in expected) + len(expected)  # + one EOS per document
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == total
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(docs) == 1800
    assert meta["tokenizer_fingerprint"] == tok.fingerprint and meta["dtype"] == "uint16"


def test_codesearchnet_documents_one_per_function(shared_data, tmp_path):
    path = shared_data / "codesearchnet" / "python_sample.jsonl"
    meta = prepare([f"codesearchnet:{path}"], ByteTokenizer(), tmp_path / "csn", val_fraction=0.0, progress=False)
    docs = [bytes(d).decode() for d in split_on(shard(tmp_path / "csn", "train"), 256)]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert meta["splits"]["train"]["documents"] == len(docs) == len(records) == 100
    for doc, rec in zip(docs, records, strict=True):
        assert doc.startswith(f"# function: {rec['func_name']}\n")
        body = doc.split('\n"""\n', 2)[-1]  # the code after the docstring block
        probe = max(rec["docstring"].strip().splitlines()[0].split('"""'), key=len)  # quotes get escaped
        assert probe in doc and probe not in body  # the docstring moved before the code
        assert "def " in body


def test_uint32_when_the_vocabulary_needs_it(tmp_path):
    class Wide(ByteTokenizer):
        def encode_batch(self, texts):
            return [[69_999, *t.encode()] for t in texts]

    src = write_docs(tmp_path / "s.txt", ["ab"])
    meta = prepare([f"tinystories:{src}"], Wide(vocab_size=70_000), tmp_path / "o", val_fraction=0.0,
                   progress=False)
    assert meta["dtype"] == "uint32"
    assert shard(tmp_path / "o", "train").tolist() == [69_999, 97, 98, 256]


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    src = tmp_path / "bad.txt"
    # Two invalid bytes (each one U+FFFD) and one U+FFFD that was already in the text (not counted).
    src.write_bytes(b"good story\n<|endoftext|>\nbad \xff\xfe bytes \xef\xbf\xbd\n<|endoftext|>\n")
    meta = prepare([f"tinystories:{src}"], ByteTokenizer(), tmp_path / "o", val_fraction=0.0, progress=False)
    assert meta["replaced"] == 2
    docs = [bytes(d).decode() for d in split_on(shard(tmp_path / "o", "train"), 256)]
    assert docs == ["good story", "bad \ufffd\ufffd bytes \ufffd"]


# --- the split --------------------------------------------------------------------------------

def _split_docs(out: Path) -> tuple[list, list]:
    return split_on(shard(out, "train"), 256), split_on(shard(out, "val"), 256)


def test_split_is_by_document_disjoint_and_deterministic(shared_data, tmp_path):
    src = f"tinystories:{shared_data / 'tinystories' / 'TinyStories-sample.txt'}"
    prepare([src], ByteTokenizer(), tmp_path / "a", val_fraction=0.2, seed=7, progress=False)
    prepare([src], ByteTokenizer(), tmp_path / "b", val_fraction=0.2, seed=7, progress=False)
    prepare([src], ByteTokenizer(), tmp_path / "c", val_fraction=0.2, seed=8, progress=False)
    train, val = _split_docs(tmp_path / "a")
    raw = (shared_data / "tinystories" / "TinyStories-sample.txt").read_text(encoding="utf-8")
    everything = sorted(tuple(d.strip().encode()) for d in raw.split(TS_SEP) if d.strip())
    assert not set(train) & set(val)
    assert sorted(train + val) == everything
    assert abs(len(val) - 0.2 * 1800) < 4 * (1800 * 0.2 * 0.8) ** 0.5  # binomial, 4 sigma
    for split in ("train", "val"):  # same seed: byte-identical shards
        assert (tmp_path / "a" / f"{split}.bin").read_bytes() == (tmp_path / "b" / f"{split}.bin").read_bytes()
    assert set(_split_docs(tmp_path / "c")[1]) != set(val)  # another seed, another split


def test_a_documents_split_does_not_depend_on_the_others(tmp_path):
    docs = [f"story number {i} about a dog" for i in range(400)]
    prepare([f"tinystories:{write_docs(tmp_path / 'all.txt', docs)}"], ByteTokenizer(), tmp_path / "all",
            val_fraction=0.3, progress=False, chunk_bytes=500)
    subset = docs[::-3]  # other documents, reversed order, other chunking
    prepare([f"tinystories:{write_docs(tmp_path / 'sub.txt', subset)}"], ByteTokenizer(), tmp_path / "sub",
            val_fraction=0.3, progress=False)
    val_all = set(_split_docs(tmp_path / "all")[1])
    sub_train, sub_val = _split_docs(tmp_path / "sub")
    assert set(sub_val) == {tuple(d.encode()) for d in subset} & val_all
    assert not set(sub_train) & val_all


# --- re-runs, tokenizer changes, atomicity ----------------------------------------------------

def test_rerun_skips_and_a_new_setting_rebuilds(tmp_path):
    src = f"tinystories:{write_docs(tmp_path / 's.txt', ['one', 'two', 'three'])}"
    first = prepare([src], ByteTokenizer(), tmp_path / "o", progress=False)
    stamp = (tmp_path / "o" / "train.bin").stat().st_mtime_ns
    again = prepare([src], ByteTokenizer(), tmp_path / "o", progress=False)
    assert (first["skipped_work"], again["skipped_work"]) == (False, True)
    assert (tmp_path / "o" / "train.bin").stat().st_mtime_ns == stamp
    assert prepare([src], ByteTokenizer(), tmp_path / "o", seed=2, progress=False)["skipped_work"] is False


def test_a_different_tokenizer_is_refused_unless_forced(tmp_path):
    src = f"tinystories:{write_docs(tmp_path / 's.txt', ['one', 'two'])}"
    prepare([src], ByteTokenizer(fingerprint="A"), tmp_path / "o", progress=False)
    before = (tmp_path / "o" / "meta.json").read_bytes()
    with pytest.raises(PrepareError, match="different tokenizer"):
        prepare([src], ByteTokenizer(fingerprint="B"), tmp_path / "o", progress=False)
    assert (tmp_path / "o" / "meta.json").read_bytes() == before  # untouched
    meta = prepare([src], ByteTokenizer(fingerprint="B"), tmp_path / "o", force=True, progress=False)
    assert read_meta(tmp_path / "o")["tokenizer_fingerprint"] == meta["tokenizer_fingerprint"] == "B"


def test_an_interrupted_run_leaves_nothing_that_looks_whole(tmp_path):
    from cogni_mamba.data import Source

    def read(stats):  # Ctrl-C after several chunks were already written
        for i in range(300):
            yield f"document {i}"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare([Source("interrupted", ("x",), read)], ByteTokenizer(), tmp_path / "o", progress=False,
                chunk_bytes=100)
    assert no_outputs(tmp_path / "o")
    # Over an existing preparation: the old files stay whole and meta.json still matches them.
    src = f"tinystories:{write_docs(tmp_path / 's.txt', ['kept'])}"
    prepare([src], ByteTokenizer(), tmp_path / "o", progress=False)
    with pytest.raises(KeyboardInterrupt):
        prepare([Source("interrupted", ("x",), read)], ByteTokenizer(), tmp_path / "o", progress=False,
                chunk_bytes=100)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert prepare([src], ByteTokenizer(), tmp_path / "o", progress=False)["skipped_work"] is True


# --- bad inputs: each gives its error and leaves no output -------------------------------------

def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


BAD_INPUTS = {
    "missing path": (lambda d: f"files:{d / 'nope.txt'}", "does not exist"),
    "empty file": (lambda d: f"files:{(d / 'empty.txt').absolute()}", "is empty"),
    "jsonl without the field": (lambda d: f"files:{_jsonl(d / 'x.jsonl', [{'text': 'a'}] * 50 + [{'body': 'b'}])}",
                                "no field 'text'"),
    "not json": (lambda d: f"files:{d / 'broken.jsonl'}", "not valid JSON"),
    "codesearchnet schema": (lambda d: f"codesearchnet:{_jsonl(d / 'c.jsonl', [{'func_name': 'f', 'code': 'x'}])}",
                             "no field 'docstring'"),
    "folder with no documents": (lambda d: f"files:{d / 'emptydir'}", "holds no non-empty"),
    "only blank documents": (lambda d: f"tinystories:{d / 'blank.txt'}", "No documents found"),
    "unknown kind": (lambda d: "nosuchkind", "Unknown source"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_its_error_and_no_output(tmp_path, case):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "blank.txt").write_text(f"  \n{TS_SEP}\n\n{TS_SEP}\n")
    make_spec, message = BAD_INPUTS[case]
    out = tmp_path / "out"
    with pytest.raises(CogniError, match=message):
        prepare([make_spec(tmp_path)], ByteTokenizer(), out, progress=False, chunk_bytes=64)
    assert no_outputs(out)


def test_offline_hub_says_so_and_how_to_use_local_files(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = ("from cogni_mamba.data import prepare\n"
            "class T:\n eos_id=0; vocab_size=300; fingerprint='t'\n"
            " def encode_batch(self, xs): return [[1] for _ in xs]\n"
            f"prepare(['tinystories'], T(), {str(tmp_path / 'out')!r}, progress=False)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "SourceError" in last and "offline" in last and "--source tinystories:" in last
    assert no_outputs(tmp_path / "out")


# --- the command ------------------------------------------------------------------------------

def test_cli_prepares_and_reports_errors_in_one_line(shared_data, tmp_path, capsys):
    pytest.importorskip("cogni_mamba.tokenizer", reason="cogni_mamba.tokenizer not written yet")
    sample = shared_data / "codesearchnet" / "python_sample.jsonl"
    out = tmp_path / "csn"
    args = ["prepare", "--source", f"codesearchnet:{sample}", "--tokenizer", str(shared_data / "gpt2"),
            "--out", str(out), "--quiet"]
    assert main(args) == 0
    assert read_meta(out)["splits"]["train"]["documents"] + read_meta(out)["splits"]["val"]["documents"] == 100
    assert main(args) == 0
    assert "already prepared" in capsys.readouterr().out

    code = main(["prepare", "--source", str(tmp_path / "missing.txt"), "--tokenizer", str(shared_data / "gpt2"),
                 "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_hub_source_reads_a_datasets_folder_and_names_a_missing_field(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    folder.mkdir()
    docs = [f"hub story {i}" for i in range(20)]
    _jsonl(folder / "train.jsonl", [{"text": d, "n": i} for i, d in enumerate(docs)])
    prepare([f"hub:{folder}"], ByteTokenizer(), tmp_path / "o", val_fraction=0.0, progress=False)
    assert [bytes(d).decode() for d in split_on(shard(tmp_path / "o", "train"), 256)] == docs

    from cogni_mamba.data import SourceOptions, resolve_source
    with pytest.raises(CogniError, match="no field 'body'"):
        resolve_source(f"hub:{folder}", SourceOptions(field="body"))
