"""SFT: assistant-only labels and loss, padding, the batch source, truncation, the finetune command, resume."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cogni_mamba.cli import main
from cogni_mamba.config import Config, DataConfig, ModelConfig, TrainConfig
from cogni_mamba.errors import CogniError
from cogni_mamba.finetune import (
    ChatBatches,
    collate,
    encode_conversation,
    encode_conversations,
    split_train_val,
)
from cogni_mamba.model import CogniMamba
from cogni_mamba.tokenizer import SimpleTokenizer
from cogni_mamba.train import Trainer
from cogni_mamba.train.checkpoint import load_checkpoint, save_checkpoint

TOK = SimpleTokenizer()
CHAT = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


def tiny_model(vocab: int = TOK.vocab_size, max_seq_len: int = 64) -> CogniMamba:
    return CogniMamba(ModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=vocab, hidden_dim=64,
                                  max_seq_len=max_seq_len))


def assistant_targets(ids: list[int]) -> list[bool]:
    """Independent of render_chat's mask: True for ids inside <|assistant|> ... <|end|> (end included)."""
    inside, out = False, []
    for tok in ids:
        if tok == TOK.role_ids["assistant"]:
            inside = True
            out.append(False)  # the role token itself is the prompt's
            continue
        out.append(inside)
        if tok == TOK.end_id:
            inside = False
    return out


# --- labels and the loss ----------------------------------------------------------------------

def test_labels_are_next_assistant_tokens_only():
    ids, _ = TOK.render_chat(CHAT)
    (x, y), truncated = encode_conversation(CHAT, TOK, max_len=1000)
    assert not truncated and x == ids[:-1]
    learn = assistant_targets(ids)
    expected = [ids[t + 1] if learn[t + 1] else -100 for t in range(len(ids) - 1)]
    assert y == expected
    # Closed form with byte tokens: "Hello!" + <|end|> and "4" + <|end|> are learned, nothing else.
    assert sum(label != -100 for label in y) == (6 + 1) + (1 + 1)
    assert TOK.decode([label for label in y if label != -100]) == "Hello!<|end|>4<|end|>"


def test_loss_is_the_mean_nll_of_assistant_tokens_against_a_naive_loop():
    torch.manual_seed(1)
    model = tiny_model()
    (x, y), _ = encode_conversation(CHAT, TOK, max_len=1000)
    xt, yt = torch.tensor([x]), torch.tensor([y])
    with torch.no_grad():
        logits, loss = model(xt, yt)
    ids, _ = TOK.render_chat(CHAT)
    learn = assistant_targets(ids)
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    terms = [-logp[t, ids[t + 1]] for t in range(len(ids) - 1) if learn[t + 1]]
    assert loss.item() == pytest.approx(float(sum(terms) / len(terms)), rel=1e-5)


def test_user_positions_contribute_nothing_and_assistant_positions_do():
    torch.manual_seed(2)
    (x, y), _ = encode_conversation(CHAT, TOK, max_len=1000)
    yt = torch.tensor(y)
    logits = torch.randn(len(x), TOK.vocab_size, requires_grad=True)
    loss = F.cross_entropy(logits, yt, ignore_index=-100)
    loss.backward()
    ids, _ = TOK.render_chat(CHAT)
    learn = torch.tensor(assistant_targets(ids)[1:])
    # Changing anything the model predicts at user/system/template positions cannot change the loss ...
    assert torch.all(logits.grad[~learn] == 0)
    assert torch.all(logits.grad[learn].abs().sum(-1) > 0)
    with torch.no_grad():
        moved = logits.detach().clone()
        moved[~learn] += 10 * torch.randn_like(moved[~learn])
        assert F.cross_entropy(moved, yt, ignore_index=-100).item() == loss.item()
        # ... while one assistant position does.
        first = int(learn.nonzero()[0])
        moved[first] += 10 * torch.randn(TOK.vocab_size)
        assert F.cross_entropy(moved, yt, ignore_index=-100).item() != loss.item()
    # And the same conversation with a different user message (same length) has the same label set.
    other = [dict(m) for m in CHAT]
    other[1]["content"] = "Yo, here"
    (x2, y2), _ = encode_conversation(other, TOK, max_len=1000)
    assert x2 != x and y2 == y


