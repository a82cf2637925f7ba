"""Loading what ptuning/ trains, for main.py and the front-ends alike.

    from ptuning.finetuned import load_finetuned
    model, tokenizer = load_finetuned("ptuning/output/adgen-demo_model-pt-32-1/checkpoint-200")

A checkpoint is one of
- P-Tuning v2: model.safetensors (or the original's pytorch_model.bin) holding only prefix-encoder weights,
  with a config.json that records pre_seq_len and prefix_projection; applied on top of the base model;
- LoRA: adapter_config.json + adapter_model.safetensors (peft); merged into the base model;
- full fine-tune: a whole checkpoint directory (weights, config, tokenizer), loaded instead of the base model.
"""
import json
import os
from typing import Optional

import torch

from utils import CheckpointError, load_model_and_tokenizer


def _weight_names(checkpoint: str):
    """Names of the weights in a single-file checkpoint, read without loading the tensors; [] when sharded."""
    path = os.path.join(checkpoint, "model.safetensors")
    if os.path.isfile(path):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    path = os.path.join(checkpoint, "pytorch_model.bin")
    if os.path.isfile(path):
        return list(torch.load(path, map_location="cpu", mmap=True, weights_only=True).keys())
    return []


def checkpoint_kind(checkpoint: str) -> str:
    """"ptuning", "lora" or "full" (see the module docstring)."""
    if not os.path.isdir(checkpoint):
        raise CheckpointError(f"fine-tuned checkpoint {checkpoint!r} is not a directory.")
    if os.path.isfile(os.path.join(checkpoint, "adapter_config.json")):
        return "lora"
    names = _weight_names(checkpoint)
    if names and all("prefix_encoder." in name for name in names):
        return "ptuning"
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        raise CheckpointError(f"{checkpoint!r} is neither a P-Tuning, a LoRA nor a full checkpoint.")
    return "full"


def load_finetuned(checkpoint: Optional[str] = None, model_path: Optional[str] = None,
                   pre_seq_len: Optional[int] = None, prefix_projection: Optional[bool] = None,
                   device: str = "auto", dtype: Optional[torch.dtype] = None, quantize: Optional[int] = None,
                   num_gpus: int = 1):
    """(model, tokenizer) in eval mode: the base model `model_path` (default: the demo checkpoint) with the
    fine-tuned `checkpoint` of any kind applied; no checkpoint gives the base model. pre_seq_len and
    prefix_projection default to the values the P-Tuning checkpoint records. Raises CheckpointError."""
    kind = checkpoint_kind(checkpoint) if checkpoint else None
    options = dict(device=device, dtype=dtype, num_gpus=num_gpus)
    if kind is None:
        return load_model_and_tokenizer(model_path, quantize=quantize, **options)
    if kind == "full":  # pre_seq_len: a new prefix to train on top (old full checkpoints record their own)
        return load_model_and_tokenizer(checkpoint, quantize=quantize, pre_seq_len=pre_seq_len,
                                        prefix_projection=bool(prefix_projection), **options)
    if kind == "lora":
        from peft import PeftModel

        # Merged before quantizing: the adapters' deltas are added to full-precision weights.
        model, tokenizer = load_model_and_tokenizer(model_path, **options)
        model = PeftModel.from_pretrained(model, checkpoint).merge_and_unload()
        if quantize:
            model.quantize(quantize)
        return model.eval(), tokenizer

    config_path = os.path.join(checkpoint, "config.json")
    recorded = {}
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            recorded = json.load(f)
    pre_seq_len = pre_seq_len or recorded.get("pre_seq_len")
    if prefix_projection is None:
        prefix_projection = recorded.get("prefix_projection", False)
    model, tokenizer = load_model_and_tokenizer(model_path, quantize=quantize, ptuning_checkpoint=checkpoint,
                                                pre_seq_len=pre_seq_len, prefix_projection=prefix_projection,
                                                **options)
    model.transformer.prefix_encoder.float()  # trained in fp32, kept so (it is small)
    return model, tokenizer
