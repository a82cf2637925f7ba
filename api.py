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
  schema rejects, 400 for requests that do not fit the model, 401 for a missing or wrong API key.
"""
import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Annotated, AsyncIterator, Callable, Iterator, List, Literal, Optional, Tuple, Union

import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException

from chatglm_6b.modeling_chatglm import build_prompt
from runtime.generation import first_stop, stable_prefix
from runtime.options import DEFAULT_MAX_LENGTH, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, add_model_args, load_from_args

MODEL_ID = "chatglm-6b"
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

class ChatRequest(RequestBody):
    model_config = ConfigDict(json_schema_extra={"examples": [{"prompt": "你好", "history": []}]})
    prompt: Text = Field(min_length=1)
    history: List[Pair] = Field(default_factory=list, description="earlier [prompt, response] pairs")
    max_length: int = Field(DEFAULT_MAX_LENGTH, ge=1, description="prompt plus response tokens, capped at the model's context")
    top_p: float = Field(DEFAULT_TOP_P, gt=0, le=1)
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0, description="0 means greedy decoding")


class ChatResponse(BaseModel):
    response: str
    history: List[Pair]
    status: int
    time: str


# ---- the OpenAI-compatible API --------------------------------------------------------------------

class Message(RequestBody):
    role: Literal["system", "user", "assistant"]
    content: Text


class StreamOptions(RequestBody):
    include_usage: bool = False


class ChatCompletionRequest(RequestBody):
    model_config = ConfigDict(json_schema_extra={"examples": [{"model": MODEL_ID, "messages": [
        {"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "你好"}]}]})
    model: str = Field(MODEL_ID, description="ignored: this server serves one model")
    messages: List[Message] = Field(min_length=1)
    temperature: Optional[float] = Field(None, ge=0, le=2, description=f"default {DEFAULT_TEMPERATURE}; 0 is greedy")
    top_p: Optional[float] = Field(None, gt=0, le=1, description=f"default {DEFAULT_TOP_P}")
    max_tokens: Optional[int] = Field(None, ge=1, description="most new tokens; default: up to the context")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="the newer name of max_tokens")
    stop: Stops = Field(default_factory=list, description="the response ends before the first of these strings")
    n: int = Field(1, ge=1, le=1, description="only one choice is supported")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None


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
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


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


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 422, 500)}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error",
                   headers=None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def messages_to_chat(messages: List[Message]) -> Tuple[str, List[Tuple[str, str]]]:
    """OpenAI messages -> (query, history) of ChatGLM: the last user message is the query, the
    user/assistant pairs before it the history, leading system messages go before the first user message."""
    system = []
    while len(system) < len(messages) and messages[len(system)].role == "system":
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


# Below this, sampling picks the top token anyway, and dividing logits by ~1e-38 overflows float32.
GREEDY_BELOW_TEMPERATURE = 1e-5


def sampling(temperature: float, top_p: float) -> dict:
    return {"do_sample": temperature >= GREEDY_BELOW_TEMPERATURE, "temperature": temperature, "top_p": top_p}


def sse(data: str) -> str:
    return f"data: {data}\n\n"


class ChatService:
    """Serves one request at a time: each request's tokenization and generation are queued on a single
    worker (the model is not thread-safe), while the event loop keeps accepting and answering."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.context = model.config.max_sequence_length
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generation")

    async def run(self, function: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self.worker, self._with_gpu_cleanup, function, *args)

    @staticmethod
    def _with_gpu_cleanup(function: Callable, *args):
        try:
            return function(*args)
        finally:
            if torch.cuda.is_available():  # as the original: give cached blocks back after every request
                torch.cuda.empty_cache()

    async def stream(self, make_iterator: Callable[[], Iterator]) -> AsyncIterator:
        """Yields the items of make_iterator(), iterated in the worker thread. Leaving early (a client
        that disconnects cancels its response) stops the iterator, and with it generation, at the next token."""
        loop, items, cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        done = object()

        def pump():
            if cancelled.is_set():  # the client left while waiting for its turn
                return
            try:
                with contextlib.closing(make_iterator()) as iterator:
                    for count, item in enumerate(iterator, 1):
                        loop.call_soon_threadsafe(items.put_nowait, (item, None))
                        if cancelled.is_set():
                            logger.info("client went away: generation stopped after %d tokens", count)
                            return
                loop.call_soon_threadsafe(items.put_nowait, (done, None))
            except Exception as error:  # re-raised in the event loop
                loop.call_soon_threadsafe(items.put_nowait, (done, error))

        running = loop.run_in_executor(self.worker, self._with_gpu_cleanup, pump)
        try:
            while True:
                item, error = await items.get()
                if error is not None:
                    raise error
                if item is done:
                    break
                yield item
        finally:
            cancelled.set()
        await running

    def count_tokens(self, query: str, history: List[Tuple[str, str]]) -> int:
        # Without the GLM attention mask, which is quadratic in the length and could not be built for a huge prompt.
        return len(self.tokenizer(build_prompt(query, history), return_attention_mask=False)["input_ids"])

    def check_fits(self, prompt_tokens: int, param: str) -> None:
        if prompt_tokens >= self.context:
            raise ApiError(400, f"{param}: the prompt is {prompt_tokens} tokens and does not fit the model's context "
                                f"of {self.context} tokens (max_sequence_length)", param)

    def chat(self, request: ChatRequest) -> Tuple[str, List[Tuple[str, str]]]:
        history = [tuple(pair) for pair in request.history]
        prompt_tokens = self.count_tokens(request.prompt, history)
        self.check_fits(prompt_tokens, "prompt")
        max_length = min(request.max_length, self.context)
        if max_length <= prompt_tokens:
            raise ApiError(400, f"max_length: {request.max_length} leaves no room for a response after the "
                                f"prompt's {prompt_tokens} tokens", "max_length")
        return self.model.chat(self.tokenizer, request.prompt, history, max_length=max_length,
                               **sampling(request.temperature, request.top_p))

    def prepare_completion(self, request: ChatCompletionRequest) -> dict:
        query, history = messages_to_chat(request.messages)
        prompt_tokens = self.count_tokens(query, history)
        self.check_fits(prompt_tokens, "messages")
        max_tokens = request.max_completion_tokens or request.max_tokens or self.context
        temperature = DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
        top_p = DEFAULT_TOP_P if request.top_p is None else request.top_p
        return {"query": query, "history": history, "prompt_tokens": prompt_tokens,
                "max_length": min(prompt_tokens + max_tokens, self.context), "sampling": sampling(temperature, top_p),
                "stops": request.stop}

    def completion(self, job: dict) -> Iterator[Tuple[str, int, Optional[str]]]:
        """Yields (response so far, completion tokens, None) after every token, then the final
        (response, completion tokens, finish reason); a stop string ends generation."""
        response, tokens = "", 0
        stream = self.model.stream_chat(self.tokenizer, job["query"], job["history"], max_length=job["max_length"],
                                        **job["sampling"])
        with contextlib.closing(stream):
            for response, _ in stream:
                tokens += 1
                cut = first_stop(response, job["stops"])
                if cut is not None:
                    yield response[:cut], tokens, "stop"
                    return
                yield response, tokens, None
        # Reaching max_length counts as "length" even when the last token happened to be the end token.
        yield response, tokens, "length" if job["prompt_tokens"] + tokens >= job["max_length"] else "stop"


