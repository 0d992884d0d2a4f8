"""The built-in corpus: generated offline, deterministic per seed, any size, three kinds mixed by weight.

    stories    children's stories from a grammar (`stories.py`, `story_grammar.py`)
    dialogues  chats in the chat template: greetings, questions, story requests, facts (`dialogues.py`)
    code       documented functions of the local Python standard library, CodeSearchNet layout

    for kind, text in corpus_items(CorpusSpec(size=2_000_000, seed=1)): ...
    cogni-mamba prepare --source builtin:size=4M,seed=1,stories=0.6,dialogues=0.3,code=0.1 --out data/demo

Weights share out the characters: each kind gets `weight / sum(weights) * size` characters (to within
one document), and the kinds are interleaved at random (seeded) in proportion to what each has left.
The data pipeline reads it as the `builtin` source kind (data/sources.py); this package does not import the
data pipeline's sources.
"""

from __future__ import annotations

import random
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from ..errors import CogniError
from ..tokenizer.specials import SPECIAL_TOKENS
from . import dialogues as _dialogues
from . import stories as _stories
from .dialogues import GREETING_WORDS, dialogue_text, generate_dialogue, is_greeting
from .stories import generate_story, vocabulary, words_of

KINDS = ("stories", "dialogues", "code")
DEFAULT_WEIGHTS = {"stories": 0.55, "dialogues": 0.4, "code": 0.05}
DEFAULT_SIZE = 4_000_000
_SPECIALS_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


class CorpusError(CogniError):
    """A bad built-in corpus specification."""


@dataclass(frozen=True)
class CorpusSpec:
    """How much of which kinds to generate: `size` in characters, weights per kind, and the seed."""

    size: int = DEFAULT_SIZE
    seed: int = 0
    weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise CorpusError(f"The corpus size must be positive, got {self.size}.")
        unknown = [k for k in self.weights if k not in KINDS]
        if unknown:
            raise CorpusError(f"Unknown corpus kind {unknown[0]!r}; the kinds are: {', '.join(KINDS)}.")
        if any(w < 0 for w in self.weights.values()) or not any(w > 0 for w in self.weights.values()):
            raise CorpusError("Corpus weights must be >= 0 with at least one positive, e.g. stories=0.7,dialogues=0.3.")

    def budgets(self) -> dict[str, int]:
        """Characters each kind contributes."""
        total = sum(self.weights.values())
        return {k: round(self.size * w / total) for k, w in self.weights.items() if w > 0}

    def key(self) -> tuple:
        """What decides the content (the stdlib's code depends on the Python version)."""
        return ("builtin", self.size, self.seed, tuple(sorted(self.weights.items())), sys.version)


def kind_stream(kind: str, seed: int) -> Iterator[str]:
    """The documents of one kind, as text (dialogues in the chat template)."""
    if kind == "stories":
        return _stories.stories(seed)
    if kind == "dialogues":
        return map(dialogue_text, _dialogues.dialogues(seed))
    from .stdlib_code import stdlib_documents  # parses files lazily; only imported when code is asked for

    return stdlib_documents(seed)


def corpus_items(spec: CorpusSpec) -> Iterator[tuple[str, str]]:
    """(kind, document) pairs until every kind has its share of characters (a finite kind may run out)."""
    left = spec.budgets()
    streams = {k: kind_stream(k, spec.seed) for k in left}
    rng = random.Random(f"mix:{spec.seed}")
    while left:
        kinds = sorted(left)
        kind = rng.choices(kinds, weights=[left[k] for k in kinds])[0]
        doc = next(streams[kind], None)
        if doc is None:  # the stdlib has no more documented functions
            del left[kind]
            continue
        left[kind] -= len(doc)
        if left[kind] <= 0:
            del left[kind]
        yield kind, doc


def corpus_documents(spec: CorpusSpec) -> Iterator[str]:
    """The documents of the corpus, in their mixed order."""
    return (doc for _, doc in corpus_items(spec))


def bpe_text(doc: str) -> str:
    """A document as BPE training text: special-token text becomes a newline, so no merge spans a role marker."""
    return _SPECIALS_RE.sub("\n", doc)


def corpus_vocabulary() -> frozenset[str]:
    """Every word the stories and dialogues can hold, in lower case (code is left out)."""
    words = set(vocabulary())
    for name in dir(_dialogues):
        if name.isupper():
            for s in _stories._strings(getattr(_dialogues, name)):
                words.update(words_of(re.sub(r"\{[A-Za-z_0-9]+\}", " ", s)))
    return frozenset(words)


# --- the `builtin` data source ----------------------------------------------------------------

_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)([kKmMgG]?)$")
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_size(text: str) -> int:
    """'4M' -> 4_000_000, '500k' -> 500_000, '1234' -> 1234."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise CorpusError(f"Corpus size {text!r} is not a number of characters like 500k, 4M or 2000000.")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_spec(arg: str | None) -> CorpusSpec:
    """A CorpusSpec from `size=4M,seed=1,stories=0.6,dialogues=0.3,code=0.1` (every part optional)."""
    size, seed, weights = DEFAULT_SIZE, 0, {}
    for part in filter(None, (arg or "").split(",")):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep:
            raise CorpusError(f"Corpus option {part!r} must look like key=value, e.g. builtin:size=4M,seed=1.")
        try:
            if key == "size":
                size = parse_size(value)
            elif key == "seed":
                seed = int(value)
            elif key in KINDS:
                weights[key] = float(value)
            else:
                raise CorpusError(f"Unknown corpus option {key!r}; use size, seed, {', '.join(KINDS)}.")
        except ValueError:
            raise CorpusError(f"Corpus option {part!r} needs a number.") from None
    return CorpusSpec(size=size, seed=seed, weights=weights or dict(DEFAULT_WEIGHTS))


__all__ = [
    "DEFAULT_WEIGHTS", "GREETING_WORDS", "KINDS", "CorpusError", "CorpusSpec", "bpe_text",
    "corpus_documents", "corpus_items", "corpus_vocabulary", "dialogue_text", "generate_dialogue",
    "generate_story", "is_greeting", "parse_spec", "vocabulary", "words_of",
]
