"""The detokenizer: token ids in, final text out, for every entry point that streams an answer.

Below both the CLI (``tokensieve ask`` and ``chat`` print an answer as it is generated) and the server
(each request's ``Delta`` events), so neither imports the other for it. :class:`Decoder` is the server's
decoding tokenizer: a copy of its own, so decoding never waits for (or races) an encoding.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from typing import Any


class TextStream:
    """Token ids in, final text out: incremental decoding with stop strings.

    A token's text is released as soon as it is final: not while it ends in an incomplete UTF-8
    character (decoded as U+FFFD), and not while its end could be the start of a stop string. The
    first stop string found ends the text (it is not included), as OpenAI does. ``text`` is the
    concatenation of everything released, so a streamed answer equals the non-streamed one.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = [s for s in stop if s]
        self.ids: list[int] = []
        self._prefix = 0  # decoding window start: the tokens of the last release give context (leading spaces)
        self._read = 0  # tokens before this are turned into text
        self._pending = ""  # decoded, not released: could be the start of a stop string
        self.text = ""
        self.stopped = False  # a stop string was found

    def push(self, token_id: int) -> str:
        """Add a token; return the text that became final (often one token's text, maybe '')."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        new = self._new_text(final=False)
        return self._release(new, final=False) if new else ""

    def finish(self) -> str:
        """End of generation: release everything held back (unless a stop string ended the text)."""
        if self.stopped:
            return ""
        return self._release(self._new_text(final=True), final=True)

    def _new_text(self, final: bool) -> str:
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before) :]

    def _release(self, new: str, final: bool) -> str:
        pending = self._pending + new
        hits = [i for i in (pending.find(s) for s in self._stop) if i >= 0]
        if hits:
            out, self._pending, self.stopped = pending[: min(hits)], "", True
        elif final:
            out, self._pending = pending, ""
        else:
            keep = self._stop_prefix_len(pending)
            out, self._pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self.text += out
        return out

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best


class Decoder:
    """``ids -> text`` (special tokens skipped) on a tokenizer instance of its own: a copy of ``tokenizer``.

    A server encodes new requests while its worker decodes running answers. A Hugging Face tokenizer instance
    keeps per-call encoding settings (truncation, padding) in shared state, so encodes on one instance are
    serialised by the encoder's lock; decoding on a separate instance needs no part of that lock, and a long
    encoding never stalls a stream. ``lock`` serialises the decodes on this instance (uncontended with one
    worker). A tokenizer that cannot be copied is shared (``copied`` False): decoding only reads it.
    """

    def __init__(self, tokenizer: Any) -> None:
        try:
            self.tokenizer = copy.deepcopy(tokenizer)
            self.copied = True
        except Exception:  # e.g. a tokenizer holding a handle that cannot be copied
            self.tokenizer, self.copied = tokenizer, False
        self.lock = threading.Lock()

    def __call__(self, ids: list[int]) -> str:
        with self.lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """The text of each token of ``ids``, special tokens included, joining to the decoded text: decoded
        incrementally (``TextStream``), so a character split over several tokens (UTF-8 bytes) belongs to the
        token that completes it and the ones before it have ``""``."""

        def decode(window: list[int]) -> str:
            with self.lock:
                return self.tokenizer.decode(window, skip_special_tokens=False)

        stream = TextStream(decode)
        out = [stream.push(t) for t in ids]
        if out:
            out[-1] += stream.finish()
        return out
