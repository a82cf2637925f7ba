"""OpenAI's API as this server speaks it: the request and response bodies of /v1/chat/completions and
/v1/completions, how OpenAI's messages become ChatGLM's (query, history), and token log-probabilities in
OpenAI's two shapes. api.py has the routes; the engine (runtime/engine.py) generates.

What differs from OpenAI, and why (README's "OpenAI API" table lists every field):
- ChatGLM-6B has no system role: a system (or developer) message is put in front of the user message that
  follows it (the last one, if none follows), separated by a blank line. Consecutive user messages are joined
  by newlines, and so are consecutive assistant messages; a final assistant message is a prefix that the reply
  continues (its tokens follow <sop>, the reply is what comes after them).
- Tools: the model was not trained to call them, so it is never left to choose. tool_choice naming a function,
  or "required", constrains the reply to that function's arguments (the schema's JSON); "auto" and "none" with
  tools are refused.
- A prompt attends in both directions (GLM), so its tokens have no next-token probabilities: `echo` on
  /v1/completions returns the prompt's text with null logprobs.
"""
import json
from typing import Annotated, Any, Dict, List, Literal, Optional, Tuple, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_serializer

from .sampling import MOST_TOP_LOGPROBS, TokenLogprobs
from .server import ApiError

MODEL_ID = "chatglm-6b"
# n above this would take the whole batch for one request; OpenAI's own limit is 128.
MOST_CHOICES = 16


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


class RequestBody(BaseModel):
    """Rejects NaN and Infinity, which Python's JSON parser accepts."""
    model_config = ConfigDict(allow_inf_nan=False)


class OmitsNulls(BaseModel):
    """Only the fields that have a value are sent (no "content": null in a stream's delta)."""

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}


# ---- requests ----------------------------------------------------------------------------------------

class TextPart(RequestBody):
    type: Literal["text"]
    text: Text


def _join_parts(content):
    """OpenAI's content is a string or a list of parts; only text parts can reach this model."""
    if isinstance(content, list):
        return "".join(part.text if isinstance(part, TextPart) else part["text"] if isinstance(part, dict) else part
                       for part in content)
    return content


class FunctionCall(RequestBody):
    name: Text
    arguments: Text = Field(description="JSON text")


class ToolCall(RequestBody):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(RequestBody):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="developer counts as system; a tool's result counts as the user's")
    content: Annotated[Optional[Union[Text, List[TextPart]]], AfterValidator(_join_parts)] = Field(
        None, description="null only for an assistant message with tool_calls")
    tool_calls: Optional[List[ToolCall]] = None
    name: Optional[str] = None
    tool_call_id: Optional[str] = None


class StreamOptions(RequestBody):
    include_usage: bool = False


