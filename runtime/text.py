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
        """A token callback that passes on the text each token adds (`Increments`)."""
        increments = Increments(self)

        def on_token(token: int) -> None:
            piece = increments.add(token)
            if piece:
                on_text(piece)
        return on_token


class Increments:
    """The text a growing list of tokens adds, token by token, each step decoding the few tokens
    since the last settled text (not the whole list: a long answer's per-token cost stays flat).
    The window starts a token before the new ones, as in vLLM and transformers' streamers, so a
    decoder that drops a text's leading space (SentencePiece) or merges across tokens is given
    its context. Tokens can end inside a character (byte-level BPE): their text waits until the
    decoding no longer ends in a replacement character."""

    def __init__(self, text: Text):
        self.text, self.ids = text, []
        self.start = self.settled = 0  # the window's first token; the first not yet shown

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._since(final=False)

    def rest(self) -> str:
        """What is still held back (an unfinished character, as decoded): the text's end."""
        return self._since(final=True)

    def _since(self, final: bool) -> str:
        shown = self.text.decode(self.ids[self.start:self.settled])
        text = self.text.decode(self.ids[self.start:])
        if len(text) <= len(shown) or (text.endswith("\ufffd") and not final):
            return ""
        self.start, self.settled = self.settled, len(self.ids)
        return text[len(shown):]
