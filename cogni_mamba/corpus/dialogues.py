"""Chat dialogues for the chat template: greetings, questions about the assistant and about stories,
story requests (answered with a generated story about the animal or person asked for), counting and
small sums, simple facts, thanks and goodbyes.

A dialogue is a list of `{"role": ..., "content": ...}` messages (an optional system message, then
user/assistant turns). `dialogue_text` renders one with the tokenizer's own chat template, so the BPE
and the model see exactly the text the Chatbot will build at inference.

Every greeting reply opens with a greeting (`is_greeting` checks that), so "answers with a greeting"
is a measurable property of a model trained on this corpus. Likewise a story asked for about a kind
of hero is about that kind, and number answers are right; `HELD_OUT_STORY_REQUESTS` and
`HELD_OUT_NUMBER_QUESTIONS` are phrasings the generator never emits, for measuring whether a model
follows the request rather than a memorised question.

Answers are written so that a small model can get them right token by token: they first repeat what
was asked ("Okay! Here is a story about a fox.", "After 4 comes 5.") and only then add what is new,
next to the words it follows from.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path

from ..tokenizer.chat_template import render_chat_text
from ..tokenizer.specials import EOS_TOKEN
from . import story_grammar as g
from .stories import Slots, fill, generate_story, words_of

ASSISTANT_NAME = "Cogni"
GREETING_WORDS = frozenset({"hello", "hi", "hey", "greetings", "howdy"})
GREETING_PAIRS = frozenset({("good", "morning"), ("good", "afternoon"), ("good", "evening")})

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",  # the Chatbot's default system prompt, so it is the most common one
    "You are a helpful assistant.",
    "You are Cogni, a friendly assistant.",
    "You are Cogni, a small and friendly language model. You like to tell stories.",
    "You are a helpful assistant. Answer in short, simple sentences.",
    "You are Cogni. Be kind and helpful.",
)
USER_GREETINGS = ("Hello!", "Hello!", "Hello!", "Hi!", "Hey!", "Hello there!", "Hi there!", "Hello, Cogni!",
                  "Hi, Cogni!", "Hey, how are you?", "Hello! How are you?", "Good morning!", "Good evening!", "Hi :)")
GREETING_OPENERS = ("Hello!", "Hi!", "Hey!", "Hello there!", "Hi there!", "Greetings!", "Hello, friend!", "Howdy!")
GREETING_FOLLOWUPS = ("How can I help you today?", "It is nice to talk to you.", "What would you like to talk about?",
                      "Do you want to hear a story?", "I am happy to see you.", "How are you today?",
                      "What can I do for you?", "I am Cogni. How can I help?")


def read_qa_tables(text: str) -> dict[str, tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]]:
    """The tables of qa.txt: name -> ((questions, answers), ...). See the file's own header for its layout."""
    tables: dict[str, list] = {}
    name = None
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if line and not line.startswith("#")]
        if lines and lines[0].startswith("[") and lines[0].endswith("]"):
            name, lines = lines[0][1:-1], lines[1:]
            tables[name] = []
        if lines:
            tables[name].append((tuple(lines[0].split(" | ")), tuple(lines[1:])))
    return {k: tuple(v) for k, v in tables.items()}


_QA = read_qa_tables((Path(__file__).parent / "qa.txt").read_text(encoding="utf-8"))
ABOUT_SELF = _QA["ABOUT_SELF"]  # questions about the assistant, and its answers
ABOUT_STORIES = _QA["ABOUT_STORIES"]  # questions about stories ({slots} filled per dialogue)
STORY_REQUESTS = ("Tell me a story.", "Can you tell me a story?", "Please tell me a story.",
                  "Tell me a story about {topic}.", "Tell me a story about {topic}.", "Can you tell me a story about {topic}?",
                  "I want a story about {topic}.", "Please tell me a story about {topic}.",
                  "Tell me a short story about {topic}.", "I would like a story about {topic}.",
                  "Can I have a story about {topic}?", "Write a story about {topic}.")
STORY_INTROS = ("Sure! Here is a story.", "Of course! Here is a story for you.", "Okay! Here is a story.", "")
TOPIC_INTROS = ("Sure! Here is a story about {topic}.", "Of course! Here is a story about {topic}.",
                "Okay! Here is a story about {topic}.", "Here is a story about {topic}.")
