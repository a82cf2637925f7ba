"""ChatGLM-6B tokenizer: a SentencePiece `ice_text.model` behind a Hugging Face slow tokenizer.

Conventions of the original (THUDM/chatglm-6b), kept because real checkpoints depend on them:
- "\n" is the piece `<n>`, "\t" is `<|tab|>`, a run of 2..80 spaces is `<|blank_N|>`;
- ids are SentencePiece ids shifted by `num_image_tokens` (20000 in the 6B model);
- `[MASK] [gMASK] [sMASK] <sop> <eop>` are control pieces of the model file;
- an encoded prompt ends with `[gMASK] <sop>`; batches are padded on the left and carry the GLM
  attention mask `[1, L, L]` (True = blocked) and 2-D position ids `[2, L]`.

The GLM input rules (context length, mask, positions) live here once and are imported by the model.
"""
import codecs
import os
import re
import shutil
from typing import Dict, List, Optional, Union

import numpy as np
import sentencepiece as spm
from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import BatchEncoding, EncodedInput, TruncationStrategy
from transformers.utils import PaddingStrategy

VOCAB_FILES_NAMES = {"vocab_file": "ice_text.model"}
MAX_BLANK_LENGTH = 80


def glm_context_length(ids: List[int], bos_token_id: int) -> int:
    """Number of prompt tokens: everything before `<sop>` attends bidirectionally."""
    return ids.index(bos_token_id) if bos_token_id in ids else len(ids)


def glm_attention_mask(ids: List[int], bos_token_id: int) -> np.ndarray:
    """[1, L, L] bool, True = blocked: the prompt is seen by all, the rest is causal."""
    length = len(ids)
    mask = np.tril(np.ones((1, length, length)))
    mask[:, :, : glm_context_length(ids, bos_token_id)] = 1
    return mask < 0.5


def glm_position_ids(ids: List[int], bos_token_id: int, mask_token_id: int, gmask_token_id: int,
                     two_d: bool = True) -> np.ndarray:
    """Position ids of one unpadded sequence: [2, L] (positions, block positions) or [L] (1-D variant).

    Generated tokens (after `<sop>`) share the position of the mask they fill, and count up in the
    block dimension. `[gMASK]` wins over `[MASK]` when both are present, as in the original model.
    In the 1-D variant `[gMASK]` keeps plain positions and only `[MASK]` is filled in place.
    """
    length = len(ids)
    context_length = glm_context_length(ids, bos_token_id)
    positions = np.arange(length, dtype=np.int64)
    mask_token = gmask_token_id if gmask_token_id in ids else mask_token_id
    if mask_token in ids and (two_d or mask_token == mask_token_id):
        positions[context_length:] = ids.index(mask_token)
    if not two_d:
        return positions
    block_positions = np.concatenate([np.zeros(context_length, dtype=np.int64),
                                      np.arange(1, length - context_length + 1, dtype=np.int64)])
    return np.stack([positions, block_positions], axis=0)


def glm_training_labels(ids: List[int], bos_token_id: int, ignore_index: int = -100) -> List[int]:
    """Labels of a training sequence `prompt [gMASK] <sop> answer <eop>`, the layout chat() generates in:
    the loss covers `<sop> answer <eop>`; the prompt and [gMASK] are seen, not predicted."""
    context_length = glm_context_length(ids, bos_token_id)
    return [ignore_index] * context_length + list(ids[context_length:])


def encode_whitespace(text: str, max_blank_length: int = MAX_BLANK_LENGTH) -> str:
    """Newlines, tabs and runs of spaces as the pieces the vocabulary has for them."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for n in range(max_blank_length, 1, -1):
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return text


class SPTokenizer:
    """SentencePiece with ChatGLM's whitespace conventions and image-token id offset."""

    def __init__(self, vocab_file: str, num_image_tokens: int = 20000, max_blank_length: int = MAX_BLANK_LENGTH):
        self.vocab_file = vocab_file
        self.num_image_tokens = num_image_tokens
        self.max_blank_length = max_blank_length
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)

    @property
    def num_tokens(self) -> int:
        return self.num_image_tokens + self.sp.get_piece_size()

    def postprocess(self, text: str) -> str:
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        return re.sub(r"<\|blank_(\d+)\|>",
                      lambda m: " " * int(m.group(1)) if 2 <= int(m.group(1)) <= self.max_blank_length else m.group(0),
                      text)

    def tokenize(self, text: str) -> List[str]:
        return self.sp.encode(encode_whitespace(text, self.max_blank_length), out_type=str)

    def decode_tokens(self, tokens: List[str]) -> str:
        return self.postprocess(self.sp.decode_pieces(tokens))

    def __getitem__(self, key: Union[int, str]) -> Union[str, int]:
        """id -> piece, piece -> id, with the image-token offset."""
        if isinstance(key, int):
            if key < self.num_image_tokens:
                return f"<image_{key}>"
            return self.sp.id_to_piece(key - self.num_image_tokens)
        if key.startswith("<image_") and key[7:-1].isdigit():
            return int(key[7:-1])
        return self.sp.piece_to_id(key) + self.num_image_tokens


