"""Server operations: the API key, the full-queue 429 and a graceful SIGTERM, each against a live
`cogni-mamba serve` subprocess on 127.0.0.1 (the engine's FIFO admission is tested in test_engine.py)."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest

from tests.test_serve_fixtures import CONTEXT, httpx, live_server, make_tiny_checkpoint, wait_for

openai = pytest.importorskip("openai", reason="the server tests use the official openai client (dev extra)")

KEY = "s3cret-key"
CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("serve-ops") / "run")


@pytest.fixture(scope="module")
def keyed(tiny):
    """A server that wants an API key and batches one generation at a time with one waiting."""
    with live_server(tiny.path, "--api-key", KEY, "--max-concurrency", "1", "--queue-size", "1") as s:
        yield s


# --- API key --------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}])
def test_v1_without_the_key_is_401(keyed, headers):
    for method, path, body in (("GET", "/v1/models", None), ("POST", CHAT, {"messages": HELLO, "max_tokens": 2}),
                               ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2})):
        r = httpx.request(method, keyed.url + path, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key" and "Bearer" in r.json()["error"]["message"]
    assert httpx.get(keyed.url + "/health").status_code == 200  # health and the page stay open
    assert httpx.get(keyed.url + "/").status_code == 200


def test_the_openai_client_with_the_key_works_and_without_it_is_refused(keyed):
    good = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0)
    reply = good.chat.completions.create(model="m", messages=HELLO, max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens == 3
    bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# --- a full queue ---------------------------------------------------------------------------------

def test_requests_beyond_the_queue_get_429_and_the_queued_one_runs_later(keyed):
    auth = {"Authorization": f"Bearer {KEY}"}
    hang_up = threading.Event()
    results: dict[str, object] = {}

    def long_stream() -> None:  # holds the only slot until told to hang up
        body = {"messages": HELLO, "max_tokens": CONTEXT - 50, "temperature": 0, "stream": True}
        with httpx.Client(timeout=120) as http, http.stream("POST", keyed.url + CHAT, json=body, headers=auth) as r:
            for _ in r.iter_lines():
                if hang_up.is_set():
                    break

    def queued() -> None:
        r = httpx.post(keyed.url + CHAT, json={"messages": HELLO, "max_tokens": 5, "temperature": 0},
                       headers=auth, timeout=120)
        results["queued"] = (r.status_code, r.json())

    first = threading.Thread(target=long_stream)
    first.start()
    try:
        assert wait_for(lambda: keyed.health()["active_generations"] == 1, 30)
        second = threading.Thread(target=queued)
        second.start()
        assert wait_for(lambda: keyed.health()["queued"] == 1, 30)

        r = httpx.post(keyed.url + CHAT, json={"messages": HELLO, "max_tokens": 5}, headers=auth, timeout=30)
        assert r.status_code == 429 and r.headers.get("retry-after")
        assert "busy" in r.json()["error"]["message"] and r.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0).chat.completions.create(
                model="m", messages=HELLO, max_tokens=5)
    finally:
        hang_up.set()
        first.join(timeout=60)
    second.join(timeout=60)
    status, body = results["queued"]
    assert status == 200 and body["usage"]["completion_tokens"] == 5 and body["choices"][0]["finish_reason"] == "length"
    assert wait_for(lambda: (keyed.health()["active_generations"], keyed.health()["queued"]) == (0, 0), 10)


# --- SIGTERM --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_lets_in_flight_requests_finish_then_exits(tiny):
    n = 900
    results: dict[str, object] = {}
    body = {"messages": HELLO, "max_tokens": n, "temperature": 0}

    with live_server(tiny.path, "--max-concurrency", "2", "--engine", "process") as server:
        def whole() -> None:
            r = httpx.post(server.url + CHAT, json=body, timeout=300)
            results["whole"] = (r.status_code, r.json())

        def streamed() -> None:
            with httpx.stream("POST", server.url + CHAT, json={**body, "stream": True}, timeout=300) as r:
                lines = [line for line in r.iter_lines() if line]
            results["stream"] = (r.status_code, lines)

        threads = [threading.Thread(target=whole), threading.Thread(target=streamed)]
        for t in threads:
            t.start()
        assert wait_for(lambda: server.health()["active_generations"] == 2, 30)
        server.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=300)
        # uvicorn re-raises the signal once it has shut down, so the exit status is -SIGTERM, as it would
        # be for a hard kill: the finished replies and the log are what show the shutdown was graceful.
        children = engine_children(server.proc.pid)
        assert server.proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert children and wait_for(lambda: not any(Path(f"/proc/{c}").exists() for c in children), 10)

    status, reply = results["whole"]
    assert status == 200 and reply["usage"]["completion_tokens"] == n and reply["choices"][0]["finish_reason"] == "length"
    status, lines = results["stream"]
    assert status == 200 and lines[-1] == "data: [DONE]"
    finishes = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines[:-1]]
    assert finishes[-1] == "length"
    log = server.output()
    # uvicorn logs a non-streamed request when its reply is sent: that happened after the shutdown began.
    assert 'POST /v1/chat/completions HTTP/1.1" 200' in log.split("Shutting down", 1)[1]
    assert "Application shutdown complete" in log
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=5)


def engine_children(pid: int) -> list[int]:
    """The engine processes `pid` started (spawned interpreters; not multiprocessing's resource tracker), from /proc."""
    tasks = Path(f"/proc/{pid}/task")
    children = [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()] if tasks.exists() else []
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the engine process through Linux's /proc")
def test_when_the_engine_process_dies_requests_get_one_sentence_and_health_says_so(tiny):
    with live_server(tiny.path, "--engine", "process") as server:
        children = engine_children(server.proc.pid)
        assert len(children) == 1  # the model runs in a process of its own
        assert httpx.post(server.url + CHAT, json={"messages": HELLO, "max_tokens": 3}, timeout=60).status_code == 200
        os.kill(children[0], signal.SIGKILL)
        assert wait_for(lambda: httpx.get(server.url + "/health", timeout=10).status_code == 503, 10)
        assert server.health()["status"] == "engine stopped"
        r = httpx.post(server.url + CHAT, json={"messages": HELLO, "max_tokens": 3}, timeout=60)
        assert r.status_code == 503
        message = r.json()["error"]["message"]
        assert "engine process stopped" in message and "restart" in message and "\n" not in message
        server.stop()
        assert "Traceback" not in server.output()


# --- a stop token, in process ---------------------------------------------------------------------

def test_a_stop_token_ends_the_reply_with_finish_reason_stop(tiny):
    import copy

    import torch

    from cogni_mamba.config import GenerationConfig
    from cogni_mamba.inference import stream_text
    from cogni_mamba.serve import Service
    from cogni_mamba.tokenizer import SimpleTokenizer
    from tests.test_serve_fixtures import chat_ids

    tok = SimpleTokenizer()
    model = copy.deepcopy(tiny.model)
    end = tiny.specials["<|end|>"]
    with torch.no_grad():  # <|end|> now scores 1.1x the byte "e": it wins wherever "e" scores high enough
        model.tok_embeddings.weight[end] = 1.1 * model.tok_embeddings.weight[ord("e")]
    prompt = chat_ids(tiny.specials, HELLO)
    stops = {end, tiny.specials["<|endoftext|>"], *(tiny.specials[f"<|{r}|>"] for r in ("system", "user", "assistant"))}

    new: list[int] = []  # the reference: argmax without a cache until a stop id comes up
    with torch.no_grad():
        while len(new) < 300 and not (new and new[-1] in stops):
            new.append(int(model(torch.tensor([prompt + new]))[0, -1].argmax()))
    assert new[-1] in stops and len(new) > 3, "precondition: a stop token after a few bytes, within 300 steps"
    reply = new[:-1]

    service = Service(model, tok, GenerationConfig(temperature=0, top_k=None, top_p=None))
    prompt_ids = service.chat_prompt(HELLO)
    assert prompt_ids == prompt
    [request] = service.submit(prompt_ids, service.settings(300, {}), service.chat_stop_ids())
    text = "".join(stream_text(request, service.decoder()))
    assert text == bytes(reply).decode("utf-8", errors="replace")
    assert request.finish_reason == "stop" and request.completion_tokens == len(reply)


def test_cpu_default_batches_eight_generations(tiny):
    # Continuous batching: a decode step for 8 rows costs little more than for one on a CPU.
    with live_server(tiny.path) as s:  # LiveServer passes --device cpu
        assert s.health()["max_batch"] == 8
