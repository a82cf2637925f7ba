"""What api.py's routes run: requests checked and tokenized into jobs (Prompts, in worker threads), jobs submitted to
the generation engine as one reply per choice (ChatService), and the replies turned into OpenAI's bodies and
server-sent events. The bodies themselves are in runtime/openai_api.py."""
import asyncio
import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import AsyncIterator, Callable, Dict, List, Optional, Tuple

from fastapi import Request

from chatglm_6b.modeling_chatglm import build_prompt, encode_chat
from .engine import Delta, DoesNotFit, EngineClosed, GenerationEngine, QueueFull, Reply
from .generation import prompt_ending
from .grammar import Grammar, GrammarError, json_schema_of
from .metrics import ServingMetrics
from .openai_api import (ChatCompletionChunk, ChatCompletionRequest, ChoiceLogprobs, ChunkChoice, Completion,
                         CompletionChoice, CompletionRequest, FunctionCall, SamplingFields, TokenTexts, ToolCall,
                         ToolCallDelta, Usage, describe_tools, forced_tool, logit_bias_ids, messages_to_chat,
                         refuse_unsupported)
from .openai_api import AssistantMessage
from .openai_api import Choice as ChatChoice
from .openai_api import Delta as ChatDelta
from .options import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, sampling
from .sampling import TokenLogprobs
from .server import ApiError, ErrorBody, ErrorResponse, unless_disconnected

# A token is rarely more than a few characters; a prompt this many times the context cannot fit.
MAX_PROMPT_CHARS_PER_TOKEN = 32
# A full queue empties at the speed of generation; a client should come back after about this long.
RETRY_AFTER_SECONDS = 1
logger = logging.getLogger("api")


def sse(data: str) -> str:
    return f"data: {data}\n\n"


@dataclass
class Job:
    """A request, checked and tokenized, as the engine runs it: `n` replies to each of its prompts."""
    query: str  # what the log shows of the request
    prompts: List[List[int]]  # token ids; one per prompt (the chat endpoints have one)
    max_lengths: List[int]  # per prompt: its tokens and the reply's
    sampling: dict  # do_sample, temperature, top_p
    stops: List[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)  # the engine's other options: penalties, logprobs, raw_text
    n: int = 1
    seed: Optional[int] = None  # reply i of a prompt is sampled with seed + i
    grammars: List[Grammar] = field(default_factory=list)  # each reply's, for a JSON schema (constrained decoding)
    history: List[Tuple[str, str]] = field(default_factory=list)
    echoes: List[str] = field(default_factory=list)  # per prompt: its text, in front of its replies (echo)
    tools: Optional[list] = None  # the functions a reply calls

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompts)


