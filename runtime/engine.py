"""The generation engine behind api.py and web_demo.py: one thread owns the model and advances every running
request in one step at a time (iteration-level batching), its work planned by the scheduler (runtime/scheduler.py),
its keys and values kept in a paged cache (runtime/kv_cache.py) and its layers run by the runner (runtime/runner.py).
This module is their small public face.

    engine = GenerationEngine(model, tokenizer, max_batch_size=8, max_queue=64).start()
    reply = engine.submit(encode_chat(tokenizer, query, history), max_length=2048, do_sample=False, stops=["\\n\\n"])
    for delta in reply: print(delta.text, end="")     # or `async for` with submit(..., loop=...)
    reply.cancel()                                       # the request leaves at the next step

Each reply is what chat() alone gives for its request, whatever else runs beside it: GLM's positions and
bidirectional prompt attention per sequence, exact layer-major chunked prefill, and sampling with chat()'s settings
from the request's own generator. Its text is produced as it grows (runtime/generation.py): process_response's
text, cut before the first stop string. Failures stay with their requests: a failing prefill fails the requests
it was prefilling, a failing decode step only the rows that fail again alone.
"""
import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Iterator, List, Optional, Sequence as Seq

import torch

from chatglm_6b.kernels import prepare_cpu_kernels
from chatglm_6b.streaming import Pump
from chatglm_6b.tokenization_chatglm import glm_context_length

from .generation import TextStream
from .kv_cache import PagedKVCache, default_budget
from .runner import ModelRunner
from .sampling import SamplingParams, TokenLogprobs, sample
from .scheduler import Scheduler, Sequence, Step, StepBudget

logger = logging.getLogger("engine")

# Rows decoded together, and requests waiting beyond them, unless the server is told otherwise.
DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE = 8, 64


class QueueFull(Exception):
    """More requests are waiting than max_queue allows."""


class EngineClosed(Exception):
    """The engine is shutting down (or has stopped) and takes no new requests."""


class DoesNotFit(ValueError):
    """A prompt that leaves no room for a reply within its max_length, or that the KV cache can never hold."""


@dataclass
class Delta:
    """What one generated token adds to a reply: the token and the text it makes visible (often ""), and its
    logprobs if the request asked for them. The text that is still pending when a reply ends comes last, with no
    token."""
    token: Optional[int]
    text: str
    logprobs: Optional[TokenLogprobs] = None


class Reply:
    """One request: its generated token ids as the engine produces them (the end token included, as generate()
    returns it) and the text they make, iterated as Deltas in a thread or, when submitted with an event loop, with
    `async for`. After the iteration: text (the whole reply's text), finish_reason ("stop": the end token or a
    stop string; "length": max_length reached; "cancelled"), and the engine's exception is raised by the iteration
    if the request failed."""

    def __init__(self, prompt_ids: List[int], max_length: int, sampling: SamplingParams, seed: Optional[int],
                 stream: TextStream, loop: Optional[asyncio.AbstractEventLoop]):
        self.prompt_ids, self.max_length, self.sampling, self.seed = list(prompt_ids), max_length, sampling, seed
        self.stream = stream
        self.tokens: List[int] = []
        self.finish_reason: Optional[str] = None
        self.error: Optional[BaseException] = None
        self.cancelled = False
        self.on_cancel = lambda reply: None  # set by the engine: frees a queue slot at once
        self.deltas = Pump(loop)

    @property
    def text(self) -> str:
        return self.stream.text

    @property
    def completion_tokens(self) -> int:
        """Generated tokens, the end token not counted."""
        return len(self.tokens) - (self.finish_reason == "stop" and not self.stream.stopped)

    def cancel(self) -> None:
        """Frees the row at the next step (or the queue slot at once); safe from any thread, returns at once."""
        if not self.cancelled:
            self.cancelled = True
            self.on_cancel(self)

    # ---- called by the engine thread ----
    def _token(self, token: int, text: str, logprobs: Optional[TokenLogprobs]) -> None:
        self.tokens.append(token)
        if not self.deltas.put(Delta(token, text, logprobs)):  # the consumer's event loop has closed
            self.cancel()

    def _finish(self, reason: Optional[str], error: Optional[BaseException] = None) -> None:
        if reason in ("stop", "length"):
            rest = self.stream.finish()
            if rest:
                self.deltas.put(Delta(None, rest))
        self.finish_reason, self.error = reason, error
        self.deltas.close(error)

    # ---- consumers ----
    def __iter__(self) -> Iterator[Delta]:
        try:
            yield from self.deltas
        finally:
            self.cancel()  # a consumer that stops early frees the row

    async def __aiter__(self) -> AsyncIterator[Delta]:
        try:
            async for delta in self.deltas:
                yield delta
        finally:
            self.cancel()


