"""The fine-tuning run: a pretrained checkpoint + chat data -> the Trainer -> a chat checkpoint.

The new checkpoint has the same layout as a pretraining one (weights, config.json, tokenizer/), so
`chat` and `serve` load it directly. Only the weights of the pretrained checkpoint are used: the
optimizer, step count and schedule start fresh. `resume=True` continues the fine-tuning run in
`out_dir` exactly (weights, optimizer, batch position and RNG, all from its latest checkpoint).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, apply_overrides
from ..errors import CogniError
from ..train import checkpoint as ckpt
from .chat_data import ChatFile, read_chat_file
from .sft import (
    ChatBatches,
    EncodeStats,
    add_system_prompt,
    encode_conversations,
    padded_eval_batches,
    split_train_val,
)

SFT_LR_SCALE = 0.1  # fine-tuning starts from trained weights: a tenth of the pretraining LR is the default
SFT_MAX_WARMUP = 20


def sft_defaults(pretrain: Config, out_dir: Path) -> Config:
    """The pretrained model's config with fine-tuning defaults: LR / 10, short warmup, 3 epochs, new out_dir."""
    t = pretrain.train
    lr = t.lr * SFT_LR_SCALE
    train = dataclasses.replace(t, lr=lr, min_lr=min(t.min_lr * SFT_LR_SCALE, lr), max_steps=None, epochs=3,
                                warmup_steps=min(t.warmup_steps, SFT_MAX_WARMUP), max_minutes=None,
                                out_dir=str(out_dir))
    return dataclasses.replace(pretrain, train=train)


def default_out_dir(checkpoint: Path) -> Path:
    """`<run>-chat` beside the pretraining run directory the checkpoint belongs to."""
    run = checkpoint.parent if (checkpoint.parent / ckpt.LATEST).is_file() else checkpoint
    return run.with_name(run.name + "-chat")


def has_checkpoint(run_dir: Path) -> bool:
    """True when `run_dir` already holds a complete checkpoint."""
    try:
        ckpt.find_checkpoint(run_dir)
    except ckpt.CheckpointError:
        return False
    return True


@dataclass
class FinetunePlan:
    """Everything a fine-tuning run needs, built and checked before any training starts."""

    trainer: Any  # cogni_mamba.train.Trainer
    config: Config
    source: Path  # the pretrained checkpoint directory
    out_dir: Path
    data: ChatFile
    train_stats: EncodeStats
    val_conversations: int
    val_examples: int  # those with an assistant token within the context
    resume: bool

    def describe(self) -> str:
        """What will happen, in a few lines."""
        t = self.config.train
        context = min(self.config.data.seq_len, self.config.model.max_seq_len)
        lines = [self.data.summary(),
                 f"train: {self.train_stats.summary(context)}",
                 f"val: {self.val_conversations:,} conversations ({self.val_examples:,} usable within the context)",
                 f"fine-tuning {self.source} -> {self.out_dir}: {self.trainer.total_steps:,} steps of "
                 f"{t.batch_size} x {t.grad_accum} conversations, lr {t.lr:g}"
                 + (" (resuming)" if self.resume else "")]
        return "\n".join(lines)


def _load_config(checkpoint: Path, out_dir: Path, resume: bool, overrides: Sequence[str],
                 max_steps: int | None) -> Config:
    """Fine-tuning defaults on the pretrained config (or the run's own config when resuming), then overrides."""
    if resume and has_checkpoint(out_dir):
        cfg = ckpt.load_config_of(ckpt.find_checkpoint(out_dir))
    else:
        cfg = sft_defaults(ckpt.load_config_of(checkpoint), out_dir)
    cfg = apply_overrides(cfg, list(overrides))
    if max_steps is not None:
        cfg = apply_overrides(cfg, [f"train.max_steps={max_steps}"])
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(out_dir)))


def _load_tokenizer(checkpoint: Path):
    from ..tokenizer import load_tokenizer

    if not (checkpoint / "tokenizer").is_dir():
        raise CogniError(f"Checkpoint {checkpoint} has no tokenizer/ folder, so its chat template cannot be "
                         "rendered; fine-tune a checkpoint written by `cogni-mamba train`.")
    return load_tokenizer(checkpoint / "tokenizer")


def _encode_val(conversations: Sequence, tokenizer: Any, context: int) -> list:
    """Validation examples (none when every held-out conversation lies beyond the context)."""
    try:
        return encode_conversations(conversations, tokenizer, context)[0] if conversations else []
    except CogniError:
        return []


def plan_finetune(checkpoint: str | Path, data: str | Path, *, out_dir: str | Path | None = None,
                  overrides: Sequence[str] = (), val_fraction: float = 0.05, max_steps: int | None = None,
                  resume: bool = False, system_prompt: str | None = None, device: str | None = None,
                  progress: bool = True, log: Callable[[str], None] | None = None, force: bool = False
                  ) -> FinetunePlan:
    """Load the checkpoint and the chat data, split and encode it, and build the Trainer (no training yet).

    `system_prompt` (default: the Chatbot's default one; "" for none) is added to half of the
    conversations that have no system message, chosen with the data seed.
    """
    from ..chat import DEFAULT_SYSTEM_PROMPT
    from ..model import CogniMamba
    from ..train import build_trainer
    from ..train.distributed import current

    source = ckpt.find_checkpoint(checkpoint)
    out = Path(out_dir) if out_dir is not None else default_out_dir(source)
    pretrain_run = source.parent if (source.parent / ckpt.LATEST).is_file() else source
    if out.resolve() in (source.resolve(), pretrain_run.resolve()):
        raise CogniError(f"--out {out} is the pretrained run itself; choose a new folder for the fine-tuned model.")
    if not resume and has_checkpoint(out):
        raise CogniError(f"{out} already holds a fine-tuning run; pass --resume to continue it or choose "
                         "another --out.")
    cfg = _load_config(source, out, resume, overrides, max_steps)
    tokenizer = _load_tokenizer(source)
    chat_file = read_chat_file(data)
    context = min(cfg.data.seq_len, cfg.model.max_seq_len)
    system = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
    conversations = add_system_prompt(chat_file.conversations, system, cfg.data.seed)
    train_convs, val_convs = split_train_val(conversations, val_fraction, cfg.data.seed)
    train_examples, train_stats = encode_conversations(train_convs, tokenizer, context)
    val_examples = _encode_val(val_convs, tokenizer, context)

    dist = current()
    batches = ChatBatches(train_examples, cfg.train.batch_size, tokenizer.pad_id, seed=cfg.data.seed,
                          rank=dist.rank, world_size=dist.world_size)
    val_batches = padded_eval_batches(val_examples, cfg.train.batch_size, tokenizer.pad_id)
    model = CogniMamba(cfg.model)
    ckpt.load_weights(model, source)  # weights only: the optimizer and schedule start anew
    trainer = build_trainer(model, batches, val_batches, cfg.train, config=cfg, tokenizer=tokenizer, out_dir=out,
                            device=device, dist=dist, progress=progress, log=log, force=force)
    return FinetunePlan(trainer, cfg, source, out, chat_file, train_stats, len(val_convs), len(val_examples), resume)


def run_finetune(plan: FinetunePlan):
    """Train (resuming first when asked and possible); returns the Trainer's TrainResult."""
    if plan.resume and has_checkpoint(plan.out_dir):
        plan.trainer.resume(plan.out_dir)
    elif plan.resume:
        plan.trainer.log(f"note: {plan.out_dir} has no checkpoint yet; starting the fine-tuning run from the start")
    return plan.trainer.train()
