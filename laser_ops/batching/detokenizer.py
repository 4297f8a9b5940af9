"""Incremental detokenization: token ids in, text out, O(1) amortised per token.

One implementation serves every route: the native generate stream, the OpenAI routes (completion
text, per-token pieces for ``logprobs.tokens`` / ``text_offset``) and stop strings.

* :class:`IncrementalDetokenizer` turns ids into text pieces as they arrive. With a fast
  (``tokenizers``) tokenizer it drives ``tokenizers.decoders.DecodeStream`` (Rust, constant work
  per token); otherwise it decodes only the few ids since the last complete character (the
  prefix/read-offset scheme of vLLM and TGI). A token that ends inside a multi-byte character gives
  ``""`` and the token that completes it gives the whole character; ``"".join`` of the pieces is the
  text. A ``context`` (e.g. the last prompt token) keeps the leading space that SentencePiece-style
  decoders strip from a sequence's first token.
* :class:`StopMatcher` finds the first stop string looking only at the text a token added (plus the
  longest stop's length), and says how much of the tail to hold back from a stream because it could
  still become a stop string.
* :class:`TextStream` combines them for one generated sequence: final text cut before a stop string,
  and stream deltas that never show a stop string or half a character.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

try:  # tokenizers >= 0.21
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - old tokenizers: the pure-Python path below serves
    DecodeStream = None  # type: ignore[assignment,misc]

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Text pieces of a growing id sequence; see the module docstring."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, context: Sequence[int] = (),
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(context)
        if context and _REPLACEMENT in self._decode(context):
            context = []  # the context itself ends inside a character: it cannot anchor anything
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = (DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
                        if DecodeStream is not None and backend is not None else None)
        self._backend = backend
        # Fallback state (and the flush of a trailing partial character on either path).
        self._ids = context
        self._prefix = 0
        self._read = len(context)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (``""`` while a character is still incomplete)."""
        self._ids.append(token_id)
        if self._stream is not None:
            piece = self._stream.step(self._backend, token_id)
            if piece is None:
                return ""
            self._prefix, self._read = max(0, len(self._ids) - 1), len(self._ids)
            return piece
        before = self._decode(self._ids[self._prefix:self._read])
        now = self._decode(self._ids[self._prefix:])
        if len(now) > len(before) and now.startswith(before) and not now.endswith(_REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Text of ids still held back (a character cut off by the end of the sequence, as U+FFFD)."""
        if self._read >= len(self._ids):
            return ""
        before = self._decode(self._ids[self._prefix:self._read])
        now = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return now[len(before):] if now.startswith(before) else now

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """One piece per id (the last one includes any flushed remainder)."""
        out = [self.push(i) for i in ids]
        if out:
            out[-1] += self.flush()
        return out


def token_string(tokenizer: PreTrainedTokenizerBase, token_id: int, anchor: Sequence[int]) -> str:
    """A token's own text as it reads after other text (special tokens show theirs): the top-logprob key."""
    anchor = list(anchor)
    anchor_text = tokenizer.decode(anchor)
    full = tokenizer.decode(anchor + [token_id])
    return full[len(anchor_text):] if full.startswith(anchor_text) else tokenizer.decode([token_id])


class StopMatcher:
    """Finds stop strings in a growing text, looking only at what changed."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self.stops), default=0)

    def __bool__(self) -> bool:
        return bool(self.stops)

    def find(self, text: str, added: int) -> int | None:
        """Start of the earliest stop string that overlaps the last ``added`` characters, else None."""
        if not self.stops or added <= 0:
            return None
        start = max(0, len(text) - added - self._longest + 1)
        window = text[start:]
        hits = [i for i in (window.find(s) for s in self.stops) if i >= 0]
        return start + min(hits) if hits else None

    def holdback(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
        for k in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


class TextStream:
    """Text of one generated sequence: stop strings applied, stream deltas held back where unsafe."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, context: Sequence[int] = (),
                 stop: Sequence[str] = ()) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, context=context)
        self._stops = StopMatcher(stop)
        self.text = ""
        self._emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a generated id; return the piece it added (before stop handling). Sets :attr:`stopped`."""
        piece = self._detok.push(token_id)
        if piece:
            self.text += piece
            cut = self._stops.find(self.text, len(piece))
            if cut is not None:
                self.text = self.text[:cut]
                self.stopped = True
        return piece

    def finish(self) -> None:
        """The sequence ended: take any held-back partial character into the text (unless stopped)."""
        if not self.stopped:
            self.text += self._detok.flush()

    def delta(self, final: bool = False) -> str:
        """Text not yet streamed that is safe to show (all of it when ``final``)."""
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._stops.holdback(self.text)
        if end <= self._emitted:
            return ""
        piece = self.text[self._emitted:end]
        self._emitted = end
        return piece
