"""Training: the loop (`Trainer`), AdamW + schedule, precision, DDP, and the checkpoint format."""

from .checkpoint import load_checkpoint, load_checkpoint_full, save_checkpoint
from .trainer import Trainer, TrainResult

__all__ = ["Trainer", "TrainResult", "load_checkpoint", "load_checkpoint_full", "save_checkpoint"]
