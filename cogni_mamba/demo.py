"""`cogni-mamba demo`: from nothing to a chatting model on a laptop CPU, offline, in minutes.

The real pipeline, step by step, each step reused when a previous run already built it:

    1. corpus      the built-in corpus (stories, dialogues, stdlib code) -> <out>/corpus/corpus.jsonl
    2. tokenizer   a byte-level BPE of the nano preset's 4,096 tokens trained on it -> <out>/tokenizer/
    3. shards      `prepare` -> <out>/data/{train,val}.bin
    4. training    the nano preset with the Trainer, in the time left of the budget -> <out>/run/
    5. samples     stories from "Once upon a time," and a short scripted chat through the Chatbot

The budget (`minutes`) covers steps 1-4: the training steps are planned from a timing of the first
few steps so that the learning-rate schedule ends when the budget does, and `train.max_minutes`
stops it there if the machine turns out slower. The core prints nothing itself: it reports through
the `say` callback and returns a `DemoReport`.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .config import Config, apply_overrides, preset
from .config import replace as replace_cfg
from .corpus import CorpusSpec, bpe_text, corpus_items, vocabulary, words_of
from .errors import CogniError
from .files import write_file_atomically, write_text_atomically

# The nano preset, tuned for a few CPU minutes (see the report in docs): smaller batches mean more
# optimizer steps in the budget, which matters more than batch size this early in training.
DEMO_OVERRIDES = ("train.batch_size=8", "train.warmup_steps=20",
                  "train.eval_interval=50", "train.eval_batches=8", "train.save_interval=100000",
                  "train.keep_last=1", "generation.max_new_tokens=200", "generation.temperature=0.8")
DEFAULT_CORPUS_SIZE = 3_000_000
STORY_PROMPTS = ("Once upon a time,", "One day, a little", "There once was")
SCRIPT = ("Hello!", "What is your name?", "Tell me a story about a fox.", "What comes after 4?", "Thank you!")
VAL_FRACTION = 0.05


@dataclass
class DemoOptions:
    """What `cogni-mamba demo` was asked for."""

    minutes: float = 5.0
    out: str = "runs/demo"
    seed: int = 0
    retrain: bool = False
    force: bool = False  # pre-flight refusals become warnings
    auto_size: bool = True  # the model size `cogni-mamba plan` picks for the budget (False: the nano preset)
    corpus_size: int = DEFAULT_CORPUS_SIZE
    overrides: list[str] = field(default_factory=list)  # extra --set section.field=value
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.minutes > 0:
            raise CogniError(f"--minutes must be positive, got {self.minutes}.")


@dataclass
class DemoReport:
    """What the demo measured; saved as <out>/report.json beside the run."""

    initial_val_loss: float
    final_val_loss: float
    steps: int
    tokens_seen: int
    train_seconds: float
    build_seconds: float
    stories: list[str] = field(default_factory=list)
    conversation: list[dict[str, str]] = field(default_factory=list)
    chat_checks: dict[str, float] = field(default_factory=dict)  # see chat_checks()
    reused: bool = False

    @property
    def drop(self) -> float:
        """Relative fall of the val loss from its initial value (0.6 = 60% lower)."""
        return 1.0 - self.final_val_loss / self.initial_val_loss


Say = Callable[[str], None]


# --- 1. corpus ----------------------------------------------------------------------------------

def build_corpus(folder: Path, spec: CorpusSpec, say: Say) -> Path:
    """<folder>/corpus.jsonl with one {"kind", "text"} per document; reused when the spec is unchanged."""
    path, meta_path = folder / "corpus.jsonl", folder / "corpus.json"
    meta = {"size": spec.size, "seed": spec.seed, "weights": dict(spec.weights), "key": repr(spec.key())}
    if path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        say(f"corpus: reusing {path}")
        return path
    folder.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # the meta is written last, so a half-built corpus is never reused
    counts: dict[str, int] = {}

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for kind, text in corpus_items(spec):
                f.write(json.dumps({"kind": kind, "text": text}) + "\n")
                counts[kind] = counts.get(kind, 0) + 1

    write_file_atomically(path, write)
    write_text_atomically(meta_path, json.dumps(meta))
    say(f"corpus: {path.stat().st_size / 1e6:.1f} MB, " + ", ".join(f"{n:,} {k}" for k, n in sorted(counts.items())))
    return path


def read_corpus(path: Path) -> list[str]:
    """The document texts of a corpus.jsonl."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