class ChatGLMTokenizer(PreTrainedTokenizer):
    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    padding_side = "left"

    def __init__(self, vocab_file, do_lower_case=False, remove_space=False, bos_token="<sop>", eos_token="<eop>",
                 end_token="</s>", mask_token="[MASK]", gmask_token="[gMASK]", padding_side="left",
                 pad_token="<pad>", unk_token="<unk>", num_image_tokens=20000, **kwargs):
        # transformers 5 hands tokenizer_config.json's non-standard *_token keys over as special tokens of
        # the base class; the original's end_token and gmask_token are plain attributes (never split out of
        # text, not in all_special_tokens).
        specific = dict(kwargs.pop("model_specific_special_tokens", None) or {})
        end_token, gmask_token = specific.pop("end_token", end_token), specific.pop("gmask_token", gmask_token)
        if specific:
            kwargs["model_specific_special_tokens"] = specific
        self.vocab_file = vocab_file
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space
        self.end_token = end_token
        self.gmask_token = gmask_token
        self.num_image_tokens = num_image_tokens
        self.sp_tokenizer = SPTokenizer(vocab_file, num_image_tokens=num_image_tokens)
        kwargs.pop("clean_up_tokenization_spaces", None)
        super().__init__(do_lower_case=do_lower_case, remove_space=remove_space, padding_side=padding_side,
                         bos_token=bos_token, eos_token=eos_token, mask_token=mask_token, pad_token=pad_token,
                         unk_token=unk_token, num_image_tokens=num_image_tokens,
                         clean_up_tokenization_spaces=False, **kwargs)
        # Saved in tokenizer_config.json like the original's, but not special tokens of the base class:
        # the original never split raw text on them.
        self.init_kwargs.update(end_token=end_token, gmask_token=gmask_token)

    @property
    def gmask_token_id(self) -> int:
        return self.sp_tokenizer[self.gmask_token]

    @property
    def end_token_id(self) -> int:
        return self.sp_tokenizer[self.end_token]

    @property
    def vocab_size(self) -> int:
        return self.sp_tokenizer.num_tokens

    def get_vocab(self) -> Dict[str, int]:
        vocab = {self.sp_tokenizer[i]: i for i in range(self.vocab_size)}
        vocab.update(self._added_tokens_encoder)
        return vocab

    def preprocess_text(self, text: str) -> str:
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        return text

    def tokenize(self, text: str, split_special_tokens: Optional[bool] = None, **kwargs) -> List[str]:
        """Split on the special tokens first (stripping the whitespace around them, as the original
        transformers 4.27 tokenizer did), then SentencePiece on each piece of text between them. With
        split_special_tokens, text that spells a special token is text: chat() encodes what users write
        so, and a user's "<sop>" cannot end the prompt early."""
        if split_special_tokens if split_special_tokens is not None else self.split_special_tokens:
            return self._tokenize(text)
        specials = sorted({self.bos_token, self.eos_token, self.unk_token, self.pad_token, self.mask_token},
                          key=len, reverse=True)
        chunks = re.split("(" + "|".join(re.escape(s) for s in specials) + ")", text)
        tokens = []
        for i, chunk in enumerate(chunks):
            if i % 2:  # a special token
                tokens.append(chunk)
                continue
            if i > 0:
                chunk = chunk.lstrip()
            if i < len(chunks) - 1:
                chunk = chunk.rstrip()
            if chunk:
                tokens.extend(self._tokenize(chunk))
        return tokens

    def _tokenize(self, text: str, **kwargs) -> List[str]:
        return self.sp_tokenizer.tokenize(self.preprocess_text(text))

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_tokenizer[token]

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_tokenizer[index]

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        return self.sp_tokenizer.decode_tokens(tokens)

    def _decode(self, token_ids: Union[int, List[int]], skip_special_tokens: bool = False, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        token_ids = [i for i in token_ids if i != self.pad_token_id]
        if skip_special_tokens:
            token_ids = [i for i in token_ids if i not in self.all_special_ids]
        return self.convert_tokens_to_string([self.sp_tokenizer[i] for i in token_ids])

    def without_partial_character(self, token_ids: List[int]) -> List[int]:
        """token_ids less a trailing run of byte-fallback pieces (<0xNN>) that stops inside a UTF-8 character,
        as a generation cut off at its length limit can: decoded, those bytes would show as U+FFFD."""
        start = len(token_ids)
        while start and re.fullmatch(r"<0x[0-9A-F]{2}>", self.sp_tokenizer[int(token_ids[start - 1])]):
            start -= 1
        tail = bytes(int(self.sp_tokenizer[int(i)][3:5], 16) for i in token_ids[start:])
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        decoder.decode(tail)  # not final: the bytes of an unfinished last character are held back
        return list(token_ids[:len(token_ids) - len(decoder.getstate()[0])])

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None):
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        path = os.path.join(save_directory, name) if os.path.isdir(save_directory) else save_directory
        if os.path.abspath(self.vocab_file) != os.path.abspath(path):
            shutil.copyfile(self.vocab_file, path)
        return (path,)

    def build_inputs_with_special_tokens(self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None):
        ids = token_ids_0 + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.eos_token_id]
        return ids

    def prepare_for_model(self, ids, pair_ids=None, padding=False, truncation=False, max_length=None,
                          return_attention_mask=None, **kwargs):
        # As the original (transformers 4.27): the GLM mask and positions come with padding, with a max_length
        # that the text is truncated to (the original's _pad built them whenever it was given a max_length), or
        # when asked for; one text without either is input_ids alone.
        padding_off = padding in (False, None, "do_not_pad", PaddingStrategy.DO_NOT_PAD)
        truncating = truncation not in (False, None, "do_not_truncate", TruncationStrategy.DO_NOT_TRUNCATE)
        if return_attention_mask is None and padding_off and not (truncating and max_length is not None):
            return_attention_mask = False
        return super().prepare_for_model(ids, pair_ids=pair_ids, padding=padding, truncation=truncation,
                                         max_length=max_length, return_attention_mask=return_attention_mask, **kwargs)

    def _pad(self, encoded_inputs: Union[Dict[str, EncodedInput], BatchEncoding], max_length: Optional[int] = None,
             padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD, pad_to_multiple_of: Optional[int] = None,
             padding_side: Optional[str] = None, return_attention_mask: Optional[bool] = None) -> dict:
        """Left padding that also builds the GLM attention mask and 2-D position ids for each sequence."""
        if (padding_side or self.padding_side) != "left":
            raise ValueError("ChatGLMTokenizer pads on the left only: generation continues at the right end.")
        ids = encoded_inputs[self.model_input_names[0]]
        if padding_strategy == PaddingStrategy.LONGEST:
            max_length = len(ids)
        if max_length is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of

        # The GLM mask is [L, L]: built only when asked for, when padding, or for texts within a max_length (the
        # original's rule), never for raw texts whose length nothing has checked (the original returned input_ids
        # alone there too; prepare_for_model does the same for one text).
        within_max_length = max_length is not None and len(ids) <= max_length
        if return_attention_mask or (return_attention_mask is None
                                     and (padding_strategy != PaddingStrategy.DO_NOT_PAD or within_max_length)):
            if "attention_mask" not in encoded_inputs or np.ndim(encoded_inputs["attention_mask"]) != 3:
                encoded_inputs["attention_mask"] = glm_attention_mask(ids, self.bos_token_id)
            if "position_ids" not in encoded_inputs:
                encoded_inputs["position_ids"] = glm_position_ids(ids, self.bos_token_id, self.mask_token_id,
                                                                  self.gmask_token_id)

        difference = (max_length or 0) - len(ids)
        if padding_strategy != PaddingStrategy.DO_NOT_PAD and difference > 0:
            if "attention_mask" in encoded_inputs:
                encoded_inputs["attention_mask"] = np.pad(encoded_inputs["attention_mask"],
                                                          [(0, 0), (difference, 0), (difference, 0)],
                                                          mode="constant", constant_values=True)
            if "position_ids" in encoded_inputs:
                encoded_inputs["position_ids"] = np.pad(encoded_inputs["position_ids"], [(0, 0), (difference, 0)])
            if "token_type_ids" in encoded_inputs:
                encoded_inputs["token_type_ids"] = [self.pad_token_type_id] * difference + encoded_inputs["token_type_ids"]
            if "special_tokens_mask" in encoded_inputs:
                encoded_inputs["special_tokens_mask"] = [1] * difference + encoded_inputs["special_tokens_mask"]
            encoded_inputs[self.model_input_names[0]] = [self.pad_token_id] * difference + list(ids)
        return encoded_inputs
