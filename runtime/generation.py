"""What turns the model's growing replies into the text a user is shown, one token at a time (the engine that
generates them for many users at once is runtime/engine.py).

    stream = TextStream(tokenizer, stops=["\\n\\n"])
    for token in tokens:
        show(stream.push(token))     # the text no later token can change, as it becomes so
        if stream.stopped: break     # a stop string appeared: the reply ends before it
    show(stream.finish())            # the rest, once the reply has ended
    stream.text == process_response(tokenizer.decode(tokens)), cut before the first stop string

Each token costs O(1) amortised: the ids are decoded in a short sliding window, and process_response runs on the
few characters that are not final yet (a mark next to the reply's end may still turn full-width).
"""
import os
from typing import List, Optional, Sequence, Tuple

from chatglm_6b.modeling_chatglm import (CHINESE_PUNCTUATION, TRAINING_TIME, TRAINING_TIME_PLACEHOLDER,
                                         process_response)

STOPPED_MARK = "（回答已中断）"  # shown after a reply the user cut short (Ctrl-C, Stop)
# Around a piece of a reply given to process_response, so that its strip() leaves the piece's own ends alone: not
# whitespace, not Chinese, not a mark, so it changes nothing next to it.
SHIELD = "\x00"


def is_chinese(char: str) -> bool:
    return "\u4e00" <= char <= "\u9fff"


def stable_prefix(response: str, stops: Sequence[str] = ()) -> str:
    """The part of a growing (post-processed) response that later tokens cannot change, safe to show while
    streaming: an ASCII mark turns Chinese once a Chinese character follows it, trailing whitespace is stripped if
    the reply ends there, an incomplete character decodes as U+FFFD, and a trailing partial placeholder or stop
    string may still complete."""
    while True:
        end = len(response.rstrip().rstrip("".join(CHINESE_PUNCTUATION) + "\ufffd"))
        for pattern in list(stops) + [TRAINING_TIME_PLACEHOLDER]:
            for k in range(min(len(pattern) - 1, end), 0, -1):
                if response.endswith(pattern[:k], 0, end):
                    end -= k
                    break
        if end == len(response):
            return response
        response = response[:end]


class Detokenizer:
    """Token ids -> the text tokenizer.decode gives for all of them, as increments: each token decodes a window of
    the last few ids, and a trailing incomplete UTF-8 character (U+FFFD) is held back until its bytes are complete.
    The window starts at an id that decodes to text of its own: SentencePiece drops the leading space of a text's
    first piece, so the window's first visible piece only anchors the decoding and is not shown again."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: List[int] = []
        self.start = self.read = 0  # the window: ids[start:]; ids[start:read] are decoded already
        self.invisible = {}  # id -> whether it decodes to nothing on its own (control tokens)

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """What is held back, once no more ids come."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self.start:self.read])
        text = self.tokenizer.decode(self.ids[self.start:])
        if not final and (text.endswith("\ufffd") or not text.startswith(before)):
            return ""
        self.start, self.read = self.read, len(self.ids)
        while 0 < self.start < len(self.ids) and self._invisible(self.ids[self.start]):
            self.start -= 1
        return text[len(os.path.commonprefix([before, text])):]

    def _invisible(self, token: int) -> bool:
        if token not in self.invisible:
            self.invisible[token] = not self.tokenizer.decode([token])
        return self.invisible[token]


class ResponseStream:
    """process_response() of a text that grows at its end, as increments of processed text. A cut in the raw text
    is safe where neither side can change the other: no placeholder spans it and it does not separate a mark from
    a Chinese character (the placeholder counts as its replacement). Everything before the last safe cut is
    processed once; only the few characters after it are processed again on each append."""

    def __init__(self):
        self.pending = ""  # raw text after the last cut
        self.started = False  # a non-whitespace character has come (process_response strips the reply's start)

    def append(self, raw: str) -> str:
        """Adds raw text; returns the processed text before the new last safe cut (final but for the reply's
        trailing whitespace, which finish() strips)."""
        self.pending += raw
        if not self.started:
            self.pending = self.pending.lstrip()
            self.started = bool(self.pending)
        cut = self._last_safe_cut()
        piece, self.pending = self.pending[:cut], self.pending[cut:]
        return self.processed(piece)

    def tentative(self) -> str:
        """The processed text after the last cut, as it would be if the reply ended here (without the strip)."""
        return self.processed(self.pending)

    def finish(self) -> str:
        piece, self.pending = self.pending, ""
        return self.processed(piece)

    @staticmethod
    def processed(piece: str) -> str:
        return process_response(SHIELD + piece + SHIELD)[1:-1] if piece else ""

    @staticmethod
    def ending(rest: str) -> str:
        """The reply's last text as process_response ends it: without trailing whitespace."""
        return rest.rstrip()

    def _last_safe_cut(self) -> int:
        text, placeholder = self.pending, TRAINING_TIME_PLACEHOLDER
        for cut in range(len(text) - len(placeholder) + 1, 0, -1):
            spanning = text.find(placeholder, max(0, cut - len(placeholder) + 1), cut + len(placeholder) - 1)
            if spanning != -1 and spanning < cut:
                continue
            left = TRAINING_TIME[-1] if text.endswith(placeholder, 0, cut) else text[cut - 1]
            right = TRAINING_TIME[0] if text.startswith(placeholder, cut) else text[cut]
            if not (left in CHINESE_PUNCTUATION and is_chinese(right) or is_chinese(left) and right in CHINESE_PUNCTUATION):
                return cut
        return 0


