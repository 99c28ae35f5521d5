"""The files exporters leave beside a model: its tokenizer, chat template and configs, bundled
into the artifact so that it takes and gives text and chats, and the end-of-sequence tokens they
name."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import LlmcError

TOKENIZER = "tokenizer.json"
# what Hugging Face's tools and onnxruntime-genai write next to a model
FILES = (TOKENIZER, "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "config.json",
         "generation_config.json", "genai_config.json")
FOLDER = "model"  # inside the artifact


def find(folder: Path) -> dict[str, Path]:
    """The model files in `folder`, by name (those present)."""
    return {name: folder / name for name in FILES if (folder / name).is_file()}


def check_tokenizer(path: Path) -> None:
    try:
        from tokenizers import Tokenizer

        Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type for a bad file
        raise LlmcError(f"{path}: not a tokenizer Hugging Face's tokenizers library reads ({e})") from None


def eos_token_ids(files: dict[str, Path]) -> list[int]:
    """The end-of-sequence ids the configs name: generation_config.json first (it may list
    several, as chat models do), then config.json, then genai_config.json."""
    for name, keys in (("generation_config.json", ("eos_token_id",)), ("config.json", ("eos_token_id",)),
                       ("genai_config.json", ("model", "eos_token_id"))):
        if name not in files:
            continue
        try:
            value = json.loads(files[name].read_text())
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LlmcError(f"{files[name]}: not readable JSON ({e})") from None
        ids = value if isinstance(value, list) else [value] if value is not None else []
        if not all(type(i) is int and i >= 0 for i in ids):
            raise LlmcError(f"{files[name]}: {'.'.join(keys)} is {value!r}, not token ids")
        if ids:
            return ids
    return []


def read_text(path, flag: str) -> str:
    """A user's text file (a text to measure or calibrate on), or an error naming the option."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LlmcError(f"{flag} {path}: not a readable UTF-8 text file ({e})") from None