class Prompts:
    """Requests -> what the engine runs, checked against the model's context. Runs in a worker thread
    (tokenizing a long prompt and compiling a grammar take a while), never waiting for the model."""

    def __init__(self, tokenizer, context: int, vocab_size: int):
        self.tokenizer, self.context, self.vocab_size = tokenizer, context, vocab_size

    def check_length(self, characters: int, param: str) -> None:
        """Refuses a prompt before tokenizing it when it has more characters than could ever fit the context."""
        if characters > MAX_PROMPT_CHARS_PER_TOKEN * self.context:
            raise ApiError(400, f"{param}: the prompt has {characters} characters, more than can fit: this model's "
                                f"maximum context length is {self.context} tokens", param,
                           code="context_length_exceeded")

    def fitting(self, prompt_ids: List[int], param: str) -> List[int]:
        if len(prompt_ids) >= self.context:
            # OpenAI's words for it, which clients (litellm) look for
            raise ApiError(400, f"{param}: this model's maximum context length is {self.context} tokens "
                                f"(max_sequence_length); however, the prompt is {len(prompt_ids)} tokens", param,
                           code="context_length_exceeded")
        return prompt_ids

    def encode(self, query: str, history: List[Tuple[str, str]], param: str, continuation: str = "") -> List[int]:
        """The prompt's tokens, as chat() encodes them, and those of the reply's start to continue."""
        self.check_length(len(build_prompt(query, history)) + len(continuation), param)
        # the reply's start as the model writes a reply's start (SentencePiece's leading space on its first piece)
        continued = self.tokenizer(continuation, add_special_tokens=False, return_attention_mask=False,
                                   split_special_tokens=True)["input_ids"] if continuation else []
        return self.fitting(encode_chat(self.tokenizer, query, history) + continued, param)

    def chat(self, request) -> Job:
        """The original endpoint's request (api.ChatRequest)."""
        history = [tuple(pair) for pair in request.history]
        prompt_ids = self.encode(request.prompt, history, "prompt")
        max_length = min(request.max_length, self.context)
        if max_length <= len(prompt_ids):
            raise ApiError(400, f"max_length: {request.max_length} leaves no room for a response after the "
                                f"prompt's {len(prompt_ids)} tokens", "max_length")
        return Job(request.prompt, [prompt_ids], [max_length], sampling(request.temperature, request.top_p),
                   history=history)

    def sampling_of(self, request: SamplingFields, logprobs: Optional[int], raw_text: bool) -> dict:
        """The request's sampling, as Job's sampling and options."""
        temperature = DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
        top_p = DEFAULT_TOP_P if request.top_p is None else request.top_p
        return dict(sampling=sampling(temperature, top_p), stops=request.stop, n=request.n or 1, seed=request.seed,
                    options=dict(presence_penalty=request.presence_penalty or 0.0,
                                 frequency_penalty=request.frequency_penalty or 0.0,
                                 logit_bias=logit_bias_ids(request.logit_bias, self.vocab_size), logprobs=logprobs,
                                 raw_text=raw_text))

    def completion(self, request: ChatCompletionRequest) -> Job:
        refuse_unsupported(request)
        tool = forced_tool(request)
        param = "tools" if tool else "response_format"
        try:
            schema = tool[1] if tool else json_schema_of(request.response_format)
            first = None if schema is None else Grammar(self.tokenizer, schema)
            grammars = [] if first is None else [first] + [first.fresh() for _ in range((request.n or 1) - 1)]
        except GrammarError as error:
            raise ApiError(400, f"{param}: {error}", param) from None
        chat = messages_to_chat(request.messages, describe_tools(tool[0]) if tool else "")
        prompt_ids = self.encode(chat.query, chat.history, "messages", chat.continuation)
        max_tokens = request.max_completion_tokens or request.max_tokens or self.context
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        return Job(chat.query, [prompt_ids], [min(len(prompt_ids) + max_tokens, self.context)], grammars=grammars,
                   history=chat.history, tools=tool[0] if tool else None,
                   **self.sampling_of(request, logprobs, raw_text=schema is not None))

    def text_completion(self, request: CompletionRequest) -> Job:
        refuse_unsupported(request)
        prompt = request.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "prompt: no prompt was given", "prompt")
        self.check_length(sum(len(p) for p in prompt if isinstance(p, str)), "prompt")
        prompts, echoes = [], []
        for i, text_or_ids in enumerate(prompt):
            param = "prompt" if len(prompt) == 1 else f"prompt.{i}"
            if isinstance(text_or_ids, str):
                ids = self.tokenizer(text_or_ids, return_attention_mask=False, split_special_tokens=True)["input_ids"]
                text = text_or_ids
            else:
                if any(not 0 <= token < self.vocab_size for token in text_or_ids):
                    raise ApiError(400, f"{param}: token ids are 0 to {self.vocab_size - 1}", param)
                ids, text = prompt_ending(self.tokenizer, list(text_or_ids)), self.tokenizer.decode(text_or_ids)
            prompts.append(self.fitting(ids, param))
            echoes.append(text if request.echo else "")
        max_tokens = request.max_tokens or self.context
        return Job(prompt[0] if isinstance(prompt[0], str) else f"<{len(prompt[0])} token ids>", prompts,
                   [min(len(ids) + max_tokens, self.context) for ids in prompts], echoes=echoes,
                   **self.sampling_of(request, request.logprobs, raw_text=True))


