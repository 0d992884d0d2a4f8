"""The built-in corpus: seeded determinism, size and weight budgets, vocabulary coverage, dialogue
structure and facts checked by hand, stdlib code documents that parse, and the `builtin` data source."""

from __future__ import annotations

import ast
import itertools
import random
import re
import subprocess
import sys
from collections import Counter

import pytest

from cogni_mamba.corpus import (
    CorpusSpec,
    bpe_text,
    corpus_items,
    corpus_vocabulary,
    dialogue_text,
    generate_dialogue,
    generate_story,
    is_greeting,
    parse_spec,
    vocabulary,
)
from cogni_mamba.corpus.dialogues import HELD_OUT_NUMBER_QUESTIONS, HELD_OUT_STORY_REQUESTS, USER_GREETINGS
from cogni_mamba.corpus.stdlib_code import stdlib_documents
from cogni_mamba.errors import CogniError

WORDS = re.compile(r"[A-Za-z]+")  # the test's own word split


def words(text: str) -> list[str]:
    return [w.lower() for w in WORDS.findall(text)]


def items(size: int, seed: int, **weights: float) -> list[tuple[str, str]]:
    return list(corpus_items(CorpusSpec(size=size, seed=seed, weights=weights or {"stories": 0.6, "dialogues": 0.3,
                                                                                  "code": 0.1})))


# --- determinism and budgets ----------------------------------------------------------------------

def test_same_seed_same_corpus_and_different_seeds_differ():
    a, b, c = items(120_000, 5), items(120_000, 5), items(120_000, 6)
    assert a == b
    assert a != c
    for kind in ("stories", "dialogues", "code"):
        docs_a = [d for k, d in a if k == kind]
        docs_c = [d for k, d in c if k == kind]
        assert docs_a and docs_c and docs_a[:5] != docs_c[:5], kind


@pytest.mark.parametrize("size,weights", [(200_000, {"stories": 0.5, "dialogues": 0.3, "code": 0.2}),
                                          (150_000, {"stories": 1.0, "dialogues": 3.0}),
                                          (50_000, {"dialogues": 1.0})])
