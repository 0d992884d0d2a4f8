"""Chat fine-tuning (SFT): chat data files, assistant-only loss, the fine-tuning run, chat data making.

    plan = plan_finetune("runs/nano", "chats.jsonl", out_dir="runs/nano-chat")
    run_finetune(plan)     # writes a checkpoint that `chat` and `serve` load directly
"""

from .chat_data import (
    CHAT_FORMAT_HELP,
    ChatDataError,
    ChatFile,
    conversation_of,
    read_chat_file,
    write_chat_file,
)
from .exact_match import exact_match_rate, greedy_replies
from .runner import FinetunePlan, plan_finetune, run_finetune, sft_defaults
from .sft import (
    ChatBatches,
    collate,
    encode_conversation,
    encode_conversations,
    labels_from_mask,
    split_train_val,
)

__all__ = [
    "CHAT_FORMAT_HELP", "ChatBatches", "ChatDataError", "ChatFile", "FinetunePlan", "collate", "conversation_of",
    "encode_conversation", "encode_conversations", "exact_match_rate", "greedy_replies", "labels_from_mask",
    "plan_finetune", "read_chat_file", "run_finetune", "sft_defaults", "split_train_val", "write_chat_file",
]
