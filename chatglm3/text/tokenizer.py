"""ChatGLM3 tokenizer on plain SentencePiece, exact to the official `build_chat_input` ids.

The official `tokenization_chatglm.py` stopped working with transformers 4.45; the format is
small enough to state here directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Iterable, Literal, Sequence

import sentencepiece as spm

Role = Literal["system", "user", "assistant", "observation"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "observation")

# The special tokens follow the 64,789 SentencePiece pieces, in this order.
SPECIAL_TOKENS: tuple[str, ...] = (
    "[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
)
EOS_ID = 2
PAD_ID = 0
PIECES = 64789  # SentencePiece pieces in ChatGLM3's tokenizer.model; the special tokens follow
SPECIAL_IDS = {tok: PIECES + i for i, tok in enumerate(SPECIAL_TOKENS)}
# Where the official chat stops: end of text, or the model starting the next user/tool turn.
STOP_IDS = frozenset({EOS_ID, SPECIAL_IDS["<|user|>"], SPECIAL_IDS["<|observation|>"]})


@dataclass(frozen=True)
class Message:
    """One chat turn. `metadata` is the text the official format puts after the role token."""

    role: Role
    content: str
    metadata: str = ""
    tools: tuple | list | None = None  # system messages only: appended as indented JSON


class ChatGLMTokenizer:
    """Encodes text and chat turns to ChatGLM3 token ids and decodes ids back to text."""

    def __init__(self, model_file: str | PathLike[str]) -> None:
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.n_pieces = self.sp.vocab_size()
        self.special_ids = {tok: self.n_pieces + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = self.n_pieces + len(SPECIAL_TOKENS)
        self.eos_id = EOS_ID
        self.pad_id = PAD_ID
        self.prefix_ids = [self.special_ids["[gMASK]"], self.special_ids["sop"]]
        if self.special_ids != SPECIAL_IDS:
            raise ValueError(f"{model_file}: {self.n_pieces} pieces, not ChatGLM3's {PIECES}")
        self.stop_ids = STOP_IDS
        # No token covers more characters than its piece has (the normalizer only turns
        # spaces into "▁", one for one; byte pieces cover at most one character), which
        # bounds the token count of a text from below without tokenizing it.
        self.max_piece_chars = max(
            len(self.sp.id_to_piece(i)) for i in range(self.n_pieces)
            if not (self.sp.is_byte(i) or self.sp.is_control(i) or self.sp.is_unknown(i)))

    @classmethod
    def from_dir(cls, model_dir: str | PathLike[str]) -> "ChatGLMTokenizer":
        return cls(Path(model_dir) / "tokenizer.model")

    def role_id(self, role: str) -> int:
        return self.special_ids[f"<|{role}|>"]

    def encode_text(self, text: str) -> list[int]:
        """Plain SentencePiece ids; special-token spellings in `text` stay ordinary text."""
        return self.sp.encode(text)

    def encode(self, text: str) -> list[int]:
        """As the official `tokenizer.encode`: the `[gMASK] sop` prefix, then the text."""
        return self.prefix_ids + self.encode_text(text)

    def encode_message(self, message: Message) -> list[int]:
        content = message.content
        if message.role == "system" and message.tools is not None:
            content += "\n" + json.dumps(message.tools, indent=4, ensure_ascii=False)
        return (
            [self.role_id(message.role)]
            + self.encode_text(f"{message.metadata}\n")
            + self.encode_text(content)
        )

    def min_chat_tokens(self, messages: Sequence[Message]) -> int:
        """A lower bound on len(build_chat_input(messages)), in O(number of messages): the
        fixed tokens, plus the characters of the texts over the longest piece's length."""
        chars = sum(len(m.content) + len(m.metadata) + 1 for m in messages)
        return len(self.prefix_ids) + len(messages) + 1 + -(-chars // self.max_piece_chars)

    def min_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)), from its length alone (as min_chat_tokens)."""
        return len(self.prefix_ids) + -(-len(text) // self.max_piece_chars)

    def build_chat_input(self, messages: Iterable[Message]) -> list[int]:
        """`[gMASK] sop`, each message, then `<|assistant|>` for the model to answer."""
        ids = list(self.prefix_ids)
        for message in messages:
            ids += self.encode_message(message)
        ids.append(self.role_id("assistant"))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the SentencePiece ids; special tokens carry no text and are skipped."""
        return self.sp.decode([i for i in ids if 0 <= i < self.n_pieces])

    def piece(self, token_id: int) -> str:
        """A token's SentencePiece piece ("▁Hello", "<0xE4>") or special token's name."""
        if token_id >= self.n_pieces:
            return SPECIAL_TOKENS[token_id - self.n_pieces]
        return self.sp.id_to_piece(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes one token stands for (a byte-fallback piece: its one byte; a piece's
        "\u2581": a space; special tokens: none), as OpenAI's logprobs report them."""
        if not 0 <= token_id < self.n_pieces or self.sp.is_control(token_id):
            return b""
        piece = self.sp.id_to_piece(token_id)
        if self.sp.is_byte(token_id):  # "<0xE4>"
            return bytes([int(piece[3:-1], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")
