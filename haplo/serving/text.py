"""Token ids to the text a client sees, piece by piece: incremental detokenization and stop strings."""

from __future__ import annotations

from collections.abc import Callable


class TextAssembler:
    """Feed new ids one at a time; get back the text that is safe to send now.

    Text is held back while it could still become a stop string, or ends in an incomplete UTF-8
    character; once a stop string appears, the text ends right before it and `stopped` is set."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]) -> None:
        self.decode, self.stops = decode, stops
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False
        self._hold = max((len(s) for s in stops), default=1) - 1

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = text[: min(hits)], True
            return self._flush(len(self.text))
        self.text = text
        safe = len(text) - self._hold
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        return self._flush(safe)

    def finish(self) -> str:
        """What is left once the stream has ended."""
        return self._flush(len(self.text))

    def _flush(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : upto], upto
        return piece
