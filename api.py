"""HTTP API for ChatGLM-6B: the original `POST /` endpoint and an OpenAI-compatible `/v1` API.

    python api.py [--host 127.0.0.1] [--port 8000] [--api-key KEY] [model options, see runtime/options.py]

Original endpoint (as in ChatGLM-6B):
    curl -X POST "http://127.0.0.1:8000" -H 'Content-Type: application/json' -d '{"prompt": "你好", "history": []}'
    -> {"response": ..., "history": [[prompt, response], ...], "status": 200, "time": "YYYY-MM-DD HH:MM:SS"}

OpenAI-compatible: GET /v1/models, POST /v1/chat/completions (streaming with "stream": true).

Choices beyond the original:
- `temperature: 0` (in fact anything below 1e-5) means greedy decoding (do_sample off) on both endpoints,
  so replies can be reproduced.
- ChatGLM-6B has no system role: system messages, allowed only before the first user message, are joined
  with newlines and put in front of the first user message, separated from it by a blank line.
- Generation never runs past the model's context (config.max_sequence_length): `max_length` is capped
  there, and a prompt that does not fit is a 400.
- Unset sampling values default to ChatGLM's own (temperature 0.95, top_p 0.7) on both endpoints.
- Errors are JSON in OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 422 for values the
  schema rejects, 400 for requests that do not fit the model (or that ask for what it cannot do: tools,
  logprobs, penalties, ...), 401 for a missing or wrong API key, 413 for a body over --max-body-bytes.
- Before any body is read: the Host header must name this server (localhost names when it listens on a
  loopback address, so that a web page cannot reach it through DNS rebinding; --allowed-hosts widens it),
  the API key is checked (on every path, /docs and /openapi.json too), and the body's size is bounded.
- Prompts are capped in characters before they are tokenized (MAX_PROMPT_CHARS_PER_TOKEN times the context).

Serving many users: requests are validated and tokenized in worker threads, then generated together by the
batching engine (runtime/engine.py): up to --max-batch-size at once, one token each per step, with up to
--max-queue more waiting; beyond that a request gets 429 with Retry-After. A client that disconnects, streaming
or not, frees its place at the next step. GET /health is 200 while the engine takes requests (503 otherwise),
GET /metrics is Prometheus' text format. On SIGTERM the running replies finish and the waiting ones get 503.
"""
import argparse
import asyncio
import contextlib
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, AsyncIterator, Callable, Dict, List, Literal, Optional, Tuple, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from fastapi_offline import FastAPIOffline
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_serializer

from chatglm_6b.modeling_chatglm import build_prompt, encode_chat
from runtime.engine import DoesNotFit, EngineClosed, GenerationEngine, QueueFull, Reply
from runtime.metrics import RequestCounter, ServingMetrics
from runtime.options import (DEFAULT_MAX_LENGTH, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, add_model_args,
                             add_serving_args, engine_options, load_from_args, sampling)
from runtime.server import (DEFAULT_MAX_BODY_BYTES, LOOPBACK_NAMES, ApiError, DrainingServer, ErrorBody, ErrorResponse,
                            HeaderDeadline, RequestGuard, install_error_handlers, unless_disconnected)

MODEL_ID = "chatglm-6b"
# A token is rarely more than a few characters; a prompt this many times the context cannot fit.
MAX_PROMPT_CHARS_PER_TOKEN = 32
logger = logging.getLogger("api")


def _encodable(text: str) -> str:
    # JSON may carry lone surrogates ("\ud800"); the tokenizer cannot encode them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text is not valid Unicode (it contains a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


def _as_list(stop):
    return [stop] if isinstance(stop, str) else [] if stop is None else stop


StopString = Annotated[Text, Field(min_length=1)]
StopList = Annotated[List[StopString], Field(max_length=4)]
# OpenAI's `stop` is null, a string or a list of up to 4; validated as a list so errors name "stop.<i>".
Stops = Annotated[StopList, BeforeValidator(_as_list, json_schema_input_type=Union[StopString, StopList, None])]


# Not a Tuple: its OpenAPI 3.1 form (prefixItems) is not understood by every client and tool.
Pair = Annotated[List[Text], Field(min_length=2, max_length=2)]


class RequestBody(BaseModel):
    """Rejects NaN and Infinity, which Python's JSON parser accepts."""
    model_config = ConfigDict(allow_inf_nan=False)


# ---- the original endpoint ------------------------------------------------------------------------

def _null_means(default_factory, accepted):
    """null means the default, as the original (whose fields were untyped) treated it."""
    return BeforeValidator(lambda value: default_factory() if value is None else value,
                           json_schema_input_type=Optional[accepted])