async def stream_chunks(events: AsyncIterator, job: dict, completion_id: str, created: int,
                        request: ChatCompletionRequest) -> AsyncIterator[str]:
    def chunk(delta: Delta, finish_reason=None, choices=True, usage_counts=None) -> str:
        return sse(ChatCompletionChunk(id=completion_id, created=created, model=MODEL_ID, usage=usage_counts,
                                       choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)] if choices
                                       else []).model_dump_json())

    yield chunk(Delta(role="assistant", content=""))
    sent = ""
    try:
        async for response, tokens, finish_reason in events:
            stable = response if finish_reason else stable_prefix(response, job["stops"])
            if len(stable) > len(sent) and stable.startswith(sent):
                yield chunk(Delta(content=stable[len(sent):]))
                sent = stable
    except Exception as error:  # the 200 is already sent: report it in the stream, as OpenAI does
        logger.exception("streaming failed")
        yield sse(ErrorResponse(error=ErrorBody(message=f"internal error: {type(error).__name__}: {error}",
                                                type="server_error")).model_dump_json())
        return
    log_exchange(job["query"], response)
    yield chunk(Delta(), finish_reason)
    if request.stream_options and request.stream_options.include_usage:
        yield chunk(Delta(), choices=False, usage_counts=usage(job, tokens))
    yield sse("[DONE]")


