"""Training: the loop (`Trainer`, made by `build_trainer`), AdamW / Muon + schedule, precision, DDP / FSDP2,
and the checkpoint format."""

from .build import build_trainer
from .checkpoint import load_checkpoint, load_checkpoint_full, save_checkpoint
from .results import TrainResult
from .trainer import Trainer

__all__ = ["Trainer", "TrainResult", "build_trainer", "load_checkpoint", "load_checkpoint_full", "save_checkpoint"]