class ChatRequest(RequestBody):
    model_config = ConfigDict(json_schema_extra={"examples": [{"prompt": "你好", "history": []}]})
    prompt: Text = Field(min_length=1)
    history: Annotated[List[Pair], _null_means(list, List[Pair])] = Field(
        default_factory=list, description="earlier [prompt, response] pairs")
    max_length: Annotated[int, _null_means(lambda: DEFAULT_MAX_LENGTH, int)] = Field(
        DEFAULT_MAX_LENGTH, ge=1, description="prompt plus response tokens, capped at the model's context")
    top_p: Annotated[float, _null_means(lambda: DEFAULT_TOP_P, float)] = Field(
        DEFAULT_TOP_P, ge=0, le=1, description="0 is greedy")
    temperature: Annotated[float, _null_means(lambda: DEFAULT_TEMPERATURE, float)] = Field(
        DEFAULT_TEMPERATURE, ge=0, description="0 means greedy decoding")


class ChatResponse(BaseModel):
    response: str
    history: List[Pair]
    status: int
    time: str


# ---- the OpenAI-compatible API --------------------------------------------------------------------

class TextPart(RequestBody):
    type: Literal["text"]
    text: Text


def _join_parts(content):
    """OpenAI's content is a string or a list of parts; only text parts can reach this model."""
    if isinstance(content, list):
        return "".join(part.text if isinstance(part, TextPart) else part["text"] if isinstance(part, dict) else part
                       for part in content)
    return content


class Message(RequestBody):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="developer counts as system")
    content: Annotated[Union[Text, List[TextPart]], AfterValidator(_join_parts)]


class StreamOptions(RequestBody):
    include_usage: bool = False