def test_padded_batch_loss_equals_per_conversation_token_weighted_loss():
    torch.manual_seed(3)
    model = tiny_model()
    convs = [CHAT, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "a much longer reply"}],
             [{"role": "user", "content": "long question " * 3}, {"role": "assistant", "content": "ok"}]]
    examples = [encode_conversation(c, TOK, 1000)[0] for c in convs]
    x, y = collate(examples, TOK.pad_id)
    assert x.shape == (3, max(len(e[0]) for e in examples))
    _, batch_loss = model(x, y)
    total, count = 0.0, 0
    for ex_x, ex_y in examples:  # each conversation alone, unpadded
        logits = model(torch.tensor([ex_x]))[0]
        keep = torch.tensor(ex_y) != -100
        total += F.cross_entropy(logits[keep], torch.tensor(ex_y)[keep], reduction="sum").item()
        count += int(keep.sum())
    assert batch_loss.item() == pytest.approx(total / count, rel=1e-5)


def test_long_conversations_are_truncated_or_skipped_and_counted():
    long_reply = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x" * 100}]
    long_prompt = [{"role": "user", "content": "q" * 100}, {"role": "assistant", "content": "y"}]
    short = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]  # 7 tokens
    examples, stats = encode_conversations([short, long_reply, long_prompt], TOK, max_len=32)
    assert (stats.kept, stats.truncated, stats.skipped_too_long) == (2, 1, 1)
    x, y = examples[1]
    # <eos><user>h i<end><assistant> is 6 tokens; inputs 0..31 predict tokens 1..32, of which 6..32 are "x".
    assert len(x) == len(y) == 32
    assert sum(label != -100 for label in y) == 32 - 5
    assert "truncated" in stats.summary(32) and "skipped" in stats.summary(32)
    with pytest.raises(CogniError, match="None of the 1 conversations"):
        encode_conversations([long_prompt], TOK, max_len=32)


def test_system_prompt_goes_to_about_half_of_the_conversations_without_one():
    from cogni_mamba.finetune.sft import add_system_prompt

    plain = [[{"role": "user", "content": str(i)}, {"role": "assistant", "content": "ok"}] for i in range(400)]
    own = [[{"role": "system", "content": "mine"}, *plain[0]]]
    out = add_system_prompt(plain + own, "Be nice.", seed=3)
    given = [c for c in out[:400] if c[0] == {"role": "system", "content": "Be nice."}]
    assert 160 < len(given) < 240  # Binomial(400, 1/2): 5 standard deviations either side
    assert all(c[1:] == p for c, p in zip(out[:400], plain, strict=True) if c in given)
    assert out[400] == own[0] and add_system_prompt(plain + own, "Be nice.", seed=3) == out
    assert add_system_prompt(plain, "", seed=3) == plain


# --- batches --------------------------------------------------------------------------------------

def numbered(n: int, length: int = 5) -> list[tuple[list[int], list[int]]]:
    return [([i] * length, [i] * length) for i in range(n)]


def rows_of(batch) -> list[int]:
    return batch[0][:, 0].tolist()


def test_each_epoch_visits_every_example_and_reshuffles():
    source = ChatBatches(numbered(10), batch_size=4, pad_id=0, seed=5)
    assert source.batches_per_epoch == 3
    epochs = []
    for _ in range(2):
        seen = [r for _ in range(3) for r in rows_of(next(source))]
        assert sorted(seen[:10]) == list(range(10))  # a permutation, then 2 rows wrapped around
        assert seen[10:] == seen[:2]
        epochs.append(seen)
    assert epochs[0] != epochs[1] and source.epoch == 2


def test_state_dict_resume_gives_the_same_batches():
    a = ChatBatches(numbered(7), batch_size=3, pad_id=0, seed=1)
    for _ in range(4):
        next(a)
    b = ChatBatches(numbered(7), batch_size=3, pad_id=0, seed=1)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # survives plain serialisation
    assert [rows_of(next(a)) for _ in range(6)] == [rows_of(next(b)) for _ in range(6)]
    with pytest.raises(CogniError, match="same --data"):
        ChatBatches(numbered(8), batch_size=3, pad_id=0, seed=1).load_state_dict(a.state_dict())


