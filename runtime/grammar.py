"""Constrained decoding: at each step a request with a grammar may only take the tokens that keep its output inside
the grammar (JSON for `response_format`, a function's arguments for `tools`). The grammars are llguidance's
(a maintained Rust library, also behind vLLM's and llama.cpp's structured output): it compiles a JSON schema and
tells, token by token, which ids of the vocabulary may come next.

llguidance needs each token's bytes as they appear inside a text. ChatGLM's ice_text vocabulary is SentencePiece
with a layout of its own: 20,000 image ids first (never text), "▁" for a space, byte pieces <0xNN>, and
pieces that stand for whitespace (<n>, <|tab|>, <|blank_N|>); its control tokens (<sop>, <eop>, [gMASK], ...) are
never text either. `vocabulary()` turns that into llguidance's tokenizer, once per tokenizer.
"""
import copy
import json
import threading
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .generation import text_ids

SPECIAL = b"\xff"  # llguidance's mark for a token that is not text
_made: Dict[Tuple[str, int], Tuple[Any, Any]] = {}  # (what, id(tokenizer)) -> (tokenizer, it): made once each
_lock = threading.RLock()


def _once(what: str, tokenizer, make):
    with _lock:
        key = (what, id(tokenizer))
        if key not in _made:  # the tokenizer is kept with it, so that its id is not reused
            _made[key] = (tokenizer, make())
        return _made[key][1]


ANY_OBJECT = {"type": "object"}
# ANY_OBJECT's grammar (json_object, a tool without parameters): compact JSON with strings of at most 200 characters
# and numbers of at most 16 digits, so that even a model never taught JSON closes them. llguidance's JSON-schema
# grammar would let it write digits or characters until max_tokens, and cannot bound keys (no propertyNames).
BOUNDED_JSON_OBJECT = r"""
start: object
object: "{" (pair ("," pair)*)? "}"
pair: STRING ":" value
array: "[" (value ("," value)*)? "]"
value: object | array | STRING | NUMBER | "true" | "false" | "null"
STRING: /"([^"\\\x00-\x1f]|\\["\\\/bfnrt]|\\u[0-9a-fA-F]{4}){0,200}"/
NUMBER: /-?(0|[1-9][0-9]{0,15})(\.[0-9]{1,15})?([eE][+-]?[0-9]{1,3})?/
"""


class GrammarError(ValueError):
    """A schema the grammar compiler refuses; the message says why."""


def vocabulary_bytes(tokenizer) -> List[bytes]:
    """token_bytes(tokenizer), made once per tokenizer."""
    return _once("bytes", tokenizer, lambda: token_bytes(tokenizer))


def token_bytes(tokenizer) -> List[bytes]:
    """Each id's bytes inside a text (SPECIAL-marked for ids that are not text)."""
    sp_tokenizer, sp = tokenizer.sp_tokenizer, tokenizer.sp_tokenizer.sp
    specials = set(tokenizer.all_special_ids) | {tokenizer.gmask_token_id}
    tokens = []
    for token in range(len(tokenizer)):
        if token < sp_tokenizer.num_image_tokens:
            tokens.append(SPECIAL + b"<image_%d>" % token)
            continue
        piece_id = token - sp_tokenizer.num_image_tokens
        piece = sp.id_to_piece(piece_id)
        if token in specials or sp.is_control(piece_id) or sp.is_unknown(piece_id):
            tokens.append(SPECIAL + piece.encode())
        elif sp.is_byte(piece_id):
            tokens.append(bytes([int(piece[3:5], 16)]))
        else:
            text = sp_tokenizer.postprocess(piece.replace("\u2581", " "))  # <n>, <|tab|>, <|blank_N|>
            tokens.append(text.encode() if text else SPECIAL + piece.encode())
    return tokens


class ChatGLMVocabulary:
    """What llguidance's TokenizerWrapper asks of a tokenizer: token bytes, end and start ids, and encoding."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens = vocabulary_bytes(tokenizer)
        self.eos_token_id, self.bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id
        self.special_token_ids = sorted(set(tokenizer.all_special_ids) | {tokenizer.gmask_token_id})

    def __call__(self, text: str) -> List[int]:
        return text_ids(self.tokenizer, text)


def vocabulary(tokenizer):
    """llguidance's tokenizer for a ChatGLM tokenizer (made once: about a second for 130,528 tokens)."""
    import llguidance

    return _once("llguidance", tokenizer,
                 lambda: llguidance.LLTokenizer(llguidance.TokenizerWrapper(ChatGLMVocabulary(tokenizer))))


def compiled(tokenizer, schema: Dict[str, Any]) -> str:
    """llguidance's grammar for a JSON schema, checked against the vocabulary (GrammarError if it cannot be used)."""
    import llguidance

    try:
        if schema == ANY_OBJECT:
            grammar = llguidance.LLMatcher.grammar_from_lark(BOUNDED_JSON_OBJECT)
        else:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), overrides={"whitespace_flexible": False})
        error = llguidance.LLMatcher.validate_grammar(grammar, vocabulary(tokenizer))
    except (ValueError, TypeError) as refused:  # what the compiler raises for a schema it cannot read
        error = str(refused)
    if error:
        raise GrammarError(f"the JSON schema cannot be used: {error}")
    return grammar


class Grammar:
    """One reply's grammar state: which tokens may come next, and the tokens it has taken. The schema is compiled
    once; `fresh()` gives another reply the same grammar from its start (the choices of one request)."""

    def __init__(self, tokenizer, schema: Dict[str, Any]):
        self.tokenizer, self.grammar = tokenizer, compiled(tokenizer, schema)
        self.matcher = self._matcher()

    def _matcher(self):
        import llguidance

        return llguidance.LLMatcher(vocabulary(self.tokenizer), self.grammar, log_level=0)

    def fresh(self) -> "Grammar":
        other = copy.copy(self)
        other.matcher = self._matcher()
        return other

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """Bool [vocab_size]: the ids that may come next (ids past the tokenizer's vocabulary never)."""
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = torch.zeros(vocab_size, dtype=torch.bool)
        n = min(vocab_size, len(bits))
        allowed[:n] = torch.from_numpy(bits[:n].astype(bool))
        return allowed

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} is outside the grammar: {self.matcher.get_error()}")


def json_schema_of(response_format: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The JSON schema an OpenAI response_format asks for: json_object is any object; text (or none) is None."""
    if not response_format or response_format.get("type") in (None, "text"):
        return None
    if response_format["type"] == "json_object":
        return dict(ANY_OBJECT)
    if response_format["type"] == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise GrammarError("response_format.json_schema.schema must be a JSON schema object")
        return schema
    raise GrammarError(f"response_format type {response_format['type']!r} is not one of text, json_object, "
                       "json_schema")

