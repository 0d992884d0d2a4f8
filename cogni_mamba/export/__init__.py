"""Export to Hugging Face (Llama) and GGUF (llama.cpp), and import Hugging Face Llama checkpoints.

    export_hf(model, tokenizer, config, "out/hf")           # AutoModelForCausalLM / AutoTokenizer folder
    export_gguf(model, tokenizer, config, "out/model.gguf", dtype="q8_0")
    model, tokenizer, config = import_hf("some/hf-llama")
"""

from .common import ExportError, chat_template_jinja, half_split_to_interleaved, interleaved_to_half_split
from .gguf_file import GGUF_DTYPES, export_gguf
from .hf import export_hf, to_transformers
from .hf_import import import_hf, import_to_checkpoint

__all__ = [
    "GGUF_DTYPES", "ExportError", "chat_template_jinja", "export_gguf", "export_hf", "half_split_to_interleaved",
    "import_hf", "import_to_checkpoint", "interleaved_to_half_split", "to_transformers",
]
