"""The demo: step planning against a hand count, corpus reuse, bad input, and (slow) the whole demo end
to end with the acceptance checks: val loss drop, greetings to "Hello!", story vocabulary, re-run reuse."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cogni_mamba.cli import main
from cogni_mamba.config import preset
from cogni_mamba.corpus import CorpusSpec
from cogni_mamba.demo import DemoOptions, build_corpus, demo_config, vocabulary_rate
from cogni_mamba.errors import CogniError

REPO = Path(__file__).resolve().parents[1]


def test_demo_config_is_the_nano_preset_pointed_at_the_demo_folders(tmp_path):
    cfg = demo_config(DemoOptions(seed=3, overrides=["train.lr=1e-3"]), tmp_path)
    nano = preset("nano")
    assert cfg.model == nano.model  # same architecture and the 4,096-token vocabulary
    assert cfg.data.data_dirs == [str(tmp_path / "data")] and cfg.train.out_dir == str(tmp_path / "run")
    assert cfg.train.lr == 1e-3 and cfg.train.seed == 3 and cfg.data.seed == 3


def test_build_corpus_reuses_and_rebuilds(tmp_path):
    lines = []
    spec = CorpusSpec(size=20_000, seed=1)
    path = build_corpus(tmp_path, spec, lines.append)
    first = path.read_bytes()
    mtime = path.stat().st_mtime_ns
    docs = [json.loads(line) for line in first.decode().splitlines()]
    assert sum(len(d["text"]) for d in docs) >= 20_000 and {d["kind"] for d in docs} == {"stories", "dialogues", "code"}
    assert build_corpus(tmp_path, spec, lines.append) == path and path.stat().st_mtime_ns == mtime
    assert "reusing" in lines[-1]
    build_corpus(tmp_path, CorpusSpec(size=20_000, seed=2), lines.append)
    assert path.read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.json", "corpus.jsonl"]  # no temp files left


def test_chat_check_scoring_by_hand():
    from cogni_mamba.demo import number_is_right, story_is_about

    assert story_is_about("Okay! Here is a story about a fox.\n\nOnce there was a fox named Finn.", "fox")
    assert not story_is_about("Okay! Here is a story about a fox.\n\nOnce there was a bunny named Jake.", "fox")
    assert story_is_about("Once upon a time, a little fox ran home.", "fox")  # no intro line: the whole reply
    assert not story_is_about("Once upon a time, a foxglove grew.", "fox")
    assert number_is_right("After 4 comes 5.", 4, 5)
    assert number_is_right("5 comes after 4. It is one more.", 4, 5)
    assert not number_is_right("4 comes after 5.", 4, 5)  # the demo's old answer: the right numbers, wrong way
    assert number_is_right("4, then 5. 5 comes after 4.", 4, 5)
    assert not number_is_right("4, then 5. 4 comes after 5.", 4, 5)
    assert number_is_right("It is 5.", 4, 5)
    assert not number_is_right("After 4 comes 6.", 4, 5)
    assert not number_is_right("After 4 comes 5 and 7.", 4, 5)
    assert not number_is_right("I like numbers.", 4, 5)


def test_vocabulary_rate_by_hand():
    assert vocabulary_rate(["Once upon a time, there was a fox."]) == 1.0
    # 8 words, of which "zyzzyva" and "qwerty" are not the grammar's.
    assert vocabulary_rate(["The fox saw a zyzzyva and a qwerty."]) == pytest.approx(6 / 8)


def test_bad_arguments_are_one_sentence(capsys):
    with pytest.raises(CogniError):
        DemoOptions(minutes=0)
    assert main(["demo", "--minutes", "-1", "--out", "unused"]) == 2
    assert main(["demo", "--corpus-size", "lots", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 2 and "Traceback" not in err
    assert not Path("unused").exists()


# --- the whole demo -----------------------------------------------------------------------------

def run_demo_cli(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "cogni_mamba", "demo", "--out", str(out), "--no-chat", *args],
                          capture_output=True, text=True, env=env, timeout=900, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """A short demo with a fixed step count (so the model is the same on any machine), then the checks."""
    out, report = tmp_path / "demo", tmp_path / "report.json"
    args = ("--minutes", "12", "--corpus-size", "1M", "--seed", "0", "--set", "train.max_steps=200",
            "--report", str(report))
    done = run_demo_cli(out, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    numbers = json.loads(report.read_text())
    assert numbers["steps"] == 200
    assert numbers["final_val_loss"] <= 0.4 * numbers["initial_val_loss"], numbers  # >= 60% lower
    for path in ("run/latest", "run/loss.png", "run/metrics.jsonl", "tokenizer/tokenizer.json", "data/meta.json",
                 "corpus/corpus.jsonl"):
        assert (out / path).is_file(), path
    assert "=== a short conversation ===" in done.stdout and "you: Hello!" in done.stdout
    assert "=== does it follow the request?" in done.stdout
    assert set(numbers["chat_checks"]) == {"story_on_topic", "number_right", "held_out_story_on_topic",
                                           "held_out_number_right"}

    from cogni_mamba.chat import Chatbot
    from cogni_mamba.corpus import is_greeting
    from cogni_mamba.demo import sample_stories

    bot = Chatbot.from_checkpoint(out / "run")
    greetings = 0
    for seed in range(10):
        bot.reset()
        greetings += is_greeting(bot.chat("Hello!", temperature=0.8, seed=seed))
    assert greetings >= 8
    stories = sample_stories(bot.model, bot.tokenizer, bot.settings, n=6, seed=1)
    words = [w.lower() for s in stories for w in re.findall(r"[A-Za-z]+", s)]
    assert len(words) > 100
    assert vocabulary_rate(stories) >= 0.95

    # A second run reuses every step it can and trains nothing.
    again = run_demo_cli(out, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    for step in ("corpus: reusing", "tokenizer: reusing", "shards: reusing", "training: reusing"):
        assert step in again.stdout