def test_ranks_take_disjoint_rows():
    ranks = [ChatBatches(numbered(16), batch_size=4, pad_id=0, seed=2, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == 2
    seen = []
    for _ in range(2):
        rows = [rows_of(next(r)) for r in ranks]
        assert not set(rows[0]) & set(rows[1])
        seen += rows[0] + rows[1]
    assert sorted(seen) == list(range(16))


def test_split_is_seeded_and_sized():
    train, val = split_train_val(list(range(100)), 0.1, seed=4)
    assert len(val) == 10 and sorted(train + val) == list(range(100))
    assert split_train_val(list(range(100)), 0.1, seed=4) == (train, val)
    assert split_train_val(list(range(3)), 0.01, seed=4)[1] and not split_train_val([1, 2], 0.0, seed=4)[1]
    with pytest.raises(CogniError, match="too few"):
        split_train_val([1], 0.5, seed=0)


# --- the finetune command -------------------------------------------------------------------------

def pretrained(tmp_path, *, dim=32, seq_len=64):
    """A randomly initialised 'pretrained' checkpoint with the byte tokenizer."""
    torch.manual_seed(0)
    model = tiny_model(max_seq_len=seq_len) if dim == 32 else CogniMamba(ModelConfig(
        dim=dim, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=TOK.vocab_size, hidden_dim=3 * dim,
        max_seq_len=seq_len))
    cfg = Config(model=model.config, data=DataConfig(seq_len=seq_len),
                 train=TrainConfig(batch_size=4, grad_accum=2, lr=1e-2, min_lr=1e-3, warmup_steps=2,
                                   eval_interval=4, save_interval=3, precision="fp32"))
    save_checkpoint(tmp_path / "pre", "step-0", model, cfg, tokenizer=TOK)
    return tmp_path / "pre"


def chat_lines(n: int) -> list[str]:
    return [json.dumps({"prompt": f"What comes after {i}?", "response": f"{i + 1}."}) for i in range(n)]


def finetune_args(pre, data, out, *extra):
    return ["finetune", "--checkpoint", str(pre), "--data", str(data), "--out", str(out), "--quiet",
            "--device", "cpu", *extra]


def losses(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


def test_finetune_writes_a_chat_checkpoint_and_reports_bad_lines(tmp_path, capsys):
    pre = pretrained(tmp_path)
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(chat_lines(30) + ['{"broken', json.dumps({"messages": [{"role": "x"}]})]) + "\n")
    out = tmp_path / "chat"
    assert main(finetune_args(pre, data, out, "--max-steps", "3", "--set", "train.lr=5e-3")) == 0
    text = capsys.readouterr().out
    assert "30 conversations, 2 lines skipped" in text and "chats.jsonl:31" in text and "chats.jsonl:32" in text
    model, tok = load_checkpoint(out)
    saved = json.loads((out / "step-3" / "config.json").read_text())
    assert saved["train"]["lr"] == 5e-3 and saved["train"]["max_steps"] == 3
    assert tok.fingerprint == TOK.fingerprint and model.config == load_checkpoint(pre)[0].config
    # A second run into the same folder without --resume is refused rather than mixed in.
    assert main(finetune_args(pre, data, out, "--max-steps", "3")) == 2
    assert "--resume" in capsys.readouterr().err


def test_finetune_defaults_scale_the_pretraining_lr(tmp_path):
    from cogni_mamba.finetune import plan_finetune

    pre = pretrained(tmp_path)
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(chat_lines(40)) + "\n")
    plan = plan_finetune(pre, data, out_dir=tmp_path / "o", val_fraction=0.1, progress=False, device="cpu")
    t = plan.config.train
    assert (t.lr, t.min_lr, t.max_steps, t.epochs) == (pytest.approx(1e-3), pytest.approx(1e-4), None, 3)
    # 36 training conversations in batches of 4, 2 micro-batches per step: 9 batches -> 4 steps an epoch.
    assert plan.trainer.total_steps == 3 * (9 // 2) and plan.val_conversations == 4


def test_finetune_errors_are_one_sentence(tmp_path, capsys):
    pre = pretrained(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert main(finetune_args(pre, bad, tmp_path / "o")) == 2
    assert "bad.jsonl holds no usable conversation" in capsys.readouterr().err
    assert main(finetune_args(tmp_path / "nope", bad, tmp_path / "o")) == 2
    assert "does not exist" in capsys.readouterr().err
    no_tok = tmp_path / "notok"
    save_checkpoint(no_tok, "step-0", tiny_model(), Config(model=tiny_model().config))
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(chat_lines(10)) + "\n")
    assert main(finetune_args(no_tok, good, tmp_path / "o2")) == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_interrupted_finetune_resumes_exactly(tmp_path, monkeypatch):
    pre = pretrained(tmp_path)
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(chat_lines(40)) + "\n")
    args = ("--max-steps", "8", "--val-fraction", "0.1")
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(finetune_args(pre, data, full, *args)) == 0

    original = Trainer.train_step

    def interrupt_at_step_3(self):
        out = original(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does: the trainer saves and stops
        return out

    monkeypatch.setattr(Trainer, "train_step", interrupt_at_step_3)
    assert main(finetune_args(pre, data, cut, *args)) == 0
    assert losses(cut)[-1][0] == 3 and (cut / "step-3").is_dir()
    monkeypatch.setattr(Trainer, "train_step", original)
    assert main(finetune_args(pre, data, cut, *args, "--resume")) == 0

    assert losses(cut) == losses(full) and len(losses(full)) == 8
    a, b = load_file(full / "step-8" / "model.safetensors"), load_file(cut / "step-8" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the end-to-end check: fine-tuning teaches checkable answers that generalise -----------------

NAMES = ["Anna", "Ben", "Carl", "Dora", "Emil", "Fay", "Gus", "Hana", "Ivan", "Jon", "Kim", "Lena", "Max", "Nora", "Omar", "Pia", "Quin", "Rosa", "Sam", "Tara", "Uma", "Vic", "Wes", "Xena", "Yuri", "Zoe", "Alma", "Bo", "Cleo", "Dan", "Eve", "Finn", "Gia", "Hugo", "Ida", "Jade", "Kai", "Lily", "Milo", "Nina"]
GREETING_REPLY = "Hello! Nice to meet you."


def synthetic_chats(seed: int = 0):
    """Training lines and held-out (prompt, answer) pairs: 'What comes after N?' -> 'N+1.', greetings.

    Held out: 100 of the numbers 10..999 (their digits all occur in training, so the model can learn
    the digit rule rather than memorise) and 8 of the names.
    """
    import random

    rng = random.Random(seed)
    numbers = list(range(10, 1000))
    rng.shuffle(numbers)
    held_numbers, train_numbers = numbers[:100], numbers[100:]
    held_names, train_names = NAMES[:8], NAMES[8:]
    lines = [{"prompt": f"What comes after {n}?", "response": f"{n + 1}."} for n in train_numbers]
    lines += [{"prompt": f"Hi, my name is {name}.", "response": GREETING_REPLY} for name in train_names * 6]
    rng.shuffle(lines)
    held = [(f"What comes after {n}?", f"{n + 1}.") for n in held_numbers]
    held += [(f"Hi, my name is {name}.", GREETING_REPLY) for name in held_names]
    return lines, held


@pytest.mark.slow
def test_finetuned_nano_model_answers_held_out_prompts(tmp_path):
    from cogni_mamba.chat import Chatbot
    from cogni_mamba.finetune import exact_match_rate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this tiny model is faster on one thread, and steadier on a busy machine
    try:
        pre = pretrained(tmp_path, dim=128, seq_len=64)
        lines, held = synthetic_chats()
        assert not {p for p, _ in held} & {line["prompt"] for line in lines}
        data = tmp_path / "chats.jsonl"
        data.write_text("".join(json.dumps(line) + "\n" for line in lines))
        base_model, _ = load_checkpoint(pre)
        before = exact_match_rate(base_model, TOK, held, max_new_tokens=32)
        assert main(finetune_args(pre, data, tmp_path / "chat", "--max-steps", "600", "--val-fraction", "0.05",
                                  "--set", "train.batch_size=32", "--set", "train.grad_accum=1",
                                  "--set", "train.lr=3e-3", "--set", "train.min_lr=1e-4",
                                  "--set", "train.warmup_steps=10", "--set", "train.eval_interval=200",
                                  "--system", "")) == 0
        tuned, _ = load_checkpoint(tmp_path / "chat")
        after = exact_match_rate(tuned, TOK, held, max_new_tokens=32)
        numbers = exact_match_rate(tuned, TOK, held[:100], max_new_tokens=32)
        print(f"\nexact match on {len(held)} held-out prompts: pretrained {before:.1%}, fine-tuned {after:.1%} "
              f"(numbers alone {numbers:.1%})")
        assert before <= 0.05
        assert after >= 0.6 and numbers >= 0.5
        # The fine-tuned run folder is what `chat` loads (trained here without a system prompt).
        bot = Chatbot.from_checkpoint(tmp_path / "chat", system_prompt=None)
        n = int(held[0][0].removeprefix("What comes after ").rstrip("?"))
        replies = [bot.chat(f"What comes after {m}?", temperature=0.0) for m in (n, n + 100)]
        assert sum(r == f"{m + 1}." for r, m in zip(replies, (n, n + 100), strict=True)) >= 1, replies
    finally:
        torch.set_num_threads(threads)