@dataclass
class Choice:
    """One reply of a job as it arrives: its text and, for logprobs, its tokens (without the end token)."""
    index: int
    reply: Reply
    prompt_ids: List[int]
    tokens: List[int] = field(default_factory=list)
    logprobs: List[TokenLogprobs] = field(default_factory=list)
    streamed: int = 0  # tokens whose logprobs a stream has sent

    def unsent(self) -> Tuple[List[int], List[TokenLogprobs]]:
        """The tokens (and their logprobs) since the last call: a streamed chunk carries those of the tokens that
        made its text, some of which make no text of their own."""
        start, self.streamed = self.streamed, len(self.tokens)
        return self.tokens[start:], self.logprobs[start:]


class ChatService:
    """Requests in, replies out: prompts are prepared in worker threads, then generated, detokenized and
    post-processed by the engine (runtime/engine.py) together with every other running request; the event loop
    only forwards the text."""

    def __init__(self, model, tokenizer, metrics: ServingMetrics, model_names: List[str], **engine_options):
        self.tokenizer, self.model_names = tokenizer, model_names
        self.prompts = Prompts(tokenizer, model.config.max_sequence_length, model.config.vocab_size)
        self.engine = GenerationEngine(model, tokenizer, **engine_options)  # started and stopped by the app's lifespan
        self.metrics = metrics.watch(self.engine)
        self.texts = None  # TokenTexts, made at the first request for logprobs

    def check_model(self, name: str) -> str:
        if name not in self.model_names:
            raise ApiError(404, f"model {name!r} does not exist: this server serves {', '.join(self.model_names)}",
                           "model", code="model_not_found")
        return name

    async def prepare(self, make_job: Callable, request) -> Job:
        if hasattr(request, "model"):
            self.check_model(request.model)
        job = await asyncio.to_thread(make_job, request)
        if job.options.get("logprobs") is not None and self.texts is None:
            self.texts = await asyncio.to_thread(TokenTexts, self.tokenizer)
        return job

    def submit(self, job: Job) -> List[Choice]:
        """Every reply of the job queued (or none: a full queue refuses the whole job)."""
        choices: List[Choice] = []
        loop = asyncio.get_running_loop()
        try:
            for p, (prompt_ids, max_length) in enumerate(zip(job.prompts, job.max_lengths)):
                for i in range(job.n):
                    grammar = job.grammars[p * job.n + i] if job.grammars else None
                    seed = None if job.seed is None else job.seed + i
                    reply = self.engine.submit(prompt_ids, max_length, loop=loop, stops=job.stops, seed=seed,
                                               grammar=grammar, **job.sampling, **job.options)
                    choices.append(Choice(p * job.n + i, reply, prompt_ids))
        except (QueueFull, EngineClosed, DoesNotFit) as error:
            for choice in choices:
                choice.reply.cancel()
            if isinstance(error, QueueFull):
                raise ApiError(429, f"the server is busy: {error}; retry later", kind="rate_limit_error",
                               headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
            if isinstance(error, EngineClosed):
                raise shutting_down(error) from None
            raise ApiError(400, f"messages: {error}", "messages", code="context_length_exceeded") from None
        self.metrics.prompt_tokens.inc(job.prompt_tokens * job.n)
        return choices

    async def deltas(self, choice: Choice) -> AsyncIterator[Tuple[Choice, Delta]]:
        """A reply's deltas as the engine makes them (process_response's text, or the raw text, cut before the
        first stop string), noting its tokens and logprobs; afterwards reply.finish_reason tells how it ended."""
        reply = choice.reply
        try:
            async for delta in self.metrics.timed(reply):
                if delta.logprobs is not None and delta.token not in self.engine.eos_ids:
                    choice.tokens.append(delta.token)
                    choice.logprobs.append(delta.logprobs)
                yield choice, delta
        except EngineClosed as closed:  # it was waiting when the server began shutting down
            raise shutting_down(closed) from None
        except (GeneratorExit, asyncio.CancelledError):  # the client went away: its row is freed below
            logger.info("client went away: generation stopped after %d tokens", len(reply.tokens))
            raise
        finally:
            reply.cancel()
            self.metrics.completion_tokens.inc(len(reply.tokens))

    def stream(self, choices: List[Choice]) -> AsyncIterator[Tuple[Choice, Delta]]:
        return self.deltas(choices[0]) if len(choices) == 1 else merged([self.deltas(c) for c in choices])

    async def whole(self, job: Job, connection: Request) -> List[Choice]:
        """Generates every reply; if the client disconnects first, generation stops (ClientGone)."""
        choices = self.submit(job)

        async def last():
            async for _ in self.stream(choices):
                pass
            return choices

        return await unless_disconnected(connection, last())


async def merged(streams: List[AsyncIterator]) -> AsyncIterator:
    """The items of several async iterators as they come; the first error ends it (and the others)."""
    queue: asyncio.Queue = asyncio.Queue()
    ended = object()

    async def drain(stream):
        try:
            async for item in stream:
                await queue.put(item)
            await queue.put(ended)
        except BaseException as error:  # noqa: BLE001 (handed to the consumer)
            await queue.put(error)

    tasks = [asyncio.ensure_future(drain(stream)) for stream in streams]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is ended:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


def shutting_down(closed: EngineClosed) -> ApiError:
    return ApiError(503, f"{closed}; send it again to another instance or after the restart", kind="server_error")


def usage(job: Job, choices: List[Choice]) -> Usage:
    """OpenAI's counts: each prompt once, every choice's completion."""
    prompt_tokens = job.prompt_tokens
    completion_tokens = sum(choice.reply.completion_tokens for choice in choices)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def tool_calls_of(choice: Choice) -> Optional[List[ToolCall]]:
    """The reply, constrained to a call's JSON, as OpenAI's tool_calls (None if it was cut short)."""
    try:
        call = json.loads(choice.reply.text)
    except ValueError:
        return None
    return [ToolCall(id=f"call_{uuid.uuid4().hex[:24]}",
                     function=FunctionCall(name=call["name"], arguments=json.dumps(call["arguments"],
                                                                                   ensure_ascii=False)))]


def ending(job: Job, choice: Choice) -> Tuple[Optional[List[ToolCall]], str]:
    """A finished chat reply's tool calls (for a job with tools, when its JSON is complete) and finish_reason."""
    calls = tool_calls_of(choice) if job.tools else None
    return calls, "tool_calls" if calls else choice.reply.finish_reason


def chat_choice(service: ChatService, job: Job, choice: Choice) -> ChatChoice:
    calls, finish_reason = ending(job, choice)
    logprobs = None
    if job.options.get("logprobs") is not None:
        logprobs = ChoiceLogprobs(content=service.texts.chat(choice.tokens, choice.logprobs))
    message = AssistantMessage(content=None, tool_calls=calls) if calls else AssistantMessage(content=choice.reply.text)
    return ChatChoice(index=choice.index, message=message, logprobs=logprobs, finish_reason=finish_reason)


def completion_choice(service: ChatService, job: Job, choice: Choice) -> CompletionChoice:
    echo, logprobs = job.echoes[choice.index // job.n], None
    if job.options.get("logprobs") is not None:
        echoed = choice.prompt_ids if echo else []
        logprobs = service.texts.completion(echoed + choice.tokens, [None] * len(echoed) + choice.logprobs)
    return CompletionChoice(index=choice.index, text=echo + choice.reply.text, logprobs=logprobs,
                            finish_reason=choice.reply.finish_reason)


async def chat_chunks(service: ChatService, job: Job, choices: List[Choice], completion_id: str, created: int,
                      model: str, include_usage: bool) -> AsyncIterator[str]:
    """The events of a chat completion: a chunk per piece of text (with its tokens' logprobs), a tool call in one
    chunk at the end, each choice's finish_reason, the usage if asked for."""
    def chunk(index: int = 0, delta: Optional[Delta] = None, finish_reason=None, logprobs=None,
              usage_counts=None) -> str:
        parts = [] if delta is None else [ChunkChoice(index=index, delta=delta, finish_reason=finish_reason,
                                                      logprobs=logprobs)]
        return sse(ChatCompletionChunk(id=completion_id, created=created, model=model, usage=usage_counts,
                                       choices=parts).model_dump_json())

    def unsent_logprobs(choice: Choice) -> Optional[ChoiceLogprobs]:
        if job.options.get("logprobs") is None:
            return None
        return ChoiceLogprobs(content=service.texts.chat(*choice.unsent()))

    for choice in choices:
        yield chunk(choice.index, ChatDelta(role="assistant", content=""))
    async for choice, delta in service.stream(choices):
        if delta.text and not job.tools:
            yield chunk(choice.index, ChatDelta(content=delta.text), logprobs=unsent_logprobs(choice))
    for choice in choices:
        calls, finish_reason = ending(job, choice)
        if calls:
            deltas = [ToolCallDelta(index=i, **call.model_dump()) for i, call in enumerate(calls)]
            yield chunk(choice.index, ChatDelta(tool_calls=deltas), logprobs=unsent_logprobs(choice))
        elif job.tools and choice.reply.text:  # cut short before its call was complete: the text as it is
            yield chunk(choice.index, ChatDelta(content=choice.reply.text), logprobs=unsent_logprobs(choice))
        elif choice.streamed < len(choice.tokens):  # tokens whose text was held back, then dropped
            yield chunk(choice.index, ChatDelta(), logprobs=unsent_logprobs(choice))
        yield chunk(choice.index, ChatDelta(), finish_reason)
        log_exchange(job.query, choice.reply.text)
    if include_usage:
        yield chunk(usage_counts=usage(job, choices))


async def completion_chunks(service: ChatService, job: Job, choices: List[Choice], completion_id: str, created: int,
                            model: str, include_usage: bool) -> AsyncIterator[str]:
    """The events of a text completion: the echoed prompt first, then a chunk per piece of text (with its tokens'
    logprobs), each choice's finish_reason, the usage if asked for."""
    def chunk(choice_parts: List[CompletionChoice], usage_counts=None) -> str:
        return sse(Completion(id=completion_id, created=created, model=model, choices=choice_parts,
                              usage=usage_counts).model_dump_json())

    logprobs = job.options.get("logprobs") is not None
    offsets: Dict[int, int] = {}  # per choice: the characters sent so far (logprobs' text_offset)

    def piece(choice: Choice, text: str, finish_reason=None) -> str:
        parts = service.texts.completion(*choice.unsent(), offsets.get(choice.index, 0)) if logprobs else None
        offsets[choice.index] = offsets.get(choice.index, 0) + len(text)
        return chunk([CompletionChoice(index=choice.index, text=text, logprobs=parts, finish_reason=finish_reason)])

    for choice in choices:
        echo = job.echoes[choice.index // job.n]
        if echo:
            parts = service.texts.completion(choice.prompt_ids, [None] * len(choice.prompt_ids)) if logprobs else None
            yield chunk([CompletionChoice(index=choice.index, text=echo, logprobs=parts, finish_reason=None)])
            offsets[choice.index] = len(echo)
    async for choice, delta in service.stream(choices):
        if delta.text:
            yield piece(choice, delta.text)
    for choice in choices:
        yield piece(choice, "", choice.reply.finish_reason)
        log_exchange(job.query, choice.reply.text)
    if include_usage:
        yield chunk([], usage(job, choices))


async def event_stream(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Server-sent events, then [DONE]. The 200 is sent with the first: a failure after it is reported in the
    stream, as OpenAI does."""
    try:
        async for event in events:
            yield event
    except Exception as error:  # noqa: BLE001
        logger.exception("streaming failed")
        yield sse(ErrorResponse(error=ErrorBody(message=f"internal error: {type(error).__name__}: {error}",
                                                type="server_error")).model_dump_json())
        return
    yield sse("[DONE]")


def log_exchange(prompt: str, response: str) -> str:
    """Logs one line per answered request, as the original did; returns the time it gives."""
    now = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    logger.info("[%s] prompt: %r, response: %r", now, prompt, response)
    return now
