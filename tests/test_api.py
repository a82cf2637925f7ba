"""api.py end to end: real servers in subprocesses, spoken to over HTTP with requests, curl, the
official openai client and a schemathesis fuzz run against the server's own OpenAPI schema."""
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import time

import openai
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from chatglm_6b.modeling_chatglm import build_prompt, process_response
from chatglm_6b.tokenization_chatglm import ChatGLMTokenizer
from tools.local_server import LocalServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API = os.path.join(ROOT, "api.py")
DEMO = os.path.join(ROOT, "demo_model")
TINY = os.path.join(ROOT, "tests", "fixtures", "reference", "tiny-chatglm")
HAS_DEMO = os.path.isfile(os.path.join(DEMO, "config.json"))
CHECKPOINT = DEMO if HAS_DEMO else TINY  # the main server runs the default checkpoint once it exists
DEMO_REPLY = ("你好👋！我是 ChatGLM-6B 的演示小模型，由本项目用自己的代码训练而成。我只记得训练语料里的对话，"
              "回答能力很有限；想要完整的能力，请加载真正的 ChatGLM-6B 权重。")
needs_demo = pytest.mark.skipif(not HAS_DEMO, reason="demo_model/ has not been trained yet")
API_KEY = "test-key-123"
MESSAGE = [{"role": "user", "content": "hi"}]


