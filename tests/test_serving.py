"""api.py serving many clients at once, end to end on real uvicorn servers: batched replies equal the replies
to single requests, a client that leaves frees its row, a full queue answers 429, /health and /metrics."""
import concurrent.futures
import json
import socket
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from test_api import HAS_DEMO, TINY, Server, post

CHECKPOINT_ARGS = [] if HAS_DEMO else ["--model-path", TINY]
QUESTIONS = ["你好", "介绍一下北京", "什么是人工智能？", "用 Python 实现快速排序", "1+1=?", "晚上睡不着怎么办",
             "Write a poem about the sea", "谢谢"]
LONG = {"messages": [{"role": "user", "content": "long"}], "max_tokens": 2000, "temperature": 0}  # tiny: 2000 tokens


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory):
    """The default checkpoint with room for a 64-client burst."""
    tmp = tmp_path_factory.mktemp("serving")
    started = Server([*CHECKPOINT_ARGS, "--max-batch-size", "8", "--max-queue", "64"], str(tmp / "server.log"),
                     str(tmp))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """The tiny checkpoint (replies of thousands of tokens), one row and one queued request at most."""
    tmp = tmp_path_factory.mktemp("serving-small")
    started = Server(["--model-path", TINY, "--max-batch-size", "1", "--max-queue", "1"], str(tmp / "server.log"),
                     str(tmp))
    yield started
    started.stop()


def ask(server, question, stream):
    """A greedy reply through either endpoint; `stream` reads the OpenAI one as server-sent events."""
    if stream is None:
        reply = post(server, "/", {"prompt": question, "history": [], "temperature": 0, "max_length": 96})
        assert reply.status_code == 200, reply.text
        return reply.json()["response"]
    body = {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 64,
            "stream": stream}
    reply = post(server, "/v1/chat/completions", body, stream=stream)
    assert reply.status_code == 200, reply.text
    if not stream:
        return reply.json()["choices"][0]["message"]["content"]
    chunks = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith(b"data: {")]
    return "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"])


def health(server):
    return requests.get(server.url + "/health", timeout=10).json()


def metrics(server):
    text = requests.get(server.url + "/metrics", timeout=10).text
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample_value(families, family, name, **labels):
    return sum(s.value for s in families[family].samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_a_64_client_burst_gets_the_replies_of_single_requests(busy_server):
    """Every question through every endpoint form, alone, then 64 of them at once (mixed streaming and not):
    nothing is lost, refused or answered differently."""
    forms = [None, False, True]
    alone = {(q, form): ask(busy_server, q, form) for q in QUESTIONS for form in forms}
    burst = [(QUESTIONS[i % len(QUESTIONS)], forms[i % 3]) for i in range(64)]
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        replies = list(pool.map(lambda job: ask(busy_server, *job), burst))
    assert replies == [alone[job] for job in burst]
    families = metrics(busy_server)
    original_endpoint = len(QUESTIONS) + sum(form is None for _, form in burst)
    assert sample_value(families, "chatglm_requests", "chatglm_requests_total", endpoint="/",
                        status="200") == original_endpoint
    assert sample_value(families, "chatglm_requests", "chatglm_requests_total", status="429") == 0
    assert sample_value(families, "chatglm_time_to_first_token_seconds",
                        "chatglm_time_to_first_token_seconds_count") == len(alone) + len(burst)
    assert sample_value(families, "chatglm_completion_tokens", "chatglm_completion_tokens_total") > 0
    assert sample_value(families, "chatglm_prompt_tokens", "chatglm_prompt_tokens_total") > 0
    assert health(busy_server) == {"status": "ok", "model": "chatglm-6b", "generating": False, "running": 0,
                                   "waiting": 0}


def wait_for(condition, server, timeout=15):
    deadline = time.time() + timeout
    while not condition(health(server)):
        assert time.time() < deadline, (health(server), server.log())
        time.sleep(0.05)


def raw_post(server, path, body: bytes) -> socket.socket:
    """Sends a request and leaves without reading the answer (the caller closes the socket)."""
    connection = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    connection.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return connection


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", LONG),
                                        ("/", {"prompt": "long", "history": [], "temperature": 0})])
def test_a_client_that_leaves_a_non_streaming_request_frees_its_row(small_server, path, body):
    connection = raw_post(small_server, path, json.dumps(body).encode())
    wait_for(lambda state: state["running"] == 1, small_server)
    connection.close()
    wait_for(lambda state: state["running"] == 0, small_server, timeout=10)  # thousands of tokens left to go
    assert "client went away: generation stopped after" in small_server.log()
    assert ask_tiny(small_server).status_code == 200


def ask_tiny(server):
    return post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})


def test_beyond_the_queue_is_429_with_retry_after(small_server):
    running = raw_post(small_server, "/v1/chat/completions", json.dumps(LONG).encode())
    wait_for(lambda state: state["running"] == 1, small_server)
    queued = raw_post(small_server, "/v1/chat/completions", json.dumps(LONG).encode())
    wait_for(lambda state: state["waiting"] == 1, small_server)
    for refused in (ask_tiny(small_server), post(small_server, "/", {"prompt": "hi", "max_length": 40},
                                                 stream=True)):
        assert refused.status_code == 429, refused.text
        assert refused.headers["Retry-After"].isdigit()
        error = refused.json()["error"]
        assert error["type"] == "rate_limit_error" and "--max-queue 1" in error["message"]
    assert requests.get(small_server.url + "/v1/models", timeout=10).status_code == 200  # the rest still answers
    queued.close()  # a waiting request that leaves gives its place back
    wait_for(lambda state: state["waiting"] == 0, small_server)
    running.close()
    wait_for(lambda state: state["running"] == 0, small_server)
    assert ask_tiny(small_server).status_code == 200
    families = metrics(small_server)
    assert sample_value(families, "chatglm_requests", "chatglm_requests_total", status="429") == 2
    assert {"chatglm_queue_depth", "chatglm_running_batch_size",
            "chatglm_time_per_output_token_seconds"} <= set(families)
