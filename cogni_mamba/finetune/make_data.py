"""Chat data made from the pretraining corpora, with no external model (`cogni-mamba make-chat-data`).

From a TinyStories story, one of:
  * "Tell me a story about a dog." -> the story. The subject is a noun of the story: a word that ends
    a short phrase after "a"/"an" ("a little dog named Max" -> dog), the one the story repeats most.
  * "Continue this story: <its first 1-3 sentences>" -> the rest of the story.
From a CodeSearchNet function (with a docstring), one of:
  * "Write a Python function that does this: <docstring>" -> the code (its docstring removed).
  * "What does this function do?\\n<code without the docstring>" -> the docstring's first paragraph.

Everything is a pure function of the input order and --seed: the same inputs give the same file.
"""

from __future__ import annotations

import inspect
import random
import re
import textwrap
from collections import Counter
from collections.abc import Iterable, Iterator

from ..data.codesearchnet import remove_docstring

Message = dict[str, str]

STORY_REQUESTS = ("Tell me a story about {noun}.", "Can you tell me a story about {noun}?",
                  "Write a short story about {noun}.", "I want a story about {noun}, please.")
CODE_REQUESTS = ("Write a Python function that does this:\n{doc}",
                 "Write a Python function for this description:\n{doc}")
EXPLAIN_REQUEST = "What does this function do?\n{code}"

# Words that end a noun phrase after "a"/"an": the noun is the word just before one of these.
_PHRASE_ENDERS = frozenset((
    "named", "called", "who", "that", "which", "was", "is", "were", "are", "had", "has", "and", "or", "but",
    "with", "in", "on", "at", "to", "of", "for", "from", "by", "because", "when", "so", "as", "than", "then",
    "he", "she", "it", "they", "his", "her", "its", "their", "him", "them", "there", "here", "very", "too",
))
_WORD = re.compile(r"[A-Za-z]+|[^A-Za-z\s]")
# A sentence ends at . ! ? (and a closing quote) before a space and a capital or an opening quote,
# so '"Can I play?" he asked.' stays one sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"']?\s+(?=[\"'A-Z])")
MAX_PHRASE_WORDS = 3


def story_nouns(story: str) -> list[str]:
    """Singular nouns that follow "a"/"an" in the story, most repeated first (ties: first seen first)."""
    tokens = _WORD.findall(story)
    found: list[str] = []
    for i, tok in enumerate(tokens):
        if tok.lower() not in ("a", "an"):
            continue
        phrase = []
        for nxt in tokens[i + 1: i + 2 + MAX_PHRASE_WORDS]:
            if not nxt.isalpha() or nxt.lower() in _PHRASE_ENDERS:
                break
            phrase.append(nxt)
        else:
            continue  # no clear end of the phrase: too unsure which word is the noun
        if phrase and phrase[-1].islower() and len(phrase[-1]) > 2:
            found.append(phrase[-1])
    counts = Counter(w.lower() for w in _WORD.findall(story) if w.isalpha())
    first = {w: i for i, w in reversed(list(enumerate(found)))}
    return sorted(set(found), key=lambda w: (-counts[w], first[w]))


def with_article(noun: str) -> str:
    """'a dog', 'an apple'."""
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def split_sentences(text: str) -> list[str]:
    """Sentences of a story, each keeping its punctuation (a closing quote stays with its sentence)."""
    pieces, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        pieces.append(text[start: m.end()].strip())
        start = m.end()
    if text[start:].strip():
        pieces.append(text[start:].strip())
    return pieces


def story_request(story: str, rng: random.Random) -> list[Message] | None:
    """'Tell me a story about a NOUN.' -> the story, or None when no noun is found."""
    nouns = story_nouns(story)
    if not nouns:
        return None
    request = rng.choice(STORY_REQUESTS).format(noun=with_article(nouns[0]))
    return [{"role": "user", "content": request}, {"role": "assistant", "content": story.strip()}]


