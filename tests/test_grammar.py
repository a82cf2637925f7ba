"""Constrained decoding (runtime/grammar.py on llguidance): ChatGLM's vocabulary as llguidance sees it, in the demo's
layout and in the real 130,528-id ice_text layout (20,000 image ids, control pieces at 130,000), and JSON replies
under a schema that always parse and validate, batched with unconstrained rows."""
import json

import jsonschema
import pytest
import torch
from sentencepiece import sentencepiece_model_pb2

from chatglm_6b.modeling_chatglm import encode_chat
from chatglm_6b.tokenization_chatglm import ChatGLMTokenizer
from runtime.engine import GenerationEngine
from runtime.generation import text_ids
from runtime.grammar import ANY_OBJECT, SPECIAL, Grammar, GrammarError, json_schema_of, token_bytes
from runtime.sampling import SamplingParams, sample
from tools.ice_tokenizer import CONTROL_PIECES

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "city": {"enum": ["北京", "上海", "New York"]},
                                           "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
          "required": ["name", "age", "city", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def demo():
    from runtime.loading import load_model_and_tokenizer

    return load_model_and_tokenizer()


@pytest.fixture(scope="module")
def real_layout(tmp_path_factory, demo):
    """A tokenizer with ChatGLM-6B's (v1.1) id layout: 20,000 image ids, then 110,528 SentencePiece pieces with the
    control pieces at 110,000 (ids 130,000-130,007: [MASK] [gMASK] ... <sop> <eop>). The demo's pieces come first,
    then made-up ones fill the vocabulary."""
    proto = sentencepiece_model_pb2.ModelProto()
    with open(demo[1].vocab_file, "rb") as f:
        proto.ParseFromString(f.read())
    controls = [piece for piece in proto.pieces if piece.piece in CONTROL_PIECES]
    pieces = [piece for piece in proto.pieces if piece.piece not in CONTROL_PIECES]
    del proto.pieces[:]
    proto.pieces.extend(pieces)
    made = (f"\u2581w{i}" for i in range(10**6))
    fresh = (name for name in made if name not in {piece.piece for piece in pieces})

    def fill(count):
        for _ in range(count):
            piece = proto.pieces.add()
            piece.piece, piece.score = next(fresh), -20.0
    fill(110_000 - len(pieces))
    proto.pieces.extend(controls)
    fill(110_528 - len(proto.pieces))
    path = tmp_path_factory.mktemp("ice") / "ice_text.model"
    path.write_bytes(proto.SerializeToString())
    return ChatGLMTokenizer(str(path), num_image_tokens=20_000)


def test_token_bytes_in_the_demo_vocabulary(demo):
    tokenizer = demo[1]
    tokens = token_bytes(tokenizer)
    assert len(tokens) == len(tokenizer)
    sp = tokenizer.sp_tokenizer
    assert tokens[sp["<n>"]] == b"\n" and tokens[sp["<|tab|>"]] == b"\t" and tokens[sp["<|blank_4|>"]] == b"    "
    for special in (tokenizer.gmask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        assert tokens[special].startswith(SPECIAL)
    # a text's tokens' bytes put together are the text (after its first piece's leading space, which SentencePiece
    # drops when decoding)
    text = "你好 world! {\"a\": [1, 2]}\n\tend"  # NFKC-stable (the normaliser makes "，" ",")
    assert b"".join(tokens[i] for i in text_ids(tokenizer, text)).decode() == text


def test_the_real_vocabulary_layout(real_layout):
    tokenizer = real_layout
    assert len(tokenizer) == 130_528
    assert (tokenizer.gmask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (130_001, 130_004, 130_005)
    tokens = token_bytes(tokenizer)
    assert all(tokens[i].startswith(SPECIAL) for i in (0, 19_999, 130_000, 130_001, 130_004, 130_005))
    assert tokens[tokenizer.sp_tokenizer["<n>"]] == b"\n"
    # a grammar over it: random scores under the mask always give JSON that validates
    for seed, schema in [(0, PERSON), (1, PERSON), (2, ANY_OBJECT), (3, ANY_OBJECT)]:
        generator = torch.Generator().manual_seed(seed)
        grammar = Grammar(tokenizer, schema)
        row = SamplingParams(True, 1.0, 1.0, generator, grammar=grammar)
        ids = []
        while True:
            token = sample(torch.randn(1, 130_528, generator=generator) * 4, [row])[0][0]
            grammar.accept(token)
            if token == tokenizer.eos_token_id:
                break
            ids.append(token)
            assert len(ids) < 400
        jsonschema.validate(json.loads(b"".join(tokens[i] for i in ids).decode()), schema)


def test_json_replies_validate_and_share_steps_with_plain_rows(demo):
    """The demo model was never taught JSON: every reply under a schema still parses and validates, replies
    under json_object are objects, and the unconstrained rows beside them are what they are alone."""
    model, tokenizer = demo
    engine = GenerationEngine(model, tokenizer, max_batch_size=8).start()
    queries = ["你好", "介绍一下北京", "Who are you?"]
    try:
        plain_alone = engine.submit(encode_chat(tokenizer, "你好"), 200)
        list(plain_alone)
        replies = [engine.submit(encode_chat(tokenizer, q), 2048, grammar=Grammar(tokenizer, PERSON), raw_text=True)
                   for q in queries]
        replies += [engine.submit(encode_chat(tokenizer, q), 2048, grammar=Grammar(tokenizer, json_schema_of({"type": "json_object"})),
                                  raw_text=True, do_sample=True, temperature=0.95, top_p=0.7, seed=i)
                    for i, q in enumerate(queries)]
        plain = engine.submit(encode_chat(tokenizer, "你好"), 200)
        for reply in replies + [plain]:
            list(reply)
    finally:
        engine.stop()
    for reply in replies[:3]:
        assert reply.finish_reason == "stop", reply.text
        jsonschema.validate(json.loads(reply.text), PERSON)
    for reply in replies[3:]:
        assert reply.finish_reason == "stop" and isinstance(json.loads(reply.text), dict), reply.text
    assert plain.tokens == plain_alone.tokens


def test_response_formats():
    assert json_schema_of(None) is None and json_schema_of({"type": "text"}) is None
    assert json_schema_of({"type": "json_object"}) == ANY_OBJECT
    assert json_schema_of({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}) == PERSON
    with pytest.raises(GrammarError, match="schema"):
        json_schema_of({"type": "json_schema", "json_schema": {"name": "p"}})
    with pytest.raises(GrammarError, match="yaml"):
        json_schema_of({"type": "yaml"})


def test_a_schema_the_compiler_refuses_is_a_grammar_error(demo):
    with pytest.raises(GrammarError):
        Grammar(demo[1], {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})
