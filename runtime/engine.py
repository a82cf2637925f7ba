"""The batching generation engine behind api.py and web_demo.py: one thread owns the model and decodes every
running request in one forward pass per step (iteration-level batching).

    engine = GenerationEngine(model, tokenizer, max_batch_size=8, max_queue=64).start()
    reply = engine.submit(encode_chat(tokenizer, query, history), max_length=2048, do_sample=False)
    for token in reply: ...            # or `async for` with submit(..., loop=asyncio.get_running_loop())
    reply.cancel()                     # the row leaves the batch at the next step

A step boundary admits the queued requests (prefilled together, left-padded), merges them into the running
batch and drops the rows that ended (end token, max_length, cancelled). Rows are aligned on the right in one
preallocated KV cache; a shorter row has blocked padding on its left, so GLM's per-row 2-D positions and
bidirectional prompt masks are exactly those of running the row alone. Each row samples with its own
settings and its own torch.Generator, the way chat() samples (temperature, transformers' default top-k of
50, then top-p).
"""
import asyncio
import collections
import logging
import threading
from typing import AsyncIterator, Iterator, List, Optional, Sequence

import torch

from chatglm_6b.modeling_chatglm import INVALID_SCORE_LOGIT, INVALID_SCORE_TOKEN_ID

logger = logging.getLogger("engine")

# Rows decoded together, and requests waiting beyond them, unless the server is told otherwise.
DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE = 8, 64
# generate()'s default top-k when sampling (transformers' GenerationConfig default, which chat() gets).
SAMPLING_TOP_K = 50


class QueueFull(Exception):
    """More requests are waiting than max_queue allows."""


class EngineClosed(Exception):
    """The engine is shutting down (or has stopped) and takes no new requests."""


class BatchCache:
    """The running batch's KV cache, duck-typing transformers' Cache for ChatGLMModel (get_seq_length, update):
    per layer [B, heads, capacity, head_dim] buffers written in place, so a step writes one column (a
    DynamicCache concatenates, copying the whole cache every token). `blocked` [B, capacity] marks the keys a
    row must not see (its left padding); `lead` counts each row's leading blocked columns (host side), so that
    rows leaving let the common padding be trimmed."""

    def __init__(self, num_layers: int, rows: int, capacity: int, device):
        self.keys: List[Optional[torch.Tensor]] = [None] * num_layers
        self.values: List[Optional[torch.Tensor]] = [None] * num_layers
        self.blocked = torch.ones(rows, capacity, dtype=torch.bool, device=device)
        self.lead = [0] * rows
        self.length = 0

    @property
    def rows(self) -> int:
        return self.blocked.shape[0]

    @property
    def capacity(self) -> int:
        return self.blocked.shape[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int):
        # key, value [B, heads, L, head_dim] -> all keys and values so far [B, heads, length + L, head_dim]
        end = self.length + key.shape[2]
        if self.keys[layer_idx] is None:
            shape = (key.shape[0], key.shape[1], self.capacity, key.shape[3])
            self.keys[layer_idx] = key.new_zeros(shape)
            self.values[layer_idx] = value.new_zeros(shape)
        self.keys[layer_idx][:, :, self.length:end] = key
        self.values[layer_idx][:, :, self.length:end] = value
        keys, values = self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]
        if layer_idx == len(self.keys) - 1:
            self.length = end
        return keys, values

    def attention_mask(self, new: int) -> torch.Tensor:
        """The GLM mask (True = blocked) [B, 1, 1, length + new] for `new` tokens that see every key but padding."""
        self.reserve(self.length + new)
        self.blocked[:, self.length:self.length + new] = False
        return self.blocked[:, None, None, :self.length + new]

    def reserve(self, length: int) -> None:
        if length > self.capacity:
            self._rebuild(range(self.rows), 0, max(length, 2 * self.capacity))

    def _rebuild(self, rows: Sequence[int], trim: int, capacity: int) -> None:
        """Keep `rows`, drop the first `trim` columns, reallocate to `capacity` columns."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.blocked.device)
        kept = self.length - trim

        def rebuilt(tensor, dim, fill):
            return relaid([(tensor.index_select(0, index), trim, kept, 0)], dim, capacity, fill)

        self.blocked = rebuilt(self.blocked, 1, True)
        for i, (keys, values) in enumerate(zip(self.keys, self.values)):
            if keys is not None:
                self.keys[i], self.values[i] = rebuilt(keys, 2, 0), rebuilt(values, 2, 0)
        self.lead, self.length = [self.lead[r] - trim for r in rows], kept

    def keep(self, rows: Sequence[int]) -> None:
        """Only these rows stay (in this order); padding that no remaining row needs is dropped."""
        trim = min(self.lead[r] for r in rows)
        self._rebuild(rows, trim, self.capacity - trim)

    def extend(self, other: "BatchCache") -> None:
        """Appends other's rows (both caches filled by a forward pass); the shorter is padded on the left."""
        length = max(self.length, other.length)
        capacity = max(self.capacity - self.length, other.capacity - other.length) + length

        def joined(mine, theirs, dim, fill):
            return relaid([(mine, 0, self.length, length - self.length),
                           (theirs, 0, other.length, length - other.length)], dim, capacity, fill)

        self.blocked = joined(self.blocked, other.blocked, 1, True)
        for i in range(len(self.keys)):
            self.keys[i] = joined(self.keys[i], other.keys[i], 2, 0)
            self.values[i] = joined(self.values[i], other.values[i], 2, 0)
        self.lead = [lead + length - self.length for lead in self.lead] + \
            [lead + length - other.length for lead in other.lead]
        self.length = length


