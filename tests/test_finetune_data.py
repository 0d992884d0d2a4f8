"""Chat data files (formats, per-line errors) and make-chat-data (TinyStories / CodeSearchNet conversations)."""

from __future__ import annotations

import ast
import json
import re

import pytest

from cogni_mamba.cli import main
from cogni_mamba.finetune.chat_data import ChatDataError, read_chat_file, write_chat_file
from cogni_mamba.finetune.make_data import (
    code_chat,
    sample_in_order,
    split_sentences,
    story_continuation,
    story_nouns,
    story_request,
)


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --- reading chat files ------------------------------------------------------------------------

def test_both_formats_and_bad_lines_reported_with_line_numbers(tmp_path):
    good = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello!"}]}
    path = _write(tmp_path / "chats.jsonl", [
        json.dumps(good),                                                            # 1 ok
        '{"messages": [',                                                            # 2 broken JSON
        json.dumps({"messages": [{"role": "bot", "content": "x"}]}),                 # 3 unknown role
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),  # 4 nothing to learn
        "",                                                                          # 5 blank: ignored
        json.dumps({"prompt": "2+2?", "response": "4", "system": "Math."}),          # 6 ok
        json.dumps(["not", "an", "object"]),                                         # 7 a list
        json.dumps({"text": "plain"}),                                               # 8 wrong keys
        json.dumps({"messages": [{"role": "assistant", "content": 7}]}),             # 9 content not a string
    ])
    chat = read_chat_file(path)
    assert chat.conversations == [
        good["messages"],
        [{"role": "system", "content": "Math."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}],
    ]
    lines = [int(re.match(r".*chats\.jsonl:(\d+): ", p).group(1)) for p in chat.problems]
    assert lines == [2, 3, 4, 7, 8, 9]
    assert "not valid JSON" in chat.problems[0]
    assert "'bot'" in chat.problems[1] and "assistant" in chat.problems[1]
    assert "no non-empty assistant message" in chat.problems[2]
    assert "6 lines skipped" in chat.summary() or "6 lines skipped" in chat.summary().replace(",", "")


def test_file_without_good_lines_is_one_clear_error(tmp_path):
    path = _write(tmp_path / "bad.jsonl", ["{oops", json.dumps({"messages": []})])
    with pytest.raises(ChatDataError, match=r"bad\.jsonl holds no usable conversation.*bad\.jsonl:1"):
        read_chat_file(path)
    with pytest.raises(ChatDataError, match="does not exist"):
        read_chat_file(tmp_path / "missing.jsonl")
    empty = _write(tmp_path / "empty.jsonl", [])
    with pytest.raises(ChatDataError, match="empty"):
        read_chat_file(empty)


def test_write_then_read_round_trip_and_no_temp_left(tmp_path):
    convs = [[{"role": "user", "content": "ünïcode <|end|>"}, {"role": "assistant", "content": "ok"}]] * 3
    assert write_chat_file(convs, tmp_path / "out.jsonl") == 3
    assert read_chat_file(tmp_path / "out.jsonl").conversations == convs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


# --- conversations from stories ----------------------------------------------------------------

STORY = ("Once there was a little dog named Max. Max saw a big red ball in the park. "
         "The dog ran to the ball and barked. \"Can I play?\" he asked. A kind girl was there.")


def test_story_nouns_prefer_repeated_nouns_after_a():
    # Hand-checked: after "a"/"an" the phrases are "little dog", "big red ball", "kind girl";
    # dog and ball appear twice each (dog first), girl once.
    assert story_nouns(STORY) == ["dog", "ball", "girl"]
    assert story_nouns("No articles here at all.") == []


def test_story_request_and_continuation_rebuild_the_story():
    import random

    chat = story_request(STORY, random.Random(0))
    assert re.fullmatch(r".*\ba dog\b.*", chat[0]["content"]) and chat[1]["content"] == STORY
    for seed in range(5):
        user, reply = story_continuation(STORY, random.Random(seed))
        head = user["content"].removeprefix("Continue this story: ")
        assert user["content"].startswith("Continue this story: ")
        assert f"{head} {reply['content']}" == STORY
        assert head.endswith((".", "!", "?", '"'))
    assert split_sentences(STORY)[3] == "\"Can I play?\" he asked."


