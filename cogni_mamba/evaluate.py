"""Loss, perplexity and bits per byte of a model on held-out text or a prepared split.

Bits per byte does not depend on the tokenizer, so models with different vocabularies compare.
Exactly what is measured:

- The stream. Documents are laid out as `prepare` writes them (doc EOS doc EOS ...); a text file is read
  into documents the way `prepare` reads it, a prepared split is taken as stored. One EOS is put in front
  (the BOS a document starts from), and every token after it is scored once: every document token and
  each document's closing EOS (knowing where a text ends is part of modelling it).
- Windows. The model reads windows of `seq_len` tokens starting every `stride` tokens; each window scores
  only the targets no earlier window scored. So the first `seq_len` targets see the context from the
  stream's start, and every later one at least `seq_len - stride` tokens. `stride == seq_len` gives
  non-overlapping windows (the training loop's val loss); a smaller stride gives more context per token
  at seq_len / stride times the compute.
- Bytes. A scored token counts the UTF-8 bytes it stands for; special tokens (EOS, chat markers) and
  vocabulary padding count 0, as they are markup rather than text. For text without literal special-token
  markup this is exactly the UTF-8 size of the documents.

loss = nats / tokens, perplexity = exp(loss), bits per byte = nats / ln 2 / bytes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CogniError
from .model import IGNORE_INDEX


class EvalError(CogniError):
    """Evaluation inputs that are missing or do not fit the checkpoint."""


@dataclass(frozen=True)
class EvalResult:
    """Totals of one evaluation; the metrics are derived from them."""

    tokens: int  # scored predictions
    bytes: int  # UTF-8 bytes those tokens stand for
    nats: float  # summed cross-entropy

    @property
    def loss(self) -> float:
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / self.bytes if self.bytes else float("nan")

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens


# --- what is scored -------------------------------------------------------------------------------

def token_byte_lengths(tokenizer, vocab_size: int) -> np.ndarray:
    """(vocab_size,) int64: the UTF-8 bytes each id stands for; 0 for special tokens and padding rows."""
    lengths = np.zeros(vocab_size, dtype=np.int64)
    for i, b in enumerate(tokenizer.token_bytes[:vocab_size]):
        lengths[i] = len(b)
    lengths[list(tokenizer.special_ids)] = 0
    return lengths


def eval_stream(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """The scored stream: one EOS (the first document's BOS) followed by doc EOS doc EOS ... (int64)."""
    return np.concatenate([np.array([eos_id], dtype=np.int64), np.asarray(tokens, dtype=np.int64)])


def plan_windows(n_targets: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first, end) per window: it reads stream[begin:end] and scores targets first..end (positions).

    Target position p is the token stream[p], predicted from stream[begin:p]; positions run 1..n_targets.
    """
    if not 0 < stride <= seq_len:
        raise EvalError(f"The stride must be between 1 and the window length {seq_len}, got {stride}.")
    plan, done, begin = [], 0, 0
    while done < n_targets:
        end = min(begin + seq_len, n_targets)
        plan.append((begin, done + 1, end))
        done, begin = end, begin + stride
    return plan


def _batches(stream: torch.Tensor, plan: list[tuple[int, int, int]], batch_size: int, pad_id: int,
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) of up to batch_size windows, right-padded; y is IGNORE_INDEX wherever nothing is scored."""
    for i in range(0, len(plan), batch_size):
        group = plan[i:i + batch_size]
        width = max(end - begin for begin, _, end in group)
        x = torch.full((len(group), width), pad_id, dtype=torch.long)  # (B, T)
        y = torch.full((len(group), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for row, (begin, first, end) in enumerate(group):
            x[row, :end - begin] = stream[begin:end]
            # Column c predicts position begin + c + 1; score columns first-1-begin .. end-1-begin.
            y[row, first - 1 - begin:end - begin] = stream[first:end + 1]
        yield x, y


@torch.inference_mode()
def score_stream(model, stream: np.ndarray, *, seq_len: int, stride: int | None = None, batch_size: int = 4,
                 progress: bool = False) -> np.ndarray:
    """Cross-entropy in nats of every target position 1..len(stream)-1, float64, in stream order."""
    stride = stride or seq_len
    n_targets = len(stream) - 1
    plan = plan_windows(n_targets, seq_len, stride)
    device = model.tok_embeddings.weight.device
    stream_t = torch.from_numpy(np.asarray(stream, dtype=np.int64))
    nats = np.empty(n_targets, dtype=np.float64)
    pos = 0
    from tqdm.auto import tqdm

    with tqdm(total=n_targets, unit="tok", unit_scale=True, desc="evaluating", disable=not progress) as bar:
        for x, y in _batches(stream_t, plan, batch_size, pad_id=int(stream[0])):
            logits = model(x.to(device))  # (B, T, V)
            losses = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(),
                                     ignore_index=IGNORE_INDEX, reduction="none").view(y.shape)  # (B, T)
            scored = losses[y.to(device) != IGNORE_INDEX].double().cpu().numpy()  # row-major = stream order
            nats[pos:pos + len(scored)] = scored
            pos += len(scored)
            bar.update(len(scored))
    assert pos == n_targets
    return nats


def evaluate_stream(model, stream: np.ndarray, byte_lengths: np.ndarray, **kwargs) -> EvalResult:
    """Totals for a stream from `eval_stream` (keyword arguments: score_stream's)."""
    if len(stream) < 2:
        raise EvalError("There is nothing to evaluate: the data holds no tokens.")
    nats = score_stream(model, stream, **kwargs)
    return EvalResult(tokens=len(nats), bytes=int(byte_lengths[stream[1:]].sum()), nats=float(nats.sum()))


# --- reading the data -----------------------------------------------------------------------------

def is_prepared(path: Path) -> bool:
    """A prepared dataset folder (meta.json, or a .bin shard whose meta.json went missing)."""
    return path.is_dir() and any((path / n).exists() for n in ("meta.json", "val.bin", "train.bin"))


def prepared_tokens(data_dir: Path, tokenizer, split: str = "val") -> np.ndarray:
    """The stored tokens of a prepared split, checked against the tokenizer's fingerprint."""
    from .data.prepare import read_meta, verify_shard

    meta = read_meta(data_dir)
    if meta.get("tokenizer_fingerprint") != tokenizer.fingerprint:
        raise EvalError(f"{data_dir} was prepared with a different tokenizer than the checkpoint's, so its token "
                        "ids mean other things; prepare the text again with the checkpoint's tokenizer.")
    if split not in meta.get("splits", {}):
        raise EvalError(f"{data_dir} has no {split!r} split; use one of: {', '.join(meta.get('splits', {}))}.")
    path = data_dir / f"{split}.bin"
    expected = meta["splits"][split]["tokens"] * np.dtype(meta["dtype"]).itemsize
    if not path.is_file() or path.stat().st_size != expected:
        raise EvalError(f"{path} is missing or does not match meta.json; re-run `cogni-mamba prepare --force`.")
    verify_shard(data_dir, split, meta)
    if meta["splits"][split]["tokens"] == 0:
        raise EvalError(f"{data_dir} has an empty {split} split; prepare it with a larger --val-fraction.")
    return np.fromfile(path, dtype=meta["dtype"]).astype(np.int64)


def text_tokens(path: Path, tokenizer, *, field: str = "text", separator: str | None = None) -> np.ndarray:
    """Documents of text files (as `prepare` reads them), encoded and laid out doc EOS doc EOS ..."""
    from .data.prepare import with_eos
    from .data.sources import ReadStats, SourceOptions, files_source

    source = files_source(str(path), SourceOptions(field=field, separator=separator))
    docs = list(source.read(ReadStats()))
    if not docs:
        raise EvalError(f"{path} holds no documents (only empty text); give a file with text in it.")
    return with_eos(tokenizer.encode_batch(docs), tokenizer.eos_id)


def load_eval_tokens(path: str | os.PathLike, tokenizer, *, split: str = "val", field: str = "text",
                     separator: str | None = None) -> np.ndarray:
    """doc EOS doc EOS ... tokens of a text file / folder (.txt, .jsonl, ...) or a prepared dataset folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise EvalError(f"{path} does not exist; pass --data with a .txt / .jsonl file or a prepared folder.")
    if is_prepared(p):
        return prepared_tokens(p, tokenizer, split)
    return text_tokens(p, tokenizer, field=field, separator=separator)


def sample_prompts(tokens: np.ndarray, eos_id: int, n: int, length: int = 8) -> list[list[int]]:
    """The first `length` tokens of each of the first n documents (prompts for `--samples`)."""
    starts = np.concatenate([[0], np.flatnonzero(tokens == eos_id) + 1])
    prompts = []
    for s in starts:
        doc = tokens[s:s + length]
        doc = doc[:np.argmax(doc == eos_id)] if (doc == eos_id).any() else doc
        if len(doc):
            prompts.append(doc.tolist())
        if len(prompts) == n:
            break
    return prompts