class Server(LocalServer):
    """api.py with the given arguments, started from outside the repository (it must find its imports
    itself), ready once its OpenAPI schema is served."""

    def __init__(self, args, log_path, cwd):
        env = {name: value for name, value in os.environ.items() if name != "CHATGLM_API_KEY"}  # keys from args only
        env["OMP_NUM_THREADS"] = "1"  # these small models run many times faster on one thread of a busy machine
        super().__init__(API, args, log_path=log_path, cwd=cwd, env=env)
        self.wait("/openapi.json")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The server as a user starts it: default checkpoint (tiny one until demo_model/ exists), no key."""
    tmp = tmp_path_factory.mktemp("api")
    started = Server([] if HAS_DEMO else ["--model-path", TINY], str(tmp / "server.log"), str(tmp))
    yield started
    started.stop()


@pytest.fixture(scope="session")
def keyed_server(tmp_path_factory):
    """A second instance with --api-key, on the tiny random checkpoint, whose long replies the disconnect
    test needs."""
    tmp = tmp_path_factory.mktemp("api-keyed")
    started = Server(["--model-path", TINY, "--api-key", API_KEY], str(tmp / "server.log"), str(tmp))
    yield started
    started.stop()


@pytest.fixture(scope="session")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def tokenizer():
    return ChatGLMTokenizer.from_pretrained(CHECKPOINT)


def prompt_tokens(tokenizer, query, history=()) -> int:
    return len(tokenizer(build_prompt(query, list(history)), return_attention_mask=False)["input_ids"])


def post(server, path, body, **kwargs):
    return requests.post(server.url + path, json=body, timeout=120, **kwargs)


# ---- the original endpoint ------------------------------------------------------------------------

def test_original_endpoint_answers_with_history_and_time(server, tokenizer):
    reply = post(server, "/", {"prompt": "你好", "history": [], "max_length": prompt_tokens(tokenizer, "你好") + 8,
                               "temperature": 0})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert set(body) == {"response", "history", "status", "time"}
    assert body["status"] == 200 and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", body["time"])
    assert body["history"] == [["你好", body["response"]]]
    assert f"prompt: '你好', response: {body['response']!r}" in server.log()  # one log line per request


@needs_demo
def test_original_endpoint_greedy_demo_reply(server):
    reply = post(server, "/", {"prompt": "你好", "history": [], "temperature": 0})
    assert reply.json()["response"] == DEMO_REPLY


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_readme_curl(server):
    command = (f"curl -X POST \"{server.url}\" -H 'Content-Type: application/json' "
               "-d '{\"prompt\": \"你好\", \"history\": []}'")
    result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120)
    body = json.loads(result.stdout)
    assert body["status"] == 200 and body["history"] == [["你好", body["response"]]]


def test_concurrent_requests_are_all_answered_alike(server, tokenizer):
    body = {"prompt": "你好", "history": [["hi", "hello"]], "temperature": 0,
            "max_length": prompt_tokens(tokenizer, "你好", [("hi", "hello")]) + 6}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: post(server, "/", body).json()["response"], range(4)))
    assert len(set(replies)) == 1


# ---- the OpenAI-compatible API --------------------------------------------------------------------

def test_models(client):
    assert [model.id for model in client.models.list()] == ["chatglm-6b"]


@needs_demo
def test_openai_greedy_demo_reply_streamed_and_not(client, tokenizer):
    messages = [{"role": "user", "content": "你好"}]
    completion = client.chat.completions.create(model="chatglm-6b", messages=messages, temperature=0)
    assert completion.choices[0].message.content == DEMO_REPLY
    assert completion.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="chatglm-6b", messages=messages, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == DEMO_REPLY
    usage = completion.usage
    assert usage.prompt_tokens == prompt_tokens(tokenizer, "你好")
    assert usage.completion_tokens >= len(tokenizer(DEMO_REPLY, add_special_tokens=False)["input_ids"])


def test_openai_streaming_matches_non_streaming(client, tokenizer):
    request = {"model": "chatglm-6b", "messages": [{"role": "user", "content": "晚上睡不着怎么办"}],
               "temperature": 0, "max_tokens": 12}
    completion = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == completion.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == completion.usage
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == completion.choices[0].message.content
    usage = completion.usage
    assert usage.prompt_tokens == prompt_tokens(tokenizer, "晚上睡不着怎么办")
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and usage.completion_tokens <= 12


def test_streamed_text_is_never_taken_back(tokenizer):
    """A growing response can still change at its end (a half character, an ASCII mark that becomes a
    Chinese one, a partial stop string or placeholder): the server streams only what stable_prefix keeps."""
    from runtime.generation import stable_prefix

    stops = ["世界 a"]
    for text in (DEMO_REPLY, "Hello, world! 你好,世界 a:b [[训练时间]] ok,好?好"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        final = process_response(tokenizer.decode(ids))
        sent = ""
        for n in range(1, len(ids) + 1):
            stable = stable_prefix(process_response(tokenizer.decode(ids[:n])), stops)
            if stable.startswith(sent):  # what the server sends
                sent = stable
            assert final.startswith(sent)
        assert sent == final


def test_max_tokens_ends_with_length(client):
    completion = client.chat.completions.create(model="chatglm-6b", messages=[{"role": "user", "content": "讲一个很长的故事"}],
                                                temperature=1.5, top_p=1, max_tokens=2)
    assert completion.usage.completion_tokens <= 2
    if completion.usage.completion_tokens == 2:  # or the end token came first
        assert completion.choices[0].finish_reason == "length"


def test_stop_cuts_the_response_and_ends_generation(client):
    request = {"model": "chatglm-6b", "messages": [{"role": "user", "content": "你好"}], "temperature": 0,
               "max_tokens": 16}
    full = client.chat.completions.create(**request)
    text = full.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.chat.completions.create(**request, stop=[stop, "never appears"])
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < full.usage.completion_tokens
    chunks = client.chat.completions.create(**request, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text[:text.index(stop)]


def test_messages_map_to_chatglm_history(server, client, tokenizer):
    """System text goes before the first user message; earlier user/assistant pairs become the history."""
    history = [("你是一个助手。\n\n你好", "你好！")]
    max_new = 8
    original = post(server, "/", {"prompt": "谢谢", "history": history, "temperature": 0,
                                  "max_length": prompt_tokens(tokenizer, "谢谢", history) + max_new}).json()
    completion = client.chat.completions.create(model="chatglm-6b", temperature=0, max_tokens=max_new, messages=[
        {"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "谢谢"}])
    assert completion.choices[0].message.content == original["response"]
    assert completion.usage.prompt_tokens == prompt_tokens(tokenizer, "谢谢", history)


# ---- API key, disconnects ------------------------------------------------------------------------

def test_api_key_is_enforced(keyed_server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        for method, path in (("POST", "/"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
            reply = requests.request(method, keyed_server.url + path, json={}, headers=headers, timeout=30)
            assert reply.status_code == 401 and "API key" in reply.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    keyed = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=API_KEY, max_retries=0)
    assert [model.id for model in keyed.models.list()] == ["chatglm-6b"]
    reply = post(keyed_server, "/", {"prompt": "hi", "max_length": 8}, headers={"Authorization": f"Bearer {API_KEY}"})
    assert reply.status_code == 200


def test_disconnect_stops_generation_and_loop_stays_responsive(keyed_server):
    """Greedy, the tiny random model answers "long" with 2000 tokens and no end token: seconds of generation
    that only the disconnect can cut short."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    long_request = {"messages": [{"role": "user", "content": "long"}], "max_tokens": 2000, "temperature": 0,
                    "stream": True}
    with requests.post(keyed_server.url + "/v1/chat/completions", json=long_request, headers=headers, stream=True,
                       timeout=60) as stream:
        lines = stream.iter_lines()
        # Leave once tokens arrive, so that there is a running generation for the disconnect to stop.
        assert next(line for line in lines if line.startswith(b"data: ") and b'"content":"' in line
                    and b'"content":""' not in line)
        started = time.time()
        assert requests.get(keyed_server.url + "/v1/models", headers=headers, timeout=10).status_code == 200
        assert time.time() - started < 2  # answered while generation runs
    deadline = time.time() + 10  # leaving the with block closed the connection: generation must stop
    while (state := requests.get(keyed_server.url + "/health", timeout=10).json())["generating"]:
        assert time.time() < deadline, (state, keyed_server.log())
        time.sleep(0.1)
    assert state["waiting"] == 0 and "client went away: generation stopped after" in keyed_server.log()
    reply = post(keyed_server, "/v1/chat/completions", {"messages": MESSAGE, "max_tokens": 1}, headers=headers)
    assert reply.status_code == 200


