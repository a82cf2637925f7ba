"""Saving checkpoints that load anywhere: weights (safetensors), config, tokenizer and the model code side by side,
so that a directory loads with this repository and with `AutoModel.from_pretrained(dir, trust_remote_code=True)`."""
import os
from typing import Dict, List, Optional

import torch

from chatglm_6b.modeling_chatglm import ChatGLMForConditionalGeneration
from chatglm_6b.tokenization_chatglm import ChatGLMTokenizer

from . import ROOT

CODE_DIR = os.path.join(ROOT, "chatglm_6b")
AUTO_MAP = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}
COPY_HEADER = ("# Copy of chatglm_6b/{name}, written by `python tools/copy_model_code.py` "
               "(runtime.saving.copy_model_code): edit chatglm_6b/{name}, not this file.\n")


def save_checkpoint(model: ChatGLMForConditionalGeneration, tokenizer: ChatGLMTokenizer, out_dir: str,
                    state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Saves weights, config, tokenizer and our model code side by side. state_dict, if given, is saved instead of
    the model's own (DeepSpeed ZeRO-3 gathers it from the ranks)."""
    os.makedirs(out_dir, exist_ok=True)
    model.config.auto_map = AUTO_MAP
    if state_dict is not None and model.config.tie_word_embeddings:  # as saved without one: tied copies left out
        state_dict = {name: tensor for name, tensor in state_dict.items() if name not in model._tied_weights_keys}
    model.save_pretrained(out_dir, state_dict=state_dict)
    tokenizer.init_kwargs["auto_map"] = {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}
    tokenizer.save_pretrained(out_dir)
    copy_model_code(out_dir)


def model_code_files() -> List[str]:
    return sorted(name for name in os.listdir(CODE_DIR) if name.endswith(".py") and name != "__init__.py")


def copy_model_code(out_dir: str) -> None:
    """Puts the current chatglm_6b/*.py beside a checkpoint (transformers' remote code), each under a one-line
    header that says where it comes from."""
    for name in model_code_files():
        with open(os.path.join(CODE_DIR, name), encoding="utf-8") as source:
            code = source.read()
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as copy:
            copy.write(COPY_HEADER.format(name=name) + code)