# Phrasings the generator never emits: for measuring whether a trained model follows a request.
HELD_OUT_STORY_REQUESTS = ("Could you tell me a story about a {kind}?", "Tell me a tale about a {kind}.",
                           "Do you know a story about a {kind}?")
HELD_OUT_NUMBER_QUESTIONS = (("Which number follows {n}?", "after"), ("What do you get if you add {a} and {b}?", "plus"))
THANKS = ("Thank you!", "Thanks!", "Thank you so much!", "Thanks, that was nice.", "Thank you, Cogni!")
THANKS_REPLIES = ("You are welcome!", "You are welcome! I am glad I could help.", "Any time!",
                  "You are very welcome.")
GOODBYES = ("Bye!", "Goodbye!", "See you later!", "Good night!", "Bye bye, Cogni!")
GOODBYE_REPLIES = ("Goodbye! Have a nice day.", "Bye! See you soon.", "Goodbye! It was nice to talk to you.",
                   "Good night! Sleep well.")
THINGS = (("the sky", "blue"), ("grass", "green"), ("the sun", "yellow"), ("snow", "white"), ("a banana", "yellow"),
          ("an apple", "red"), ("a carrot", "orange"), ("the night", "black"), ("a frog", "green"),
          ("a lemon", "yellow"), ("a strawberry", "red"), ("milk", "white"), ("a pig", "pink"), ("coal", "black"),
          ("chocolate", "brown"), ("a leaf", "green"), ("the sea", "blue"), ("a fire truck", "red"))
SOUNDS = (("a cow", "moo"), ("a dog", "woof"), ("a cat", "meow"), ("a duck", "quack"), ("a sheep", "baa"),
          ("a pig", "oink"), ("an owl", "hoot"), ("a lion", "roar"), ("a mouse", "squeak"), ("a frog", "ribbit"))
OPPOSITES = (("big", "small"), ("hot", "cold"), ("up", "down"), ("day", "night"), ("happy", "sad"),
             ("fast", "slow"), ("old", "new"), ("wet", "dry"), ("tall", "short"), ("open", "closed"))
FACT_TEMPLATES = {
    "colour": (("What colour is {thing}?", "What is the colour of {thing}?"), ("{Thing} is {colour}.",)),
    "sound": (("What does {animal} say?", "What sound does {animal} make?"), ("{Animal} says {sound}.",)),
    "opposite": (("What is the opposite of {word}?",), ("The opposite of {word} is {other}.",)),
}
NUMBER_TEMPLATES = {
    "after": (("What comes after {n}?", "What number comes after {n}?", "What is the next number after {n}?",
               "What is one more than {n}?", "Which number comes after {n}?", "What is after {n}?"),
              ("After {n} comes {n1}.", "The number after {n} is {n1}.", "{n}, then {n1}. {n1} comes after {n}.")),
    "before": (("What comes before {n1}?", "What number comes before {n1}?", "Which number comes before {n1}?"),
               ("Before {n1} comes {n}.", "The number before {n1} is {n}.")),
    "plus": (("What is {a} plus {b}?", "What is {a} + {b}?", "What is {a} and {b}?", "Add {a} and {b}.",
              "How much is {a} plus {b}?"),
             ("{a} plus {b} is {c}.", "{a} + {b} = {c}.")),
    "count": (("Can you count to {k}?", "Count to {k}.", "Please count to {k}.", "Count from 1 to {k}."),
              ("Sure! {upto}.", "{upto}.")),
}
MAX_NUMBER = 19  # "after" and "before" questions use 0..20; sums use 0..10 + 0..10; counting up to 12
def _pick(rng: random.Random, pair: tuple[tuple[str, ...], tuple[str, ...]], slots: Slots) -> tuple[str, str]:
    question, answer = pair
    return fill(rng.choice(question), slots), fill(rng.choice(answer), slots)


def greeting(rng: random.Random) -> tuple[str, str]:
    """A greeting and a reply that opens with a greeting."""
    user = rng.choice(USER_GREETINGS)
    opener = user.split("!")[0] + "!" if user.startswith("Good ") else rng.choice(GREETING_OPENERS)
    return user, f"{opener} {rng.choice(GREETING_FOLLOWUPS)}"


