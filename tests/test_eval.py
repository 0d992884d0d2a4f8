"""Evaluation against a naive reference: one forward pass per predicted token, bytes counted from the raw text."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from cogni_mamba.cli import main
from cogni_mamba.config import Config, ModelConfig
from cogni_mamba.data import prepare
from cogni_mamba.evaluate import (
    EvalError,
    eval_stream,
    evaluate_stream,
    load_eval_tokens,
    plan_windows,
    token_byte_lengths,
)
from cogni_mamba.model import CogniMamba
from cogni_mamba.tokenizer import SimpleTokenizer, train_bpe
from cogni_mamba.train.checkpoint import save_checkpoint

CORPUS = [f"the {w} fox number {i} jumps over the lazy dog, said {w}." for i in range(150)
          for w in ("quick", "brown", "red", "café")]
DOCS = ["Once upon a time a café fox sang.", "The lazy dog — très calme — slept 🐕.",
        "Numbers: 12, 345, 6789!", "the quick brown fox jumps over the lazy dog, said red.",
        "Ünïcödé ends here."]
SEQ = 16




@pytest.fixture(scope="module")
def tok():
    return train_bpe(CORPUS, 300, progress=False)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(3)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, hidden_dim=64,
                      max_seq_len=SEQ)
    return CogniMamba(cfg).eval()


@pytest.fixture
def checkpoint(tmp_path, model, tok):
    return save_checkpoint(tmp_path, "ckpt", model, Config(model=model.config), tokenizer=tok)


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    return path


def naive_nats(model, stream: list[int], seq: int, stride: int) -> float:
    """Sum of -log p(stream[i] | context) with one forward pass per target i.

    The documented context: the window that first covers position i starts at 0 when i <= seq, else at
    the smallest multiple of stride s with s + seq >= i.
    """
    total = 0.0
    with torch.no_grad():
        for i in range(1, len(stream)):
            begin = 0 if i <= seq else math.ceil((i - seq) / stride) * stride
            assert 0 < i - begin <= seq
            logits = model(torch.tensor([stream[begin:i]]))[0, -1].double()
            total -= torch.log_softmax(logits, -1)[stream[i]].item()
    return total


@pytest.mark.parametrize("stride", [SEQ, 5])
def test_bits_per_byte_equals_naive_loop(model, tok, jsonl, stride):
    stream = [tok.eos_id]
    for d in DOCS:  # doc EOS doc EOS ..., built here without the library's layout code
        stream += tok.encode(d) + [tok.eos_id]
    assert len(stream) > 3 * SEQ  # several windows
    text_bytes = sum(len(d.encode("utf-8")) for d in DOCS)
    nats = naive_nats(model, stream, SEQ, stride)

    tokens = load_eval_tokens(jsonl, tok)
    result = evaluate_stream(model, eval_stream(tokens, tok.eos_id), token_byte_lengths(tok, tok.vocab_size),
                             seq_len=SEQ, stride=stride, batch_size=3)
    assert result.tokens == len(stream) - 1
    assert result.bytes == text_bytes
    assert result.nats == pytest.approx(nats, rel=1e-5)
    assert result.loss == pytest.approx(nats / (len(stream) - 1), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nats / (len(stream) - 1)), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(nats / math.log(2) / text_bytes, rel=1e-5)


@pytest.mark.parametrize(("n", "seq", "stride"), [(1, 4, 4), (4, 4, 4), (9, 4, 4), (17, 5, 2), (30, 8, 3), (7, 8, 1)])
def test_windows_score_each_target_once_with_enough_context(n, seq, stride):
    scored = []
    for begin, first, end in plan_windows(n, seq, stride):
        assert 0 < end - begin <= seq
        for p in range(first, end + 1):
            scored.append(p)
            assert p - begin >= min(p, seq - stride + 1)  # context: from the start, or >= seq - stride tokens
    assert scored == list(range(1, n + 1))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def printed(out: str, label: str) -> float:
    return float(re.search(rf"^{label}\s+([0-9.]+)", out, re.M).group(1))


def test_cli_eval_text_file_and_samples(checkpoint, model, tok, jsonl, capsys):
    code, out, err = run_cli(capsys, "eval", "--checkpoint", str(checkpoint), "--data", str(jsonl), "--seq", "16",
                             "--stride", "8", "--quiet", "--samples", "2")
    assert code == 0, err
    stream = [tok.eos_id]
    for d in DOCS:
        stream += tok.encode(d) + [tok.eos_id]
    nats = naive_nats(model, stream, SEQ, 8)
    assert printed(out, "bits per byte") == pytest.approx(nats / math.log(2) / sum(len(d.encode()) for d in DOCS),
                                                          abs=1e-4)
    assert printed(out, "perplexity") == pytest.approx(math.exp(nats / (len(stream) - 1)), abs=1e-3)
    assert out.count("--- sample") == 2
    assert "--- sample 1 ---\nOnce upo" in out  # the first document's first 8 tokens are the first prompt


def test_cli_eval_prepared_split(tmp_path, checkpoint, model, tok, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(DOCS * 2), encoding="utf-8")
    meta = prepare([f"files:{corpus}"], tok, tmp_path / "prepared", val_fraction=0.0, progress=False)
    # The whole file is one document (no separator), so it lands in train; evaluate that split.
    code, out, err = run_cli(capsys, "eval", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "prepared"),
                             "--split", "train", "--seq", "16", "--stride", "16", "--quiet")
    assert code == 0, err
    stored = np.fromfile(tmp_path / "prepared" / "train.bin", dtype=meta["dtype"]).astype(int).tolist()
    nats = naive_nats(model, [tok.eos_id, *stored], SEQ, SEQ)
    text_bytes = len(corpus.read_text(encoding="utf-8").encode("utf-8"))
    assert meta["splits"]["train"]["text_bytes"] == text_bytes
    assert printed(out, "bits per byte") == pytest.approx(nats / math.log(2) / text_bytes, abs=1e-4)
    assert printed(out, "loss") == pytest.approx(nats / len(stored), abs=1e-4)


def test_special_tokens_count_no_bytes(tok):
    lengths = token_byte_lengths(tok, tok.vocab_size)
    assert all(lengths[i] == 0 for i in tok.special_ids)
    assert (lengths[tok.real_vocab_size:] == 0).all()  # padding rows
    ids = tok.encode("café 🦊 fox")
    assert lengths[ids].sum() == len("café 🦊 fox".encode())


def one_sentence(err: str) -> str:
    line = err.strip()
    assert line.startswith("error: ") and "\n" not in line and "Traceback" not in line, err
    return line


def test_cli_eval_bad_inputs(tmp_path, checkpoint, model, tok, jsonl, capsys):
    other = tmp_path / "other"
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text for another tokenizer", encoding="utf-8")
    prepare([f"files:{corpus}"], SimpleTokenizer(), other, val_fraction=0.0, progress=False)
    prepare([f"files:{corpus}"], tok, tmp_path / "good", val_fraction=0.0, progress=False)
    (tmp_path / "empty.txt").write_text("   \n", encoding="utf-8")
    notok = save_checkpoint(tmp_path, "notok", model, Config(model=model.config))
    cases = [
        (["--data", str(other), "--split", "train"], "different tokenizer"),
        (["--data", str(tmp_path / "missing.txt")], "does not exist"),
        (["--data", str(tmp_path / "empty.txt")], "no documents"),
        (["--data", str(jsonl), "--seq", "999"], "--seq must be between 1 and the model's context 16"),
        (["--data", str(jsonl), "--stride", "40"], "--stride must be between 1"),
        (["--data", str(tmp_path / "good"), "--split", "test"], "no 'test' split"),
    ]
    for extra, needle in cases:
        code, _, err = run_cli(capsys, "eval", "--checkpoint", str(checkpoint), "--quiet", *extra)
        assert code == 2 and needle in one_sentence(err), (extra, err)
    code, _, err = run_cli(capsys, "eval", "--checkpoint", str(notok), "--data", str(jsonl))
    assert code == 2 and "has no tokenizer/ folder" in one_sentence(err)
    (other / "meta.json").unlink()
    code, _, err = run_cli(capsys, "eval", "--checkpoint", str(checkpoint), "--data", str(other))
    assert code == 2 and "not a prepared dataset" in one_sentence(err)
    with pytest.raises(EvalError, match="nothing to evaluate"):
        evaluate_stream(model, np.array([tok.eos_id]), token_byte_lengths(tok, tok.vocab_size), seq_len=SEQ)
