"""The clients people point at an OpenAI-compatible server, against a real api.py on 127.0.0.1: the openai SDK
(every field of README's OpenAI table), LangChain's ChatOpenAI, litellm and lm-evaluation-harness."""
import asyncio
import json
import os
import subprocess
import sys

import jsonschema
import openai
import pytest
import requests

from chatglm_6b.modeling_chatglm import process_response
from tests.test_api import CHECKPOINT, DEMO_REPLY, Server, needs_demo

MODEL = "chatglm-6b"
HELLO = [{"role": "user", "content": "你好"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clients")
    started = Server(["--model-path", CHECKPOINT, "--served-model-name", MODEL, "glm"], str(tmp / "server.log"),
                     str(tmp))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def content(completion) -> str:
    return completion.choices[0].message.content


# ---- the openai SDK ------------------------------------------------------------------------------------

def test_seed_gives_the_same_sampled_reply(client):
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "介绍一下北京"}], temperature=1.5, top_p=0.95,
               max_tokens=24)
    first, again = (client.chat.completions.create(**ask, seed=11) for _ in range(2))
    assert content(first) == content(again)
    others = {content(client.chat.completions.create(**ask, seed=seed)) for seed in (12, 13, 14)}
    assert len(others | {content(first)}) > 1  # the seed matters: these are draws


def test_n_choices_each_seeded_and_counted(client):
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "介绍一下北京"}], temperature=1.5, max_tokens=16,
               seed=5)
    both = client.chat.completions.create(**ask, n=3)
    assert [c.index for c in both.choices] == [0, 1, 2]
    # choice i is what the request with seed + i gives alone; usage counts the prompt once, every choice's tokens
    alone = [client.chat.completions.create(**{**ask, "seed": 5 + i}) for i in range(3)]
    assert [c.message.content for c in both.choices] == [content(a) for a in alone]
    assert both.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone) > 16
    assert both.usage.prompt_tokens == alone[0].usage.prompt_tokens
    streamed = client.chat.completions.create(**ask, n=3, stream=True)
    texts = {0: "", 1: "", 2: ""}
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert [texts[i] for i in range(3)] == [c.message.content for c in both.choices]


