"""Streaming for stream_chat(): transformers' generate() runs in a worker thread and hands each new token
to the consuming generator, which can stop it at the next token by closing."""
import queue
import signal
import threading
from typing import Iterator

import torch
from transformers.generation import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer


class TokenQueue(BaseStreamer):
    """The new tokens [B] of every step, in order; None once generation has ended."""

    def __init__(self):
        self.queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        self.queue.put(value)

    def end(self):
        self.queue.put(None)


class StopOnEvent(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_generate(model, input_ids: torch.LongTensor, **kwargs) -> Iterator[torch.LongTensor]:
    """Runs model.generate() in a worker thread and yields the sequences [B, L + n] after every new token.
    Closing the generator (or an exception in the consumer) stops generation at the next token; an
    exception in generate() is raised in the consumer."""
    tokens, stop = TokenQueue(), threading.Event()
    kwargs["stopping_criteria"] = StoppingCriteriaList(list(kwargs.get("stopping_criteria") or [])
                                                       + [StopOnEvent(stop)])
    failure = []

    def run():
        # A SIGINT delivered to this thread would leave the consumer blocked on the queue: Ctrl-C must
        # reach the consumer (the main thread of a terminal or a notebook), which can then close us.
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            model.generate(input_ids=input_ids, streamer=tokens, **kwargs)
        except BaseException as error:  # re-raised in the consumer
            failure.append(error)
        finally:
            tokens.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    sequences = input_ids
    try:
        while (step := tokens.queue.get()) is not None:
            sequences = torch.cat([sequences, step.view(-1, 1).to(sequences.device)], dim=-1)
            yield sequences
    finally:
        stop.set()
        worker.join()
    if failure:
        raise failure[0]
