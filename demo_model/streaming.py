# Copy of chatglm_6b/streaming.py, written by `python tools/copy_model_code.py` (runtime.saving.copy_model_code): edit chatglm_6b/streaming.py, not this file.
"""Streaming from a producer thread to a consumer: `Pump`, the one hand-over of the repository (stream_chat()'s
tokens here, and the serving engine's replies in runtime/engine.py), and stream_generate(), which runs
transformers' generate() in a worker thread and yields each new token; the consumer stops it at the next token by
closing."""
import asyncio
import collections
import signal
import threading
from typing import AsyncIterator, Iterator, Optional

import torch
from transformers.generation import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer


class Pump:
    """Items put by a producer thread, taken in order by one consumer, then the end (with the producer's error,
    raised in the consumer, or not). The consumer iterates in a thread, or with `async for` when the pump is made
    with its event loop."""

    _END = object()

    def __init__(self, loop: Optional[asyncio.AbstractEventLoop] = None):
        self.loop = loop
        self.items = asyncio.Queue() if loop is not None else collections.deque()
        self.ready = None if loop is not None else threading.Condition()
        self.error: Optional[BaseException] = None

    def put(self, item) -> bool:
        """Hands an item over; False if the consumer's event loop has closed (nobody is listening)."""
        if self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(self.items.put_nowait, item)
            except RuntimeError:
                return False
            return True
        with self.ready:
            self.items.append(item)
            self.ready.notify()
        return True

    def close(self, error: Optional[BaseException] = None) -> bool:
        """The end: no more items; `error` is raised in the consumer after the items before it."""
        self.error = error
        return self.put(self._END)

    def __iter__(self) -> Iterator:
        if self.loop is not None:
            raise TypeError("this pump hands over to an event loop: use `async for`")
        while True:
            with self.ready:
                while not self.items:
                    self.ready.wait()
                item = self.items.popleft()
            if item is self._END:
                break
            yield item
        if self.error is not None:
            raise self.error

    async def __aiter__(self) -> AsyncIterator:
        while (item := await self.items.get()) is not self._END:
            yield item
        if self.error is not None:
            raise self.error


class TokenPump(BaseStreamer):
    """generate()'s streamer: the new tokens [B] of every step into a pump (generate() first puts the prompt)."""

    def __init__(self):
        self.pump = Pump()
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.pump.put(value)

    def end(self):
        pass  # the pump is closed by the worker, with generate()'s error if it failed


class StopOnEvent(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_generate(model, input_ids: torch.LongTensor, **kwargs) -> Iterator[torch.LongTensor]:
    """Runs model.generate() in a worker thread and yields the sequences [B, L + n] after every new token.
    Closing the generator (or an exception in the consumer) stops generation at the next token; an
    exception in generate() is raised in the consumer."""
    tokens, stop = TokenPump(), threading.Event()
    kwargs["stopping_criteria"] = StoppingCriteriaList(list(kwargs.get("stopping_criteria") or [])
                                                       + [StopOnEvent(stop)])

    def run():
        # A SIGINT delivered to this thread would leave the consumer blocked on the pump: Ctrl-C must
        # reach the consumer (the main thread of a terminal or a notebook), which can then close us.
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        error = None
        try:
            model.generate(input_ids=input_ids, streamer=tokens, **kwargs)
        except BaseException as failure:  # re-raised in the consumer
            error = failure
        finally:
            tokens.pump.close(error)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    sequences = input_ids
    try:
        for step in tokens.pump:
            sequences = torch.cat([sequences, step.view(-1, 1).to(sequences.device)], dim=-1)
            yield sequences
    finally:
        stop.set()
        worker.join()