def test_logprobs_streamed_and_not(client):
    ask = dict(model=MODEL, messages=HELLO, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**ask)
    entries = whole.choices[0].logprobs.content
    assert len(entries) == whole.usage.completion_tokens
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the likeliest
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
    assert process_response(bytes(b for e in entries for b in e.bytes).decode()) == content(whole)  # raw bytes
    chunks = list(client.chat.completions.create(**ask, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in entries]
    too_many = requests.post(client.base_url.join("chat/completions").__str__(), json={**ask, "top_logprobs": 21})
    assert too_many.status_code == 422


def test_penalties_and_logit_bias(client, server):
    ask = dict(model=MODEL, messages=HELLO, temperature=0, max_tokens=40)
    plain = client.chat.completions.create(**ask, logprobs=True)
    first = plain.choices[0].logprobs.content[0]
    tokenizer_ids = requests.post(server.url + "/v1/completions", json={
        "model": MODEL, "prompt": "你好", "max_tokens": 1, "temperature": 0, "logprobs": 0}).json()
    assert tokenizer_ids["choices"][0]["logprobs"]["tokens"][0] == first.token
    # banning the first token changes the reply
    first_id = token_id_of(first)
    banned = client.chat.completions.create(**ask, logit_bias={str(first_id): -100})
    assert not content(banned).startswith(content(plain)[:1])
    # the penalties lower a token generated once before by frequency_penalty + presence_penalty against a token not
    # generated yet (the confident demo model still picks it here); the first token is untouched
    plain = client.chat.completions.create(**ask, logprobs=True, top_logprobs=5)
    penalised = client.chat.completions.create(**ask, frequency_penalty=1.0, presence_penalty=0.5, logprobs=True,
                                               top_logprobs=5)
    before, after = plain.choices[0].logprobs.content, penalised.choices[0].logprobs.content
    i = next(i for i, entry in enumerate(before) if entry.token in {e.token for e in before[:i]})
    assert [e.token for e in after[:i + 1]] == [e.token for e in before[:i + 1]]
    seen = {e.token for e in before[:i]}
    other = next(alt.token for alt in before[i].top_logprobs if alt.token not in seen)

    def gap(entry):  # log p(chosen) - log p(other) = their scores' difference
        return entry.logprob - next(alt.logprob for alt in entry.top_logprobs if alt.token == other)
    assert gap(before[i]) - gap(after[i]) == pytest.approx(1.5, abs=1e-2)
    assert after[0].logprob == pytest.approx(before[0].logprob, abs=1e-5)
    bad = requests.post(server.url + "/v1/chat/completions", json={**ask, "logit_bias": {"hello": 1}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logit_bias"


def token_id_of(entry) -> int:
    """The id of a logprobs entry, by its bytes."""
    from chatglm_6b.tokenization_chatglm import ChatGLMTokenizer
    from runtime.grammar import token_bytes

    return token_bytes(ChatGLMTokenizer.from_pretrained(CHECKPOINT)).index(bytes(entry.bytes))


def test_completions_raw_prompt_echo_and_stream(client, server):
    plain = client.completions.create(model=MODEL, prompt="北京是", max_tokens=8, temperature=0)
    assert plain.object == "text_completion" and plain.choices[0].finish_reason in ("stop", "length")
    one = requests.post(server.url + "/v1/completions", json={
        "model": MODEL, "prompt": "北京是", "max_tokens": 1, "echo": True, "logprobs": 0}).json()
    tokens = one["choices"][0]["logprobs"]["tokens"]
    assert tokens[-3:-1] == ["[gMASK]", "<sop>"] and len(tokens) == plain.usage.prompt_tokens + 1  # as chat() ends it
    echoed = client.completions.create(model=MODEL, prompt="北京是", max_tokens=8, temperature=0, echo=True,
                                       logprobs=2)
    assert echoed.choices[0].text == "北京是" + plain.choices[0].text
    logprobs = echoed.choices[0].logprobs
    prompt_length = plain.usage.prompt_tokens
    assert logprobs.token_logprobs[:prompt_length] == [None] * prompt_length  # GLM's prompt: no next-token logprobs
    assert all(lp <= 0 for lp in logprobs.token_logprobs[prompt_length:])
    assert all(len(top) <= 2 for top in logprobs.top_logprobs[prompt_length:])
    chunks = [c for c in client.completions.create(model=MODEL, prompt="北京是", max_tokens=8, temperature=0,
                                                   stream=True, logprobs=2) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    streamed_tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed_tokens == logprobs.tokens[prompt_length:]
    many = client.completions.create(model=MODEL, prompt=["北京是", "你好"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3] and many.choices[0].text == many.choices[1].text
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=MODEL, prompt="北京是", suffix="。", max_tokens=4)


@needs_demo
def test_json_object_and_json_schema_replies(client):
    for question in ("你好", "介绍一下北京", "Who are you?"):
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
        jsonschema.validate(json.loads(content(reply)), PERSON)
    anything = client.chat.completions.create(model=MODEL, messages=HELLO, response_format={"type": "json_object"},
                                              seed=3)
    assert isinstance(json.loads(content(anything)), dict)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=HELLO, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}) if c.choices)
    jsonschema.validate(json.loads(streamed), PERSON)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "城市的天气",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 10}},
                                                "required": ["city"], "additionalProperties": False}}}


@needs_demo
def test_tools_named_or_required_are_honoured_and_auto_is_refused(client):
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "北京天气怎么样？"}], temperature=0, tools=[WEATHER])
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        reply = client.chat.completions.create(**ask, tool_choice=choice)
        call = reply.choices[0].message.tool_calls[0]
        assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        assert isinstance(json.loads(call.function.arguments)["city"], str)
    streamed = [c for c in client.chat.completions.create(**ask, tool_choice="required", stream=True) if c.choices]
    calls = [t for c in streamed for t in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and "city" in json.loads(calls[0].function.arguments)
    # the call and its result go back into the conversation
    followup = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=8, messages=[
        *ask["messages"], {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "晴，25 度"}])
    assert content(followup)
    for choice in ("auto", "none", None):
        with pytest.raises(openai.BadRequestError, match="tool_choice"):
            client.chat.completions.create(**ask, **({} if choice is None else {"tool_choice": choice}))


@needs_demo
def test_stop_strings_match_the_shown_and_the_raw_text(client):
    ask = dict(model=MODEL, messages=HELLO, temperature=0, max_tokens=200)
    assert content(client.chat.completions.create(**ask)) == DEMO_REPLY
    for stop in ("！", "!"):  # the model writes '!', the user sees '！'
        reply = client.chat.completions.create(**ask, stop=[stop])
        assert (content(reply), reply.choices[0].finish_reason) == ("你好👋", "stop")
    assert content(client.chat.completions.create(**ask, stop="我是")) == "你好👋！"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        **ask, stop="!", stream=True) if c.choices)
    assert streamed == "你好👋"