def test_sizes_and_weights_are_honoured(size, weights):
    got = items(size, 1, **weights)
    chars = Counter()
    longest = Counter()
    for kind, doc in got:
        chars[kind] += len(doc)
        longest[kind] = max(longest[kind], len(doc))
    total_w = sum(weights.values())
    assert set(chars) == {k for k, w in weights.items() if w > 0}
    for kind, w in weights.items():
        budget = size * w / total_w
        # Each kind stops at the first document that reaches its budget: at most one document over.
        assert budget <= chars[kind] < budget + longest[kind] + 1, (kind, chars[kind], budget)
    # Interleaved, not in blocks: the first tenth of the documents already holds every kind.
    first = {k for k, _ in got[: len(got) // 10]}
    assert first == set(chars)


def test_bad_specs_raise_clear_errors():
    assert parse_spec("size=4M,seed=2,stories=1,code=0.5") == CorpusSpec(size=4_000_000, seed=2,
                                                                           weights={"stories": 1.0, "code": 0.5})
    assert parse_spec(None).size == parse_spec("").size > 0
    for bad in ("size=lots", "poems=1", "seed", "stories=0,dialogues=0", "size=0", "stories=-1"):
        with pytest.raises(CogniError):
            parse_spec(bad)


# --- stories ------------------------------------------------------------------------------------

def test_story_words_belong_to_the_vocabulary():
    rng = random.Random(11)
    text = [w for _ in range(300) for w in words(generate_story(rng))]
    vocab = vocabulary()
    assert sum(w in vocab for w in text) / len(text) >= 0.95
    # The vocabulary is the grammar's, not English at large: code and made-up words fall outside it.
    code = " ".join(itertools.islice(stdlib_documents(0), 50))
    assert sum(w in vocab for w in words(code)) / len(words(code)) < 0.5
    assert not {"xylophone", "def", "return", "quantum"} & vocab
    assert vocabulary() <= corpus_vocabulary()


def test_stories_are_varied_and_structured():
    rng = random.Random(2)
    texts = [generate_story(rng) for _ in range(400)]
    assert len(set(texts)) == len(texts)
    openings = {t.split(".")[0] for t in texts}
    assert len(openings) > 200  # names, kinds, adjectives and places combine
    trigrams = {tuple(w[i:i + 3]) for t in texts for w in [words(t)] for i in range(len(w) - 2)}
    assert len(trigrams) > 5000
    for t in texts:
        paragraphs = t.split("\n\n")
        assert len(paragraphs) == 3 and all(p.strip() for p in paragraphs)
        assert t.count('"') % 2 == 0  # every quote is closed
        assert 50 <= len(t.split()) <= 300
    assert sum('"' in t for t in texts) > 0.9 * len(texts)  # characters speak


def test_story_about_a_named_hero():
    rng = random.Random(4)
    for kind, name in (("fox", "Finn"), ("girl", "Lily"), ("robot", None)):
        story = generate_story(rng, kind=kind, name=name)
        assert kind in words(story)
        if name:
            assert name in story


# --- dialogues ----------------------------------------------------------------------------------

def test_dialogue_structure():
    rng = random.Random(8)
    for _ in range(500):
        messages = generate_dialogue(rng)
        roles = [m["role"] for m in messages]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles and len(roles) % 2 == 0
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert all(set(m) == {"role", "content"} and m["content"].strip() for m in messages)


def test_dialogue_text_is_the_tokenizers_template():
    from cogni_mamba.tokenizer import load_tokenizer

    tok = load_tokenizer("simple")
    rng = random.Random(3)
    for _ in range(20):
        messages = generate_dialogue(rng)
        ids, _ = tok.render_chat(messages)
        # prepare puts EOS between documents; with it in front the text encodes to the template's ids.
        assert [tok.eos_id] + tok.encode(dialogue_text(messages)) == ids


def test_greetings_are_answered_with_greetings():
    rng = random.Random(9)
    seen = 0
    hand_greetings = {"hello", "hi", "hey", "greetings", "howdy", "good"}
    for _ in range(1500):
        m = [x for x in generate_dialogue(rng) if x["role"] != "system"]
        if m[0]["content"] in USER_GREETINGS:
            seen += 1
            assert words(m[1]["content"])[0] in hand_greetings, m[1]["content"]
            assert is_greeting(m[1]["content"])
    assert seen > 300
    assert "Hello!" in USER_GREETINGS
    for not_greeting in ("The sky is blue.", "5 comes after 4.", "Once upon a time, there was a fox.", ""):
        assert not is_greeting(not_greeting)


def test_facts_are_right():
    rng = random.Random(12)
    checked = Counter()
    for _ in range(3000):
        m = generate_dialogue(rng)
        for q, a in itertools.pairwise(m):
            if q["role"] != "user":
                continue
            q, a = q["content"], a["content"]
            if (hit := re.fullmatch(r"What (?:number )?comes after (\d+)\?", q)):
                n = int(hit[1])
                assert a in (f"After {n} comes {n + 1}.", f"The number after {n} is {n + 1}.",
                             f"{n}, then {n + 1}. {n + 1} comes after {n}."), (q, a)
                checked["after"] += 1
            elif (hit := re.fullmatch(r"What (?:number )?comes before (\d+)\?", q)):
                n = int(hit[1])
                assert a in (f"Before {n} comes {n - 1}.", f"The number before {n} is {n - 1}."), (q, a)
                checked["before"] += 1
            elif (hit := re.fullmatch(r"What is (\d+) (?:plus|\+) (\d+)\?", q)):
                x, y = int(hit[1]), int(hit[2])
                assert a in (f"{x} plus {y} is {x + y}.", f"{x} + {y} = {x + y}."), (q, a)
                checked["plus"] += 1
            elif (hit := re.fullmatch(r"(?:Can you count|Count|Please count) to (\d+)[?.]", q)):
                assert a.removeprefix("Sure! ") == ", ".join(str(i) for i in range(1, int(hit[1]) + 1)) + "."
                checked["count"] += 1
            elif q == "What colour is the sky?":
                assert a == "The sky is blue."
                checked["sky"] += 1
            elif (hit := re.fullmatch(r"(?:Can you tell|Tell|Please tell) me a story about an? (\w+)[?.]", q)):
                intro, _, story = a.partition("\n\n")
                assert intro.endswith(f"a story about a {hit[1]}.") and hit[1] in words(story), a[:80]
                checked["story"] += 1
    assert min(checked[k] for k in ("after", "before", "plus", "count", "sky", "story")) > 0, checked


def test_held_out_phrasings_are_never_generated():
    held_out = [re.escape(t.split("{")[0]) for t in HELD_OUT_STORY_REQUESTS] + \
        [re.escape(t.split("{")[0]) for t, _ in HELD_OUT_NUMBER_QUESTIONS]
    pattern = re.compile("|".join(held_out))
    rng = random.Random(5)
    for _ in range(5000):
        for m in generate_dialogue(rng):
            assert not pattern.match(m["content"]), m["content"]


def test_bpe_text_drops_special_tokens():
    text = dialogue_text([{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello!"}])
    assert "<|" in text
    assert bpe_text(text) == "\nHi!\n\nHello!\n"


# --- stdlib code --------------------------------------------------------------------------------

def split_document(doc: str) -> tuple[str, str, str]:
    """(function name, docstring, code) of a CodeSearchNet-layout document, parsed by hand."""
    header, body = doc.split("\n", 1)
    assert header.startswith("# function: ")
    doc_match = re.match(r'"""\n(.*?)\n"""\n', body, re.S)
    assert doc_match, doc[:200]
    return header[len("# function: "):], doc_match[1], body[doc_match.end():]


def test_stdlib_code_documents_parse():
    docs = list(itertools.islice(stdlib_documents(0), 300))
    assert len(docs) == 300
    for doc in docs:
        name, docstring, code = split_document(doc)
        tree = ast.parse(code)
        assert isinstance(tree.body[0], ast.FunctionDef | ast.AsyncFunctionDef)
        assert name.split(".")[-1] == tree.body[0].name
        assert docstring.strip()
        assert ast.get_docstring(tree.body[0]) is None  # the docstring moved to the header
    assert len(set(docs)) == len(docs)


# --- the data source ------------------------------------------------------------------------------

def test_builtin_source_prepares(tmp_path):
    from cogni_mamba.data import prepare, resolve_source
    from cogni_mamba.tokenizer import load_tokenizer

    source = resolve_source("builtin:size=60k,seed=4,stories=2,dialogues=1")
    tok = load_tokenizer("simple")
    meta = prepare([source], tok, tmp_path / "p", progress=False, val_fraction=0.1)
    expected = list(corpus_items(CorpusSpec(size=60_000, seed=4, weights={"stories": 2, "dialogues": 1})))
    assert sum(s["documents"] for s in meta["splits"].values()) == len(expected)
    assert sum(s["text_bytes"] for s in meta["splits"].values()) == sum(len(d.encode()) for _, d in expected)


def test_data_does_not_import_the_corpus_until_the_builtin_source_is_used():
    code = ("import sys; import cogni_mamba.data as d; assert 'cogni_mamba.corpus' not in sys.modules; "
            "s = d.resolve_source('builtin:size=2k'); assert 'cogni_mamba.corpus' in sys.modules; "
            "print(s.description)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "builtin:size=2k", out.stderr


def test_qa_tables_read_as_written():
    from cogni_mamba.corpus.dialogues import ABOUT_SELF, read_qa_tables

    text = "# a comment\n\n[ONE]\nHi? | Hello?\nAnswer one.\nAnswer two.\n\nWhy?\nBecause.\n\n[TWO]\nQ?\nA {slot}.\n"
    assert read_qa_tables(text) == {"ONE": ((("Hi?", "Hello?"), ("Answer one.", "Answer two.")),
                                            (("Why?",), ("Because.",))),
                                    "TWO": ((("Q?",), ("A {slot}.",)),)}
    assert ABOUT_SELF[0][0] == ("What is your name?", "Who are you?", "What are you called?")
    assert all(questions and answers for questions, answers in ABOUT_SELF)