class ChatCompletionRequest(RequestBody):
    model_config = ConfigDict(json_schema_extra={"examples": [{"model": MODEL_ID, "messages": [
        {"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "你好"}]}]})
    model: str = Field(MODEL_ID, description="ignored: this server serves one model")
    messages: List[Message] = Field(min_length=1)
    temperature: Optional[float] = Field(None, ge=0, le=2, description=f"default {DEFAULT_TEMPERATURE}; 0 is greedy")
    top_p: Optional[float] = Field(None, ge=0, le=1, description=f"default {DEFAULT_TOP_P}; 0 is greedy")
    max_tokens: Optional[int] = Field(None, ge=1, description="most new tokens; default: up to the context")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="the newer name of max_tokens")
    stop: Stops = Field(default_factory=list, description="the response ends before the first of these strings")
    n: Optional[int] = Field(1, ge=1, le=1, description="only one choice is supported")
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    # OpenAI options this server cannot honour: refused (400, naming the field) unless null or neutral.
    tools: Optional[List[Any]] = None
    tool_choice: Optional[Any] = None
    functions: Optional[List[Any]] = None
    function_call: Optional[Any] = None
    response_format: Optional[Dict[str, Any]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    logit_bias: Optional[Dict[str, float]] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None


# Values of those options that ask for nothing this server does not do anyway.
NEUTRAL = {"tools": [[]], "functions": [[]], "tool_choice": ["none"], "function_call": ["none"],
           "response_format": [{"type": "text"}], "logprobs": [False], "top_logprobs": [0], "logit_bias": [{}],
           "presence_penalty": [0], "frequency_penalty": [0]}


def refuse_unsupported(request: "ChatCompletionRequest") -> None:
    for name, neutral in NEUTRAL.items():
        value = getattr(request, name)
        if value is not None and value not in neutral:
            raise ApiError(400, f"{name} is not supported by this server (ChatGLM-6B generates plain text only)",
                           name)
    if request.seed is not None:
        raise ApiError(400, "seed is not supported: sampling here is not reproducible by seed; use temperature 0 "
                            "for a deterministic reply", "seed")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: List[Choice]
    usage: Usage


class Delta(BaseModel):
    """Only the fields a chunk carries are sent (no "content": null)."""
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Optional[Literal["stop", "length"]] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: List[ChunkChoice]
    usage: Optional[Usage] = None


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    generating: bool = Field(description="replies are being generated now")
    running: int = Field(description="requests in the running batch")
    waiting: int = Field(description="requests queued for a place in the batch")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard]


ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 413, 422, 429, 500, 503)}
# A full queue empties at the speed of generation; a client should come back after about this long.
RETRY_AFTER_SECONDS = 1


def messages_to_chat(messages: List[Message]) -> Tuple[str, List[Tuple[str, str]]]:
    """OpenAI messages -> (query, history) of ChatGLM: the last user message is the query, the
    user/assistant pairs before it the history, leading system messages go before the first user message."""
    system = []
    while len(system) < len(messages) and messages[len(system)].role in ("system", "developer"):
        system.append(messages[len(system)].content)
    turns = messages[len(system):]
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise ApiError(400, f"messages[{len(system) + i}]: expected a {expected} message, got {message.role} "
                                "(system messages first, then user and assistant alternating, ending with user)",
                           "messages")
    if len(turns) % 2 == 0:
        raise ApiError(400, "messages: the last message must be from the user", "messages")
    contents = [m.content for m in turns]
    if system:
        contents[0] = "\n".join(system) + "\n\n" + contents[0]
    if not contents[-1]:
        raise ApiError(400, "messages: the last user message is empty", "messages")
    return contents[-1], list(zip(contents[0:-1:2], contents[1:-1:2]))


def sse(data: str) -> str:
    return f"data: {data}\n\n"


@dataclass
class Job:
    """A request, checked and tokenized, as the engine runs it."""
    query: str
    history: List[Tuple[str, str]]
    prompt_ids: List[int]
    max_length: int  # prompt and reply tokens
    sampling: dict  # do_sample, temperature, top_p
    stops: List[str] = field(default_factory=list)


class Prompts:
    """Requests -> what the engine runs, checked against the model's context. Runs in a worker thread
    (tokenizing a long prompt takes a while), never waiting for the model."""

    def __init__(self, tokenizer, context: int):
        self.tokenizer, self.context = tokenizer, context

    def encode(self, query: str, history: List[Tuple[str, str]], param: str) -> List[int]:
        """The prompt's tokens, as chat() encodes them. Refused before tokenizing when it has more characters
        than could ever fit the context."""
        length = len(build_prompt(query, history))
        if length > MAX_PROMPT_CHARS_PER_TOKEN * self.context:
            raise ApiError(400, f"{param}: the prompt has {length} characters, more than the model's context of "
                                f"{self.context} tokens can hold", param)
        prompt_ids = encode_chat(self.tokenizer, query, history)
        if len(prompt_ids) >= self.context:
            raise ApiError(400, f"{param}: the prompt is {len(prompt_ids)} tokens and does not fit the model's "
                                f"context of {self.context} tokens (max_sequence_length)", param)
        return prompt_ids

    def chat(self, request: ChatRequest) -> Job:
        history = [tuple(pair) for pair in request.history]
        prompt_ids = self.encode(request.prompt, history, "prompt")
        max_length = min(request.max_length, self.context)
        if max_length <= len(prompt_ids):
            raise ApiError(400, f"max_length: {request.max_length} leaves no room for a response after the "
                                f"prompt's {len(prompt_ids)} tokens", "max_length")
        return Job(request.prompt, history, prompt_ids, max_length, sampling(request.temperature, request.top_p))

    def completion(self, request: ChatCompletionRequest) -> Job:
        refuse_unsupported(request)
        query, history = messages_to_chat(request.messages)
        prompt_ids = self.encode(query, history, "messages")
        max_tokens = request.max_completion_tokens or request.max_tokens or self.context
        temperature = DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
        top_p = DEFAULT_TOP_P if request.top_p is None else request.top_p
        return Job(query, history, prompt_ids, min(len(prompt_ids) + max_tokens, self.context),
                   sampling(temperature, top_p), request.stop)


class ChatService:
    """Requests in, replies out: prompts are prepared in worker threads, then generated, detokenized and
    post-processed by the engine (runtime/engine.py) together with every other running request; the event loop
    only forwards the text."""

    def __init__(self, model, tokenizer, metrics: ServingMetrics, **engine_options):
        self.tokenizer = tokenizer
        self.prompts = Prompts(tokenizer, model.config.max_sequence_length)
        self.engine = GenerationEngine(model, tokenizer, **engine_options)  # started and stopped by the app's lifespan
        self.metrics = metrics.watch(self.engine)

    async def prepare(self, make_job: Callable, request) -> Job:
        return await asyncio.to_thread(make_job, request)

    def submit(self, job: Job) -> Reply:
        try:
            reply = self.engine.submit(job.prompt_ids, job.max_length, loop=asyncio.get_running_loop(),
                                       stops=job.stops, **job.sampling)
        except QueueFull as full:
            raise ApiError(429, f"the server is busy: {full}; retry later", kind="rate_limit_error",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except EngineClosed as closed:
            raise shutting_down(closed) from None
        except DoesNotFit as error:
            raise ApiError(400, f"messages: {error}", "messages") from None
        self.metrics.prompt_tokens.inc(len(job.prompt_ids))
        return reply

    async def completion(self, job: Job, reply: Reply) -> AsyncIterator[str]:
        """The reply's text as it becomes visible (process_response's text, cut before the first stop string,
        as the engine makes it); afterwards reply.finish_reason and reply.completion_tokens tell how it ended."""
        try:
            async for delta in self.metrics.timed(reply):
                if delta.text:
                    yield delta.text
        except EngineClosed as closed:  # it was waiting when the server began shutting down
            raise shutting_down(closed) from None
        except (GeneratorExit, asyncio.CancelledError):  # the client went away: its row is freed below
            logger.info("client went away: generation stopped after %d tokens", len(reply.tokens))
            raise
        finally:
            reply.cancel()
            self.metrics.completion_tokens.inc(len(reply.tokens))

    async def whole(self, job: Job, connection: Request) -> Reply:
        """Generates the whole reply; if the client disconnects first, generation stops (ClientGone)."""
        reply = self.submit(job)

        async def last():
            async for _ in self.completion(job, reply):
                pass
            return reply

        return await unless_disconnected(connection, last())


def shutting_down(closed: EngineClosed) -> ApiError:
    return ApiError(503, f"{closed}; send it again to another instance or after the restart", kind="server_error")


async def stream_chunks(service: ChatService, job: Job, reply: Reply, completion_id: str, created: int,
                        request: ChatCompletionRequest) -> AsyncIterator[str]:
    def chunk(delta: Delta, finish_reason=None, choices=True, usage_counts=None) -> str:
        return sse(ChatCompletionChunk(id=completion_id, created=created, model=MODEL_ID, usage=usage_counts,
                                       choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)] if choices
                                       else []).model_dump_json())

    yield chunk(Delta(role="assistant", content=""))
    try:
        async for text in service.completion(job, reply):
            yield chunk(Delta(content=text))
    except Exception as error:  # the 200 is already sent: report it in the stream, as OpenAI does
        logger.exception("streaming failed")
        yield sse(ErrorResponse(error=ErrorBody(message=f"internal error: {type(error).__name__}: {error}",
                                                type="server_error")).model_dump_json())
        return
    log_exchange(job.query, reply.text)
    yield chunk(Delta(), reply.finish_reason)
    if request.stream_options and request.stream_options.include_usage:
        yield chunk(Delta(), choices=False, usage_counts=usage(job, reply))
    yield sse("[DONE]")


def usage(job: Job, reply: Reply) -> Usage:
    prompt_tokens, completion_tokens = len(job.prompt_ids), reply.completion_tokens
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def log_exchange(prompt: str, response: str) -> str:
    """Logs one line per answered request, as the original did; returns the time it gives."""
    now = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    logger.info("[%s] prompt: %r, response: %r", now, prompt, response)
    return now


ENDPOINTS = ["/", "/v1/chat/completions", "/v1/models", "/health", "/metrics"]


def create_app(model, tokenizer, api_key: Optional[str] = None, allowed_hosts: Optional[List[str]] = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, **engine_options) -> FastAPI:
    """The application (engine_options: GenerationEngine's max_batch_size, max_queue, kv_cache_bytes,
    max_step_tokens); allowed_hosts None answers every Host header. Its lifespan starts the generation engine and,
    at its end, stops it."""
    metrics = ServingMetrics(ENDPOINTS)
    service = ChatService(model, tokenizer, metrics, **engine_options)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.engine.start()
        yield
        await asyncio.to_thread(service.engine.stop)

    app = FastAPIOffline(title="ChatGLM-6B API", lifespan=lifespan)  # /docs and /redoc served here, no CDN
    app.state.service = service
    app.add_middleware(RequestGuard, api_key=api_key, allowed_hosts=allowed_hosts, max_body_bytes=max_body_bytes)
    app.add_middleware(RequestCounter, metrics=metrics)

    install_error_handlers(app)

    @app.post("/", response_model=ChatResponse, responses=ERROR_RESPONSES)
    async def chat(request: ChatRequest, connection: Request):
        job = await service.prepare(service.prompts.chat, request)
        response = (await service.whole(job, connection)).text
        now = log_exchange(request.prompt, response)
        return ChatResponse(response=response, history=job.history + [(request.prompt, response)], status=200,
                            time=now)

    card = ModelCard(id=MODEL_ID, created=started, owned_by="THUDM")

    @app.get("/health", response_model=Health, responses=ERROR_RESPONSES)
    async def health():
        """The model is loaded and its engine takes requests (else 503); what the engine is doing."""
        if not service.engine.alive:
            raise ApiError(503, "the generation engine is not running (the server is shutting down, or it failed: "
                                "see its log)", kind="server_error")
        running = service.engine.batch_size
        return Health(model=MODEL_ID, generating=running > 0, running=running, waiting=service.engine.queue_depth)

    @app.get("/metrics", response_class=PlainTextResponse, responses=ERROR_RESPONSES)
    async def metrics_text():
        """Prometheus' text format: requests, tokens, queue depth, batch size, latency histograms."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.api_route("/v1/models", methods=["GET", "HEAD"], response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models():
        return ModelList(data=[card])

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses={**ERROR_RESPONSES, 404: ERROR_RESPONSES[400]})
    async def get_model(model_id: str):
        if model_id != MODEL_ID:
            raise ApiError(404, f"model {model_id!r} does not exist: this server serves {MODEL_ID!r}", "model",
                           kind="not_found_error")
        return card

    @app.post("/v1/chat/completions", response_model=ChatCompletion,
              responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}},
                                                  "description": "chat.completion.chunk events when stream is true"}})
    async def chat_completions(request: ChatCompletionRequest, connection: Request):
        job = await service.prepare(service.prompts.completion, request)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if request.stream:
            reply = service.submit(job)  # a full queue is a 429, not a broken stream
            return StreamingResponse(stream_chunks(service, job, reply, completion_id, created, request),
                                     media_type="text/event-stream")
        reply = await service.whole(job, connection)
        log_exchange(job.query, reply.text)
        return ChatCompletion(id=completion_id, created=created, model=MODEL_ID,
                              choices=[Choice(message=AssistantMessage(content=reply.text),
                                              finish_reason=reply.finish_reason)],
                              usage=usage(job, reply))

    return app


def app_from_args(args: argparse.Namespace) -> FastAPI:
    """Loads the model the options name and makes the app (here, or in each Ray Serve replica)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, tokenizer = load_from_args(args)
    return create_app(model, tokenizer, api_key=args.api_key, allowed_hosts=args.allowed_hosts,
                      max_body_bytes=args.max_body_bytes, **engine_options(args))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Serve ChatGLM-6B over HTTP: the original POST / endpoint and "
                                                 "an OpenAI-compatible /v1 API.")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines too")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("CHATGLM_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $CHATGLM_API_KEY; none: open)")
    parser.add_argument("--allowed-hosts", default=None,
                        help="comma-separated Host names to answer to, * for any (default: localhost names when "
                             "--host is a loopback address, else any)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="longest request body; longer ones get 413")
    parser.add_argument("--header-timeout", type=float, default=10.0,
                        help="seconds a connection has to send a request's headers before it is closed")
    add_serving_args(parser)
    ray = parser.add_argument_group("Ray Serve", "replicas of this server behind Ray's HTTP proxy "
                                                 "(pip install 'ray[serve]'; see runtime/ray_serving.py)")
    ray.add_argument("--ray-replicas", type=int, default=0, help="serve with this many replicas (0: no Ray)")
    ray.add_argument("--ray-max-replicas", type=int, default=None, help="autoscale from --ray-replicas up to this")
    ray.add_argument("--ray-num-cpus", type=float, default=1, help="CPUs per replica (its torch threads)")
    ray.add_argument("--ray-num-gpus", type=float, default=0, help="GPUs per replica")
    ray.add_argument("--ray-address", default=None, help="a running Ray cluster ('auto'); default: start one here")
    add_model_args(parser)
    args = parser.parse_args(argv)
    if args.api_key is not None and not args.api_key.strip():
        parser.error("--api-key (or $CHATGLM_API_KEY) is empty: give a key, or leave it out to serve without one")
    if args.allowed_hosts is not None:
        args.allowed_hosts = [host.strip() for host in args.allowed_hosts.split(",") if host.strip()]
    else:
        args.allowed_hosts = LOOPBACK_NAMES if args.host in LOOPBACK_NAMES or args.host.startswith("127.") else None
    if args.ray_replicas:
        from runtime.ray_serving import serve_with_ray

        # The replicas build the app by this function's import path (this file runs as __main__ here).
        serve_with_ray("api:app_from_args", args, args.ray_replicas, args.host, args.port,
                       max_ongoing_requests=args.max_batch_size + args.max_queue, max_replicas=args.ray_max_replicas,
                       num_cpus=args.ray_num_cpus, num_gpus=args.ray_num_gpus, address=args.ray_address)
        return
    app = app_from_args(args)
    HeaderDeadline.seconds = args.header_timeout
    DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, http=HeaderDeadline),
                   on_exit=app.state.service.engine.close).run()


if __name__ == "__main__":
    main()
