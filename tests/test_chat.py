"""The Chatbot against a naive reference: render the conversation with the tokenizer's template,
decode greedily by full recomputation, cut at the turn-ending ids, decode the ids to text."""

from __future__ import annotations

import pytest
import torch

from cogni_mamba.chat import Chatbot, fit_history, reply_budget
from cogni_mamba.config import GenerationConfig, ModelConfig
from cogni_mamba.errors import CogniError
from cogni_mamba.model import CogniMamba
from cogni_mamba.tokenizer import SimpleTokenizer
from tests.references import naive_reply

GREEDY = GenerationConfig(temperature=0.0, max_new_tokens=48)





@pytest.fixture(scope="module")
def tok():
    return SimpleTokenizer()


def tiny_model(vocab: int, max_seq_len: int = 384) -> CogniMamba:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, hidden_dim=128,
                      max_seq_len=max_seq_len, init_std=0.3)  # 0.3: a random model that does not loop on one token
    return CogniMamba(cfg).eval()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.vocab_size)


def test_two_turns_match_the_naive_reference_and_pieces_join_to_the_text(model, tok):
    bot = Chatbot(model, tok, GREEDY, system_prompt="Be brief.")
    pieces = list(bot.reply("Hello there!"))
    sys_msg = {"role": "system", "content": "Be brief."}
    first = naive_reply(model, tok, [sys_msg, {"role": "user", "content": "Hello there!"}], 48)
    assert len(first) > 5  # the reference answer is not trivially empty
    assert "".join(pieces) == first == bot.turns[-1]["content"]
    second = bot.chat("And then?")
    expected = naive_reply(model, tok, [sys_msg, {"role": "user", "content": "Hello there!"},
                                        {"role": "assistant", "content": first},
                                        {"role": "user", "content": "And then?"}], 48)
    assert second == expected
    assert [m["role"] for m in bot.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_sampled_pieces_join_to_the_recorded_answer_and_seed_repeats(model, tok):
    cfg = GenerationConfig(temperature=1.0, top_k=None, top_p=None, max_new_tokens=60, seed=7)
    bot = Chatbot(model, tok, cfg)
    pieces = list(bot.reply("Tell me a story"))
    assert "".join(pieces) == bot.turns[-1]["content"]
    bot.reset()
    assert bot.turns == []
    assert bot.chat("Tell me a story") == "".join(pieces)


def test_stop_string_spanning_tokens_cuts_the_reply_exactly(model, tok):
    reference = naive_reply(model, tok, [{"role": "user", "content": "hi"}], 48)
    stop = reference[4:7]
    assert len(tok.encode(stop)) >= 3  # spans several tokens of the byte-level tokenizer
    bot = Chatbot(model, tok, GREEDY, system_prompt=None)
    pieces = list(bot.reply("hi", stop=[stop]))
    assert "".join(pieces) == reference[:reference.index(stop)]
    assert bot.finish_reason == "stop"


def test_per_call_settings_do_not_change_the_defaults(model, tok):
    bot = Chatbot(model, tok, GREEDY)
    short = bot.chat("hi", max_new_tokens=3)
    assert len(tok.encode(short)) <= 3
    assert bot.settings == GREEDY
    bot.configure(max_new_tokens=5)
    assert bot.settings.max_new_tokens == 5 and bot.settings.temperature == 0.0
    with pytest.raises(CogniError, match="valid settings are"):
        bot.chat("hi", temprature=0.5)
    with pytest.raises(CogniError, match="temperature"):
        bot.configure(temperature=-1.0)


def test_closing_a_reply_early_keeps_what_was_streamed(model, tok):
    bot = Chatbot(model, tok, GREEDY)
    stream = bot.reply("Hello there!")
    first = next(stream)
    stream.close()
    assert bot.turns[-1] == {"role": "assistant", "content": first}


# --- history trimming ---------------------------------------------------------------------------------

def naive_fit(system, turns, count, budget):
    """The longest suffix of turns starting at a user message that fits; else only the newest turn."""
    starts = [i for i, m in enumerate(turns) if m["role"] == "user"]
    for i in starts:
        if count(system + turns[i:]) <= budget:
            return system + turns[i:]
    return system + turns[-1:]


@pytest.mark.parametrize("budget", [0, 10, 25, 40, 60, 1000])
def test_fit_history_keeps_the_system_prompt_and_the_newest_turn(budget):
    system = [{"role": "system", "content": "sys"}]
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "answer " * i}]
    turns.append({"role": "user", "content": "newest"})
    count = lambda msgs: sum(len(m["content"]) for m in msgs)  # noqa: E731
    kept = fit_history(system, turns, count, budget)
    assert kept == naive_fit(system, turns, count, budget)
    assert kept[0] == system[0] and kept[-1] == turns[-1]


def test_long_conversation_is_trimmed_to_fit_the_context(tok):
    model = tiny_model(tok.vocab_size, max_seq_len=160)
    bot = Chatbot(model, tok, GREEDY, system_prompt="SYSTEM PROMPT")
    for i in range(8):
        bot.turns += [{"role": "user", "content": f"question number {i} " * 2},
                      {"role": "assistant", "content": f"answer number {i} " * 2}]
    ids = bot.prompt_ids([*bot.turns, {"role": "user", "content": "NEWEST"}], GREEDY.max_new_tokens)
    text = tok.decode(ids)
    assert len(ids) <= reply_budget(160, GREEDY.max_new_tokens)
    assert text.startswith("<|endoftext|><|system|>SYSTEM PROMPT<|end|><|user|>question number")
    assert text.endswith("<|user|>NEWEST<|end|><|assistant|>")
    assert "question number 0" not in text and "answer number 7" in text
    bot.chat("NEWEST")  # generation fits too
    assert len(bot.turns) == 18  # the stored history keeps everything


def test_message_longer_than_the_context_is_refused_without_changing_history(tok):
    model = tiny_model(tok.vocab_size, max_seq_len=64)
    bot = Chatbot(model, tok, GREEDY)
    with pytest.raises(CogniError, match="send a shorter message"):
        bot.reply("x" * 100)
    assert bot.turns == []


def test_missing_checkpoint_is_one_clear_sentence(tmp_path):
    with pytest.raises(CogniError, match="does not exist"):
        Chatbot.from_checkpoint(tmp_path / "nope")
