"""Generated ids -> the text a client may be sent so far, with stop strings.

A streamed reply must never show text it will take back. Three things hold text back:
- the last character may be incomplete (its UTF-8 bytes are spread over several byte tokens and
  decode to U+FFFD until all have arrived);
- the end of the text may be the beginning of a stop string ("Obs" when "Observation:" stops);
- a chat reply is post-processed as the official code does (surrounding whitespace stripped, the
  training-date placeholder filled in), so a partial placeholder cannot be shown yet.
"""

from __future__ import annotations

from collections.abc import Sequence

from glm_numpy.generation import INCOMPLETE_CHARACTER, process_response
from glm_numpy.tokenizer import ChatGLM2Tokenizer


class TextStream:
    """Feed ids one at a time with ``add``; each call returns the text newly safe to send.

    ``stopped`` turns True when a stop string appears: the text ends just before it, and later
    ids must not be added. ``text`` is everything sent so far.
    """

    def __init__(
        self,
        tokenizer: ChatGLM2Tokenizer,
        stop: Sequence[str] = (),
        chat: bool = False,
        context: Sequence[int] = (),
    ):
        self.tokenizer, self.stop, self.chat = tokenizer, tuple(stop), chat
        # Decoding drops the space SentencePiece marks at the start of the first piece: decoded
        # after the prompt's last id (context) and without that id's text, a continuation keeps
        # its leading space, so that prompt + completion is the whole text.
        self.context = list(context)
        self.context_text = tokenizer.decode(self.context)
        self.ids: list[int] = []
        self.text = ""  # sent so far
        self.stopped = False

    def add(self, token: int) -> str:
        """-> the text that ``token`` makes safe to send ('' while something is held back)."""
        self.ids.append(token)
        return self._advance(final=False)

    def finish(self) -> str:
        """The reply has ended (</s> or the length limit): -> whatever was held back."""
        return self._advance(final=True)

    def decoded(self) -> str:
        """The text of the ids so far (after the context's text)."""
        full = self.tokenizer.decode(self.context + self.ids)
        if self.context and full.startswith(self.context_text):
            return full[len(self.context_text) :]
        return self.tokenizer.decode(self.ids)

    def _advance(self, final: bool) -> str:
        full = self.decoded()
        cut = first_stop(full, self.stop)
        if cut is not None:
            full, self.stopped, final = full[:cut], True, True
        if not final:
            full = full.rstrip(INCOMPLETE_CHARACTER)
            full = full[: len(full) - held_for_stop(full, self.stop)]
        shown = process_response(full) if self.chat else full
        if not final and self.chat and "[[" in shown[len(self.text) :]:
            return ""  # maybe half of the "[[训练时间]]" placeholder
        if not shown.startswith(self.text):  # post-processing rewrote what was sent: wait
            return ""
        delta, self.text = shown[len(self.text) :], shown
        return delta


def first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in text, or None."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def held_for_stop(text: str, stop: Sequence[str]) -> int:
    """How many characters at the end of text could be the start of a stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
