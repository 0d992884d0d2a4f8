"""Text on top of token streams: incremental decoding plus stop strings, O(n) in the reply's length.

`TextStream` turns ids into pieces of text that are safe to show: the tokenizer's incremental
decoder holds back a character split across tokens, and a tail that could still begin a stop
string is held back until it cannot. Only the held-back tail (shorter than the longest stop
string, plus the newest piece) is ever searched, so nothing is decoded or scanned twice.
`text_pieces` turns the ids a Request has made into text, cancelling the request (finish reason
"stop") when a stop string appears; it is the one path from a Request's ids to text, for readers that
block (`stream_text`: the Chatbot) and for those that poll (the server's event loop).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


class TextStream:
    """Ids in (`put`), safe text out; `stopped` once a stop string has appeared (the text ends just before it).

    The pieces joined, plus `flush()`, equal `text`: the decoded ids cut before the first stop string.
    """

    def __init__(self, decoder: Any, stop_strings: Iterable[str] = ()):
        self._decoder = decoder  # .put(id) -> str, .flush() -> str (e.g. tokenizer.stream_decoder())
        self._stops = [s for s in stop_strings if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self._pending = ""  # decoded but not yet released: may begin a stop string
        self._released: list[str] = []
        self.stopped = False
        self.tokens = 0  # ids put before a stop string ended the text (the reply's token count)

    @property
    def text(self) -> str:
        """The text released so far."""
        return "".join(self._released)

    def put(self, token_id: int) -> str:
        """Add one id; return the text it releases (may be empty)."""
        if self.stopped:
            return ""
        self.tokens += 1
        self._pending += self._decoder.put(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """The rest once generation has ended (a dangling partial character becomes U+FFFD)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.flush()
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            return self._release(cut)
        return self._release(len(self._pending) - (0 if final else self._held_back()))

    def _release(self, end: int) -> str:
        piece, self._pending = self._pending[:end], self._pending[end:]
        if piece:
            self._released.append(piece)
        return piece

    def _first_stop(self) -> int | None:
        found = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Length of the longest tail of the pending text that is a proper prefix of some stop string."""
        tail = self._pending
        for n in range(min(len(tail), self._longest - 1), 0, -1):
            end = tail[-n:]
            if any(s.startswith(end) for s in self._stops):
                return n
        return 0


def text_pieces(request: Any, text: TextStream, tokens: Iterable[int], ended: bool) -> Iterator[str]:
    """The text of `tokens`, ids a Request made since the last call; `ended`: it has finished, so the
    held-back tail is flushed. A stop string cancels the request with finish reason "stop" and ends the text."""
    for token in tokens:
        piece = text.put(token)
        if piece:
            yield piece
        if text.stopped:
            request.cancel(reason="stop")
            return
    if ended and not text.stopped:
        tail = text.flush()
        if text.stopped:  # a stop string completed by the last, flushed character
            request.cancel(reason="stop")
        if tail:
            yield tail


def stream_text(request: Any, decoder: Any, stop_strings: Iterable[str] = ()) -> Iterator[str]:
    """The text pieces of an engine Request, read blocking; a stop string cancels it with finish reason "stop".

    Closing the iterator early cancels the request too (its slot is freed at the next step).
    """
    text = TextStream(decoder, stop_strings)
    try:
        for token in request:
            yield from text_pieces(request, text, (token,), ended=False)
            if text.stopped:
                return
        yield from text_pieces(request, text, (), ended=True)
    finally:
        request.cancel()  # a no-op once the request has finished
