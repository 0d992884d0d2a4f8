"""The OpenAI-compatible server, live on 127.0.0.1 in a subprocess: the official `openai` client
(streaming and not) against greedy decoding recomputed here without a cache, usage counts from the
template's closed form, stop strings, seeds, bad requests, 8 concurrent streams and disconnects."""

from __future__ import annotations

import json
import threading

import pytest

from tests.test_serve_fixtures import (
    CONTEXT,
    chat_ids,
    httpx,
    live_server,
    make_tiny_checkpoint,
    naive_greedy_text,
    text_ids,
    wait_for,
)

openai = pytest.importorskip("openai", reason="the server tests use the official openai client (dev extra)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "run")


@pytest.fixture(scope="module")
def server(tiny):
    """One server with the defaults (no key) but 4 generations at once, so concurrent decoding is exercised."""
    with live_server(tiny.path, "--max-concurrency", "4") as s:
        yield s


def client(server, **kwargs):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                         timeout=120, **kwargs)


def stream_chat(c, **kwargs) -> tuple[str, str | None, dict | None]:
    """(joined content, finish_reason, usage) of a streamed chat completion."""
    text, finish, usage = "", None, None
    for chunk in c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage.model_dump(exclude_none=True)
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish, usage


def test_health_and_models(server):
    health = server.health()
    assert health["status"] == "ok" and health["active_generations"] == 0 and health["max_concurrency"] == 4
    assert health["weights"] == "float32"  # --dtype fp32
    models = client(server).models.list().data
    assert [m.id for m in models] == ["run/step-1"]  # <run dir>/<checkpoint>


def test_chat_greedy_streamed_and_not_equal_the_naive_reference(server, tiny):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there, é!"}]
    prompt = chat_ids(tiny.specials, messages)
    expected = naive_greedy_text(tiny.model, prompt, 24)
    c = client(server)

    whole = c.chat.completions.create(model="any", messages=messages, temperature=0, max_tokens=24)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length"
    # Closed form: BOS + per message (role + UTF-8 bytes + end) + the assistant cue.
    n_prompt = 1 + sum(2 + len(m["content"].encode()) for m in messages) + 1
    assert whole.usage.prompt_tokens == len(prompt) == n_prompt
    assert whole.usage.completion_tokens == 24 and whole.usage.total_tokens == n_prompt + 24

    text, finish, usage = stream_chat(c, model="any", messages=messages, temperature=0, max_tokens=24)
    assert text == expected and finish == "length"
    assert usage == {"prompt_tokens": n_prompt, "completion_tokens": 24, "total_tokens": n_prompt + 24}


