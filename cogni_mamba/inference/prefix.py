"""Prompt prefixes kept from finished generations, so a chat's next turn prefills only what is new.

A chat client (the web page, the CLI Chatbot, any OpenAI client) sends the whole conversation with every
turn: the previous prompt, the reply it got, and the new message. The keys and values of everything but
the new message were computed for the previous turn. `PrefixCache` keeps the cache rows of generations
that leave the engine (prompt and reply, as far as they were fed to the model) in spare slots of the
engine's `SlotCache`, with their token ids; a new prompt that starts with one of them gets those keys
and values copied into its row and is prefilled from there. The least recently used rows go first.

A row's keys and values at a position depend only on the tokens up to it, so the copy is what prefilling
those tokens again would write (up to the rounding of a different batch shape).
"""

from __future__ import annotations

import collections
import os
from typing import Any

from .cache import SlotCache

MIN_TOKENS = 8  # shorter shared prefixes are not worth a copy


class PrefixCache:
    """Slots `first_row` .. `first_row + rows - 1` of `cache`, each holding a finished generation's tokens."""

    def __init__(self, cache: SlotCache, first_row: int, rows: int):
        self.cache = cache
        self._free = list(range(first_row, first_row + rows))
        self._held: collections.OrderedDict[int, list[int]] = collections.OrderedDict()  # slot -> ids, oldest first

    def __len__(self) -> int:
        return len(self._held)

    def keep(self, row: int, occupant: Any) -> None:
        """Keep what engine row `row` holds (a `_Row`: a decoding request or a prefilling group) before it leaves."""
        length = self.cache.lengths[row]
        if occupant.request is not None:
            request = occupant.request
            ids = (request.prompt + request.ids)[:length]  # the last sampled token was never fed
        else:
            ids = occupant.group.prompt[:length]
        if len(ids) < MIN_TOKENS or not (self._free or self._held):
            return
        for slot, held in self._held.items():
            if ids[:len(held)] == held:  # an older turn of the same conversation: this one replaces it
                break
            if held[:len(ids)] == ids:  # already kept, and more
                self._held.move_to_end(slot)
                return
        else:
            slot = self._free.pop() if self._free else next(iter(self._held))  # else the least recently used
        self.cache.copy_row(row, slot)
        self._held[slot] = ids
        self._held.move_to_end(slot)

    def restore(self, prompt: list[int], row: int) -> int:
        """Fill engine row `row` with the longest kept prefix of `prompt` (leaving at least its last token to
        prefill, whose logits give the first new token); how many tokens it holds now (0: none, row emptied)."""
        best, shared = None, 0
        for slot, held in self._held.items():
            n = len(os.path.commonprefix([held, prompt]))
            if n > shared:
                best, shared = slot, n
        shared = min(shared, len(prompt) - 1)
        if best is None or shared < MIN_TOKENS:
            self.cache.reset(row)
            return 0
        self.cache.copy_row(best, row, shared)
        self._held.move_to_end(best)
        return shared
