"""Children's stories from the grammar in `story_grammar`: a cast, a setting, one of several plots, an ending.

    rng = random.Random(0)
    story = generate_story(rng)                   # about 120-200 words, in 3-4 paragraphs
    generate_story(rng, kind="fox", name="Finn")  # the hero asked for in a chat ("a story about a fox")

`vocabulary()` is the set of lowercase words the grammar can produce (read off its tables).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from functools import cache

from . import story_grammar as g

WORD_RE = re.compile(r"[a-z]+")  # words are runs of letters, compared in lower case ("Lily's" -> lily, s)
_SLOT_RE = re.compile(r"\{[A-Za-z_0-9]+\}")


class Slots(dict):
    """Slot values for `str.format_map`; `{Hero}` is `{hero}` with its first letter in upper case."""

    def __missing__(self, key: str) -> str:
        lower = key[:1].lower() + key[1:]
        if lower != key and lower in self:
            value = self[lower]
            return value[:1].upper() + value[1:]
        raise KeyError(key)


def fill(template: str, slots: Slots) -> str:
    """The template with its slots filled; slot values may hold slots themselves (one level)."""
    text = template.format_map(slots)
    return text.format_map(slots) if "{" in text else text


def _character(rng: random.Random, *, avoid: str = "", kind: str | None = None, name: str | None = None,
               ) -> dict[str, str]:
    """A named character: gender (for pronouns), name, kind and an adjective with its article."""
    gender = rng.choice(("she", "he"))
    if name is None:
        names = [n for n in (g.GIRL_NAMES if gender == "she" else g.BOY_NAMES) if n != avoid]
        name = rng.choice(names)
    elif name in g.BOY_NAMES:
        gender = "he"
    elif name in g.GIRL_NAMES:
        gender = "she"
    if kind is None:
        kind = rng.choice(g.PEOPLE_KINDS[gender]) if rng.random() < 0.3 else rng.choice(g.ANIMAL_KINDS)
    elif kind in ("girl", "boy"):
        gender = "she" if kind == "girl" else "he"
    return {"name": name, "gender": gender, "kind": kind, "a_adj": rng.choice(g.A_ADJECTIVES)}


def story_slots(rng: random.Random, *, kind: str | None = None, name: str | None = None) -> Slots:
    """Every slot value one story uses, drawn once so the story stays consistent."""
    hero = _character(rng, kind=kind, name=name)
    friend = _character(rng, avoid=hero["name"])
    spots = rng.sample(g.SEARCH_SPOTS, 3)
    slots = Slots(
        hero=hero["name"], kind=hero["kind"], a_adj=hero["a_adj"],
        hero_intro=f"{hero['a_adj']} {hero['kind']} named {hero['name']}",
        friend=friend["name"], fkind=friend["kind"],
        friend_desc=f"{friend['a_adj']} {friend['kind']}",
        friend_intro=f"{friend['a_adj']} {friend['kind']} named {friend['name']}",
        helper=rng.choice(g.HELPERS), family=rng.choice(g.FAMILY), place=rng.choice(g.PLACES),
        far=rng.choice(g.FAR_PLACES), object=rng.choice(g.OBJECTS), colour=rng.choice(g.COLOURS),
        activity=rng.choice(g.ACTIVITIES), time=rng.choice(g.TIMES), game=rng.choice(g.GAMES),
        spot=spots[0], spot2=spots[1], spot3=spots[2], stuck=rng.choice(g.STUCK_SPOTS),
        sight=rng.choice(g.SIGHTS), food=rng.choice(g.FOODS), gift=rng.choice(g.GIFTS),
        lost_animal=rng.choice(g.LOST_ANIMALS), good=rng.choice(g.GOOD_FEELINGS), bad=rng.choice(g.BAD_FEELINGS),
    )
    slots.update(g.PRONOUNS[hero["gender"]])
    slots.update({f"f{k}": v for k, v in g.PRONOUNS[friend["gender"]].items()})
    return slots


def generate_story(rng: random.Random, *, kind: str | None = None, name: str | None = None,
                   plot: str | None = None) -> str:
    """One story: an opening paragraph, the plot's beats in two paragraphs, and a fitting ending."""
    slots = story_slots(rng, kind=kind, name=name)
    plot = plot or rng.choice(sorted(g.PLOTS))
    opening = [fill(rng.choice(g.OPENINGS), slots), fill(rng.choice(g.TRAITS), slots)]
    beats = [fill(rng.choice(beat), slots) for beat in g.PLOTS[plot]]
    cut = len(beats) // 2 + rng.randint(-1, 1)  # where the middle paragraph break falls varies
    ending = fill(g.ENDINGS[rng.choice(g.PLOT_ENDINGS[plot])], slots)
    paragraphs = [opening, beats[:cut], [*beats[cut:], ending]]
    return "\n\n".join(" ".join(p) for p in paragraphs)


def stories(seed: int) -> Iterator[str]:
    """An endless, seeded stream of stories."""
    rng = random.Random(f"stories:{seed}")
    while True:
        yield generate_story(rng)


def _strings(value: object) -> Iterator[str]:
    """Every string inside nested tuples, lists and dict values."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _strings(v)


def words_of(text: str) -> list[str]:
    """The lowercase words of a text (runs of letters)."""
    return WORD_RE.findall(text.lower())


@cache
def vocabulary() -> frozenset[str]:
    """Every word the story grammar can produce, in lower case."""
    words: set[str] = set()
    for name in dir(g):
        if name.isupper():  # the grammar's tables
            for s in _strings(getattr(g, name)):
                words.update(words_of(_SLOT_RE.sub(" ", s)))
    return frozenset(words)
