"""What turns the model's growing replies into text a user is shown (the engine that generates them for many
users at once is runtime/engine.py)."""
from typing import List, Optional, Sequence

from chatglm_6b.modeling_chatglm import TRAINING_TIME_PLACEHOLDER

STOPPED_MARK = "（回答已中断）"  # shown after a reply the user cut short (Ctrl-C, Stop)


def stable_prefix(response: str, stops: Sequence[str] = ()) -> str:
    """The part of a growing (post-processed) response that later tokens cannot change, safe to show
    while streaming: an ASCII mark turns Chinese once a Chinese character follows it, an incomplete
    character decodes as U+FFFD, and a trailing partial placeholder or stop string may still complete."""
    end = len(response.rstrip(",!:;?\ufffd"))
    for pattern in list(stops) + [TRAINING_TIME_PLACEHOLDER]:
        for k in range(min(len(pattern) - 1, len(response)), 0, -1):
            if response.endswith(pattern[:k]):
                end = min(end, len(response) - k)
                break
    return response[:end]


def first_stop(text: str, stops: List[str]) -> Optional[int]:
    """Where the first of the stop strings starts in text, or None."""
    found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return min(found) if found else None