def story_continuation(story: str, rng: random.Random) -> list[Message] | None:
    """'Continue this story: <first sentences>' -> the rest, or None for a story of under 3 sentences."""
    sentences = split_sentences(story.strip())
    if len(sentences) < 3:
        return None
    k = rng.randint(1, min(3, len(sentences) // 2))
    # Cut the original text right after sentence k so the two parts rejoin to the story exactly.
    cut = _nth_sentence_end(story.strip(), k)
    head, rest = story.strip()[:cut].strip(), story.strip()[cut:].strip()
    return [{"role": "user", "content": f"Continue this story: {head}"}, {"role": "assistant", "content": rest}]


def _nth_sentence_end(text: str, k: int) -> int:
    for i, m in enumerate(_SENTENCE_END.finditer(text), 1):
        if i == k:
            return m.end()
    return len(text)  # pragma: no cover - callers check there are more than k sentences


def story_chats(stories: Iterable[str], seed: int) -> Iterator[list[Message]]:
    """One conversation per usable story: a request for it or its continuation (chosen by the seed)."""
    rng = random.Random(seed)
    for story in stories:
        makers = [story_request, story_continuation]
        rng.shuffle(makers)
        for make in makers:  # if the chosen kind does not fit the story, the other may
            chat = make(story, rng)
            if chat is not None:
                yield chat
                break


def docstring_summary(docstring: str) -> str:
    """The docstring's first paragraph, cleaned and on one line."""
    paragraphs = re.split(r"\n\s*\n", inspect.cleandoc(docstring or "").strip())
    return " ".join(paragraphs[0].split()) if paragraphs and paragraphs[0] else ""


def code_without_docstring(code: str) -> str:
    """The function's code, dedented, without its docstring (the layout prepare uses)."""
    code = code.replace("\r\n", "\n")  # Windows line endings in some repositories
    return textwrap.dedent(remove_docstring(textwrap.dedent(code))).strip("\n").rstrip()


def code_chat(docstring: str, code: str, rng: random.Random) -> list[Message] | None:
    """Docstring -> code, or code -> what it does; None for a function without a usable docstring."""
    summary = docstring_summary(docstring)
    body = code_without_docstring(code)
    if len(summary) < 10 or not body:
        return None
    if rng.random() < 0.5:
        user = rng.choice(CODE_REQUESTS).format(doc=inspect.cleandoc(docstring).strip())
        reply = body
    else:
        user, reply = EXPLAIN_REQUEST.format(code=body), summary
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def code_chats(functions: Iterable[tuple[str, str]], seed: int) -> Iterator[list[Message]]:
    """One conversation per (docstring, code) pair that has a docstring."""
    rng = random.Random(seed)
    for docstring, code in functions:
        chat = code_chat(docstring, code, rng)
        if chat is not None:
            yield chat


def sample_in_order(items: Iterable, n: int | None, seed: int) -> list:
    """n items chosen uniformly at random (reservoir sampling, seeded), kept in input order; all when n is None."""
    if n is None:
        return list(items)
    rng = random.Random(seed)
    reservoir: list[tuple[int, object]] = []
    for i, item in enumerate(items):
        if len(reservoir) < n:
            reservoir.append((i, item))
        else:
            j = rng.randint(0, i)
            if j < n:
                reservoir[j] = (i, item)
    return [item for _, item in sorted(reservoir, key=lambda pair: pair[0])]


# --- sources ------------------------------------------------------------------------------------

MAKE_SOURCE_HELP = """\
  tinystories:PATH     a local TinyStories .txt (stories split on <|endoftext|>), .jsonl or .parquet
  tinystories          the hub dataset roneneldan/TinyStories
  codesearchnet:PATH   local CodeSearchNet .jsonl / .jsonl.gz files (fields docstring and code) or a folder
  codesearchnet        the hub CodeSearchNet Python subset
"""


def _codesearchnet_functions(arg: str | None) -> Iterator[tuple[str, str]]:
    """(docstring, code) of every function of local CodeSearchNet files or the hub subset."""
    from ..data import sources as src

    if arg is None:
        splits = src.load_hub(src.CODESEARCHNET_HUB, "python", "codesearchnet:/path/to/python/final/jsonl",
                              revision="refs/convert/parquet")
        for split in sorted(splits):
            for row in splits[split].select_columns(["func_documentation_string", "func_code_string"]):
                yield row["func_documentation_string"] or "", row["func_code_string"] or ""
        return
    stats = src.ReadStats()
    for f in src.list_files(arg, (".jsonl", ".jsonl.gz")):
        for lineno, record in src.iter_jsonl(f, stats):
            where = f"{f}:{lineno}"
            yield src.require_field(record, "docstring", where), src.require_field(record, "code", where)


def source_chats(spec: str, seed: int) -> Iterator[list[Message]]:
    """The conversations made from a `--source` spec (see MAKE_SOURCE_HELP), in input order."""
    from ..data import sources as src
    from ..errors import CogniError

    kind, sep, arg = spec.partition(":")
    if kind == "tinystories":
        source = src.resolve_source(spec)  # path checks and the hub happen here, before any work
        return story_chats(source.read(src.ReadStats()), seed)
    if kind == "codesearchnet":
        functions = _codesearchnet_functions(arg if sep else None)
        return code_chats(functions, seed)
    raise CogniError(f"Unknown chat-data source {spec!r}; use tinystories[:PATH] or codesearchnet[:PATH].")