def _stories(path):
    return [s.strip() for s in path.read_text(encoding="utf-8").split("<|endoftext|>") if s.strip()]


def test_make_chat_data_from_tinystories_sample(shared_data, tmp_path):
    src = shared_data / "tinystories" / "TinyStories-sample.txt"
    out = tmp_path / "chats.jsonl"
    assert main(["make-chat-data", "--source", f"tinystories:{src}", "--out", str(out), "--n", "200"]) == 0
    chats = read_chat_file(out).conversations
    assert len(chats) == 200
    stories = set(_stories(src))
    normalise = " ".join
    by_words = {normalise(s.split()) for s in stories}
    kinds = {"about": 0, "continue": 0}
    for (user, reply) in chats:
        assert (user["role"], reply["role"]) == ("user", "assistant")
        if user["content"].startswith("Continue this story: "):
            kinds["continue"] += 1
            joined = user["content"].removeprefix("Continue this story: ") + " " + reply["content"]
            assert normalise(joined.split()) in by_words
        else:
            kinds["about"] += 1
            noun = re.search(r"about an? (\w+)", user["content"]).group(1)
            assert reply["content"] in stories
            assert re.search(rf"\b{noun}\b", reply["content"], re.IGNORECASE)
    assert kinds["about"] > 50 and kinds["continue"] > 50


def test_make_chat_data_is_deterministic(shared_data, tmp_path):
    src = f"tinystories:{shared_data / 'tinystories' / 'TinyStories-sample.txt'}"
    paths = [tmp_path / f"{i}.jsonl" for i in range(3)]
    for path, seed in zip(paths, ("1", "1", "2"), strict=True):
        assert main(["make-chat-data", "--source", src, "--out", str(path), "--n", "50", "--seed", seed]) == 0
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()


def test_sample_in_order_is_uniform_and_ordered():
    picks = sample_in_order(range(100), 10, seed=3)
    assert len(picks) == 10 and picks == sorted(picks) and len(set(picks)) == 10
    assert sample_in_order(range(5), 10, seed=3) == list(range(5))
    # Each item should be picked about n/N = 20% of the time over many seeds.
    counts = [0] * 20
    for seed in range(2000):
        for i in sample_in_order(range(20), 4, seed):
            counts[i] += 1
    assert all(300 < c < 500 for c in counts), counts


# --- conversations from code -------------------------------------------------------------------

CODE = 'def add(a, b):\r\n    """Add two numbers.\r\n\r\n    Longer text here.\r\n    """\r\n    return a + b\r\n'


def test_code_chats_hide_the_docstring_in_the_question():
    import random

    kinds = set()
    for seed in range(10):
        user, reply = code_chat("Add two numbers.\n\nLonger text here.", CODE, random.Random(seed))
        if user["content"].startswith("What does this function do?"):
            kinds.add("explain")
            assert reply["content"] == "Add two numbers."
            assert "Add two numbers" not in user["content"]
            assert "return a + b" in user["content"]
        else:
            kinds.add("write")
            assert "Add two numbers." in user["content"]
            tree = ast.parse(reply["content"])
            assert ast.get_docstring(tree.body[0]) is None and "\r" not in reply["content"]
    assert kinds == {"explain", "write"}
    assert code_chat("", CODE, random.Random(0)) is None  # no docstring: nothing to ask


def test_make_chat_data_from_codesearchnet_sample(shared_data, tmp_path):
    src = shared_data / "codesearchnet" / "python_sample.jsonl"
    records = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    summaries = {" ".join(re.split(r"\n\s*\n", r["docstring"].strip())[0].split()) for r in records}
    out = tmp_path / "code.jsonl"
    assert main(["make-chat-data", "--source", f"codesearchnet:{src}", "--out", str(out)]) == 0
    chats = read_chat_file(out).conversations
    assert 0 < len(chats) <= len(records)
    for user, reply in chats:
        if user["content"].startswith("What does this function do?\n"):
            assert reply["content"] in summaries
        else:
            assert reply["content"].lstrip().startswith(("def ", "async def ", "@"))


def test_make_chat_data_errors(tmp_path, capsys):
    assert main(["make-chat-data", "--source", "wiki:x", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "Unknown chat-data source 'wiki:x'" in capsys.readouterr().err
    assert main(["make-chat-data", "--source", f"tinystories:{tmp_path / 'nope.txt'}",
                 "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
