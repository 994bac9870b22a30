"""Answer tokens -> text pieces as they come, in time linear in the answer's length.

Decoding the whole answer again at every token (what this did before) is quadratic: a 4,000-token answer decoded
8 million tokens. The `tokenizers` library keeps a small window instead (`DecodeStream`), holding back a piece
while it ends in an incomplete UTF-8 sequence; a tokenizer without a `tokenizers` backend gets the same window
kept by hand. `flush` decodes the whole answer once, so the text handed out always adds up to a whole decode.
"""
from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = None
        if self._backend is not None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=True)
        self._prefix = self._read = 0  # the hand-kept window: ids[_prefix:_read] were decoded last time

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self._stream is not None:
            piece = self._stream.step(self._backend, token_id) or ""
        else:
            piece = self._window_step()
        self.emitted += len(piece)
        return piece

    def _window_step(self) -> str:
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        now = decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(now) <= len(before) or now.endswith("\ufffd"):  # nothing new yet, or a character cut in two
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return now[len(before):]

    def flush(self) -> str:
        """What is still held back at the end (an incomplete byte sequence shows as U+FFFD, as decode does)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece = text[self.emitted:]
        self.emitted = len(text)
        return piece
