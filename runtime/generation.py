"""The generation engine's home: what turns the model's growing replies into text a user is shown.
(The batching engine that serves many users at once lands here too.)"""
import queue
import threading
from typing import Callable, Iterator, List, Optional, Sequence

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


def in_own_thread(make_iterator: Callable[[], Iterator]) -> Iterator:
    """The items of make_iterator(), produced in a thread of their own. Closing this generator returns at
    once: the source is closed in its own thread, after its current step (a forward pass), so that whoever
    closes (a web server's event loop when a page presses Stop) never waits for the model."""
    items, closed, end = queue.Queue(), threading.Event(), object()

    def produce():
        source = make_iterator()
        try:
            for item in source:
                if closed.is_set():
                    break
                items.put((item, None))
            items.put((end, None))
        except Exception as error:  # noqa: BLE001 (re-raised in the consumer)
            items.put((end, error))
        finally:
            source.close()

    threading.Thread(target=produce, daemon=True, name="generation").start()
    try:
        while True:
            item, error = items.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        closed.set()
