"""Prefixes kept from finished generations (`inference.prefix.PrefixCache`): a chat's next turn, which resends the
whole conversation, prefills only what is new, and its tokens stay those of the no-cache reference."""

from __future__ import annotations

import torch

from cogni_mamba.chat import Chatbot
from cogni_mamba.config import GenerationConfig
from cogni_mamba.inference import Engine, greedy_settings
from cogni_mamba.tokenizer import SimpleTokenizer
from tests.references import naive_greedy
from tests.test_engine import byte_model


def prefilled(engine: Engine) -> int:
    return engine.stats().prefill_tokens


def test_a_next_turn_prefills_only_what_is_new_and_matches_the_reference():
    model = byte_model()
    engine = Engine(model, max_batch=2)
    first = [ord(c) for c in "Once upon a time, a fox"]
    reply = list(engine.submit(first, greedy_settings(20)))
    assert reply == naive_greedy(model, first, 20)
    assert len(engine.prefixes) == 1

    second = first + reply + [ord(c) for c in " and then?"]  # the previous turn, its reply, something new
    before = prefilled(engine)
    got = list(engine.submit(second, greedy_settings(15)))
    assert got == naive_greedy(model, second, 15)
    # kept: the prompt and the reply as far as it was fed (its last token never was)
    assert prefilled(engine) - before == len(second) - (len(first) + len(reply) - 1)


def test_without_kept_rows_every_prompt_is_prefilled_whole():
    model = byte_model()
    engine = Engine(model, max_batch=2, prefix_rows=0)
    first = [ord(c) for c in "Once upon a time, a fox"]
    reply = list(engine.submit(first, greedy_settings(10)))
    second = first + reply + [ord(c) for c in "?"]
    before = prefilled(engine)
    assert list(engine.submit(second, greedy_settings(5))) == naive_greedy(model, second, 5)
    assert prefilled(engine) - before == len(second)


def test_a_prompt_equal_to_a_kept_row_still_prefills_its_last_token():
    model = byte_model()
    engine = Engine(model, max_batch=1)
    prompt = [ord(c) for c in "The same prompt, twice over."]
    assert list(engine.submit(prompt, greedy_settings(8))) == naive_greedy(model, prompt, 8)
    before = prefilled(engine)
    assert list(engine.submit(prompt, greedy_settings(8))) == naive_greedy(model, prompt, 8)
    assert prefilled(engine) - before == 1  # the logits for the first new token come from its last position


def test_the_least_recently_used_row_goes_first():
    model = byte_model()
    engine = Engine(model, max_batch=1, prefix_rows=1)
    a, b = [ord(c) for c in "Alpha: the first conversation."], [ord(c) for c in "Bravo: another talk entirely."]
    list(engine.submit(a, greedy_settings(4)))
    list(engine.submit(b, greedy_settings(4)))  # one kept row: B's replaces A's
    before = prefilled(engine)
    list(engine.submit(a + [33], greedy_settings(2)))
    assert prefilled(engine) - before == len(a) + 1  # A was gone: prefilled whole
    before = prefilled(engine)
    list(engine.submit(a + [33, 34], greedy_settings(2)))
    assert prefilled(engine) - before < 6  # A's newest turn is kept now


def test_a_cancelled_request_keeps_what_it_fed():
    model = byte_model()
    engine = Engine(model, max_batch=1)
    prompt = [ord(c) for c in "A long story that the reader stops early."]
    request = engine.submit(prompt, greedy_settings(40))
    made = [next(request) for _ in range(5)]
    request.cancel()
    assert list(request) == []
    follow = prompt + made[:3] + [ord("!")]
    before = prefilled(engine)
    assert list(engine.submit(follow, greedy_settings(6))) == naive_greedy(model, follow, 6)
    assert prefilled(engine) - before <= 2


def test_the_chatbot_reprefills_only_what_its_next_turn_adds():
    import os

    model = byte_model()
    bot = Chatbot(model, SimpleTokenizer(), GenerationConfig(temperature=0, top_k=None, top_p=None, max_new_tokens=12))
    submitted = []
    submit = bot.engine.submit

    def recording(ids, *args, **kwargs):
        request = submit(ids, *args, **kwargs)
        submitted.append((list(ids), request))
        return request

    bot.engine.submit = recording
    "".join(bot.reply("Hello there, who are you?"))
    before = prefilled(bot.engine)
    "".join(bot.reply("Tell me more."))
    (first, request), (second, _) = submitted
    kept = (first + request.ids)[:len(first) + len(request.ids) - 1]  # the reply's last token was never fed
    shared = len(os.path.commonprefix([kept, second]))
    # at least the whole first prompt (and the reply as far as its text re-encodes to the same ids: this random
    # model's bytes are not always valid UTF-8)
    assert shared >= len(first)
    assert prefilled(bot.engine) - before == len(second) - shared


def test_kept_rows_live_beside_the_batch_and_bf16_keeps_working():
    model = byte_model().to(torch.bfloat16)
    engine = Engine(model, max_batch=2, prefix_rows=3)
    assert engine.cache.max_batch == 5 and engine.cache.k.dtype == torch.bfloat16
    prompt = [ord(c) for c in "bf16 rows are kept as they are."]
    reply = list(engine.submit(prompt, greedy_settings(6)))
    before = prefilled(engine)
    assert len(list(engine.submit(prompt + reply + [63], greedy_settings(3)))) == 3
    assert prefilled(engine) - before == 2