# --- 2. tokenizer -------------------------------------------------------------------------------

def build_tokenizer(corpus: Path, folder: Path, vocab_size: int, say: Say, progress: bool):
    """A BPE of `vocab_size` tokens trained on the corpus, reused when built from the same corpus."""
    from .tokenizer import load_tokenizer, train_bpe

    stamp = {"corpus": (corpus.parent / "corpus.json").read_text(), "vocab_size": vocab_size}
    stamp_path = folder / "demo.json"
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        say(f"tokenizer: reusing {folder}")
        return load_tokenizer(folder)
    stamp_path.unlink(missing_ok=True)
    tok = train_bpe([bpe_text(d) for d in read_corpus(corpus)], vocab_size, folder, progress=progress)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomically(stamp_path, json.dumps(stamp))
    report = tok.train_report or {}
    say(f"tokenizer: {tok.real_vocab_size:,} tokens, {report.get('bytes_per_token', float('nan')):.2f} bytes/token "
        f"on held-out text -> {folder}")
    return tok


# --- 3. shards ----------------------------------------------------------------------------------

def build_shards(corpus: Path, tokenizer, folder: Path, seed: int, say: Say, progress: bool) -> dict:
    """Token shards of the corpus (`prepare` itself skips the work when nothing changed)."""
    from .data import prepare
    from .data.sources import SourceOptions, files_source

    source = files_source(str(corpus), SourceOptions(field="text"))
    meta = prepare([source], tokenizer, folder, val_fraction=VAL_FRACTION, seed=seed, progress=progress)
    splits = meta["splits"]
    say(f"shards: {'reusing ' if meta['skipped_work'] else ''}{splits['train']['tokens']:,} train and "
        f"{splits['val']['tokens']:,} val tokens -> {folder}")
    return meta


# --- 4. training --------------------------------------------------------------------------------

def demo_config(options: DemoOptions, out: Path) -> Config:
    """The nano preset with the demo's settings, pointed at the demo's folders."""
    cfg = apply_overrides(preset("nano"), [*DEMO_OVERRIDES, *options.overrides])
    return replace_cfg(cfg, data=replace_cfg(cfg.data, data_dirs=[str(out / "data")], seed=options.seed),
                       train=replace_cfg(cfg.train, out_dir=str(out / "run"), seed=options.seed),
                       tokenizer=str(out / "tokenizer"))


def train_model(cfg: Config, tokenizer, budget_s: float, say: Say, progress: bool, force: bool = False,
                auto_size: bool = False) -> tuple[Config, dict]:
    """Train on the shards for `budget_s` seconds (the nano preset, or with `auto_size` the size
    `cogni-mamba plan` picks for the budget on this machine); returns the config used and the numbers."""
    from .train import build_trainer
    from .train.build import pretraining_inputs
    from .train.distributed import pick_device

    device = pick_device(None)
    cfg = replace_cfg(cfg, model=replace_cfg(cfg.model, vocab_size=tokenizer.vocab_size))
    if auto_size and not cfg.train.max_steps:
        from .plan import apply_plan, plan_for_budget

        start = time.time()
        plan = plan_for_budget(budget_s / 60, cfg, device, seconds_each=2.0)
        say(plan.describe())
        cfg = apply_plan(cfg, plan)
        budget_s -= time.time() - start
    model, batches, val = pretraining_inputs(cfg)
    # The clock is the budget: the trainer fits its schedule to the pace as it goes (longer or shorter),
    # so a slow first measurement does not cut the run short. An explicit train.max_steps (a test that
    # wants the same model on any machine) caps it.
    cfg = replace_cfg(cfg, train=replace_cfg(cfg.train, max_minutes=budget_s / 60))
    B, T = cfg.train.batch_size, cfg.data.seq_len
    say(f"training: {model.num_parameters() / 1e6:.1f}M parameters on {device.type}, {B} x {T} tokens per step, "
        f"for {budget_s / 60:.1f} min" + (f" or {cfg.train.max_steps} steps" if cfg.train.max_steps else ""))
    trainer = build_trainer(model, batches, val, cfg.train, config=cfg, tokenizer=tokenizer,
                            out_dir=cfg.train.out_dir, device=device, progress=progress, log=say, force=force)
    initial = trainer.evaluate()
    trainer.metrics.write({"step": 0, "epoch": 0, "val_loss": initial, "val_ppl": math.exp(min(initial, 50.0))})
    result = trainer.train()
    final = trainer.evaluate()
    say(f"training: {result.summary()}")
    return cfg, {"initial_val_loss": initial, "final_val_loss": final, "steps": result.steps,
                 "tokens_seen": result.tokens_seen, "train_seconds": result.seconds, "stopped": result.stopped}


