"""Host-side text of generated sequences: incremental detokenisation and stop strings.

`SequenceText.push(token)` returns the text that can be shown now: complete characters only (a byte-level piece
may end inside a UTF-8 character), and never a piece of text that could still become a stop string. Streaming
and non-streaming answers go through the same object, so their texts are identical.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class SequenceText:
    """The growing text of one sequence (`decode` is the tokenizer's decode with special tokens skipped)."""

    def __init__(self, decode, stop: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stop = tuple(stop)
        self.tokens: list[int] = []
        self.text = ""  # the decoded text so far (complete characters)
        self.emitted = 0  # characters of `text` already returned by push
        self.stopped = False
        # windowed detokenisation: decode from `prefix` so each step costs O(window), not O(length)
        self._prefix = 0
        self._read = 0

    def push(self, token: int) -> str:
        """Add a token; returns the newly visible text (may be empty). After a stop string, returns "" forever."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        before = self.decode(self.tokens[self._prefix: self._read])
        after = self.decode(self.tokens[self._prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return self._visible(final=False)  # an incomplete character (or a token with no text yet)
        self.text += after[len(before):]
        self._prefix, self._read = self._read, len(self.tokens)
        return self._visible(final=False)

    def finish(self) -> str:
        """The sequence ended: the text still held back (incomplete characters are decoded as they are)."""
        if not self.stopped:
            tail = self.decode(self.tokens[self._prefix:])
            head = self.decode(self.tokens[self._prefix: self._read])
            if len(tail) > len(head):
                self.text += tail[len(head):]
        return self._visible(final=True)

    def _visible(self, final: bool) -> str:
        for s in self.stop:
            at = self.text.find(s)
            if at >= 0:
                self.text = self.text[:at]
                self.stopped = True
        if self.stopped or final:
            out = self.text[self.emitted:]
            self.emitted = len(self.text)
            return out
        hold = self._stop_prefix_length()
        end = max(self.emitted, len(self.text) - hold)
        out = self.text[self.emitted: end]
        self.emitted = end
        return out

    def _stop_prefix_length(self) -> int:
        """Length of the longest end of the text that is the beginning of a stop string (held back)."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
