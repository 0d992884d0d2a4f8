"""`load_tokenizer`: from a saved directory, GPT-2's vocab.json + merges.txt, the hub name "gpt2", or "simple"."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from ..errors import CogniError
from .core import SIDECAR, Tokenizer, fingerprint_of
from .simple import SimpleTokenizer

HUB_REPOS = {"gpt2": "openai-community/gpt2", "openai-community/gpt2": "openai-community/gpt2"}
SIMPLE_NAMES = ("simple", "bytes")
LOCAL_HINT = ("pass a local directory holding tokenizer.json or vocab.json + merges.txt instead "
              "(--tokenizer /path/to/dir, or `tokenizer` in config.json)")


def load_tokenizer(path_or_name: str | os.PathLike | Tokenizer) -> Tokenizer:
    """The tokenizer named by a directory (or tokenizer.json file), "gpt2" (hub) or "simple"/"bytes"."""
    if isinstance(path_or_name, Tokenizer):
        return path_or_name
    text = str(path_or_name)
    if text in SIMPLE_NAMES:
        return SimpleTokenizer()
    path = Path(text).expanduser()
    if path.exists():  # a local folder wins over a hub name, so ./gpt2 works offline
        return load_from_path(path)
    if text in HUB_REPOS:
        return gpt2_from_hub(HUB_REPOS[text])
    raise CogniError(f"No tokenizer at {text!r}: pass a directory holding tokenizer.json or vocab.json + "
                     f"merges.txt, or one of: gpt2, {', '.join(SIMPLE_NAMES)}.")


def load_from_path(path: Path) -> Tokenizer:
    """Load from a directory (ours, GPT-2 files, or a checkpoint with a tokenizer/ folder) or a .json file."""
    if path.is_file() and path.name in ("vocab.json", "merges.txt"):
        return load_from_path(path.parent)
    if path.is_file():
        if path.suffix != ".json":
            raise CogniError(f"{path} is not a tokenizer: pass its directory or a tokenizer.json file.")
        return from_tokenizer_json(path, path.parent / SIDECAR)
    if (path / "tokenizer.json").is_file():
        return from_tokenizer_json(path / "tokenizer.json", path / SIDECAR)
    vocab, merges = path / "vocab.json", path / "merges.txt"
    if vocab.is_file() and merges.is_file():
        return gpt2_from_files(vocab, merges)
    if vocab.is_file() != merges.is_file():
        present, missing = (vocab, merges) if vocab.is_file() else (merges, vocab)
        raise CogniError(f"{path} has {present.name} but no {missing.name}; GPT-2 style tokenizers need both files.")
    if (path / "tokenizer").is_dir():  # a checkpoint directory
        return load_from_path(path / "tokenizer")
    raise CogniError(f"{path} holds no tokenizer.json and no vocab.json + merges.txt; pass a tokenizer directory, "
                     f"or train one with `cogni-mamba tokenizer train`.")


def read_sidecar(path: Path) -> dict | None:
    """Our metadata beside tokenizer.json, or None where there is none (e.g. a tokenizer.json from the hub)."""
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CogniError(f"{path} is not valid JSON ({e}); delete it to load tokenizer.json without it.") from None
    if not isinstance(meta, dict) or meta.get("kind") not in ("gpt2", "bpe", "simple"):
        raise CogniError(f"{path} is not a Cogni-Mamba tokenizer sidecar; delete it to load tokenizer.json alone.")
    return meta


def from_tokenizer_json(path: Path, sidecar: Path) -> Tokenizer:
    """A Tokenizer from a tokenizer.json, checked against the fingerprint our sidecar recorded."""
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises bare Exceptions for parse errors
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CogniError(f"{path} is not a valid tokenizer.json ({first}); replace it with a good copy or "
                         f"retrain the tokenizer.") from None
    meta = read_sidecar(sidecar)
    if meta is None:
        return Tokenizer(hf, kind="bpe", name=path.parent.name or "bpe")
    if meta.get("fingerprint") not in (None, fingerprint_of(hf)):
        raise CogniError(f"{path} does not match the fingerprint in {sidecar.name} (the file was changed or "
                         f"replaced); restore the original, or delete {sidecar.name} to accept it as is.")
    if meta["kind"] == "simple":
        return SimpleTokenizer()
    return Tokenizer(hf, kind=meta["kind"], name=str(meta.get("name") or meta["kind"]),
                     train_report=meta.get("train_report"))


def gpt2_hf_from_files(vocab: Path, merges: Path) -> HFTokenizer:
    """GPT-2's byte-level BPE from its original files (before our special tokens are added)."""
    try:
        bpe = models.BPE.from_file(str(vocab), str(merges))
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CogniError(f"Cannot read GPT-2 tokenizer files {vocab} and {merges} ({first}); replace them with the "
                         f"original vocab.json and merges.txt.") from None
    hf = HFTokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2 does not add a leading space
    hf.decoder = decoders.ByteLevel()
    return hf


def gpt2_from_files(vocab: Path, merges: Path) -> Tokenizer:
    """The GPT-2 tokenizer (ids identical to OpenAI's) plus our chat/pad tokens at 50257..50261."""
    return Tokenizer(gpt2_hf_from_files(vocab, merges), kind="gpt2", name="gpt2")


def gpt2_from_hub(repo: str) -> Tokenizer:
    """GPT-2's vocab.json + merges.txt from the Hugging Face hub cache, downloading them when online."""
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError:
        raise CogniError(f"Loading 'gpt2' from the hub needs the huggingface_hub package; {LOCAL_HINT}.") from None

    def fetch(local_only: bool) -> tuple[Path, Path]:
        files = [hf_hub_download(repo, name, local_files_only=local_only) for name in ("vocab.json", "merges.txt")]
        return Path(files[0]), Path(files[1])

    try:
        return gpt2_from_files(*fetch(local_only=True))
    except CogniError:
        raise
    except Exception:
        pass  # not cached yet
    if constants.HF_HUB_OFFLINE or not _resolves(constants.ENDPOINT):
        raise CogniError(f"Cannot download the GPT-2 tokenizer: this machine is offline and it is not in the "
                         f"Hugging Face cache; {LOCAL_HINT}.")
    try:
        return gpt2_from_files(*fetch(local_only=False))
    except CogniError:
        raise
    except Exception as e:
        raise CogniError(f"Downloading the GPT-2 tokenizer from {repo} failed ({type(e).__name__}); {LOCAL_HINT}.") \
            from None


def _resolves(url: str) -> bool:
    # A DNS check answers "offline?" in milliseconds; the hub client would retry for ~20 s first.
    host = urlparse(url).hostname or url
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True