def relaid(parts, dim: int, capacity: int, fill) -> torch.Tensor:
    """One new tensor, `capacity` long along `dim`, of the parts (tensor, start, count, offset) stacked along dim 0:
    each part's [start, start + count) along `dim` lands at [offset, offset + count); the rest is `fill`."""
    shape = list(parts[0][0].shape)
    shape[0], shape[dim] = sum(tensor.shape[0] for tensor, *_ in parts), capacity
    out = parts[0][0].new_full(shape, fill)
    row = 0
    for tensor, start, count, offset in parts:
        out.narrow(0, row, tensor.shape[0]).narrow(dim, offset, count).copy_(tensor.narrow(dim, start, count))
        row += tensor.shape[0]
    return out


class Reply:
    """One request: its generated token ids as the engine produces them (the end token included, as generate()
    returns it), iterated in a thread or, when submitted with an event loop, with `async for`. After the
    iteration: finish_reason ("stop": the end token; "length": max_length reached; "cancelled"), and the
    engine's exception is raised by the iteration if the request failed."""

    _END = object()

    def __init__(self, prompt_ids: List[int], max_length: int, do_sample: bool, temperature: float, top_p: float,
                 loop: Optional[asyncio.AbstractEventLoop], seed: Optional[int]):
        self.prompt_ids, self.max_length = list(prompt_ids), max_length
        self.do_sample, self.temperature, self.top_p = do_sample, temperature, top_p
        self.seed = seed
        self.tokens: List[int] = []
        self.finish_reason: Optional[str] = None
        self.error: Optional[BaseException] = None
        self.cancelled = False
        self.generator: Optional[torch.Generator] = None  # made by the engine on the model's device
        self.on_cancel = lambda reply: None  # set by the engine: frees a queue slot at once
        self.loop = loop
        self._events = asyncio.Queue() if loop is not None else collections.deque()
        self._ready = None if loop is not None else threading.Condition()

    def cancel(self) -> None:
        """Frees the row at the next step (or the queue slot at once); safe from any thread, returns at once."""
        if not self.cancelled:
            self.cancelled = True
            self.on_cancel(self)

    # ---- called by the engine thread ----
    def _emit(self, item) -> None:
        if self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(self._events.put_nowait, item)
            except RuntimeError:  # the consumer's loop has closed: nobody is listening
                self.cancel()
        else:
            with self._ready:
                self._events.append(item)
                self._ready.notify()

    def _token(self, token: int) -> None:
        self.tokens.append(token)
        self._emit(token)

    def _finish(self, reason: Optional[str], error: Optional[BaseException] = None) -> None:
        self.finish_reason, self.error = reason, error
        self._emit(self._END)

    # ---- consumers ----
    def __iter__(self) -> Iterator[int]:
        if self.loop is not None:
            raise TypeError("this reply was submitted with an event loop: use `async for`")
        try:
            while True:
                with self._ready:
                    while not self._events:
                        self._ready.wait()
                    item = self._events.popleft()
                if item is self._END:
                    break
                yield item
        finally:
            self.cancel()  # a consumer that stops early frees the row
        if self.error is not None:
            raise self.error

    async def __aiter__(self) -> AsyncIterator[int]:
        try:
            while (item := await self._events.get()) is not self._END:
                yield item
        finally:
            self.cancel()
        if self.error is not None:
            raise self.error