class FunctionSpec(RequestBody):
    name: str = Field(min_length=1, max_length=64)
    description: Optional[str] = None
    parameters: Optional[Dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(RequestBody):
    type: Literal["function"]
    function: FunctionSpec


class NamedToolChoice(RequestBody):
    type: Literal["function"]
    function: Dict[str, str] = Field(description='{"name": ...}')


LogitBias = Dict[str, Annotated[float, Field(ge=-100, le=100)]]


class SamplingFields(RequestBody):
    """What both endpoints take to pick tokens."""
    model: str = Field(MODEL_ID, description="one of the names this server serves (--served-model-name)")
    temperature: Optional[float] = Field(None, ge=0, le=2, description="default 0.95 (ChatGLM's); 0 is greedy")
    top_p: Optional[float] = Field(None, ge=0, le=1, description="default 0.7 (ChatGLM's); 0 is greedy")
    n: Optional[int] = Field(1, ge=1, le=MOST_CHOICES, description="choices, each its own row in the engine")
    stop: Stops = Field(default_factory=list, description="the text ends before the first of these strings")
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    seed: Optional[int] = Field(None, description="the same seed and settings give the same reply (choice i: seed+i)")
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[LogitBias] = Field(None, description="token id -> added to its score (-100 to 100)")
    user: Optional[str] = None


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra={"examples": [{"model": MODEL_ID, "messages": [
        {"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "你好"}]}]})
    messages: List[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1, description="most new tokens; default: up to the context")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="the newer name of max_tokens")
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MOST_TOP_LOGPROBS)
    response_format: Optional[Dict[str, Any]] = Field(
        None, description='{"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": ...}}')
    tools: Optional[List[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None
    # Older names of tools and tool_choice: refused unless null or empty.
    functions: Optional[List[Any]] = None
    function_call: Optional[Any] = None


Prompt = Union[Text, List[Text], List[int], List[List[int]]]


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra={"examples": [{"model": MODEL_ID, "prompt": "北京是", "max_tokens": 16}]})
    prompt: Prompt = Field(description="text, texts, token ids, or lists of token ids; [gMASK] <sop> is added to "
                                       "text as the model's prompts end with them")
    max_tokens: Optional[int] = Field(16, ge=1, description="most new tokens (OpenAI's default 16); null: up to the "
                                                            "context")
    logprobs: Optional[int] = Field(None, ge=0, le=MOST_TOP_LOGPROBS,
                                    description="the chosen token's logprob and this many alternatives")
    echo: Optional[bool] = Field(False, description="the prompt's text before the completion (its tokens' logprobs "
                                                    "are null: GLM's prompt attends both ways)")
    suffix: Optional[str] = Field(None, description="refused unless null: GLM-6B has no insertion mode")
    best_of: Optional[int] = Field(None, ge=1, le=MOST_CHOICES, description="only null or n")


# Values of OpenAI options that ask for nothing this server does not do anyway.
NEUTRAL = {"functions": [[]], "function_call": ["none"]}


def refuse_unsupported(request: BaseModel) -> None:
    for name, neutral in NEUTRAL.items():
        value = getattr(request, name, None)
        if value is not None and value not in neutral:
            raise ApiError(400, f"{name} is not supported by this server: use tools with tool_choice naming the "
                                "function", name)
    if isinstance(request, CompletionRequest):
        if request.suffix is not None:
            raise ApiError(400, "suffix is not supported: ChatGLM-6B completes a prompt at its end only", "suffix")
        if request.best_of is not None and request.best_of != (request.n or 1):
            raise ApiError(400, "best_of is supported only equal to n (no choice is ranked out)", "best_of")


def logit_bias_ids(bias: Optional[Dict[str, float]], vocab_size: int) -> Optional[Dict[int, float]]:
    if not bias:
        return None
    ids = {}
    for key, value in bias.items():
        if not key.isdigit() or int(key) >= vocab_size:
            raise ApiError(400, f"logit_bias: {key!r} is not a token id of this model (0 to {vocab_size - 1})",
                           "logit_bias")
        ids[int(key)] = value
    return ids


# ---- tools -------------------------------------------------------------------------------------------

def forced_tool(request: ChatCompletionRequest) -> Optional[Tuple[List[Tool], Dict[str, Any]]]:
    """For tool_choice naming a function or "required": (the functions it may call, the JSON schema of the
    call) with the call's shape {"name": ..., "arguments": {...}}; None without tools. Refuses the choices the
    model cannot make."""
    if not request.tools:
        if request.tool_choice not in (None, "none"):
            raise ApiError(400, "tool_choice: there are no tools to choose from", "tool_choice")
        return None
    choice = request.tool_choice
    if choice is None or choice in ("auto", "none"):
        raise ApiError(400, f"tool_choice: {choice or 'auto'!r} with tools is not supported: ChatGLM-6B was not "
                            "trained to decide when to call a tool. Name the function (tool_choice: {\"type\": "
                            "\"function\", \"function\": {\"name\": ...}}) or use \"required\", and the reply is "
                            "constrained to that function's arguments", "tool_choice")
    if choice == "required":
        tools = request.tools
    else:
        tools = [tool for tool in request.tools if tool.function.name == choice.function.get("name")]
        if not tools:
            raise ApiError(400, f"tool_choice: no tool is named {choice.function.get('name')!r}", "tool_choice")
    calls = [{"type": "object", "properties": {"name": {"const": tool.function.name},
                                               "arguments": tool.function.parameters or {"type": "object"}},
              "required": ["name", "arguments"], "additionalProperties": False} for tool in tools]
    return tools, calls[0] if len(calls) == 1 else {"anyOf": calls}


def describe_tools(tools: List[Tool]) -> str:
    """What the model is told about the functions it will call (in front of the last user message)."""
    lines = ["请调用以下函数之一作答，只输出 JSON：" if len(tools) > 1 else "请调用以下函数作答，只输出 JSON："]
    for tool in tools:
        spec = tool.function
        lines.append(f"{spec.name}: {spec.description or ''} 参数: {json.dumps(spec.parameters or {}, ensure_ascii=False)}")
    return "\n".join(lines)


# ---- messages ------------------------------------------------------------------------------------------

class Conversation(BaseModel):
    """OpenAI messages as ChatGLM's chat() takes them, and the start of a reply to continue."""
    query: str
    history: List[Tuple[str, str]]
    continuation: str = ""


def _message_text(message: Message, index: int) -> str:
    if message.role == "assistant" and message.tool_calls:
        calls = [{"name": call.function.name, "arguments": _loads_or_text(call.function.arguments)}
                 for call in message.tool_calls]
        text = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
        return text if not message.content else message.content + "\n" + text
    if message.content is None:
        raise ApiError(400, f"messages[{index}]: content is required (null only for an assistant message with "
                            "tool_calls)", "messages")
    return message.content


def _loads_or_text(arguments: str):
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def messages_to_chat(messages: List[Message], instructions: str = "") -> Conversation:
    """OpenAI messages -> ChatGLM's (query, history, continuation); see the module's docstring. instructions: more
    system text (the tools' description)."""
    turns: List[List[str]] = []  # [role, text] with roles user and assistant, alternating after merging
    system: List[str] = []  # system text waiting for the next user message
    for index, message in enumerate(messages):
        text = _message_text(message, index)
        if message.role in ("system", "developer"):
            system.append(text)
            continue
        role = "assistant" if message.role == "assistant" else "user"
        if role == "user" and system:
            text, system = "\n".join(system) + "\n\n" + text, []
        if turns and turns[-1][0] == role:
            turns[-1][1] += "\n" + text
        else:
            turns.append([role, text])
    last_user = max((i for i, (role, _) in enumerate(turns) if role == "user"), default=None)
    if last_user is None:
        raise ApiError(400, "messages: there is no user message to answer", "messages")
    system += [instructions] if instructions else []
    if system:
        turns[last_user][1] = "\n".join(system) + "\n\n" + turns[last_user][1]
    if not turns[last_user][1]:
        raise ApiError(400, "messages: the last user message is empty", "messages")
    continuation = turns.pop()[1] if turns[-1][0] == "assistant" else ""
    if turns[0][0] == "assistant":  # the assistant spoke first: its turn answers an empty question
        turns.insert(0, ["user", ""])
    contents = [text for _, text in turns]
    return Conversation(query=contents[-1], history=list(zip(contents[0:-1:2], contents[1:-1:2])),
                        continuation=continuation)


# ---- log-probabilities -------------------------------------------------------------------------------

class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[List[int]]


class TokenLogprob(TopLogprob):
    top_logprobs: List[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: Optional[List[TokenLogprob]]


class CompletionLogprobs(BaseModel):
    """The legacy shape of /v1/completions."""
    tokens: List[str]
    token_logprobs: List[Optional[float]]
    top_logprobs: List[Optional[Dict[str, float]]]
    text_offset: List[int]


class TokenTexts:
    """A token id's text and bytes as OpenAI reports them: the bytes it adds to a text (a byte piece: one byte,
    perhaps part of a character), its text those bytes decoded (a partial character as bytes:\\xNN)."""

    def __init__(self, tokenizer):
        from .grammar import SPECIAL, vocabulary_bytes

        self.bytes, self.special = vocabulary_bytes(tokenizer), SPECIAL

    def text(self, token: int) -> str:
        data = self.bytes[token]
        if data.startswith(self.special):
            return data[len(self.special):].decode("utf-8", "replace")
        return data.decode("utf-8", "backslashreplace")

    def entry(self, token: int, logprob: float) -> TopLogprob:
        data = self.bytes[token]
        return TopLogprob(token=self.text(token), logprob=logprob,
                          bytes=None if data.startswith(self.special) else list(data))

    def chat(self, tokens: List[int], logprobs: List[TokenLogprobs]) -> List[TokenLogprob]:
        return [TokenLogprob(**self.entry(token, lp.logprob).model_dump(),
                             top_logprobs=[self.entry(alt, value) for alt, value in lp.top])
                for token, lp in zip(tokens, logprobs)]

    def completion(self, tokens: List[Optional[int]], logprobs: List[Optional[TokenLogprobs]], offset: int = 0
                   ) -> CompletionLogprobs:
        """tokens None-logprobs first for an echoed prompt."""
        texts = [self.text(token) for token in tokens]
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        return CompletionLogprobs(
            tokens=texts, token_logprobs=[None if lp is None else lp.logprob for lp in logprobs],
            top_logprobs=[None if lp is None else {self.text(alt): value for alt, value in lp.top} for lp in logprobs],
            text_offset=offsets)


# ---- responses -----------------------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "tool_calls"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]
    tool_calls: Optional[List[ToolCall]] = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: List[Choice]
    usage: Usage


class ToolCallDelta(BaseModel):
    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Delta(OmitsNulls):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[List[ToolCallDelta]] = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[FinishReason] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: List[ChunkChoice]
    usage: Optional[Usage] = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: List[CompletionChoice]
    usage: Optional[Usage] = None
