"""The inference engine: continuous batching against solo references computed without any cache.

The reference for every greedy request is argmax decoding by full recomputation (the whole sequence
through the model each step), one request at a time. The engine must give the same tokens whatever
else shares the batch, however the prompt is chunked, and when a prompt is prefilled once for n samples.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time

import pytest
import torch

from cogni_mamba.config import GenerationConfig, ModelConfig
from cogni_mamba.inference import Engine, EngineBusy, greedy_settings, stream_text
from cogni_mamba.model import CogniMamba
from cogni_mamba.tokenizer import SimpleTokenizer
from tests.references import naive_greedy

CONTEXT = 192


def byte_model(context: int = CONTEXT) -> CogniMamba:
    """A random 2-layer model over SimpleTokenizer's vocabulary whose special rows score exactly 0,
    so greedy decoding only ever picks bytes (init_std 0.3: the output varies instead of repeating)."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=SimpleTokenizer().vocab_size,
                      hidden_dim=128, max_seq_len=context, init_std=0.3)
    model = CogniMamba(cfg).eval()
    with torch.no_grad():
        model.tok_embeddings.weight[256:] = 0
    return model


def text_of(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


@dataclasses.dataclass
class Case:
    prompt: list[int]
    max_tokens: int
    cancel_after: int | None = None  # read this many tokens, then cancel
    stop_string: str | None = None
    stop_id: int | None = None


def make_cases(model, rng: random.Random) -> list[tuple[Case, list[int]]]:
    """16 requests of mixed prompt lengths and max tokens; some cancelled, some ending on stop strings or ids."""
    cases = []
    for i in range(16):
        role = i % 4  # 0: runs to max_tokens, 1: cancelled, 2: a stop string, 3: a stop id
        prompt = [rng.randrange(32, 127) for _ in range(rng.choice([1, 3, 9, 40, 70, 130]))]
        case = Case(prompt, rng.choice([4, 12, 30, 45] if role == 0 else [12, 30, 45]))
        reference = naive_greedy(model, prompt, case.max_tokens)
        if role == 1:
            case.cancel_after = len(reference) // 2
        elif role == 2:
            text = text_of(reference)
            case.stop_string = text[len(text) // 2: len(text) // 2 + 2]
        elif role == 3:
            case.stop_id = reference[6]
        cases.append((case, reference))
    return cases


def expected_output(case: Case, reference: list[int]) -> tuple[str, str]:
    """(text, finish_reason) the engine must give for a case, from its solo reference."""
    if case.cancel_after is not None:
        return text_of(reference[:case.cancel_after]), "cancelled"
    if case.stop_id is not None:
        return text_of(reference[:reference.index(case.stop_id)]), "stop"
    text = text_of(reference)
    if case.stop_string is not None:
        return text[:text.find(case.stop_string)], "stop"
    return text, "length"


def run_case(engine: Engine, case: Case) -> tuple[str, str, list[int]]:
    """Submit and read one case as a client would; (text, finish_reason, tokens read)."""
    stops = [case.stop_id] if case.stop_id is not None else []
    request = engine.submit(case.prompt, greedy_settings(case.max_tokens), stop_ids=stops)
    if case.cancel_after is not None:
        tokens = []
        for token in request:
            tokens.append(token)
            if len(tokens) == case.cancel_after:
                request.cancel()
        return text_of(tokens), request.finish_reason, tokens
    text = "".join(stream_text(request, SimpleTokenizer().stream_decoder(), [case.stop_string or ""]))
    return text, request.finish_reason, []


def test_sixteen_concurrent_requests_from_several_threads_match_their_solo_references():
    model = byte_model()
    cases = make_cases(model, random.Random(3))
    engine = Engine(model, max_batch=5, max_queue=16, prefill_chunk=32).start()
    results: dict[int, tuple] = {}
    gate = threading.Barrier(4)

    def client(indices: list[int]) -> None:
        gate.wait()
        for i in indices:
            results[i] = run_case(engine, cases[i][0])

    # Each thread submits its next request when the previous one ends, so rows join and leave all the time;
    # with 4 threads x 4 requests and max_batch 5 the first burst also queues.
    threads = [threading.Thread(target=client, args=([t, t + 4, t + 8, t + 12],)) for t in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        engine.stop()
    for i, (case, reference) in enumerate(cases):
        text, reason = expected_output(case, reference)
        assert results[i][:2] == (text, reason), f"request {i}: {case}"
    stats = engine.stats()
    assert stats.active == 0 and stats.queued == 0 and stats.completed_requests == 16


def test_a_burst_larger_than_the_batch_queues_and_every_request_matches():
    model = byte_model()
    rng = random.Random(7)
    prompts = [[rng.randrange(32, 127) for _ in range(rng.randrange(1, 60))] for _ in range(12)]
    engine = Engine(model, max_batch=4, max_queue=8, prefill_chunk=24)
    requests = [engine.submit(p, greedy_settings(6 + i)) for i, p in enumerate(prompts)]
    assert engine.stats().queued == 12
    engine.step()
    assert engine.stats().active == 4 and engine.stats().queued == 8  # first come, first served
    outputs = [list(r) for r in requests]
    for i, prompt in enumerate(prompts):
        assert outputs[i] == naive_greedy(model, prompt, 6 + i)


def test_a_seeded_sampled_request_is_the_same_alone_and_inside_a_busy_batch():
    model = byte_model()
    sampled = GenerationConfig(temperature=1.0, top_k=40, top_p=0.9, max_new_tokens=40, seed=1234)
    prompt = list(b"Once upon a time")
    alone = list(Engine(model, max_batch=4).submit(prompt, sampled))

    engine = Engine(model, max_batch=4, prefill_chunk=8)
    others = [engine.submit(list(b"x" * 30), greedy_settings(50)),
              engine.submit(list(b"hello"), dataclasses.replace(sampled, seed=9, temperature=0.7, top_k=None)),
              engine.submit(list(b"abc"), dataclasses.replace(sampled, seed=None, min_p=0.1))]
    for _ in range(5):
        engine.step()  # the others are decoding when it joins
    busy = list(engine.submit(prompt, sampled))
    assert busy == alone and len(alone) == 40
    assert list(Engine(model).submit(prompt, dataclasses.replace(sampled, seed=99))) != alone  # the seed matters
    for r in others:
        r.cancel()


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_keep_decoding():
    model = byte_model()
    engine = Engine(model, max_batch=3, prefill_chunk=16)
    short = engine.submit(list(b"Hi"), greedy_settings(60))
    engine.step()
    long_prompt = [random.Random(1).randrange(32, 127) for _ in range(150)]
    long = engine.submit(long_prompt, greedy_settings(20))
    made_while_prefilling = []
    while long.generated == 0:
        before = short.generated
        engine.step()
        made_while_prefilling.append(short.generated - before)
    assert len(made_while_prefilling) == -(-150 // 16)  # ceil(150 / 16) steps, one chunk each
    assert all(n == 1 for n in made_while_prefilling)  # the running row got a token every step
    assert list(long) == naive_greedy(model, long_prompt, 20)
    assert list(short) == naive_greedy(model, list(b"Hi"), 60)


def test_n_samples_share_one_prefill_and_each_equals_a_separate_greedy_run():
    model = byte_model()
    prompt = list(b"The little fox ran into the woods and")
    fed = []
    hook = model.tok_embeddings.register_forward_pre_hook(lambda _, args: fed.append(args[0].numel()))
    try:
        engine = Engine(model, max_batch=8)
        requests = engine.submit_samples(prompt, greedy_settings(10), 8)
        outputs = [list(r) for r in requests]
    finally:
        hook.remove()
    reference = naive_greedy(model, prompt, 10)
    assert all(out == reference for out in outputs)
    # The prompt once, then 9 decode steps feeding one token per sample (the 10th token is never fed).
    assert sum(fed) == len(prompt) + 8 * 9
    assert engine.stats().prefill_tokens == len(prompt)


def test_prompts_joining_together_are_prefilled_in_one_pass_and_match_their_references():
    model = byte_model()
    rng = random.Random(5)
    prompts = [[rng.randrange(32, 127) for _ in range(n)] for n in (5, 23, 1, 40, 12, 9)]
    engine = Engine(model, max_batch=9, prefill_chunk=200)
    calls = []
    hook = model.tok_embeddings.register_forward_pre_hook(lambda _, args: calls.append(tuple(args[0].shape)))
    try:
        one = engine.submit(prompts[0], greedy_settings(1))  # ends at its first token: rows move under the others
        three = engine.submit_samples(prompts[1], greedy_settings(7), 3)
        gone = engine.submit(prompts[2], greedy_settings(9))
        gone.cancel()  # cancelled while queued: never prefilled
        rest = [engine.submit(p, greedy_settings(8 + i)) for i, p in enumerate(prompts[3:])]
        engine.step()
        assert calls[0] == (5, 40)  # the five live prompts in one forward pass, right-padded to the longest
        assert list(one) == naive_greedy(model, prompts[0], 1)
        assert all(list(r) == naive_greedy(model, prompts[1], 7) for r in three)
        for i, (r, p) in enumerate(zip(rest, prompts[3:], strict=True)):
            assert list(r) == naive_greedy(model, p, 8 + i)
        assert list(gone) == [] and gone.finish_reason == "cancelled"
    finally:
        hook.remove()


def test_rows_with_different_settings_share_a_batch():
    model = byte_model()
    prompt = list(b"aaaa bbbb aaaa")
    engine = Engine(model, max_batch=4)
    plain = engine.submit(prompt, greedy_settings(40))
    penalised = engine.submit(prompt, dataclasses.replace(greedy_settings(40), repetition_penalty=1.8))
    stop = naive_greedy(model, prompt, 40)[6]
    stopped = engine.submit(prompt, greedy_settings(40), stop_ids=[stop])
    assert list(penalised) == naive_greedy(model, prompt, 40, penalty=1.8)
    assert list(plain) == naive_greedy(model, prompt, 40)
    assert list(stopped) == naive_greedy(model, prompt, 40, stop_ids={stop}) and stopped.finish_reason == "stop"


def test_generation_ends_when_the_context_is_full():
    model = byte_model(context=64)
    prompt = list(b"z" * 60)
    request = Engine(model).submit(prompt, greedy_settings(50))
    assert list(request) == naive_greedy(model, prompt, 50) and request.completion_tokens == 5
    assert request.finish_reason == "length"


def test_a_full_queue_raises_engine_busy():
    engine = Engine(byte_model(), max_batch=1, max_queue=1)
    first = engine.submit([65], greedy_settings(50))
    second = engine.submit([66], greedy_settings(5))
    with pytest.raises(EngineBusy, match="its 1 generation slot and 1 queue place have no room"):
        engine.submit([67], greedy_settings(5))
    engine.step()
    assert (engine.stats().active, engine.stats().queued) == (1, 1)
    first.cancel()
    assert len(list(second)) == 5
    engine.submit([67], greedy_settings(5))  # room again


def test_cancel_frees_the_slot_within_one_step_and_a_queued_request_takes_it():
    # Driven step by step (no background thread), so "within one step" is exact, not a timing guess.
    model = byte_model()
    engine = Engine(model, max_batch=1, max_queue=4)
    running = engine.submit(list(b"go"), greedy_settings(CONTEXT - 10))
    waiting = engine.submit(list(b"next"), greedy_settings(8))
    for _ in range(3):
        engine.step()
    assert engine.stats().active == 1 and engine.stats().queued == 1
    running.cancel()
    assert running.finish_reason == "cancelled"
    engine.step()  # the next step drops the cancelled row and admits the queued request into its slot
    stats = engine.stats()
    assert stats.completed_requests == 1 and stats.queued == 0 and stats.active == 1
    assert list(waiting) == naive_greedy(model, list(b"next"), 8)
    assert engine.stats().active == 0


def test_closing_a_text_stream_cancels_its_request():
    engine = Engine(byte_model(), max_batch=2)
    request = engine.submit(list(b"abc"), greedy_settings(100))
    pieces = stream_text(request, SimpleTokenizer().stream_decoder())
    next(pieces)
    pieces.close()
    assert request.finish_reason == "cancelled" and engine.stats().active == 0


def test_a_request_above_the_batch_size_or_with_an_empty_prompt_is_refused():
    engine = Engine(byte_model(), max_batch=2)
    with pytest.raises(Exception, match="at most 2"):
        engine.submit_samples([1], greedy_settings(3), 3)
    with pytest.raises(Exception, match="empty"):
        engine.submit([], greedy_settings(3))
    assert list(Engine(byte_model(), bos_id=256).submit([], greedy_settings(3))) == naive_greedy(byte_model(), [256], 3)


def test_a_failing_step_ends_its_requests_with_the_error_and_the_engine_goes_on():
    model = byte_model()
    engine = Engine(model, max_batch=2).start()
    real_forward = model.forward
    try:
        model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory (simulated)"))
        doomed = engine.submit(list(b"abc"), greedy_settings(5))
        with pytest.raises(Exception, match="Generation failed: out of memory"):
            list(doomed)
        assert doomed.finish_reason == "error"
        model.forward = real_forward
        assert list(engine.submit(list(b"abc"), greedy_settings(5))) == naive_greedy(model, list(b"abc"), 5)
    finally:
        model.forward = real_forward
        engine.stop()


def test_ctrl_c_inside_an_inline_step_cancels_what_ran_and_keeps_the_queue():
    model = byte_model()
    engine = Engine(model, max_batch=1)
    running = engine.submit(list(b"abc"), greedy_settings(30))
    waiting = engine.submit(list(b"xyz"), greedy_settings(6))
    assert next(running) is not None
    running.take()  # what the first step made (prefill and one decode), so the next read must step
    real_forward = model.forward
    model.forward = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())
    try:
        with pytest.raises(KeyboardInterrupt):
            next(running)
    finally:
        model.forward = real_forward
    assert running.finish_reason == "cancelled" and engine.stats().active == 0
    assert list(waiting) == naive_greedy(model, list(b"xyz"), 6)  # the queued request runs on a clean cache


def test_bf16_weights_run_with_a_bf16_cache(tmp_path):
    from cogni_mamba.config import Config
    from cogni_mamba.inference import load_model_for_inference
    from cogni_mamba.train.checkpoint import save_checkpoint

    model = byte_model()
    save_checkpoint(tmp_path, "step-1", model, Config(model=model.config), tokenizer=SimpleTokenizer())
    half, tok, _ = load_model_for_inference(tmp_path, "cpu", "bf16")
    assert half.tok_embeddings.weight.dtype == torch.bfloat16
    engine = Engine(half, max_batch=2, bos_id=tok.bos_id)
    assert engine.cache.k.dtype == torch.bfloat16
    request = engine.submit(list(b"Once"), greedy_settings(12))
    assert len(list(request)) == 12 and request.finish_reason == "length"
    exact, _, _ = load_model_for_inference(tmp_path, "cpu", "fp32")
    assert exact.tok_embeddings.weight.dtype == torch.float32


def test_finetune_greedy_replies_match_the_naive_chat_reference():
    from cogni_mamba.finetune import greedy_replies
    from tests.references import naive_reply

    torch.manual_seed(1)
    tok = SimpleTokenizer()
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, hidden_dim=128,
                      max_seq_len=256, init_std=0.3)
    model = CogniMamba(cfg).eval()  # special rows left random: some replies end early on <|end|> or a role
    conversations = [[{"role": "user", "content": text}] for text in ("hi", "Tell me a story.", "2+2?", "x" * 50, "ok")]
    replies = greedy_replies(model, tok, conversations, max_new_tokens=24, batch_size=2)
    assert replies == [naive_reply(model, tok, c, 24) for c in conversations]


@pytest.mark.parametrize("where", ["middle", "last character"])
def test_a_stop_string_in_tokens_made_before_the_reader_sees_them_still_ends_with_stop(where):
    # The engine can run a request to its length before the reader decodes the tokens; the reply the
    # reader gets ends on the stop string, so its finish reason must be "stop" either way.
    model = byte_model()
    prompt, n = list(b"Once"), 12
    text = text_of(naive_greedy(model, prompt, n))
    stop = text[5:7] if where == "middle" else text[-2:]
    assert stop and text.find(stop) >= 0
    engine = Engine(model, max_batch=2)
    request = engine.submit(prompt, greedy_settings(n))
    while engine.step():
        pass
    assert request.finish_reason == "length"  # made in full before anyone read it
    got = "".join(stream_text(request, SimpleTokenizer().stream_decoder(), [stop]))
    assert got == text[:text.find(stop)] and request.finish_reason == "stop"


@pytest.mark.parametrize(("costs", "expected"), [({1: 0.004, 2: 0.002}, 2), ({1: 0.002, 2: 0.004}, 1),
                                                  ({1: 0.003, 2: 0.0029}, 1)])
def test_thread_choice_keeps_the_fastest_count_and_the_fewest_threads_on_a_near_tie(costs, expected):
    from cogni_mamba.inference.threads import choose_threads

    before = torch.get_num_threads()
    try:
        chosen = choose_threads(lambda: time.sleep(costs[torch.get_num_threads()]), [1, 2])
        assert chosen == expected and torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)


def test_auto_threads_are_measured_on_the_engine_thread_and_the_tokens_do_not_change():
    model = byte_model()
    engine = Engine(model, max_batch=3, threads="auto").start()
    try:
        got = list(engine.submit(list(b"threads"), greedy_settings(12)))
        n = max(1, torch.get_num_threads() - 1)  # the background engine leaves one core to the rest of the process
        assert engine.stats().threads in (1, max(1, n // 2), n)
    finally:
        engine.stop()
    assert got == naive_greedy(model, list(b"threads"), 12)
    assert engine.stats().active == 0


def test_a_request_arriving_during_a_prefill_is_prefilled_before_the_decode_pass():
    model = byte_model()
    engine = Engine(model, max_batch=3)
    running = engine.submit(list(b"one"), greedy_settings(10))
    engine.step()  # prefill (first token) and one decode pass
    joining = engine.submit(list(b"two"), greedy_settings(10))
    late: list = []
    real_forward = model.forward

    def forward(ids, **kwargs):  # a prefill pass: another request arrives while it runs
        if ids.shape[1] > 1 and not late:
            late.append(engine.submit(list(b"three!"), greedy_settings(10)))
        return real_forward(ids, **kwargs)

    model.forward = forward
    try:
        engine.step()
    finally:
        model.forward = real_forward
    # the late request was admitted and prefilled in the same step, then all three decoded once
    assert (running.generated, joining.generated, late[0].generated) == (3, 2, 2)
    for request, prompt in ((running, b"one"), (joining, b"two"), (late[0], b"three!")):
        assert list(request) == naive_greedy(model, list(prompt), 10)


def test_eight_samples_run_their_prompt_through_the_model_once():
    # Counted at the model: every forward call's (rows, tokens); the prompt's tokens pass through it once.
    model = byte_model()
    engine = Engine(model, max_batch=8)
    calls: list[tuple[int, int]] = []
    real_forward = model.forward

    def forward(ids, **kwargs):
        calls.append(tuple(ids.shape))
        return real_forward(ids, **kwargs)

    prompt = list(b"a prompt of some length")
    model.forward = forward
    try:
        samples = engine.submit_samples(prompt, greedy_settings(5), 8)
        outputs = [list(r) for r in samples]
    finally:
        model.forward = real_forward
    assert calls[0] == (1, len(prompt))  # one row, the whole prompt
    assert calls[1:] == [(8, 1)] * 4  # then one token for each of the 8 rows per step (the first came from the prefill)
    assert outputs == [naive_greedy(model, prompt, 5)] * 8


def test_on_own_thread_returns_the_result_raises_the_error_and_takes_its_openmp_threads_with_it():
    import os
    import threading

    from cogni_mamba.inference.threads import on_own_thread

    assert on_own_thread(lambda a, b=0: (a + b, threading.current_thread().name), 2, b=3) == (5, "cogni-load")
    with pytest.raises(KeyError, match="gone"):
        on_own_thread(lambda: {}["gone"])

    tasks = "/proc/self/task"
    if not os.path.isdir(tasks) or "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("counts the process's threads through /proc, with torch's OpenMP backend")
    x = torch.randn(512, 2048)

    def work() -> int:  # a multi-threaded operation makes this thread an OpenMP pool
        torch.set_num_threads(2)
        torch.nn.functional.silu(x)
        return len(os.listdir(tasks))

    before = len(os.listdir(tasks))
    during = on_own_thread(work)
    deadline = time.monotonic() + 2
    while len(os.listdir(tasks)) > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert during >= before + 1  # the loading thread (and, unless libgomp reused an idle one, its pool's workers)
    assert len(os.listdir(tasks)) <= before  # all gone: no pool is left to slow the engine's thread


def test_auto_threads_leave_a_core_to_the_process_when_the_engine_runs_on_its_own_thread(monkeypatch):
    from cogni_mamba.inference import threads

    seen = []

    def record(run_step, candidates):
        seen.append(sorted(set(candidates)))
        return 1

    monkeypatch.setattr(threads, "choose_threads", record)
    before = torch.get_num_threads()
    torch.set_num_threads(4)  # the count the engine's thread inherits from the one that starts it
    try:
        model = byte_model()
        engine = Engine(model, max_batch=2, threads="auto").start()  # the server's way: a core stays for HTTP
        try:
            list(engine.submit(list(b"a"), greedy_settings(2)))
        finally:
            engine.stop()
        inline = Engine(model, max_batch=2, threads="auto")  # stepped by its caller (chat): every core
        list(inline.submit(list(b"a"), greedy_settings(2)))
    finally:
        torch.set_num_threads(before)
    assert seen == [[1, 3], [1, 2, 4]]
