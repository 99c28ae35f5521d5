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

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        """Token ids; `special_tokens`: with those the tokenizer adds around a text (a BOS), as
        for a plain prompt, or without, as for a rendered chat (its template writes them)."""
        return self.tokenizer.encode(text, add_special_tokens=special_tokens).ids

    @property
    def bos_token_id(self) -> int | None:
        """The token the tokenizer starts every text with, or None where it adds none."""
        with_special, plain = self.encode("a"), self.encode("a", special_tokens=False)
        adds_bos = len(with_special) > len(plain) and with_special[1:len(plain) + 1] == plain
        return with_special[0] if adds_bos else None

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