class GenerationEngine:
    """Owns the model in one thread. submit() only queues (it never waits for the model); the thread runs up to
    max_batch_size requests at once in a KV cache of kv_cache_bytes (default: sized to the free memory), and
    submit() refuses (QueueFull) a request beyond max_queue waiting ones. max_step_tokens bounds a step's work
    (see runtime/scheduler.py; default: from the measured step times)."""

    def __init__(self, model, tokenizer, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 max_queue: int = DEFAULT_MAX_QUEUE, kv_cache_bytes: Optional[int] = None,
                 max_step_tokens: Optional[int] = None):
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError("max_batch_size must be at least 1 and max_queue at least 0")
        if max_step_tokens is not None and max_step_tokens < 1:
            raise ValueError("max_step_tokens must be at least 1")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [tokenizer.eos_token_id if eos is None else eos])
        config = model.config
        self.context, self.prefix_length = config.max_sequence_length, config.pre_seq_len or 0
        if model.device.type == "cpu":
            prepare_cpu_kernels()  # its paged attention: compiled now (once per machine), not inside a reply
        dtype = PagedKVCache.dtype_for(model)
        budget = kv_cache_bytes or default_budget(model, dtype, max_batch_size * (self.context + self.prefix_length))
        self.cache = PagedKVCache.for_model(model, budget)
        self.runner = ModelRunner(model, self.cache)
        self.scheduler = Scheduler(self.cache, config.num_layers, max_batch_size,
                                   StepBudget(config.num_layers, max_step_tokens))
        logger.info("KV cache: %.2f GB (%d tokens in blocks of %d)%s", self.cache.bytes / 2**30, self.cache.tokens,
                    self.cache.block_size, "" if kv_cache_bytes else ", sized to the free memory (--kv-cache-gb)")
        self.lock = threading.Condition()  # guards incoming, accepted and closing; wakes the engine thread
        self.incoming: collections.deque = collections.deque()  # submitted, not yet seen by the engine thread
        self.accepted = 0  # submitted and not finished: at most max_batch_size + max_queue
        self.closing = False
        self.thread: Optional[threading.Thread] = None

    # ---- what other threads call ----
    def start(self) -> "GenerationEngine":
        self.thread = threading.Thread(target=self._run, daemon=True, name="generation-engine")
        self.thread.start()
        return self

    @property
    def alive(self) -> bool:
        """Taking requests: the engine thread runs and is not shutting down."""
        return self.thread is not None and self.thread.is_alive() and not self.closing

    @property
    def queue_depth(self) -> int:
        return len(self.incoming) + len(self.scheduler.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.scheduler.admitted)

    def submit(self, prompt_ids: List[int], max_length: int, do_sample: bool = False, temperature: float = 1.0,
               top_p: float = 1.0, loop: Optional[asyncio.AbstractEventLoop] = None, seed: Optional[int] = None,
               stops: Seq[str] = (), raw_text: bool = False, **options) -> Reply:
        """Queues a request: prompt_ids as chat() encodes them, max_length counting prompt and reply (capped at
        the model's context), stops the strings that end the reply's text, options SamplingParams' others
        (presence_penalty, frequency_penalty, logit_bias, logprobs, grammar). The reply's text is chat()'s
        (process_response), or with raw_text the tokens as decoded. Raises QueueFull, EngineClosed, or DoesNotFit
        for a prompt that leaves no room for a reply or that the cache can never hold."""
        max_length = min(max_length, self.context)
        if not prompt_ids or len(prompt_ids) >= max_length:
            raise DoesNotFit(f"the prompt is {len(prompt_ids)} tokens and leaves no room for a reply within "
                             f"max_length={max_length}")
        if not self.scheduler.fits(len(prompt_ids), self.prefix_length):
            raise DoesNotFit(f"the prompt is {len(prompt_ids)} tokens and the KV cache holds {self.cache.tokens} "
                             "(--kv-cache-gb)")
        reply = Reply(prompt_ids, max_length, SamplingParams(do_sample, temperature, top_p, **options), seed,
                      TextStream(self.tokenizer, stops, processed=not raw_text), loop)
        with self.lock:
            if not self.alive:
                raise EngineClosed("the server is shutting down: this request was not started")
            if self.accepted >= self.max_batch_size + self.max_queue:
                raise QueueFull(f"{self.batch_size} requests are generating and {self.queue_depth} waiting, "
                                f"the most this server queues (--max-queue {self.max_queue})")
            self.accepted += 1
            reply.on_cancel = self._cancelled
            self.incoming.append(reply)
            self.lock.notify()
        return reply

    def close(self) -> None:
        """No new requests, and the ones that have not started end with EngineClosed; the running ones finish."""
        with self.lock:
            self.closing = True
            refused = list(self.incoming)
            self.incoming.clear()
            self.lock.notify()
        for reply in refused:
            self._finish(reply, None, EngineClosed("the server is shutting down: this request was not started"))

    def stop(self, timeout: Optional[float] = None) -> None:
        """close(), then wait for the running requests to finish and the thread to end."""
        self.close()
        if self.thread is not None:
            self.thread.join(timeout)

    def _cancelled(self, reply: Reply) -> None:
        with self.lock:
            try:
                self.incoming.remove(reply)
            except ValueError:
                self.lock.notify()
                return  # the engine thread drops it at the next step
        self._finish(reply, "cancelled")

    def _finish(self, reply: Reply, reason: Optional[str], error: Optional[BaseException] = None) -> None:
        if reply.finish_reason is None and reply.error is None:
            with self.lock:
                self.accepted -= 1
            reply._finish(reason, error)

    # ---- the engine thread ----
    def _run(self) -> None:
        scheduler = self.scheduler
        try:
            with torch.inference_mode():
                while True:
                    with self.lock:
                        while not self.incoming and not scheduler.waiting and not scheduler.admitted \
                                and not self.closing:
                            self.lock.wait()
                        arrived = list(self.incoming)
                        self.incoming.clear()
                        closing = self.closing
                    scheduler.waiting.extend(self._sequence(reply) for reply in arrived)
                    if closing:  # what has not started ends now; what runs finishes
                        for sequence in [s for s in scheduler.waiting if not s.reply.tokens]:
                            scheduler.remove(sequence)
                            self._finish(sequence.reply, None, EngineClosed(
                                "the server is shutting down: this request was not started"))
                        if not scheduler.waiting and not scheduler.admitted:
                            return
                    self._drop_cancelled()
                    step = scheduler.schedule()
                    for sequence in scheduler.out_of_room:
                        self._end(sequence, "length")
                    scheduler.out_of_room.clear()
                    if step:
                        self._step(step)
                    if torch.cuda.is_available() and not scheduler.admitted:  # as the original: give blocks back
                        torch.cuda.empty_cache()
        except BaseException:
            logger.exception("the generation engine stopped")
            raise
        finally:
            with self.lock:
                self.closing = True
                left = [s.reply for s in list(scheduler.waiting) + scheduler.admitted] + list(self.incoming)
                self.incoming.clear()
            for reply in left:
                self._finish(reply, None, EngineClosed("the generation engine stopped"))

    def _sequence(self, reply: Reply) -> Sequence:
        if reply.sampling.do_sample:
            reply.sampling.generator = torch.Generator(device=self.model.device)
            if reply.seed is None:
                reply.sampling.generator.seed()
            else:
                reply.sampling.generator.manual_seed(reply.seed)
        positions, step = self.model.glm_generation_positions(torch.tensor([reply.prompt_ids]))
        return Sequence(reply=reply, tokens=list(reply.prompt_ids), prompt_length=len(reply.prompt_ids),
                        context_length=glm_context_length(reply.prompt_ids, self.model.config.bos_token_id),
                        prompt_positions=positions[0], position_step=step[0], prefix_length=self.prefix_length)

    def _drop_cancelled(self) -> None:
        for sequence in list(self.scheduler.waiting) + self.scheduler.admitted:
            if sequence.reply.cancelled:
                self._end(sequence, "cancelled")

    def _end(self, sequence: Sequence, reason: Optional[str], error: Optional[BaseException] = None) -> None:
        self.scheduler.remove(sequence)
        self._finish(sequence.reply, reason, error)

    def _step(self, step: Step) -> None:
        started = time.perf_counter()
        try:
            rows = step.decode + step.completing
            picks = self._sample(self.runner.run(step), rows)
        except Exception as error:  # noqa: BLE001 (the step's requests fail; the engine keeps serving)
            self._isolate(step, error)
            return
        self.scheduler.budget.observe(time.perf_counter() - started, len(step.decode), step.units)
        for sequence in step.decode:
            sequence.computed += 1
        for sequence in step.completing:
            sequence.computed, sequence.workspace = sequence.prefill_length, None
        self._deliver(rows, *picks)

    def _sample(self, logits, sequences: List[Sequence]):
        # the generated tokens only of the rows whose penalties count them (a copy per row per step otherwise)
        generated = [s.tokens[s.prompt_length:] if s.reply.sampling.adjusts_scores else None for s in sequences]
        return sample(logits, [s.reply.sampling for s in sequences], generated)

    def _isolate(self, step: Step, error: BaseException) -> None:
        """A step failed: the prefills in it fail (their buffers are spent), and the decoding rows are run again,
        together and then one by one; only a row that fails alone fails."""
        prefilling = list(dict.fromkeys(segment.sequence for segment in step.segments))
        logger.exception("a generation step failed: %d prefilling requests end with the error", len(prefilling),
                         exc_info=error)
        for sequence in prefilling:
            self._end(sequence, None, error)
        groups = [step.decode] if len(step.decode) > 1 else []
        groups += [[sequence] for sequence in step.decode]
        pending = list(step.decode)
        for group in groups:
            group = [s for s in group if s in pending]
            if not group:
                continue
            try:
                retry = Step(decode=group, segments=[], completing=[], units=0)
                picks = self._sample(self.runner.run(retry), group)
            except Exception as again:  # noqa: BLE001
                if len(group) == 1:
                    logger.exception("a request's decoding step failed alone: it ends with the error", exc_info=again)
                    self._end(group[0], None, again)
                    pending.remove(group[0])
                continue
            for sequence in group:
                sequence.computed += 1
                pending.remove(sequence)
            self._deliver(group, *picks)

    def _deliver(self, sequences: List[Sequence], tokens: List[int], logprobs: List[Optional[TokenLogprobs]]) -> None:
        for sequence, token, token_logprobs in zip(sequences, tokens, logprobs):
            reply = sequence.reply
            if reply.cancelled:
                continue
            sequence.tokens.append(token)
            end = token in self.eos_ids
            try:
                if reply.sampling.grammar is not None:
                    reply.sampling.grammar.accept(token)
                text = "" if end else reply.stream.push(token)
            except Exception as error:  # noqa: BLE001 (e.g. an id the tokenizer cannot decode: this reply fails)
                logger.exception("a reply's text failed: it ends with the error")
                self._end(sequence, None, error)
                continue
            reply._token(token, text, token_logprobs)
            if end or reply.stream.stopped:
                self._end(sequence, "stop")
            elif len(sequence.tokens) >= reply.max_length:
                self._end(sequence, "length")
