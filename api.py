"""HTTP API for ChatGLM-6B: the original `POST /` endpoint and an OpenAI-compatible `/v1` API.

    python api.py [--host 127.0.0.1] [--port 8000] [--api-key KEY] [model options, see runtime/options.py]

Original endpoint (as in ChatGLM-6B):
    curl -X POST "http://127.0.0.1:8000" -H 'Content-Type: application/json' -d '{"prompt": "你好", "history": []}'
    -> {"response": ..., "history": [[prompt, response], ...], "status": 200, "time": "YYYY-MM-DD HH:MM:SS"}

OpenAI-compatible: GET /v1/models, POST /v1/chat/completions and POST /v1/completions (streaming with "stream":
true); what each field does, and where it differs from OpenAI, is in runtime/openai_api.py and README's table.

Choices beyond the original:
- `temperature: 0` (in fact anything below 1e-5) means greedy decoding (do_sample off) on both endpoints,
  so replies can be reproduced.
- Generation never runs past the model's context (config.max_sequence_length): `max_length` is capped
  there, and a prompt that does not fit is a 400 (code context_length_exceeded).
- Unset sampling values default to ChatGLM's own (temperature 0.95, top_p 0.7) on both endpoints.
- Errors are JSON in OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 422 for values the
  schema rejects, 400 for requests that do not fit the model (or that ask for what it cannot do: tool_choice
  "auto", suffix, ...), 404 for a model it does not serve, 401 for a missing or wrong API key, 413 for a body over --max-body-bytes.
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
from typing import Annotated, Callable, List, Literal, Optional, Sequence

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from runtime.chat_service import (ChatService, chat_choice, chat_chunks, completion_choice, completion_chunks,
                                  event_stream, log_exchange, usage)
from runtime.metrics import RequestCounter, ServingMetrics
from runtime.options import (DEFAULT_MAX_LENGTH, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, add_model_args,
                             add_serving_args, engine_options, load_from_args)
from runtime.server import (DEFAULT_MAX_BODY_BYTES, LOOPBACK_NAMES, ApiError, DrainingServer, ErrorResponse,
                            HeaderDeadline, RequestGuard, install_error_handlers)
from runtime.openai_api import (MODEL_ID, ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest,
                                RequestBody, Text)

logger = logging.getLogger("api")


# Not a Tuple: its OpenAPI 3.1 form (prefixItems) is not understood by every client and tool.
Pair = Annotated[List[Text], Field(min_length=2, max_length=2)]


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


# ---- the OpenAI-compatible API (bodies in runtime/openai_api.py) --------------------------------

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


ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 422, 429, 500, 503)}


ENDPOINTS = ["/", "/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"]
STREAM_RESPONSES = {**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}},
                                             "description": "chunk events when stream is true"}}


def create_app(model, tokenizer, api_key: Optional[str] = None, allowed_hosts: Optional[List[str]] = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, model_names: Sequence[str] = (MODEL_ID,),
               **engine_options) -> FastAPI:
    """The application (engine_options: GenerationEngine's max_batch_size, max_queue, kv_cache_bytes,
    max_step_tokens); allowed_hosts None answers every Host header; model_names the names requests may give (the
    first is the one reported). Its lifespan starts the generation engine and, at its end, stops it."""
    metrics = ServingMetrics(ENDPOINTS)
    service = ChatService(model, tokenizer, metrics, list(model_names), **engine_options)
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
        response = (await service.whole(job, connection))[0].reply.text
        now = log_exchange(request.prompt, response)
        return ChatResponse(response=response, history=job.history + [(request.prompt, response)], status=200,
                            time=now)

    cards = {name: ModelCard(id=name, created=started, owned_by="THUDM") for name in model_names}

    @app.get("/health", response_model=Health, responses=ERROR_RESPONSES)
    async def health():
        """The model is loaded and its engine takes requests (else 503); what the engine is doing."""
        if not service.engine.alive:
            raise ApiError(503, "the generation engine is not running (the server is shutting down, or it failed: "
                                "see its log)", kind="server_error")
        running = service.engine.batch_size
        return Health(model=model_names[0], generating=running > 0, running=running,
                      waiting=service.engine.queue_depth)

    @app.get("/metrics", response_class=PlainTextResponse, responses=ERROR_RESPONSES)
    async def metrics_text():
        """Prometheus' text format: requests, tokens, queue depth, batch size, latency histograms."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.api_route("/v1/models", methods=["GET", "HEAD"], response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models():
        return ModelList(data=list(cards.values()))

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses=ERROR_RESPONSES)
    async def get_model(model_id: str):
        return cards[service.check_model(model_id)]

    async def respond(make_job: Callable, request, connection: Request, id_prefix: str, events: Callable,
                      body: Callable, choice_body: Callable):
        """Either OpenAI endpoint: the request made a job, then its events streamed, or its whole body."""
        job = await service.prepare(make_job, request)
        completion_id, created = f"{id_prefix}-{uuid.uuid4().hex}", int(time.time())
        if request.stream:
            choices = service.submit(job)  # a full queue is a 429, not a broken stream
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return StreamingResponse(event_stream(events(service, job, choices, completion_id, created,
                                                         request.model, include_usage)),
                                     media_type="text/event-stream")
        choices = await service.whole(job, connection)
        for choice in choices:
            log_exchange(job.query, choice.reply.text)
        return body(id=completion_id, created=created, model=request.model, usage=usage(job, choices),
                    choices=[choice_body(service, job, choice) for choice in choices])

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=STREAM_RESPONSES)
    async def chat_completions(request: ChatCompletionRequest, connection: Request):
        return await respond(service.prompts.completion, request, connection, "chatcmpl", chat_chunks,
                             ChatCompletion, chat_choice)

    @app.post("/v1/completions", response_model=Completion, responses=STREAM_RESPONSES)
    async def completions(request: CompletionRequest, connection: Request):
        """A raw prompt continued: the text as decoded (no process_response), [gMASK] <sop> added to text
        prompts as chat() adds them."""
        return await respond(service.prompts.text_completion, request, connection, "cmpl", completion_chunks,
                             Completion, completion_choice)

    return app


def app_from_args(args: argparse.Namespace) -> FastAPI:
    """Loads the model the options name and makes the app (here, or in each Ray Serve replica)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, tokenizer = load_from_args(args)
    return create_app(model, tokenizer, api_key=args.api_key, allowed_hosts=args.allowed_hosts,
                      max_body_bytes=args.max_body_bytes, model_names=args.served_model_name, **engine_options(args))


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
    parser.add_argument("--served-model-name", nargs="+", default=[MODEL_ID], metavar="NAME",
                        help="the model names requests may give (the first is the one reported); others get 404 "
                             "model_not_found")
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