def test_context_overflow_and_unknown_models(client, server):
    with pytest.raises(openai.BadRequestError) as overflow:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "你好" * 3000}])
    assert overflow.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=2)
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    other_name = client.chat.completions.create(model="glm", messages=HELLO, max_tokens=2)
    assert other_name.model == "glm"
    assert [m.id for m in client.models.list()] == [MODEL, "glm"]
    assert requests.get(server.url + "/v1/models/gpt-4o").json()["error"]["code"] == "model_not_found"


@needs_demo
def test_message_orders_openai_accepts(client):
    ask = dict(model=MODEL, temperature=0, max_tokens=30)
    joined = client.chat.completions.create(**ask, messages=[{"role": "user", "content": "你"},
                                                            {"role": "user", "content": "好"}])
    assert content(joined) == content(client.chat.completions.create(**ask, messages=[
        {"role": "user", "content": "你\n好"}]))
    late_system = client.chat.completions.create(**ask, messages=[
        {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
        {"role": "system", "content": "简短回答"}, {"role": "user", "content": "谢谢"}])
    first_system = client.chat.completions.create(**ask, messages=[
        {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "简短回答\n\n谢谢"}])
    assert content(late_system) == content(first_system)
    # a final assistant message is continued: greedy, the reply's start given back gives the rest of the reply
    whole = client.chat.completions.create(**{**ask, "max_tokens": 200}, messages=HELLO)
    assert content(whole) == DEMO_REPLY
    continued = client.chat.completions.create(**{**ask, "max_tokens": 200}, messages=[
        *HELLO, {"role": "assistant", "content": "你好👋！我是"}])
    assert "你好👋！我是 " + content(continued) == DEMO_REPLY


# ---- LangChain -----------------------------------------------------------------------------------------

def test_langchain_chat_openai(server):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    llm = ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="unused", temperature=0, max_tokens=30,
                     max_retries=0, stream_usage=True, seed=1)
    answer = llm.invoke("你好")
    assert answer.content and answer.usage_metadata["output_tokens"] > 0
    streamed = list(llm.stream("你好"))
    assert "".join(chunk.content for chunk in streamed) == answer.content
    assert sum((chunk.usage_metadata or {}).get("output_tokens", 0) for chunk in streamed) > 0
    assert [m.content for m in llm.batch(["你好", "你好"])] == [answer.content] * 2

    class Person(BaseModel):
        name: str = Field(max_length=16)
        age: int = Field(ge=0, le=150)

    person = llm.with_structured_output(Person).invoke("介绍一个人")  # method json_schema, LangChain's default
    assert isinstance(person, Person)
    ranked = llm.bind(logprobs=True, top_logprobs=2).invoke("你好")
    assert ranked.response_metadata["logprobs"]["content"][0]["top_logprobs"]


# ---- litellm -------------------------------------------------------------------------------------------

def test_litellm(server, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # its price list, without fetching it
    import litellm

    ask = dict(model=f"openai/{MODEL}", api_base=server.url + "/v1", api_key="unused", max_tokens=12, temperature=0,
               seed=2, messages=HELLO)
    reply = litellm.completion(**ask)
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    assert asyncio.run(litellm.acompletion(**ask)).choices[0].message.content == reply.choices[0].message.content
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in litellm.completion(**ask, stream=True))
    assert streamed == reply.choices[0].message.content
    text = litellm.text_completion(model=f"text-completion-openai/{MODEL}", api_base=server.url + "/v1",
                                   api_key="unused", prompt="北京是", max_tokens=6, temperature=0)
    assert text.choices[0].text is not None
    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.completion(**{**ask, "messages": [{"role": "user", "content": "你好" * 3000}]}, num_retries=0)


# ---- lm-evaluation-harness -----------------------------------------------------------------------------

@needs_demo
def test_lm_eval_local_chat_completions_scores_a_generation_task(server, tmp_path):
    """lm-eval's local-chat-completions (which sends seed with every request) on a small generation task whose
    answers are the demo model's greedy replies: it finishes with a score, and the score is the replies'."""
    tasks = os.path.join(FIXTURES, "lm_eval")
    command = [sys.executable, "-m", "lm_eval", "--model", "local-chat-completions", "--tasks", "chatglm_demo_chat",
               "--include_path", tasks, "--limit", "4", "--apply_chat_template", "--output_path", str(tmp_path),
               "--model_args", f"model={MODEL},base_url={server.url}/v1/chat/completions,num_concurrent=2,"
                               "max_retries=1,tokenized_requests=False"]
    run = subprocess.run(command, cwd=tasks, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = [os.path.join(root, name) for root, _, names in os.walk(tmp_path) for name in names
               if name.startswith("results")]
    scores = json.load(open(results[0]))["results"]["chatglm_demo_chat"]
    assert scores["exact_match,none"] == 1.0, scores
