"""Text in, text out, with the tokenizer an artifact bundles, read by Hugging Face's
`tokenizers` (imported only when text is asked for: token ids need nothing beyond numpy)."""

from __future__ import annotations

from typing import Callable

from .errors import LlmcError


class Text:
    def __init__(self, path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise LlmcError("text prompts need Hugging Face's tokenizers library (pip install tokenizers)") from None
        self.tokenizer = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    def stream(self, on_text: Callable[[str], None]) -> Callable[[int], None]:
        """A token callback that passes on the text each token adds. Tokens can end inside a
        character (byte-level BPE): text is held back until the decoding no longer ends in a
        replacement character."""
        ids, shown = [], [0]

        def on_token(token: int) -> None:
            ids.append(token)
            text = self.decode(ids)
            if not text.endswith("\ufffd") and len(text) > shown[0]:
                on_text(text[shown[0]:])
                shown[0] = len(text)
        return on_token
