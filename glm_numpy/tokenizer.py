"""ChatGLM2Tokenizer: SentencePiece plus five special ids, and the chat prompt (spec §4.4, §5).

    encode("你好") -> [gMASK, sop] + sp.encode("你好") = [64790, 64792, 36474, 54591]

The SentencePiece model holds n pieces (ids 0..n-1; n = 64789 for the real tokenizer.model).
ChatGLM2 appends its special tokens after them, so their ids depend on n:

    [MASK] n   [gMASK] n+1   [sMASK] n+2   sop n+3   eop n+4        vocab_size = n + 5

and reuses SentencePiece's own <unk> 0 (also the pad id), <s> 1 (never added) and </s> 2 (eos).
The text goes to SentencePiece unchanged: no normalisation, and special-token strings inside the
text ("</s>", "[gMASK]") are ordinary text. The model's embedding has more rows than the
tokenizer has ids (65024 > 64794); ids in that gap have no text, and ``decode`` refuses them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")  # ids n, n+1, ... in this order
UNK_ID = 0  # <unk>, also the padding id
BOS_ID = 1  # <s>: exists in the vocabulary, never added by ChatGLM2
EOS_ID = 2  # </s>: the only id that stops generation

History = Sequence[tuple[str, str]]


class TokenizerError(ValueError):
    """A tokenizer.model that is missing or unreadable, or ids that have no text."""


def build_prompt(query: str, history: History | None = None) -> str:
    """The ChatGLM2 chat prompt (spec §4.4): every past round, then the new query.

    Rounds are numbered from 1, separated by two line feeds, with full-width colons (U+FF1A);
    nothing follows the final "答：". The wrapper is used even when there is no history.
    """
    prompt = "".join(
        f"[Round {i}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(history or [], start=1)
    )
    return prompt + f"[Round {len(history or []) + 1}]\n\n问：{query}\n\n答："


def continuation_prompt(query: str, history: History) -> str:
    """The text a conversation appends to its KV cache for a new round (spec §4.5): the same
    round as ``build_prompt`` writes it, led by the two line feeds that end the previous round."""
    return f"\n\n[Round {len(history) + 1}]\n\n问：{query}\n\n答："


@dataclasses.dataclass(frozen=True)
class Batch:
    """Left-padded token ids of several texts (spec §5.4), each array [B, T]."""

    input_ids: np.ndarray  # pads are id 0
    attention_mask: np.ndarray  # 0 on pads, 1 on tokens
    position_ids: np.ndarray  # 0 on pads, 0..len-1 on each row's tokens


def left_pad(id_lists: Sequence[Sequence[int]]) -> Batch:
    """Lists of ids of different lengths -> one [B, T] batch, padded on the LEFT (spec §5.4), so
    every row's last token sits in the last column and positions do not shift with padding."""
    if not id_lists or any(len(ids) == 0 for ids in id_lists):
        raise ValueError("left_pad needs at least one list of ids, and no empty list")
    width = max(len(ids) for ids in id_lists)
    input_ids = np.full((len(id_lists), width), UNK_ID, dtype=np.int64)  # [B, T]
    attention_mask = np.zeros((len(id_lists), width), dtype=np.int64)  # [B, T]
    position_ids = np.zeros((len(id_lists), width), dtype=np.int64)  # [B, T]
    for row, ids in enumerate(id_lists):
        start = width - len(ids)
        input_ids[row, start:] = ids
        attention_mask[row, start:] = 1
        position_ids[row, start:] = np.arange(len(ids))
    return Batch(input_ids, attention_mask, position_ids)


class ChatGLM2Tokenizer:
    """The ChatGLM2 tokenizer over a SentencePiece ``tokenizer.model``."""

    stop_ids = (EOS_ID,)  # generated ids that end a reply (ChatGLM3 adds role tokens)

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path}: no such tokenizer file (expected a tokenizer.model)")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as err:
            raise TokenizerError(
                f"{path}: not a readable SentencePiece model ({err})".strip()
            ) from None
        n = self.sp.GetPieceSize()
        self.special_ids = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.gmask_id = self.special_ids["[gMASK]"]
        self.sop_id = self.special_ids["sop"]
        self.eop_id = self.special_ids["eop"]
        self.eos_id, self.pad_id, self.unk_id = EOS_ID, UNK_ID, UNK_ID

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ChatGLM2Tokenizer:
        """The tokenizer.model inside a model directory."""
        path = Path(directory) / "tokenizer.model"
        if not path.is_file():
            raise TokenizerError(f"{directory}: no tokenizer.model in this directory")
        return cls(path)

    @property
    def vocab_size(self) -> int:
        """Ids that have a meaning: the SentencePiece pieces plus the five special tokens."""
        return self.sp.GetPieceSize() + len(SPECIAL_TOKENS)

    @property
    def prefix_ids(self) -> list[int]:
        """[gMASK, sop]: what every encode with special tokens starts with (spec §4.2)."""
        return [self.gmask_id, self.sop_id]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """text -> ids; with special tokens, [gMASK, sop] first. No BOS, no EOS."""
        ids = self.sp.EncodeAsIds(text)
        return self.prefix_ids + ids if add_special_tokens else ids

    def batch_encode(self, texts: Sequence[str], add_special_tokens: bool = True) -> Batch:
        """Several texts -> a left-padded batch with attention mask and position ids."""
        return left_pad([self.encode(t, add_special_tokens) for t in texts])

    def build_chat_input(self, query: str, history: History | None = None) -> list[int]:
        """The ids of a whole chat prompt: [gMASK, sop] + build_prompt(query, history)."""
        return self.encode(build_prompt(query, history))

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """ids -> their token strings ('▁你', '<0x0A>', '[gMASK]'…), for showing a tokenization."""
        names = {i: name for name, i in self.special_ids.items()}
        self._check_ids(ids)
        return [names.get(int(i)) or self.sp.IdToPiece(int(i)) for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        """ids -> text. <unk>/pad 0, <s> 1, </s> 2 and the five special ids decode to nothing.

        Raises TokenizerError (a ValueError) naming the id for an id with no text: negative, or
        >= vocab_size (e.g. the model's unused embedding rows 64794..65023), as the reference does.
        """
        self._check_ids(ids)
        n = self.sp.GetPieceSize()
        kept = [int(i) for i in ids if int(i) not in (UNK_ID, BOS_ID, EOS_ID) and int(i) < n]
        return self.sp.DecodeIds(kept)

    def _check_ids(self, ids: Sequence[int]) -> None:
        for i in ids:
            if not 0 <= int(i) < self.vocab_size:
                last = self.vocab_size - 1
                raise TokenizerError(
                    f"token id {int(i)} has no text: this tokenizer's ids are 0..{last}"
                )
