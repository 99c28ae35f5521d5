"""Text out token by token (`runtime.text.Increments`, what `llmc run`/`chat` stream and the
server sends): the pieces join to the whole decoding, no piece carries half a character, and each
token costs a few tokens' decoding, not the whole output's; with the tokenizers of files nobody
here made (byte-level BPE) and a SentencePiece one with byte fallback made here."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmc.runtime.text import Increments, Text

FIXTURES = Path(__file__).parent / "fixtures" / "third_party"
SAMPLE = "Naïve café — 東京 in 2026: ½ 🙂🙂 done.\n  Indented\tline, «quoted»."


def sentencepiece(folder: Path) -> Path:
    """A Llama-style tokenizer: SentencePiece pieces ("▁" for a space, the decoder stripping the
    text's leading one) with byte fallback (<0xNN>) for what is not in its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyzNI.,:"]:
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


@pytest.mark.parametrize("name", ["optimum-llama", "optimum-qwen2", "optimum-phi3", "optimum-gpt2", "sentencepiece"])
def test_pieces_join_to_the_whole_text_and_never_split_a_character(name, tmp_path):
    text = Text(sentencepiece(tmp_path) if name == "sentencepiece" else FIXTURES / name / "tokenizer.json")
    ids = text.encode(SAMPLE, special_tokens=False)
    increments = Increments(text)
    pieces = [increments.add(t) for t in ids]
    pieces.append(increments.rest())
    assert "".join(pieces) == text.decode(ids), name
    assert not any("\ufffd" in p for p in pieces), pieces
    assert sum(map(bool, pieces)) > len(SAMPLE.split()), "the text came at the end, not as it went"


def test_each_token_decodes_a_window_not_the_whole_output():
    text = Text(FIXTURES / "optimum-qwen2" / "tokenizer.json")
    decoded = []
    real = text.decode
    text.decode = lambda ids: decoded.append(len(ids)) or real(ids)
    increments = Increments(text)
    for t in text.encode(SAMPLE * 20, special_tokens=False):
        increments.add(t)
    assert max(decoded) <= 8  # the last settled text (an emoji's 4 bytes at most) and the tokens waiting


def test_an_unfinished_character_at_the_end_is_given_as_decoded():
    text = Text(FIXTURES / "optimum-qwen2" / "tokenizer.json")
    ids = text.encode("🙂", special_tokens=False)
    increments = Increments(text)
    assert [increments.add(t) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert increments.rest() == text.decode(ids[:-1])