# --- 5. samples ---------------------------------------------------------------------------------

def sample_stories(model, tokenizer, settings, n: int = 3, seed: int = 0) -> list[str]:
    """n stories continued from STORY_PROMPTS, sampled as one batch (story i with seed + i)."""
    from .inference import Engine

    prompts = [STORY_PROMPTS[i % len(STORY_PROMPTS)] for i in range(n)]
    engine = Engine(model, max_batch=n, bos_id=tokenizer.bos_id)
    requests = [engine.submit([tokenizer.bos_id, *tokenizer.encode(p, special=False)],
                              replace(settings, seed=seed + i), stop_ids=[tokenizer.eos_id])
                for i, p in enumerate(prompts)]
    return [p + tokenizer.decode(list(r), skip_special=True) for p, r in zip(prompts, requests, strict=True)]


def scripted_chat(chatbot, script=SCRIPT, **settings) -> list[dict[str, str]]:
    """Run a short conversation through the Chatbot; returns its messages (without the system prompt)."""
    for message in script:
        chatbot.chat(message, **settings)
    return [m for m in chatbot.messages if m["role"] != "system"]


CHECK_ANIMALS = ("fox", "bear", "cat", "dog", "duck", "frog", "owl", "lion", "penguin", "elephant")
CHECK_NUMBERS = tuple(range(1, 11))


def story_is_about(reply: str, kind: str) -> bool:
    """Whether a story reply is about `kind`: the word appears in the story itself, not only in an
    opening "Here is a story about a ..." line."""
    intro, sep, story = reply.partition("\n\n")
    body = story if sep and "story" in intro.lower() else reply
    return kind in words_of(body)


_SUCCESSOR_CLAIMS = (  # (pattern, group of the number, group of the one said to follow it)
    (re.compile(r"(\d+) comes after (\d+)", re.I), 2, 1),
    (re.compile(r"after (\d+) (?:comes|is) (\d+)", re.I), 1, 2),
    (re.compile(r"(\d+), then (\d+)", re.I), 1, 2),
    (re.compile(r"one more than (\d+) is (\d+)", re.I), 1, 2),
)


def number_is_right(reply: str, asked: int, expected: int) -> bool:
    """Whether a reply says `expected` follows `asked`: every "X comes after Y" / "after Y comes X" /
    "Y, then X" claim in it about `asked` names `expected` (and there is one, and none is wrong), and
    its first sentence names no other number than those two; a reply with no such claim is right when
    `expected` is the only number of its first sentence besides `asked`."""
    first = reply.strip().split(".")[0]
    numbers = {int(w) for w in re.findall(r"\d+", first)} - {asked}
    claims = [(int(m[a]), int(m[b])) for pattern, a, b in _SUCCESSOR_CLAIMS for m in pattern.finditer(reply)]
    if claims:
        about = [succ for of, succ in claims if of == asked]
        wrong = [(of, succ) for of, succ in claims if succ != of + 1]
        return bool(about) and all(s == expected for s in about) and not wrong and numbers <= {expected}
    return numbers == {expected}


