"""Trains a SentencePiece model in the layout of ChatGLM-6B's `ice_text.model`, so that
`ChatGLMTokenizer` loads it unchanged: unigram with byte fallback and NFKC normalisation, ids
0-3 = <unk> <s> </s> <pad>, then `<n>`, `<|tab|>`, `<|blank_2..80|>` as user-defined pieces, the
learned pieces, and the control pieces `[MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>`
last (as in the original, where they sit at the end of the vocabulary)."""
import io
from typing import Dict, Iterable

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from chatglm_6b.tokenization_chatglm import MAX_BLANK_LENGTH, encode_whitespace

CONTROL_PIECES = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
USER_PIECES = ["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, MAX_BLANK_LENGTH + 1)]


def train_ice_tokenizer(texts: Iterable[str], model_path: str, vocab_size: int) -> Dict[str, int]:
    """Writes `model_path` and returns the ids of the special tokens (for the model config)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(encode_whitespace(t) for t in texts), model_writer=model,
        vocab_size=vocab_size, model_type="unigram", character_coverage=0.9995, byte_fallback=True,
        normalization_rule_name="nmt_nfkc", user_defined_symbols=USER_PIECES, control_symbols=CONTROL_PIECES,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, hard_vocab_limit=False, num_threads=1,
        max_sentence_length=1 << 16, minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    controls = [p for p in proto.pieces if p.piece in CONTROL_PIECES]
    others = [p for p in proto.pieces if p.piece not in CONTROL_PIECES]
    pieces = others + sorted(controls, key=lambda p: CONTROL_PIECES.index(p.piece))
    del proto.pieces[:]
    proto.pieces.extend(pieces)
    with open(model_path, "wb") as f:
        f.write(proto.SerializeToString())
    ids = {p.piece: i for i, p in enumerate(pieces)}
    return {"vocab_size": len(pieces), "mask_token_id": ids["[MASK]"], "gmask_token_id": ids["[gMASK]"],
            "bos_token_id": ids["<sop>"], "eos_token_id": ids["<eop>"], "pad_token_id": ids["<pad>"]}