def test_text_completions_streamed_and_not(server, tiny):
    expected = naive_greedy_text(tiny.model, text_ids(tiny.specials, "Once upon"), 20)
    c = client(server)
    whole = c.completions.create(model="m", prompt="Once upon", temperature=0, max_tokens=20)
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (1 + len("Once upon"), 20)
    chunks = list(c.completions.create(model="m", prompt="Once upon", temperature=0, max_tokens=20, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_raw_sse_ends_with_done(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("length") == 1


@pytest.mark.parametrize("stop", ["single", "list"])
def test_stop_strings_cut_the_reply(server, tiny, stop):
    messages = [{"role": "user", "content": "Tell me a story."}]
    reference = naive_greedy_text(tiny.model, chat_ids(tiny.specials, messages), 40)
    # A two-character stop string taken from the middle of the reference (no replacement characters).
    i = next(i for i in range(8, 30) if "\ufffd" not in reference[i:i + 2])
    word = reference[i:i + 2]
    stops = word if stop == "single" else ["never appears \u2603", word]
    expected = reference[:reference.find(word)]
    c = client(server)
    whole = c.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=40, stop=stops)
    assert whole.choices[0].message.content == expected and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens < 40
    text, finish, _ = stream_chat(c, model="m", messages=messages, temperature=0, max_tokens=40, stop=stops)
    assert (text, finish) == (expected, "stop")


def test_fixed_seed_sampling_is_reproducible_and_streams_the_same_text(server):
    c = client(server)
    kwargs = dict(model="m", messages=[{"role": "user", "content": "Hi"}], temperature=1.0, top_p=0.9,
                  max_tokens=30)
    a = c.chat.completions.create(seed=1234, **kwargs).choices[0].message.content
    b = c.chat.completions.create(seed=1234, **kwargs).choices[0].message.content
    streamed, _, _ = stream_chat(c, seed=1234, **kwargs)
    others = {c.chat.completions.create(seed=s, **kwargs).choices[0].message.content for s in (1, 2, 3)}
    greedy = c.chat.completions.create(**{**kwargs, "temperature": 0}).choices[0].message.content
    assert a == b == streamed
    assert len(others | {a}) > 1 and a != greedy  # the seed and the temperature really are used


def test_seeds_of_any_size_are_taken_modulo_2_to_the_64(server):
    """A seed past torch's range once killed the engine process for every client; now it is 2**64-periodic."""
    c = client(server)
    kwargs = dict(model="m", messages=[{"role": "user", "content": "Hi"}], temperature=1.0, max_tokens=12)
    huge = c.chat.completions.create(seed=10**23, **kwargs).choices[0].message.content
    assert huge == c.chat.completions.create(seed=10**23 % 2**64, **kwargs).choices[0].message.content
    negative = c.chat.completions.create(seed=-7, **kwargs).choices[0].message.content
    assert negative == c.chat.completions.create(seed=2**64 - 7, **kwargs).choices[0].message.content
    assert c.chat.completions.create(**{**kwargs, "temperature": 0}).choices[0].finish_reason  # still serving


CHAT = "/v1/chat/completions"
OK_MESSAGES = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [
    ("malformed JSON", CHAT, b'{"messages": [', None),
    ("not an object", CHAT, b"[1, 2]", None),
    ("empty body", CHAT, b"", None),
    ("missing messages", CHAT, {"max_tokens": 5}, "messages"),
    ("empty messages", CHAT, {"messages": []}, "messages"),
    ("unknown role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("content not a string", CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("messages not a list", CHAT, {"messages": "hi"}, "messages"),
    ("max_tokens a string", CHAT, {"messages": OK_MESSAGES, "max_tokens": "10"}, "max_tokens"),
    ("max_tokens zero", CHAT, {"messages": OK_MESSAGES, "max_tokens": 0}, "max_tokens"),
    ("max_tokens negative", CHAT, {"messages": OK_MESSAGES, "max_tokens": -3}, "max_tokens"),
    ("max_tokens beyond context", CHAT, {"messages": OK_MESSAGES, "max_tokens": CONTEXT + 1}, "max_tokens"),
    ("prompt + max_tokens beyond context", CHAT, {"messages": OK_MESSAGES, "max_tokens": CONTEXT - 3}, "max_tokens"),
    ("temperature negative", CHAT, {"messages": OK_MESSAGES, "temperature": -0.1}, "temperature"),
    ("temperature a string", CHAT, {"messages": OK_MESSAGES, "temperature": "hot"}, "temperature"),
    ("top_p zero", CHAT, {"messages": OK_MESSAGES, "top_p": 0}, "top_p"),
    ("top_p above one", CHAT, {"messages": OK_MESSAGES, "top_p": 1.5}, "top_p"),
    ("stop a number", CHAT, {"messages": OK_MESSAGES, "stop": 7}, "stop"),
    ("seed a float", CHAT, {"messages": OK_MESSAGES, "seed": 1.5}, "seed"),
    ("stream a string", CHAT, {"messages": OK_MESSAGES, "stream": "yes"}, "stream"),
    ("prompt longer than context", CHAT, {"messages": [{"role": "user", "content": "x" * CONTEXT}]}, "messages"),
    ("completion prompt longer than context", "/v1/completions", {"prompt": "y" * CONTEXT}, "prompt"),
    ("completion prompt not text", "/v1/completions", {"prompt": {"text": "hi"}}, "prompt"),
    ("completion max_tokens zero", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("logprobs asked for", CHAT, {"messages": OK_MESSAGES, "logprobs": True}, "logprobs"),
    ("top_logprobs asked for", CHAT, {"messages": OK_MESSAGES, "logprobs": True, "top_logprobs": 2}, "logprobs"),
    ("completion logprobs asked for", "/v1/completions", {"prompt": "hi", "logprobs": 1}, "logprobs"),
    ("n zero", CHAT, {"messages": OK_MESSAGES, "n": 0}, "n"),
    ("n above the batch", CHAT, {"messages": OK_MESSAGES, "n": 5}, "n"),
]


@pytest.mark.parametrize(("case", "path", "body", "param"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_requests_get_400_naming_the_problem(server, case, path, body, param, stream):
    if isinstance(body, dict):
        body = json.dumps({**body, "stream": body.get("stream", stream)}).encode()
    r = httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400, (case, r.text)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"].endswith(".")
    assert error["param"] == param
    if param:
        assert param.split("[")[0].split(".")[-1] in error["message"] or param.split("[")[0] in error["message"]
    assert server.health()["status"] == "ok"


def test_openai_client_sees_400_as_bad_request(server):
    with pytest.raises(openai.BadRequestError) as info:
        client(server).chat.completions.create(model="m", messages=OK_MESSAGES, max_tokens=CONTEXT + 10)
    assert "context" in info.value.message


def test_unknown_routes_and_methods_answer_in_openai_shape(server):
    r = httpx.get(server.url + "/v1/nope")
    assert r.status_code == 404 and "message" in r.json()["error"]
    r = httpx.get(server.url + CHAT)
    assert r.status_code == 405 and "message" in r.json()["error"]


def test_eight_concurrent_streams_all_complete_correctly(server, tiny):
    prompts = [f"Question number {i}?" for i in range(8)]
    expected = [naive_greedy_text(tiny.model, chat_ids(tiny.specials, [{"role": "user", "content": p}]), 16)
                for p in prompts]
    results: list = [None] * 8
    c = client(server)

    def run(i: int) -> None:
        results[i] = stream_chat(c, model="m", messages=[{"role": "user", "content": prompts[i]}], temperature=0,
                                 max_tokens=16)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [r[0] for r in results] == expected
    assert all(r[1] == "length" and r[2]["completion_tokens"] == 16 for r in results)
    assert wait_for(lambda: server.health()["active_generations"] == 0, 10)


def test_a_disconnect_cancels_the_generation(server):
    before = server.health()
    n = CONTEXT - 40
    body = {"messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": n, "temperature": 0,
            "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", server.url + CHAT, json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        received = [line for line, _ in zip(lines, range(4), strict=False)]  # a few chunks, then hang up
    assert len(received) == 4
    assert wait_for(lambda: server.health()["active_generations"] == 0, 10), "the generation kept running"
    after = server.health()
    generated = after["generated_tokens"] - before["generated_tokens"]
    assert after["completed_requests"] == before["completed_requests"] + 1
    assert 0 < generated < n


def test_binds_to_127_0_0_1_only_by_default(server):
    from cogni_mamba.cli import build_parser

    assert build_parser().parse_args(["serve", "--checkpoint", "x"]).host == "127.0.0.1"
    # Another loopback address reaches this machine but not a socket bound to 127.0.0.1 alone.
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.2:{server.port}/health", timeout=5)
    assert httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=5).status_code == 200


# --- n choices, log probabilities, oversized bodies ---------------------------------------------------

def choices_of(server, path: str, body: dict) -> list[tuple[str, str]]:
    """(text, finish_reason) per choice index, from a raw request, streamed (SSE) or not."""
    if not body.get("stream"):
        r = httpx.post(server.url + path, json=body, timeout=120)
        assert r.status_code == 200, r.text
        got = r.json()["choices"]
        assert [c["index"] for c in got] == list(range(len(got)))
        return [(c["message"]["content"] if "message" in c else c["text"], c["finish_reason"]) for c in got]
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    with httpx.stream("POST", server.url + path, json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for c in json.loads(line[6:])["choices"]:
                texts[c["index"]] = texts.get(c["index"], "") + (c["delta"].get("content") or "" if "delta" in c
                                                                 else c["text"])
                if c["finish_reason"]:
                    assert c["index"] not in finish  # one finish chunk per choice
                    finish[c["index"]] = c["finish_reason"]
    assert sorted(texts) == sorted(finish) == list(range(len(texts)))
    return [(texts[i], finish[i]) for i in range(len(texts))]


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_n_3_gives_three_choices_equal_to_the_naive_reference(server, tiny, stream):
    messages = [{"role": "user", "content": "Three times?"}]
    expected = naive_greedy_text(tiny.model, chat_ids(tiny.specials, messages), 12)
    body = {"messages": messages, "n": 3, "temperature": 0, "max_tokens": 12, "stream": stream}
    assert choices_of(server, CHAT, body) == [(expected, "length")] * 3
    whole = client(server).chat.completions.create(model="m", messages=messages, n=3, temperature=0, max_tokens=12)
    assert whole.usage.completion_tokens == 3 * 12 and whole.usage.prompt_tokens == len(chat_ids(tiny.specials,
                                                                                                  messages))


@pytest.mark.parametrize("stream", [False, True])
def test_seeded_n_choices_equal_the_seeds_submitted_one_by_one(server, stream):
    body = {"prompt": "Once", "temperature": 1.0, "max_tokens": 16, "stream": stream}
    together = choices_of(server, "/v1/completions", {**body, "n": 3, "seed": 40})
    alone = [choices_of(server, "/v1/completions", {**body, "seed": 40 + i})[0] for i in range(3)]
    assert together == alone
    assert len({text for text, _ in together}) > 1  # really sampled, each choice with its own seed


def test_a_stop_string_ends_each_choice_on_its_own(server, tiny):
    messages = [{"role": "user", "content": "Stop somewhere."}]
    reference = naive_greedy_text(tiny.model, chat_ids(tiny.specials, messages), 30)
    i = next(i for i in range(8, 25) if "\ufffd" not in reference[i:i + 2])
    body = {"messages": messages, "n": 2, "temperature": 0, "max_tokens": 30, "stop": reference[i:i + 2]}
    expected = (reference[:reference.find(reference[i:i + 2])], "stop")
    assert choices_of(server, CHAT, body) == [expected] * 2
    assert choices_of(server, CHAT, {**body, "stream": True}) == [expected] * 2


def test_logprobs_false_is_accepted(server):
    body = {"messages": OK_MESSAGES, "logprobs": False, "max_tokens": 3, "temperature": 0}
    assert httpx.post(server.url + CHAT, json=body, timeout=60).status_code == 200


@pytest.mark.parametrize("chunked", [False, True])
def test_an_oversized_body_is_refused_by_its_size_before_it_is_parsed(server, chunked):
    import time

    prompt = "word " * 400_000  # 2 MB: tokenizing it would take seconds
    data = json.dumps({"prompt": prompt, "max_tokens": 5}).encode()

    def parts():  # no Content-Length: the size is counted as the body arrives
        for k in range(0, len(data), 65536):
            yield data[k:k + 65536]

    start = time.perf_counter()
    r = httpx.post(server.url + "/v1/completions", content=parts() if chunked else data,
                   headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large"
    assert time.perf_counter() - start < 1.5
    assert server.health()["status"] == "ok"


def test_int8_server_streams_what_the_int8_engine_gives_alone(tiny):
    """`serve --int8`: int8 weights (the banner says so), and 4 concurrent chats each get the tokens an
    in-process int8 engine gives that prompt alone (our int8 kernel keeps rows independent of their batch)."""
    import copy

    import torch

    from cogni_mamba.inference import Engine, greedy_settings, int8_kernel
    from cogni_mamba.inference.precision import prepare_model

    model = prepare_model(copy.deepcopy(tiny.model), torch.float32, quantize="int8")
    prompts = [f"Int8 question {i}?" for i in range(4)]
    ids = [chat_ids(tiny.specials, [{"role": "user", "content": p}]) for p in prompts]
    expected = [bytes(Engine(model, max_batch=1).submit(p, greedy_settings(16))).decode("utf-8", errors="replace")
                for p in ids]
    results: list = [None] * 4
    with live_server(tiny.path, "--int8", "--max-concurrency", "4") as server:
        assert "int8, batch up to 4" in server.output() and server.health()["weights"] == "int8"
        c = client(server)
        if not int8_kernel.available():  # fbgemm: a row follows its batch and the kept prefixes; only that it answers
            pytest.skip(f"the equality needs our int8 kernel: {int8_kernel.why_unavailable() or 'turned off'}")
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, stream_chat(
            c, model="m", messages=[{"role": "user", "content": prompts[i]}], temperature=0, max_tokens=16)))
            for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert [r[0] for r in results] == expected