class RawStream:
    """ResponseStream's interface for text shown as decoded: every piece is final at once."""

    def append(self, raw: str) -> str:
        return raw

    def tentative(self) -> str:
        return ""

    def finish(self) -> str:
        return ""

    @staticmethod
    def ending(rest: str) -> str:
        return rest


def earliest_stop(text: str, stops: Sequence[str], start: int = 0) -> Optional[Tuple[int, int]]:
    """(start, end) of the stop string that ends first in text[start:] (of those, the one starting first)."""
    found = [(i + len(stop), i) for stop in stops if (i := text.find(stop, start)) >= 0]
    return (min(found)[1], min(found)[0]) if found else None


def shown_forms(stop: str) -> List[str]:
    """A stop string as it may appear in the text the user is shown: as written and, if it has ASCII marks that
    process_response makes full-width next to Chinese, with them full-width (the model wrote the ASCII mark)."""
    full_width = "".join(CHINESE_PUNCTUATION.get(char, char) for char in stop)
    return [stop] if full_width == stop else [stop, full_width]


class TextStream:
    """A reply's token ids in, the text its user is shown out (see the module's docstring). End tokens are not
    pushed. `text` is everything shown so far; `stopped` tells that a stop string ended the reply. processed=False
    gives the text as decoded, without process_response (raw completions, JSON)."""

    def __init__(self, tokenizer, stops: Sequence[str] = (), processed: bool = True):
        self.detokenizer = Detokenizer(tokenizer)
        self.response = ResponseStream() if processed else RawStream()
        self.stops = [form for stop in stops if stop for form in (shown_forms(stop) if processed else [stop])]
        self.lookback = max((len(stop) for stop in self.stops), default=1) - 1
        self.unsent = ""  # processed, final, not shown yet (held back: trailing whitespace, a partial stop)
        self.ahead = 0  # characters of response.tentative() already shown
        self.shown: List[str] = []
        self.recent = ""  # the last `lookback` characters shown, where a stop string may have begun
        self.stopped = False

    @property
    def text(self) -> str:
        return "".join(self.shown)

    def push(self, token: int) -> str:
        """The newly shown text after this token (often "")."""
        if self.stopped:
            return ""
        self._confirm(self.response.append(self.detokenizer.push(token)))
        return self._show(self.unsent + self.response.tentative()[self.ahead:], final=False)

    def finish(self) -> str:
        """The rest of the text, once the reply has ended (the end token, its length limit, or a cancel)."""
        if self.stopped:
            return ""
        self._confirm(self.response.append(self.detokenizer.flush()))
        self._confirm(self.response.finish())
        return self._show(self.response.ending(self.unsent), final=True)

    def _confirm(self, piece: str) -> None:
        skipped = min(self.ahead, len(piece))  # shown already, as part of the tentative text
        self.unsent += piece[skipped:]
        self.ahead -= skipped

    def _show(self, candidate: str, final: bool) -> str:
        settled = candidate if final else stable_prefix(candidate)  # no later token changes it
        searched = self.recent + settled
        stop = earliest_stop(searched, self.stops)
        if stop is not None:
            settled, self.stopped = searched[:stop[0]].rstrip()[len(self.recent):], True
        shown = settled if final or self.stopped else stable_prefix(settled, self.stops)
        if len(shown) <= len(self.unsent):
            self.unsent = self.unsent[len(shown):]
        else:
            self.ahead += len(shown) - len(self.unsent)
            self.unsent = ""
        if shown:
            self.shown.append(shown)
            self.recent = (self.recent + shown)[-self.lookback:] if self.lookback else ""
        return shown


# ---- text -> token ids ---------------------------------------------------------------------------------

def text_ids(tokenizer, text: str) -> List[int]:
    """Ids of `text` as it appears inside a reply (no special tokens). SentencePiece puts a space before a text's
    first piece, so the text is encoded after a newline (a piece of its own) and what comes before it is dropped."""
    sp = tokenizer.sp_tokenizer
    ids = [sp[piece] for piece in sp.tokenize("\n" + text)]
    return ids[ids.index(sp["<n>"]) + 1:]


def prompt_ending(tokenizer, ids: List[int]) -> List[int]:
    """Token ids of a prompt ending as chat()'s prompts end, with [gMASK] <sop> (added unless already there)."""
    ending = [tokenizer.gmask_token_id, tokenizer.bos_token_id]
    return ids if ids[-2:] == ending else ids + ending
