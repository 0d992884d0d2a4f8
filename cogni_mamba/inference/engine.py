"""The inference engine: continuous batching over a slot KV cache. Knows token ids only.

Requests are submitted from any thread (`submit`) and come back as iterators of token ids. One
scheduler iteration (`step`) does, in order:

1. drop cancelled rows, freeing their slots;
2. admit queued requests first come, first served, while slots are free (`max_batch` rows in all);
3. prefill at most `prefill_chunk` prompt tokens of joining requests, several in one forward pass (a long
   prompt takes several iterations, so the running rows keep getting tokens between its chunks); a request
   whose prompt is in the cache gets its first token at once, and requests that arrived meanwhile are
   prefilled too while the budget lasts, before the decode pass of the others;
4. one batched forward pass of one token for every decoding row, then per-row sampling with that
   request's own settings and generator; rows that finish leave at once.

The cache rows stay compact: rows 0..d-1 decode, rows d..n-1 are prefilling, and a row that leaves is filled
by moving the last one, so every forward pass runs on a contiguous range of rows. With `submit_samples(prompt,
n)` the prompt is prefilled once and its cache row copied to n rows. A row that leaves is kept in a spare slot
(`prefix.PrefixCache`): a later prompt that starts with its tokens (a chat's next turn) prefills only the rest.

Two ways to drive it, one code path: `start()` runs `step()` in one long-lived background thread (the
server); without it, iterating a Request runs `step()` inline until that request has a token (the Chatbot,
the CLI, evaluation). `threads` sets the intra-op thread count of the thread that runs the steps; "auto"
measures a step at a few counts first (see threads.py). `remote.EngineProcess` runs one in a child process.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable, Iterable, Sequence

import torch

from ..config import GenerationConfig
from ..errors import CogniError
from ..generate import make_generator
from .cache import SlotCache
from .prefix import PrefixCache
from .request import EngineStats, Request, _Group, _Row, checked_submission, ended_on_its_own, engine_busy
from .sampling import pick_tokens, prefill_logits
from .threads import fastest_thread_count

DEFAULT_PREFILL_CHUNK = 256
PREFILL_LOGITS = 2**24  # logits (rows x width x vocab) a batched prefill may make at once: 64 MiB in fp32


class Engine:
    """Continuous batching for one model: `submit` requests from any thread, `step()` or `start()` to run them."""

    def __init__(self, model, *, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 bos_id: int | None = None, max_len: int | None = None, threads: int | str | None = None,
                 prefix_rows: int | None = None):
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise CogniError(f"The engine needs max_batch >= 1, max_queue >= 0 and prefill_chunk >= 1; got "
                             f"{max_batch}, {max_queue} and {prefill_chunk}.")
        if not (threads is None or threads == "auto" or (isinstance(threads, int) and threads >= 1)):
            raise CogniError(f"threads must be a count >= 1, 'auto' or None; got {threads!r}.")
        self.model = model  # callers put it in eval mode (dropout would change every token)
        weight = model.tok_embeddings.weight
        self.device = weight.device
        self.max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
        self.vocab_size = model.config.vocab_size
        prefix_rows = min(max_batch, 8) if prefix_rows is None else prefix_rows  # finished rows kept for their prefix
        self.cache = SlotCache(model.config, max_batch + prefix_rows, self.max_len, device=self.device, dtype=weight.dtype)
        self.prefixes = PrefixCache(self.cache, max_batch, prefix_rows)
        self.max_batch, self.max_queue, self.prefill_chunk, self.bos_id = max_batch, max_queue, prefill_chunk, bos_id
        self._rows: list[_Row] = []
        self._decoding = 0  # rows[:_decoding] decode, the rest are prefilling
        self._reserved = 0  # slots promised to admitted groups' other samples
        self._queue: collections.deque[_Group] = collections.deque()
        self._cond = threading.Condition()  # guards the queue and every Request's state
        self._step_lock = threading.Lock()  # one step at a time
        self._thread: threading.Thread | None = None
        self._after_step: Callable[[], None] = lambda: None
        self._stopping = False
        self._generated = self._completed = self._prefilled = self._steps = 0
        self._threads_wanted = threads
        self.threads: int | None = threads if isinstance(threads, int) else None  # the count in use once chosen
        self._threads_on: int | None = None  # ident of the thread whose count was last set

    def submit(self, prompt: Sequence[int], settings: GenerationConfig | None = None, *,
               stop_ids: Iterable[int] = (), on_overflow: str = "warn") -> Request:
        """Queue one generation; EngineBusy when the queue is full."""
        return self.submit_samples(prompt, settings, 1, stop_ids=stop_ids, on_overflow=on_overflow)[0]

    def submit_samples(self, prompt: Sequence[int], settings: GenerationConfig | None = None, n: int = 1, *,
                       stop_ids: Iterable[int] = (), on_overflow: str = "warn",
                       on_update: Callable[[Request], None] | None = None) -> list[Request]:
        """Queue n generations of one prompt, prefilled once; with a seed, sample i uses seed + i; `on_update`:
        each request's listener from the start, called with the request (see `Request.on_update`)."""
        ids, settings, stops = checked_submission(prompt, settings, n, stop_ids, on_overflow, max_batch=self.max_batch,
                                                  max_len=self.max_len, bos_id=self.bos_id)
        requests = [Request(self, ids, settings, stops, None if settings.seed is None
                            else make_generator(settings.seed + i, "cpu"), index=i) for i in range(n)]
        for request in requests if on_update else ():
            request.on_update(lambda r=request: on_update(r))
        with self._cond:
            queued = sum(len(g.live) for g in self._queue)
            free = self.max_batch - len(self._rows) - self._reserved
            if queued + n - free > self.max_queue:
                raise engine_busy(self.max_batch, self.max_queue, n)
            self._queue.append(_Group(requests, ids))
            self._cond.notify_all()
        return requests

    def _cancel(self, request: Request, reason: str) -> None:
        with self._cond:
            if ended_on_its_own(request, reason):
                return
            request._cancel = request._cancel or reason
            request._ready.clear()
            request._finish(reason)
            self._cond.notify_all()
        request._notify()
        if not self.running and not self._step_lock.locked():  # inline mode: free the slot now
            with self._step_lock:
                self._drop_cancelled()

    @property
    def running(self) -> bool:
        """True while the background thread runs the steps."""
        return self._thread is not None

    def start(self, after_step: Callable[[], None] | None = None) -> Engine:
        """Run the scheduler in one long-lived background thread (idempotent), calling `after_step()` once its thread
        count is set and after each iteration (the engine process sends each iteration's tokens from there)."""
        with self._cond:
            if self._thread is None:
                self._stopping = False
                self._after_step = after_step or (lambda: None)
                self._thread = threading.Thread(target=self._loop, args=(torch.get_num_threads(),), name="cogni-engine",
                                                daemon=True)
                self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the background thread after its current step (requests still running stay as they are)."""
        with self._cond:
            thread, self._stopping = self._thread, True
            self._cond.notify_all()
        if thread is not None:
            thread.join()
        with self._cond:
            self._thread = None
            self._cond.notify_all()
        with self._step_lock:  # a cancel that came after the last step frees its slot now
            self._drop_cancelled()

    def _loop(self, inherited: int) -> None:
        # The intra-op thread count is per thread in torch's OpenMP backend: the starting thread's, unless set.
        torch.set_num_threads(inherited)
        with self._step_lock:
            self._use_threads(spare=1)  # a core for the rest of the process: a server's HTTP side
        self._after_step()  # once before any step: the thread count is known now
        while True:
            with self._cond:
                while not self._stopping and not self._rows and not self._queue:
                    self._cond.wait()
                if self._stopping:
                    return
            with contextlib.suppress(Exception):  # handed to every request it touched; the engine goes on
                self.step()
            self._after_step()

    def stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(active=len(self._rows), queued=sum(len(g.live) for g in self._queue),
                               max_batch=self.max_batch, max_queue=self.max_queue, generated_tokens=self._generated,
                               completed_requests=self._completed, prefill_tokens=self._prefilled, steps=self._steps,
                               threads=self.threads)

    def _use_threads(self, spare: int = 0) -> None:
        """Set (with "auto": first measure, leaving `spare` of the thread's count to other work) the intra-op thread
        count on the thread about to run steps (CPU)."""
        if self._threads_wanted is None or self._threads_on == threading.get_ident() or self.device.type != "cpu":
            return
        if self.threads is None:  # "auto": measured once, on an empty cache
            if self._rows:
                return
            self.threads = fastest_thread_count(self.model, self.cache, self.max_batch,
                                                available=max(1, torch.get_num_threads() - spare))
        torch.set_num_threads(self.threads)
        self._threads_on = threading.get_ident()

    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduler iteration; False when there was nothing to do."""
        events: list[Request] = []
        with self._step_lock:
            try:
                self._use_threads()
                self._drop_cancelled()
                self._admit()
                if not self._rows:
                    return False
                self._steps += 1
                self._prefill(events)
                self._decode(events)
            except BaseException as e:  # Ctrl-C too: a step cut short leaves rows half-updated
                events = self._fail_all(e)
                raise
            finally:
                with self._cond:
                    self._cond.notify_all()
                for request in events:
                    request._notify()
        return True

    def _fail_all(self, error: BaseException) -> list[Request]:
        """A step failed (out of memory: "error") or was cut short (Ctrl-C: "cancelled"): the cache's requests end."""
        interrupted = isinstance(error, KeyboardInterrupt)
        with self._cond:
            requests = [r for row in self._rows for r in ([row.request] if row.request else row.group.requests)]
            for r in requests:
                if r.finish_reason is None:
                    r.error = None if interrupted else error
                    r._finish("cancelled" if interrupted else "error")
            self._rows.clear()
            self._decoding = self._reserved = 0
        return requests

    # --- the scheduler's parts (the step lock is held) ---------------------------------------------

    def _admit(self) -> None:
        with self._cond:
            while self._queue:
                group = self._queue[0]
                live = group.live
                if not live:
                    self._queue.popleft()
                    continue
                group.requests = live
                if len(self._rows) + self._reserved + len(live) > self.max_batch:
                    return
                self._queue.popleft()
                group.done = self.prefixes.restore(group.prompt, len(self._rows))  # a kept prefix, or an empty row
                self._rows.append(_Row(group=group))
                self._reserved += len(live) - 1

    def _prefill(self, events: list[Request]) -> None:
        """Run up to `prefill_chunk` prompt tokens of the joining rows, several rows in one forward pass."""
        budget = self.prefill_chunk
        while budget > 0:
            self._admit()  # requests that arrived during the last pass join before the decode pass
            if self._decoding == len(self._rows):
                return
            batch = self._prefill_batch(budget)
            start = self._decoding
            chunks = [group.prompt[group.done: group.done + size] for group, size in batch]
            width = max(len(c) for c in chunks)
            ids = torch.tensor([c + [0] * (width - len(c)) for c in chunks], dtype=torch.long, device=self.device)
            view = self.cache.view(start, start + len(batch))
            if len(batch) == 1:
                last = prefill_logits(self.model, ids, view, None)  # (1, V)
            else:  # rows right-padded to one width: logits at each row's last real position, then its true length
                lengths = [self.cache.lengths[start + k] for k in range(len(batch))]
                last = prefill_logits(self.model, ids, view, [len(c) - 1 for c in chunks])  # (B, V)
                for k, c in enumerate(chunks):
                    self.cache.set_length(start + k, lengths[k] + len(c))
            finished = []
            for k, (group, size) in enumerate(batch):
                group.done += size
                budget -= size
                self._prefilled += size
                if group.done == len(group.prompt):
                    finished.append((self._rows[start + k], last[k]))
            for row, logits_row in finished:  # rows may move as others start or end: find each again
                i = next(k for k, r in enumerate(self._rows) if r is row)
                if i != self._decoding:
                    self.cache.swap_rows(i, self._decoding)
                    self._rows[i], self._rows[self._decoding] = self._rows[self._decoding], self._rows[i]
                self._start_decoding(self._decoding, row.group, logits_row, events)

    def _prefill_batch(self, budget: int) -> list[tuple[_Group, int]]:
        """The joining rows (from the first prefilling one on) that share this forward pass, and how many
        prompt tokens each adds: within the budget, the cache rows' room and a bound on the logits' size."""
        batch: list[tuple[_Group, int]] = []
        width = top = 0
        for i in range(self._decoding, len(self._rows)):
            group = self._rows[i].group
            size = min(budget, len(group.prompt) - group.done)
            w, t = max(width, size), max(top, self.cache.lengths[i])
            if batch and (t + w > self.max_len or (len(batch) + 1) * w * self.vocab_size > PREFILL_LOGITS):
                break
            batch.append((group, size))
            width, top, budget = w, t, budget - size
            if budget == 0:
                break
        return batch

    def _start_decoding(self, i: int, group: _Group, logits: torch.Tensor, events: list[Request]) -> None:
        """A prompt is in the cache: its row (and a copy per further sample) starts decoding."""
        with self._cond:
            live = group.live
            self._reserved -= len(group.requests) - 1
        if not live:
            self._remove(i)
            return
        seen = None
        if any(r.settings.repetition_penalty != 1.0 for r in live):
            seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            seen[torch.tensor(group.prompt, device=self.device)] = True
        self._rows[i] = _Row(request=live[0], seen=seen)
        self._decoding += 1  # row i is the first prefilling row, so it joins the decoding block as is
        rows = [i]
        for request in live[1:]:
            rows.append(self._add_decoding_copy(i, _Row(request=request, seen=None if seen is None else seen.clone())))
        first: list[Request] = []  # handed out now, not after this step's decode pass: a shorter time to first token
        self._sample(rows, logits[None].expand(len(rows), -1), first)
        with self._cond:
            self._cond.notify_all()
        for request in first:
            request._notify()

    def _add_decoding_copy(self, src: int, row: _Row) -> int:
        """Append a decoding row holding a copy of row `src`'s cache; returns its index."""
        d, n = self._decoding, len(self._rows)
        if n > d:  # a prefilling row sits at d: move it to the end
            self.cache.copy_row(d, n)
            self._rows.append(self._rows[d])
        else:
            self._rows.append(row)
        self.cache.copy_row(src, d)
        self._rows[d] = row
        self._decoding += 1
        return d

    def _decode(self, events: list[Request]) -> None:
        d = self._decoding
        if d == 0:
            return
        tokens = torch.tensor([row.next_token for row in self._rows[:d]], dtype=torch.long, device=self.device)
        logits = self.model(tokens[:, None], cache=self.cache.view(0, d), last_only=True)[:, -1]  # (d, V)
        self._sample(list(range(d)), logits, events)

    def _sample(self, rows: list[int], logits: torch.Tensor, events: list[Request]) -> None:
        """Next token of each row with its request's settings; hand them out; finished rows leave."""
        requests = [self._rows[i].request for i in rows]
        chosen = pick_tokens(logits, [r.settings for r in requests], [self._rows[i].seen for i in rows],
                             [r.generator for r in requests])
        finished: list[int] = []
        with self._cond:
            for i, token in zip(rows, chosen, strict=True):
                row = self._rows[i]
                request = row.request
                events.append(request)
                if request._cancel is not None:
                    self._completed += 1
                    finished.append(i)
                    continue
                if token in request.stop_ids:
                    request._finish("stop")
                else:
                    request._emit(token)
                    self._generated += 1
                    if request.generated >= request.settings.max_new_tokens or self.cache.lengths[i] >= self.max_len:
                        request._finish("length")
                if request.finish_reason is not None:
                    self._completed += 1
                    finished.append(i)
                    continue
                row.next_token = token
                if row.seen is not None:
                    row.seen[token:token + 1] = True  # a fill; `seen[token] = True` waits for a GPU
        for i in sorted(finished, reverse=True):
            self._remove(i)

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [i for i, row in enumerate(self._rows)
                    if (row.request is not None and row.request._cancel is not None)
                    or (row.group is not None and not row.group.live)]
            for i in gone:  # a prefilling group gives back its reserved rows; a decoding request is done
                group = self._rows[i].group
                self._reserved -= 0 if group is None else len(group.requests) - 1
                self._completed += group is None
        for i in sorted(gone, reverse=True):
            self._remove(i)

    def _remove(self, i: int) -> None:
        """Free row i (its contents kept for their prefix), keeping the rows compact (decoding first, then prefilling)."""
        self.prefixes.keep(i, self._rows[i])
        d, last = self._decoding, len(self._rows) - 1
        if i < d:
            self._move(d - 1, i)
            if last >= d:
                self._move(last, d - 1)
            self._decoding -= 1
        else:
            self._move(last, i)
        self._rows.pop()

    def _move(self, src: int, dst: int) -> None:
        if src != dst:
            self.cache.copy_row(src, dst)
            self._rows[dst] = self._rows[src]

