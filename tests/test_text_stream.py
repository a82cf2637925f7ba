"""runtime/generation.py: a reply's text made token by token equals process_response of the whole decoded reply,
cut before the first stop string, and nothing once shown is ever taken back."""
import json
import os
import random

import pytest

from chatglm_6b.modeling_chatglm import CHINESE_PUNCTUATION, process_response
from chatglm_6b.tokenization_chatglm import ChatGLMTokenizer
from conftest import ROOT
from runtime.generation import Detokenizer, ResponseStream, TextStream, earliest_stop, stable_prefix

DEMO = os.path.join(ROOT, "demo_model")
# Where process_response's rules meet the stream's cuts: marks beside Chinese on either side, the training-time
# placeholder (whose replacement ends in a Chinese character), whitespace at the ends, emoji, runs of marks.
AWKWARD = ["你好!我是,a,b?中?  [[训练时间]]!x ", "  \n 中!中!中!中,", "[[训练时间]],好", "a!  ", "🎉👋!你", "中 ! 中",
           "[[训练", "x[[训练时间]]", "!!!中", "好\n\n下一段", "1,2,3,四", "[[训练时间]][[训练时间]]"]


@pytest.fixture(scope="module")
def tokenizer():
    return ChatGLMTokenizer.from_pretrained(DEMO)


def corpus_replies():
    with open(os.path.join(ROOT, "data", "demo_corpus", "single_turn.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["response"] for line in f]


def expected(tokenizer, ids, stops):
    """The whole reply processed at once; with stops, cut before the stop that is complete first, a stop being
    found as written or with its ASCII marks as process_response shows them (full-width)."""
    whole = process_response(tokenizer.decode(ids))
    stops = list(stops) + [stop.translate(str.maketrans(CHINESE_PUNCTUATION)) for stop in stops]
    for end in range(1, len(whole) + 1):
        hit = earliest_stop(whole[:end], stops)
        if hit:
            return whole[:hit[0]].rstrip(), True
    return whole, False


def streamed(tokenizer, ids, stops):
    stream, pieces, shown = TextStream(tokenizer, stops), [], ""
    for token in ids:
        pieces.append(stream.push(token))
        shown += pieces[-1]
        assert not shown or not shown[-1].isspace()  # trailing whitespace waits: the end strips it
        if stream.stopped:
            break
    pieces.append(stream.finish())
    return "".join(pieces), stream


def test_the_stream_equals_processing_the_whole_reply(tokenizer):
    rng = random.Random(0)
    texts = corpus_replies() + AWKWARD
    for trial in range(1500):
        if trial % 3:
            ids = tokenizer(rng.choice(texts), add_special_tokens=False)["input_ids"]
        else:  # what a random model writes: any id, control tokens and byte pieces included
            ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 40))]
        whole = process_response(tokenizer.decode(ids))
        stops = []
        if trial % 2 and len(whole) > 2:
            start = rng.randrange(len(whole))
            stops = [whole[start:start + rng.randint(1, 3)], rng.choice(["！", "!", "\n", "好", "，", "2023"])]
        text, stream = streamed(tokenizer, ids, stops)
        want, stopped = expected(tokenizer, ids, stops)
        assert (text, stream.text, stream.stopped) == (want, want, stopped), (ids, stops)


def test_stop_strings_match_the_text_the_user_sees_and_the_raw_text(tokenizer):
    """The raw reply has an ASCII '!' after Chinese; the user sees '！': a stop string matches either."""
    ids = tokenizer("你好!我是 ChatGLM", add_special_tokens=False)["input_ids"]
    assert streamed(tokenizer, ids, ["！"])[0] == "你好"
    assert streamed(tokenizer, ids, ["我是"])[0] == "你好！"
    assert streamed(tokenizer, ids, ["!"])[0] == "你好"  # the raw text's mark
    assert streamed(tokenizer, ids, ["!我"])[0] == "你好"
    plain = TextStream(tokenizer, ["!"], processed=False)  # raw text (completions, JSON): matched as written only
    assert "".join(plain.push(token) for token in ids) + plain.finish() == "你好"


def test_text_shows_as_soon_as_it_cannot_change(tokenizer):
    stream = TextStream(tokenizer)
    shown = [stream.push(token) for token in tokenizer("你好,世界", add_special_tokens=False)["input_ids"]]
    assert "".join(shown) == "你好，世界"  # nothing waits for the end
    assert stable_prefix("你好！") == "你好！" and stable_prefix("abc!") == "abc"  # "！" is final; "!" may turn
    assert stable_prefix("abc [[训练") == "abc" and stable_prefix("abc\n", ["\nEND"]) == "abc"


def test_each_token_costs_a_bounded_amount(tokenizer, monkeypatch):
    """Decoding and post-processing work per token does not grow with the reply (no whole-reply decode)."""
    decoded = []
    decode = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **kw: decoded.append(len(ids)) or decode(ids, **kw))
    ids = tokenizer("你好，我是 ChatGLM-6B 的演示小模型。" * 40, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer)
    for token in ids:
        stream.push(token)
    assert len(ids) > 300 and max(decoded) <= 4
    response = ResponseStream()
    for piece in ["中文。"] * 2000:
        response.append(piece)
    assert len(response.pending) < 10


def test_detokenizer_holds_back_an_unfinished_character(tokenizer):
    ids = tokenizer("𝄞", add_special_tokens=False)["input_ids"]  # four byte pieces
    detokenizer = Detokenizer(tokenizer)
    parts = [detokenizer.push(token) for token in ids]
    assert "\ufffd" not in "".join(parts) and "".join(parts) + detokenizer.flush() == tokenizer.decode(ids)