def chat_checks(chatbot, seed: int = 0, temperature: float = 0.8) -> dict[str, float]:
    """Does the chat follow the request? Rates over fresh one-turn conversations, sampled at `temperature`
    as one batch through the engine:

    - story_on_topic / number_right: "Tell me a story about a X." for 10 animals, "What comes after N?" for
      N = 1..10 (phrasings the corpus uses, with other animals and numbers around them);
    - held_out_story_on_topic / held_out_number_right: phrasings the corpus generator never emits
      ("Could you tell me a story about a X?", "Which number follows N?", ...).
    """
    from .corpus.dialogues import HELD_OUT_STORY_REQUESTS
    from .inference import Engine

    cases = [("story_on_topic", f"Tell me a story about a {k}.", k) for k in CHECK_ANIMALS]
    cases += [("number_right", f"What comes after {n}?", n) for n in CHECK_NUMBERS]
    cases += [("held_out_story_on_topic", HELD_OUT_STORY_REQUESTS[i % len(HELD_OUT_STORY_REQUESTS)].format(kind=k), k)
              for i, k in enumerate(CHECK_ANIMALS)]
    cases += [("held_out_number_right", f"Which number follows {n}?", n) for n in CHECK_NUMBERS]
    settings = replace(chatbot.settings, temperature=temperature)
    engine = Engine(chatbot.model, max_batch=len(cases), bos_id=chatbot.tokenizer.bos_id)
    requests = [engine.submit(chatbot.prompt_ids([{"role": "user", "content": text}], settings.max_new_tokens),
                              replace(settings, seed=seed + i), stop_ids=chatbot.stop_ids)
                for i, (_, text, _) in enumerate(cases)]
    hits: dict[str, list[bool]] = {}
    for (name, _, arg), request in zip(cases, requests, strict=True):
        reply = chatbot.tokenizer.decode(list(request), skip_special=True)
        ok = story_is_about(reply, arg) if "story" in name else number_is_right(reply, arg, arg + 1)
        hits.setdefault(name, []).append(ok)
    return {name: sum(v) / len(v) for name, v in hits.items()}


def vocabulary_rate(texts: list[str]) -> float:
    """Share of the words of texts that the story grammar can produce."""
    words = [w for t in texts for w in words_of(t)]
    vocab = vocabulary()
    return sum(w in vocab for w in words) / max(1, len(words))


# --- the whole demo -------------------------------------------------------------------------------

def _trained(run: Path, report_path: Path) -> bool:
    from .checkpoint import CheckpointError, find_checkpoint

    try:
        find_checkpoint(run)
    except CheckpointError:
        return False
    return report_path.is_file()


def run_demo(options: DemoOptions, say: Say = print) -> tuple[DemoReport, object]:
    """Build (or reuse) everything, train (or reuse the checkpoint), sample; returns the report and the Chatbot."""
    from .chat import Chatbot
    from .checkpoint import load_checkpoint_full

    start = time.time()
    out = Path(options.out)
    cfg = demo_config(options, out)
    corpus = build_corpus(out / "corpus", CorpusSpec(size=options.corpus_size, seed=options.seed), say)
    tokenizer = build_tokenizer(corpus, out / "tokenizer", cfg.model.vocab_size, say, options.progress)
    build_shards(corpus, tokenizer, out / "data", options.seed, say, options.progress)
    report_path = out / "report.json"
    reused = not options.retrain and _trained(out / "run", report_path)
    if reused:
        numbers = json.loads(report_path.read_text())
        say(f"training: reusing the checkpoint in {out / 'run'} (pass --retrain to train again)")
    else:
        report_path.unlink(missing_ok=True)
        if (out / "run").exists():
            import shutil

            shutil.rmtree(out / "run")  # a fresh run (retrain, or one cut short): old checkpoints and metrics would mix in
        build_s = time.time() - start
        budget = options.minutes * 60 - build_s  # samples and chat come after the budget
        if budget < 10:
            raise CogniError(f"Building took {build_s:.0f} s of the {options.minutes:g}-minute budget, leaving too "
                             "little to train; pass a larger --minutes (the build is reused next time).")
        cfg, numbers = train_model(cfg, tokenizer, budget, say, options.progress, options.force, options.auto_size)
        numbers["build_seconds"] = build_s
        if numbers.pop("stopped") != "signal":  # a run cut short by Ctrl-C is trained again next time
            write_text_atomically(report_path, json.dumps(numbers, indent=2))
    model, tokenizer, run_cfg = load_checkpoint_full(out / "run")
    report = DemoReport(**{k: numbers[k] for k in ("initial_val_loss", "final_val_loss", "steps", "tokens_seen",
                                                  "train_seconds", "build_seconds")}, reused=reused)
    say(f"val loss: {report.initial_val_loss:.3f} -> {report.final_val_loss:.3f} ({report.drop:.0%} lower); "
        f"checkpoint and loss plot in {out / 'run'}")
    report.stories = sample_stories(model, tokenizer, run_cfg.generation, seed=options.seed)
    chatbot = Chatbot(model, tokenizer, run_cfg.generation)
    report.conversation = scripted_chat(chatbot, seed=options.seed)
    chatbot.reset()
    report.chat_checks = chat_checks(chatbot, seed=options.seed)
    return report, chatbot


def report_dict(report: DemoReport) -> dict:
    """The report as plain JSON-ready data (with the derived drop)."""
    return {**asdict(report), "drop": report.drop}