def fact(rng: random.Random) -> tuple[str, str]:
    """A simple fact: colours of things, animal sounds, opposites."""
    thing, colour = rng.choice(THINGS)
    animal, sound = rng.choice(SOUNDS)
    word, other = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        word, other = other, word
    slots = Slots(thing=thing, colour=colour, animal=animal, sound=sound, word=word, other=other)
    return _pick(rng, FACT_TEMPLATES[rng.choice(sorted(FACT_TEMPLATES))], slots)


def number(rng: random.Random) -> tuple[str, str]:
    """Counting: the number after or before another, small sums, counting up to a number."""
    n, a, b, k = rng.randint(0, MAX_NUMBER), rng.randint(0, 10), rng.randint(0, 10), rng.randint(2, 12)
    slots = Slots(n=str(n), n1=str(n + 1), a=str(a), b=str(b), c=str(a + b), k=str(k),
                  upto=", ".join(str(i) for i in range(1, k + 1)))
    return _pick(rng, NUMBER_TEMPLATES[rng.choice(sorted(NUMBER_TEMPLATES))], slots)


def story_request(rng: random.Random) -> tuple[str, str]:
    """A request for a story, mostly about a kind of hero (maybe named), answered with a story about it."""
    kind, name = rng.choice(g.ANIMAL_KINDS + ("girl", "boy")), None
    request = rng.choice(STORY_REQUESTS)
    if "{topic}" in request:
        if rng.random() < 0.3:
            name = rng.choice(g.GIRL_NAMES if kind == "girl" else g.BOY_NAMES if kind == "boy"
                              else g.GIRL_NAMES + g.BOY_NAMES)
            topic = f"a {kind} named {name}"
        else:
            topic = f"a {kind}"
        request = request.replace("{topic}", topic)
        intro = rng.choice(TOPIC_INTROS).replace("{topic}", topic)
    else:
        kind = None  # an open request: any hero
        intro = rng.choice(STORY_INTROS)
    story = generate_story(rng, kind=kind, name=name)
    return request, f"{intro}\n\n{story}" if intro else story


def _about(table: tuple) -> Callable[[random.Random], tuple[str, str]]:
    def make(rng: random.Random) -> tuple[str, str]:
        from .stories import story_slots

        return _pick(rng, rng.choice(table), story_slots(rng))
    return make


TOPICS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "self": _about(ABOUT_SELF), "stories": _about(ABOUT_STORIES), "story": story_request, "fact": fact,
    "number": number,
}
TOPIC_WEIGHTS = {"self": 3, "stories": 1, "story": 3, "fact": 2, "number": 4}


def generate_dialogue(rng: random.Random) -> list[dict[str, str]]:
    """One conversation: maybe a system prompt and a greeting, 1-3 topical exchanges, maybe thanks/goodbye."""
    messages: list[dict[str, str]] = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    exchanges: list[tuple[str, str]] = []
    if rng.random() < 0.6:
        exchanges.append(greeting(rng))
    names = sorted(TOPICS)
    for _ in range(rng.randint(0 if exchanges else 1, 3)):
        topic = rng.choices(names, weights=[TOPIC_WEIGHTS[n] for n in names])[0]
        exchanges.append(TOPICS[topic](rng))
    if rng.random() < 0.3:
        exchanges.append((rng.choice(THANKS), rng.choice(THANKS_REPLIES)))
    if rng.random() < 0.25:
        exchanges.append((rng.choice(GOODBYES), rng.choice(GOODBYE_REPLIES)))
    if not exchanges:
        exchanges.append(greeting(rng))
    for user, assistant in exchanges:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


def dialogues(seed: int) -> Iterator[list[dict[str, str]]]:
    """An endless, seeded stream of dialogues."""
    rng = random.Random(f"dialogues:{seed}")
    while True:
        yield generate_dialogue(rng)


def dialogue_text(messages: list[dict[str, str]]) -> str:
    """A dialogue as a pretraining document: the chat template's text without its leading BOS.

    `prepare` puts an EOS (= BOS) between documents, so the model sees `<|endoftext|><|user|>...` exactly
    as the Chatbot's prompt starts; keeping the template's own BOS would double it.
    """
    text = render_chat_text(messages)
    return text[len(EOS_TOKEN):] if text.startswith(EOS_TOKEN) else text


def is_greeting(text: str) -> bool:
    """Whether a reply opens with a greeting: a greeting word or pair among its first three words."""
    words = words_of(text)[:3]
    return any(w in GREETING_WORDS for w in words) or any(p in GREETING_PAIRS for p in pairwise(words))
