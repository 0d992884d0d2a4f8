"""The web chat page at `/`, driven in headless Chromium (Debian's `chromium`) through Playwright:
type a message, watch the reply stream in, check it against greedy decoding recomputed here, reset."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.test_serve_fixtures import chat_ids, live_server, make_tiny_checkpoint, naive_greedy_text

CHROMIUM = os.environ.get("COGNI_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(f"Chromium is not installed at {CHROMIUM} (Debian: apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the web page test needs Playwright (dev extra)")

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "page-key"
N_TOKENS = 120

# Counts every change to the newest reply bubble's text, so the test can see it grow piece by piece.
WATCH_REPLIES = """
window.__replyLengths = [];
new MutationObserver(() => {
  const replies = document.querySelectorAll('.msg.assistant .content');
  if (replies.length) window.__replyLengths.push(replies[replies.length - 1].textContent.length);
}).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("serve-web") / "run")


@pytest.fixture(scope="module")
def page(tiny):
    with live_server(tiny.path, "--api-key", KEY) as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(server.url + "/")
            yield page
        finally:
            browser.close()


def send(page, text: str) -> str:
    """Type a message, press Enter, wait for the reply to finish; its text."""
    page.evaluate("window.__replyLengths = []")
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function("document.getElementById('status').textContent.includes('tokens')")
    return page.locator(".msg.assistant .content").last.text_content()


@pytest.mark.slow
def test_web_chat_streams_a_reply_uses_the_controls_and_resets(page, tiny):
    page.evaluate(WATCH_REPLIES)
    # Without the key the page reports the server's 401 in place of a reply.
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(N_TOKENS))
    page.fill("#input", "hello?")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.error")
    assert "API key" in page.locator(".msg.error").last.text_content()

    page.click("#reset")
    assert page.locator(".msg").count() == 0
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.fill("#system", "You are terse.")
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi, who are you?"}]
    reply = send(page, messages[1]["content"])

    expected = naive_greedy_text(tiny.model, chat_ids(tiny.specials, messages), N_TOKENS)
    assert reply == expected
    lengths = page.evaluate("window.__replyLengths")
    grew = sorted({n for n in lengths if 0 < n < len(expected)})
    assert len(grew) >= 3, f"the reply did not stream in (text lengths seen: {lengths})"
    assert page.locator("#status").text_content() == f"{N_TOKENS} tokens, stopped at Max tokens"  # ran to the limit

    # A second turn sends the whole history; after a reset only the new message is sent.
    follow_up = "Tell me more."
    second = send(page, follow_up)
    history = [*messages, {"role": "assistant", "content": expected}, {"role": "user", "content": follow_up}]
    assert second == naive_greedy_text(tiny.model, chat_ids(tiny.specials, history), N_TOKENS)

    page.click("#reset")
    assert page.locator(".msg").count() == 0
    fresh = send(page, follow_up)
    assert fresh == naive_greedy_text(tiny.model, chat_ids(tiny.specials, [messages[0], history[-1]]), N_TOKENS)


@pytest.mark.slow
def test_web_chat_leaves_out_the_oldest_turns_when_the_context_is_full(page, tiny):
    import json
    import time

    from tests.test_serve_fixtures import CONTEXT

    page.click("#reset")
    page.fill("#system", "")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "16")
    first = "Hi!"
    reply = send(page, first)
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") else None)
    # Ask for so many tokens that the first exchange no longer fits beside the new message: the page
    # must retry without it instead of showing the server's context error.
    second = "And then?"
    room = CONTEXT - len(chat_ids(tiny.specials, [{"role": "user", "content": second}]))
    page.fill("#max-tokens", str(room))
    page.fill("#input", second)
    page.press("#input", "Enter")
    deadline = time.time() + 60
    while len(bodies) < 2 and time.time() < deadline:
        page.wait_for_timeout(50)
    # The long reply itself is not the point: stop it if it still runs (checked and clicked in the page at once).
    page.evaluate("() => { const stop = document.getElementById('stop'); if (!stop.disabled) stop.click(); }")
    page.wait_for_function("/tokens|stopped/.test(document.getElementById('status').textContent)")
    assert [b["messages"] for b in bodies] == [
        [{"role": "user", "content": first}, {"role": "assistant", "content": reply},
         {"role": "user", "content": second}],
        [{"role": "user", "content": second}],
    ]
    assert page.locator(".msg.error").count() == 0


@pytest.mark.slow
def test_a_ten_turn_conversation_with_a_256_token_model_keeps_answering(page, tmp_path):
    """The demo model's case: context 256, 128 tokens a reply. From the third turn the history no longer fits;
    every turn must still be answered, from the newest exchanges that fit, as greedy decoding of what was sent."""
    import json

    small = make_tiny_checkpoint(tmp_path / "run", context=256)
    with live_server(small.path) as server:
        page = page.context.browser.new_page()  # the module's browser (one Playwright per process), a new tab
        try:
            page.set_default_timeout(60_000)
            page.goto(server.url + "/")
            page.fill("#system", "Be kind.")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "128")
            sent: list[dict] = []
            page.on("request", lambda r: sent.append(json.loads(r.post_data))
                    if r.url.endswith("/v1/chat/completions") else None)
            notes = []
            for turn in range(10):
                sent.clear()
                reply = send(page, f"Message number {turn}, please answer.")
                answered = sent[-1]["messages"]  # the request that was answered (earlier ones got a 400)
                assert len(chat_ids(small.specials, answered)) + 128 <= 256
                assert answered[-1]["content"] == f"Message number {turn}, please answer."
                assert reply == naive_greedy_text(small.model, chat_ids(small.specials, answered), 128)
                notes.append(page.locator("#status").text_content())
            assert page.locator(".msg.error").count() == 0
            assert page.locator(".msg.assistant").count() == 10
            assert all(n.startswith("128 tokens") for n in notes) and "left out" in notes[-1]
        finally:
            page.close()