def usage(job: dict, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=job["prompt_tokens"], completion_tokens=completion_tokens,
                 total_tokens=job["prompt_tokens"] + completion_tokens)


def log_exchange(prompt: str, response: str) -> str:
    """Logs one line per answered request, as the original did; returns the time it gives."""
    now = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    logger.info("[%s] prompt: %r, response: %r", now, prompt, response)
    return now


def create_app(model, tokenizer, api_key: Optional[str] = None) -> FastAPI:
    service = ChatService(model, tokenizer)
    started = int(time.time())
    bearer = HTTPBearer(auto_error=False)

    def require_api_key(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)):
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           kind="authentication_error")

    app = FastAPI(title="ChatGLM-6B API", dependencies=[Depends(require_api_key)] if api_key else [])

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error_response(error.status, error.message, error.param, error.kind)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        problems = error.errors()

        def where(problem) -> str:
            if problem["type"] == "json_invalid":  # its loc is the character offset
                return "body"
            return ".".join(str(part) for part in problem["loc"] if part != "body") or "body"

        def what(problem) -> str:
            if problem["type"] == "json_invalid":
                return f"invalid JSON at character {problem['loc'][-1]}: {problem['ctx']['error']}"
            return problem["msg"]

        message = "; ".join(f"{where(p)}: {what(p)}" for p in problems)
        return error_response(422, message, where(problems[0]))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return error_response(error.status_code, str(error.detail), headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):  # uvicorn logs the traceback
        return error_response(500, f"internal error: {type(error).__name__}: {error}", kind="server_error")

    @app.post("/", response_model=ChatResponse, responses=ERROR_RESPONSES)
    async def chat(request: ChatRequest):
        response, history = await service.run(service.chat, request)
        now = log_exchange(request.prompt, response)
        return ChatResponse(response=response, history=history, status=200, time=now)

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models():
        return ModelList(data=[ModelCard(id=MODEL_ID, created=started, owned_by="THUDM")])

    @app.post("/v1/chat/completions", response_model=ChatCompletion,
              responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}},
                                                  "description": "chat.completion.chunk events when stream is true"}})
    async def chat_completions(request: ChatCompletionRequest):
        job = await service.run(service.prepare_completion, request)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        events = service.stream(lambda: service.completion(job))
        if request.stream:
            return StreamingResponse(stream_chunks(events, job, completion_id, created, request),
                                     media_type="text/event-stream")
        async for response, tokens, finish_reason in events:
            pass  # the last item is the whole response
        log_exchange(job["query"], response)
        return ChatCompletion(id=completion_id, created=created, model=MODEL_ID,
                              choices=[Choice(message=AssistantMessage(content=response), finish_reason=finish_reason)],
                              usage=usage(job, tokens))

    return app


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Serve ChatGLM-6B over HTTP: the original POST / endpoint and "
                                                 "an OpenAI-compatible /v1 API.")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines too")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("CHATGLM_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $CHATGLM_API_KEY; none: open)")
    add_model_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, tokenizer = load_from_args(args)
    uvicorn.run(create_app(model, tokenizer, api_key=args.api_key), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
