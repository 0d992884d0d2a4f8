"""Streaming text: incremental decoding with stop strings held back (`TextStream`), against a naive
reference that decodes the whole reply at once and cuts it at the first stop string."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from cogni_mamba.inference import TextStream
from cogni_mamba.tokenizer import SimpleTokenizer


class PieceDecoder:
    """A stand-in stream decoder: id i decodes to pieces[i]."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def put(self, i: int) -> str:
        return self.pieces[i]

    def flush(self) -> str:
        return ""


def naive_stop_text(pieces: list[str], stops: list[str]) -> str:
    """Text up to the earliest stop string present once the first token completing one has arrived."""
    text = ""
    for piece in pieces:
        text += piece
        hits = [text.find(s) for s in stops if s and s in text]
        if hits:
            return text[:min(hits)]
    return text


def run_stream(pieces: list[str], stops: list[str]) -> tuple[list[str], TextStream]:
    stream = TextStream(PieceDecoder(pieces), stops)
    out, longest = [], max((len(s) for s in stops), default=1)
    for i in range(len(pieces)):
        out.append(stream.put(i))
        if stream.stopped:
            break
        held = "".join(pieces[:i + 1])[len("".join(out)):]
        assert len(held) < longest  # only a possible stop-string start is ever held back
    out.append(stream.flush())
    return out, stream


def test_stop_string_spanning_tokens_is_cut_exactly_and_never_streamed():
    out, stream = run_stream(["Hello", " wor", "ld", "<", "|us", "er", "|>", "more"], ["<|user|>"])
    assert "".join(out) == "Hello world" == stream.text and stream.stopped
    assert all("<" not in p for p in out)


def test_false_start_of_a_stop_string_is_released():
    out, stream = run_stream(["a<", "|u", "x", "b"], ["<|user|>"])
    assert "".join(out) == "a<|uxb" and not stream.stopped
    assert out[0] == "a"  # "<" waits until it can no longer begin the stop string


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.text(alphabet="ab<>|xé", max_size=4), max_size=25),
       stops=st.lists(st.text(alphabet="ab<>|é", min_size=1, max_size=4), max_size=3))
def test_stop_strings_fuzzed_against_naive(pieces, stops):
    out, stream = run_stream(pieces, stops)
    assert "".join(out) == naive_stop_text(pieces, stops) == stream.text


def test_multibyte_characters_split_across_tokens_never_stream_replacement_chars():
    text = "héllo 🙂 wörld ✓"
    ids = list(text.encode("utf-8"))
    stream = TextStream(SimpleTokenizer().stream_decoder())
    out = [stream.put(i) for i in ids] + [stream.flush()]
    assert "".join(out) == text and not any("\ufffd" in p for p in out)
    stream = TextStream(SimpleTokenizer().stream_decoder(), ["🙂"])
    out = [stream.put(i) for i in ids] + [stream.flush()]
    assert "".join(out) == "héllo "


def test_text_stream_work_is_linear_in_the_reply_length():
    """Each token's work stays bounded by the held-back tail, never the whole reply: 20,000 tokens
    take well under 20x the time of 1,000 (a re-decode per token would take ~400x)."""
    def timed(n: int) -> float:
        stream = TextStream(PieceDecoder(["ab<"] * n), ["<|user|>", "\n\n"])
        start = time.perf_counter()
        for _ in range(n):
            stream.put(0)
        return time.perf_counter() - start

    timed(1000)
    assert timed(20000) < 60 * timed(1000)