class GenerationEngine:
    """Owns the model in one thread. submit() only queues (it never waits for the model); the thread runs up to
    max_batch_size rows at once, and submit() refuses (QueueFull) a request beyond max_queue waiting ones."""

    def __init__(self, model, tokenizer, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 max_queue: int = DEFAULT_MAX_QUEUE):
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError("max_batch_size must be at least 1 and max_queue at least 0")
        self.model, self.max_batch_size, self.max_queue = model, max_batch_size, max_queue
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [tokenizer.eos_token_id if eos is None else eos])
        self.pad_id = tokenizer.pad_token_id
        self.context = model.config.max_sequence_length
        self.prefix_length = model.config.pre_seq_len or 0
        self.lock = threading.Condition()  # guards waiting, accepted and closing; wakes the engine thread
        self.waiting: collections.deque = collections.deque()  # submitted, not yet prefilled
        self.accepted = 0  # submitted and not finished: at most max_batch_size + max_queue
        self.closing = False
        # The running batch (engine thread only): its rows, their KV cache, and per row [B, ...] the next
        # input token, its GLM positions and what each token adds to them.
        self.running: List[Reply] = []
        self.cache: Optional[BatchCache] = None
        self.next_tokens = self.positions = self.position_step = None
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
        return len(self.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.running)

    def submit(self, prompt_ids: List[int], max_length: int, do_sample: bool = False, temperature: float = 1.0,
               top_p: float = 1.0, loop: Optional[asyncio.AbstractEventLoop] = None,
               seed: Optional[int] = None) -> Reply:
        """Queues a request: prompt_ids as chat() encodes them, max_length counting prompt and reply (capped at
        the model's context). Raises QueueFull, EngineClosed, or ValueError for a prompt that leaves no room."""
        max_length = min(max_length, self.context)
        if not prompt_ids or len(prompt_ids) >= max_length:
            raise ValueError(f"the prompt is {len(prompt_ids)} tokens and leaves no room for a reply within "
                             f"max_length={max_length}")
        reply = Reply(prompt_ids, max_length, do_sample, temperature, top_p, loop, seed)
        with self.lock:
            if not self.alive:
                raise EngineClosed("the server is shutting down: this request was not started")
            if self.accepted >= self.max_batch_size + self.max_queue:
                raise QueueFull(f"{self.max_batch_size} requests are generating and {len(self.waiting)} waiting, "
                                f"the most this server queues (--max-queue {self.max_queue})")
            self.accepted += 1
            reply.on_cancel = self._cancelled
            self.waiting.append(reply)
            self.lock.notify()
        return reply

    def close(self) -> None:
        """No new requests, and the waiting ones end with EngineClosed; the running rows finish."""
        with self.lock:
            self.closing = True
            refused = list(self.waiting)
            self.waiting.clear()
            self.lock.notify()
        for reply in refused:
            self._finish(reply, None, EngineClosed("the server is shutting down: this request was not started"))

    def stop(self, timeout: Optional[float] = None) -> None:
        """close(), then wait for the running rows to finish and the thread to end."""
        self.close()
        if self.thread is not None:
            self.thread.join(timeout)

    def _cancelled(self, reply: Reply) -> None:
        with self.lock:
            try:
                self.waiting.remove(reply)
            except ValueError:
                return  # running: the engine thread drops it at the next step
        self._finish(reply, "cancelled")

    def _finish(self, reply: Reply, reason: Optional[str], error: Optional[BaseException] = None) -> None:
        if reply.finish_reason is None and reply.error is None:
            with self.lock:
                self.accepted -= 1
            reply._finish(reason, error)

    # ---- the engine thread ----
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self.lock:
                        while not self.waiting and not self.running and not self.closing:
                            self.lock.wait()
                        if self.closing and not self.running:
                            return
                        admitted = [self.waiting.popleft()
                                    for _ in range(min(self.max_batch_size - len(self.running), len(self.waiting)))]
                    try:
                        if admitted:
                            self._prefill(admitted)
                        self._retire()
                        if self.running:
                            self._decode()
                            self._retire()
                    except Exception as error:  # noqa: BLE001 (this batch fails; the engine keeps serving)
                        failed = {id(reply): reply for reply in self.running + admitted}.values()
                        logger.exception("a generation step failed: its %d requests end with the error", len(failed))
                        for reply in failed:
                            self._finish(reply, None, error)
                        self._reset()
                    if torch.cuda.is_available() and not self.running:  # as the original: give cached blocks back
                        torch.cuda.empty_cache()
        except BaseException:
            logger.exception("the generation engine stopped")
            raise
        finally:
            with self.lock:
                self.closing = True
                left = list(self.waiting) + self.running
                self.waiting.clear()
            for reply in left:
                self._finish(reply, None, EngineClosed("the generation engine stopped"))

    def _reset(self) -> None:
        self.running, self.cache = [], None
        self.next_tokens = self.positions = self.position_step = None

    def _prefill(self, replies: List[Reply]) -> None:
        """Runs the new prompts together (left-padded), samples their first tokens, and appends their rows."""
        model, device = self.model, self.model.device
        length = max(len(reply.prompt_ids) for reply in replies)
        input_ids = torch.full((len(replies), length), self.pad_id, dtype=torch.long)
        padding = torch.zeros((len(replies), length), dtype=torch.long)
        for i, reply in enumerate(replies):
            input_ids[i, length - len(reply.prompt_ids):] = torch.tensor(reply.prompt_ids)
            padding[i, length - len(reply.prompt_ids):] = 1
        input_ids, padding = input_ids.to(device), padding.to(device)
        positions, step = model.glm_generation_positions(input_ids, padding)  # [n, 2, L], [n, 2, 1]
        cache = BatchCache(model.config.num_layers, len(replies), self.prefix_length + length + 64, device)
        cache.blocked[:, :self.prefix_length] = False  # the P-Tuning prefix, visible to every row
        cache.blocked[:, self.prefix_length:self.prefix_length + length] = padding == 0
        cache.lead = [0 if self.prefix_length else length - len(reply.prompt_ids) for reply in replies]
        logits = model(input_ids=input_ids, attention_mask=padding, position_ids=positions, cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]  # [n, vocab]
        tokens = self._sample(logits, replies)  # [n, 1]
        if self.cache is None:
            self.cache, self.next_tokens = cache, tokens
            self.positions, self.position_step = positions[..., -1:] + step, step
        else:
            self.cache.extend(cache)
            self.next_tokens = torch.cat([self.next_tokens, tokens])
            self.positions = torch.cat([self.positions, positions[..., -1:] + step])
            self.position_step = torch.cat([self.position_step, step])
        self.running += replies
        self._deliver(tokens.view(-1).tolist(), replies)

    def _decode(self) -> None:
        """One token for every running row."""
        mask = self.cache.attention_mask(1)
        logits = self.model(input_ids=self.next_tokens, attention_mask=mask, position_ids=self.positions,
                            cache=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # [B, vocab]
        self.next_tokens = self._sample(logits, self.running)
        self.positions = self.positions + self.position_step
        self._deliver(self.next_tokens.view(-1).tolist(), self.running)

    def _deliver(self, tokens: List[int], replies: List[Reply]) -> None:
        for reply, token in zip(replies, tokens):
            if reply.cancelled:
                continue
            reply._token(token)
            if token in self.eos_ids:
                self._finish(reply, "stop")
            elif len(reply.prompt_ids) + len(reply.tokens) >= reply.max_length:
                self._finish(reply, "length")

    def _retire(self) -> None:
        """Drops the rows that ended or were cancelled from the batch."""
        for reply in self.running:
            if reply.cancelled:
                self._finish(reply, "cancelled")
        keep = [i for i, reply in enumerate(self.running) if reply.finish_reason is None and reply.error is None]
        if len(keep) == len(self.running):
            return
        if not keep:
            self._reset()
            return
        self.cache.keep(keep)
        index = torch.tensor(keep, device=self.next_tokens.device)
        self.next_tokens, self.positions = self.next_tokens[index], self.positions[index]
        self.position_step = self.position_step[index]
        self.running = [self.running[i] for i in keep]

    def _sample(self, logits: torch.Tensor, replies: List[Reply]) -> torch.LongTensor:
        """Next tokens [n, 1] for logits [n, vocab], each row as chat() picks it: greedy rows take the argmax;
        sampling rows divide by their temperature, keep the 50 most likely tokens, then the fewest whose
        probability reaches top_p, and draw with their own generator. A row with NaN/inf scores gets the
        original's replacement (token 5)."""
        logits = logits.float()
        invalid = ~torch.isfinite(logits).all(dim=-1, keepdim=True)
        replacement = torch.zeros_like(logits)
        replacement[:, INVALID_SCORE_TOKEN_ID] = INVALID_SCORE_LOGIT
        logits = torch.where(invalid, replacement, logits)
        tokens = logits.argmax(dim=-1, keepdim=True)
        sampled = [i for i, reply in enumerate(replies) if reply.do_sample]
        if not sampled:
            return tokens
        device = logits.device
        temperature = torch.tensor([replies[i].temperature for i in sampled], device=device)[:, None]
        top_p = torch.tensor([replies[i].top_p for i in sampled], device=device)[:, None]
        scores = logits[torch.tensor(sampled, device=device)] / temperature
        values, candidates = scores.topk(min(SAMPLING_TOP_K, scores.shape[-1]), dim=-1)  # descending
        # transformers' top-p: in ascending order, drop tokens while the cumulative probability is <= 1 - top_p
        ascending = values.flip(-1)
        removed = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        removed[:, -1] = False  # the most likely token always stays
        probs = ascending.masked_fill(removed, float("-inf")).softmax(-1).flip(-1)
        for row, i in enumerate(sampled):
            reply = replies[i]
            if reply.generator is None:
                reply.generator = torch.Generator(device=device)
                if reply.seed is None:
                    reply.generator.seed()
                else:
                    reply.generator.manual_seed(reply.seed)
            tokens[i] = candidates[row, torch.multinomial(probs[row], 1, generator=reply.generator)]
        return tokens