# ---- bad input ------------------------------------------------------------------------------------

BAD_REQUESTS = [
    ("/", '{"prompt": "hi", ', 422, "body"),
    ("/", "[]", 422, "body"),
    ("/", {}, 422, "prompt"),
    ("/", {"prompt": 5}, 422, "prompt"),
    ("/", {"prompt": ""}, 422, "prompt"),
    ("/", {"prompt": "hi", "history": "none"}, 422, "history"),
    ("/", {"prompt": "hi", "history": [["only one"]]}, 422, "history"),
    ("/", {"prompt": "hi", "history": [["a", 1]]}, 422, "history"),
    ("/", {"prompt": "hi", "history": [["a", "b", "c"]]}, 422, "history"),
    ("/", {"prompt": "hi", "top_p": 1.5}, 422, "top_p"),
    ("/", {"prompt": "hi", "temperature": -0.1}, 422, "temperature"),
    ("/", {"prompt": "hi", "max_length": 0}, 422, "max_length"),
    ("/", {"prompt": "hi", "max_length": "long"}, 422, "max_length"),
    ("/", {"prompt": "hi", "max_length": 2}, 400, "max_length"),
    ("/", '{"prompt": "hi", "temperature": NaN}', 422, "temperature"),
    ("/", '{"prompt": "\\ud800"}', 422, "prompt"),
    ("/v1/chat/completions", {"messages": []}, 422, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 422, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 422, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "a"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "s"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": MESSAGE, "temperature": -1}, 422, "temperature"),
    ("/v1/chat/completions", {"messages": MESSAGE, "temperature": 2.5}, 422, "temperature"),
    ("/v1/chat/completions", {"messages": MESSAGE, "max_tokens": 0}, 422, "max_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGE, "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
    ("/v1/chat/completions", {"messages": MESSAGE, "stop": [""]}, 422, "stop"),
    ("/v1/chat/completions", {"messages": MESSAGE, "stop": 7}, 422, "stop"),
    ("/v1/chat/completions", {"messages": MESSAGE, "stream": "maybe"}, 422, "stream"),
    ("/v1/chat/completions", {"messages": MESSAGE, "n": 17}, 422, "n"),
    ("/v1/chat/completions", {"messages": MESSAGE, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "tool_choice"),
    ("/v1/chat/completions", {"messages": MESSAGE, "tool_choice": "required"}, 400, "tool_choice"),
    ("/v1/chat/completions", {"messages": MESSAGE, "functions": [{"name": "f"}]}, 400, "functions"),
    ("/v1/chat/completions", {"messages": MESSAGE, "response_format": {"type": "yaml"}}, 400, "response_format"),
    ("/v1/chat/completions", {"messages": MESSAGE, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}}, 400,
     "response_format"),
    ("/v1/chat/completions", {"messages": MESSAGE, "top_logprobs": 21}, 422, "top_logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGE, "presence_penalty": 3}, 422, "presence_penalty"),
    ("/v1/chat/completions", {"messages": MESSAGE, "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": MESSAGE, "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": MESSAGE, "logit_bias": {"1": 101}}, 422, "logit_bias"),
    ("/v1/chat/completions", {"messages": MESSAGE, "model": "gpt-4o"}, 404, "model"),
    ("/v1/completions", {"prompt": "hi", "suffix": "!"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "hi", "best_of": 2}, 400, "best_of"),
    ("/v1/completions", {"prompt": [[1, 99999999]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 422, "logprobs"),
    ("/v1/completions", {}, 422, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     422, "messages.0.content"),
    ("/", b"\xff\xfe not utf-8", 422, "body"),
    ("/", "[" * 100_000 + "]" * 100_000, 400, "body"),
]


@pytest.mark.parametrize("path, body, status, field", BAD_REQUESTS)
def test_bad_input_is_a_4xx_naming_the_field(server, path, body, status, field):
    data = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
    reply = requests.post(server.url + path, data=data, headers={"Content-Type": "application/json"},
                          timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"].startswith(field) and error["message"].startswith(field), error


def test_prompt_longer_than_the_context_is_a_400(server, client):
    with open(os.path.join(CHECKPOINT, "config.json")) as f:
        context = json.load(f)["max_sequence_length"]
    long_prompt = "你好" * context
    for prompt in (long_prompt, "a" * 1_000_000):
        reply = post(server, "/", {"prompt": prompt})
        assert reply.status_code == 400 and "context" in reply.json()["error"]["message"]
    history = [["你好", "你好！"]] * context
    reply = post(server, "/", {"prompt": "hi", "history": history})
    assert reply.status_code == 400 and "context" in reply.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="chatglm-6b", messages=[{"role": "user", "content": long_prompt}])


def test_still_serving_after_bad_input(server):
    reply = post(server, "/v1/chat/completions", {"messages": MESSAGE, "max_tokens": 2})
    assert reply.status_code == 200 and reply.json()["object"] == "chat.completion"


# ---- fuzzing --------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


# Generation kept to a few tokens, so that hundreds of requests fit in about a minute.
GENERATION_BOUNDS = {"/": {"max_length": 24}, "/v1/chat/completions": {"max_tokens": 8, "max_completion_tokens": 8},
                     "/v1/completions": {"max_tokens": 8}}


def bound_generation(case) -> None:
    if not isinstance(case.body, dict):
        return
    for field, bound in GENERATION_BOUNDS.get(case.path, {}).items():
        value = case.body.get(field)
        if value is None:
            case.body[field] = bound
        elif type(value) in (int, float) and value >= 1:  # 7.0 counts as an int; the rest is left invalid
            case.body[field] = min(value, bound)


def test_fuzz_no_server_errors(server, api_schema):
    """Valid and invalid requests for every operation of the server's own schema (schemathesis' strategies
    driven by hypothesis directly: its pytest plugin does not run on current pytest)."""
    checks = schemathesis.checks
    sent = {}
    for result in api_schema.get_all_operations():
        operation = result.ok()
        cases = st.one_of([operation.as_strategy(mode) for mode in GenerationMode])

        @given(case=cases)
        @settings(max_examples=250, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
        def exchange(case):
            bound_generation(case)
            sent[operation.label] = sent.get(operation.label, 0) + 1
            case.call_and_validate(timeout=60, checks=[checks.not_a_server_error, checks.status_code_conformance,
                                                       checks.content_type_conformance,
                                                       checks.response_schema_conformance])

        exchange()
    assert len(sent) == 8 and sum(sent.values()) >= 750, sent
    assert post(server, "/v1/chat/completions", {"messages": MESSAGE, "max_tokens": 2}).status_code == 200


# ---- hostile and careless clients -----------------------------------------------------------------

def test_host_header_must_name_this_server(server):
    """DNS rebinding: a page on evil.example that resolves to 127.0.0.1 sends its own Host header."""
    evil = requests.get(server.url + "/v1/models", headers={"Host": f"evil.example:{server.port}"}, timeout=10)
    assert evil.status_code == 400 and evil.json()["error"]["param"] == "host"
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}"):
        assert requests.get(server.url + "/v1/models", headers={"Host": host}, timeout=10).status_code == 200


def test_the_key_is_checked_first_and_everywhere(keyed_server):
    for path in ("/docs", "/redoc", "/openapi.json"):
        reply = requests.get(keyed_server.url + path, timeout=10)
        assert reply.status_code == 401 and reply.headers["WWW-Authenticate"] == "Bearer", path
    malformed = requests.post(keyed_server.url + "/", data=b'{"prompt": ', timeout=10,
                              headers={"Content-Type": "application/json"})
    assert malformed.status_code == 401  # not 422: nothing of the body is read without the key
    with requests.post(keyed_server.url + "/", data=b"x" * (8 << 20), timeout=30,
                       headers={"Content-Type": "application/json"}) as huge:
        assert huge.status_code == 401


def test_an_empty_api_key_is_refused(tmp_path):
    result = subprocess.run([sys.executable, API, "--api-key", ""], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 2 and "--api-key" in result.stderr and "empty" in result.stderr


def test_bodies_are_bounded_before_they_are_read(server):
    big = json.dumps({"prompt": "长" * (2 << 20)}).encode()  # 6 MB
    reply = requests.post(server.url + "/", data=big, headers={"Content-Type": "application/json"}, timeout=30)
    assert reply.status_code == 413 and reply.json()["error"]["param"] == "body"

    def chunks():  # no Content-Length: the limit holds while the body streams in
        for _ in range(64):
            yield b" " * (64 << 10)

    reply = requests.post(server.url + "/", data=chunks(), headers={"Content-Type": "application/json"}, timeout=30)
    assert reply.status_code == 413
    long_prompt = post(server, "/", {"prompt": "长" * 100_000})  # under the body limit, over any context
    assert long_prompt.status_code == 400 and long_prompt.json()["error"]["param"] == "prompt"
    assert "characters" in long_prompt.json()["error"]["message"]
    assert post(server, "/", {"prompt": "你好", "max_length": 24}).status_code == 200


def test_nulls_and_openai_forms_are_accepted(server):
    for body in ({"prompt": "你好", "history": None, "max_length": None, "top_p": None, "temperature": None},):
        reply = post(server, "/", body)
        assert reply.status_code == 200, reply.text
    forms = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "你"}, {"type": "text", "text": "好"}]}]},
             {"messages": [{"role": "developer", "content": "简短回答"}, *MESSAGE]},
             {"messages": MESSAGE, "n": None, "stream": None, "presence_penalty": 0, "logprobs": False,
              "response_format": {"type": "text"}, "tools": None}]
    for body in forms:
        reply = post(server, "/v1/chat/completions", {**body, "max_tokens": 4})
        assert reply.status_code == 200, (body, reply.text)
    parts = post(server, "/v1/chat/completions", {**forms[0], "temperature": 0, "max_tokens": 12}).json()
    plain = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "你好"}], "temperature": 0,
                                                   "max_tokens": 12}).json()
    assert parts["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    top_p_zero = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "你好"}], "top_p": 0,
                                                        "max_tokens": 12}).json()
    assert top_p_zero["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]


def test_models_by_id_and_head(server):
    assert requests.get(server.url + "/v1/models/chatglm-6b", timeout=10).json()["id"] == "chatglm-6b"
    missing = requests.get(server.url + "/v1/models/gpt-4", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert requests.head(server.url + "/v1/models", timeout=10).status_code == 200


def test_stream_chunks_carry_no_nulls_and_usage_counts_no_end_token(server):
    body = {"messages": [{"role": "user", "content": "你好"}], "temperature": 0, "stream": True}
    with requests.post(server.url + "/v1/chat/completions", json=body, stream=True, timeout=120) as reply:
        lines = [line for line in reply.iter_lines() if line.startswith(b"data: {")]
    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in lines if b'"choices":[{' in line]
    assert deltas and all(None not in delta.values() for delta in deltas), deltas
    whole = post(server, "/v1/chat/completions", {**body, "stream": False}).json()
    content, tokens = whole["choices"][0]["message"]["content"], whole["usage"]["completion_tokens"]
    assert whole["choices"][0]["finish_reason"] == "stop"
    cut = post(server, "/v1/chat/completions", {**body, "stream": False, "max_tokens": tokens - 1}).json()
    full = post(server, "/v1/chat/completions", {**body, "stream": False, "max_tokens": tokens}).json()
    assert cut["choices"][0]["message"]["content"] != content  # one token short of the reply
    assert full["choices"][0]["message"]["content"] == content  # exactly the reply's tokens, <eop> not among them


@needs_demo
@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_match_the_text_the_user_sees(server, stream):
    """The model writes an ASCII '!' after Chinese and the user sees '！' (process_response): a stop string is
    looked for in what the user sees and in the raw text, and the text before it is shown as it would be without
    the stop."""
    body = {"messages": [{"role": "user", "content": "你好"}], "temperature": 0, "max_tokens": 200, "stream": stream}

    def content(stop):
        reply = post(server, "/v1/chat/completions", {**body, "stop": stop})
        if not stream:
            choice = reply.json()["choices"][0]
            return choice["message"]["content"], choice["finish_reason"]
        chunks = [json.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: {")]
        return ("".join(c["choices"][0]["delta"].get("content", "") for c in chunks),
                next(c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]))

    whole, _ = content([])
    assert whole.startswith("你好👋！我是")
    assert content(["！"]) == ("你好👋", "stop")
    assert content(["我是"]) == ("你好👋！", "stop")
    assert content(["!"]) == ("你好👋", "stop")  # the raw text's ASCII mark


def test_sigterm_finishes_the_running_reply_and_refuses_the_queued(tmp_path):
    import signal
    import threading

    # One row at a time, so that the two later requests wait in the queue.
    server = Server(["--model-path", TINY, "--max-batch-size", "1"], str(tmp_path / "server.log"), str(tmp_path))
    try:
        streamed, answers = [], []
        started = threading.Event()

        def long_stream():
            body = {"messages": [{"role": "user", "content": "long"}], "max_tokens": 2000, "temperature": 0,
                    "stream": True}  # seconds of generation: the tiny random model never ends a reply
            with requests.post(server.url + "/v1/chat/completions", json=body, stream=True, timeout=120) as reply:
                for line in reply.iter_lines():
                    if b'"content":"' in line and b'"content":""' not in line:
                        started.set()
                    streamed.append(line)

        def queued():
            try:
                answers.append(post(server, "/v1/chat/completions", {"messages": MESSAGE, "max_tokens": 300,
                                                                      "temperature": 0}).status_code)
            except requests.ConnectionError:
                answers.append("refused")

        running = threading.Thread(target=long_stream)
        running.start()
        assert started.wait(60), server.log()  # generation is under way
        waiting = [threading.Thread(target=queued) for _ in range(2)]
        for thread in waiting:
            thread.start()
        time.sleep(1)  # both requests reach the queue
        server.process.send_signal(signal.SIGTERM)
        for thread in [running, *waiting]:
            thread.join(120)
        events = [line for line in streamed if line]
        assert events and events[-1] == b"data: [DONE]", events[-3:]  # the running reply was finished
        assert answers == [503, 503], (answers, server.log())
        assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    finally:
        server.stop()


def test_docs_work_offline(server):
    """/docs and /redoc load their scripts from this server, not from a CDN this machine may not reach."""
    for page in ("/docs", "/redoc"):
        html = requests.get(server.url + page, timeout=10).text
        scripts = re.findall(r'src="([^"]+\.js)"', html)
        assert scripts and all(src.startswith("/") for src in scripts), scripts
        for src in scripts:
            assert requests.get(server.url + src, timeout=10).status_code == 200, src


def test_slow_headers_are_cut_off(tmp_path):
    import socket

    server = Server(["--model-path", TINY, "--header-timeout", "1"], str(tmp_path / "server.log"), str(tmp_path))
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=15) as slow:
            slow.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n")  # and never the blank line
            assert slow.recv(1024) == b""  # closed by the server, within its deadline (the timeout is 15 s)
        assert requests.get(server.url + "/v1/models", timeout=10).status_code == 200  # whole requests still served
    finally:
        server.stop()


def test_health_answers_without_the_key(keyed_server):
    reply = requests.get(keyed_server.url + "/health", timeout=10)
    assert reply.status_code == 200
    assert reply.json() == {"status": "ok", "model": "chatglm-6b", "generating": False, "running": 0, "waiting": 0}
