"""What ptuning/ trains, applied when loading: a P-Tuning v2 prefix (model.safetensors holding only
prefix_encoder.* and config.json), a LoRA adapter (peft's adapter_config.json), or a full fine-tune (a
whole checkpoint)."""
import json
import os
from typing import Optional

import torch

from .loading import CheckpointError, load_model_and_tokenizer, prefix_shape, weight_names


def checkpoint_kind(checkpoint: str) -> str:
    """"ptuning", "lora" or "full", from what the directory holds."""
    if not os.path.isdir(checkpoint):
        raise CheckpointError(f"fine-tuned checkpoint {checkpoint!r} is not a directory.")
    if os.path.isfile(os.path.join(checkpoint, "adapter_config.json")):
        return "lora"
    names = weight_names(checkpoint)
    if names and all("prefix_encoder." in name for name in names):
        return "ptuning"
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        raise CheckpointError(f"{checkpoint!r} is neither a P-Tuning, a LoRA nor a full checkpoint.")
    return "full"


def load_finetuned(checkpoint: Optional[str] = None, model_path: Optional[str] = None,
                   pre_seq_len: Optional[int] = None, prefix_projection: Optional[bool] = None,
                   device: str = "auto", dtype: Optional[torch.dtype] = None, quantize: Optional[int] = None,
                   num_gpus: int = 1, quantize_embeddings: bool = False):
    """(model, tokenizer) in eval mode: the base model `model_path` (default: the demo checkpoint) with the
    fine-tuned `checkpoint` of any kind applied; no checkpoint gives the base model. pre_seq_len and
    prefix_projection default to the values the P-Tuning checkpoint records. Raises CheckpointError."""
    kind = checkpoint_kind(checkpoint) if checkpoint else None
    options = dict(device=device, dtype=dtype, num_gpus=num_gpus)
    quantization = dict(quantize=quantize, quantize_embeddings=quantize_embeddings)
    if kind is None:
        return load_model_and_tokenizer(model_path, **quantization, **options)
    if kind == "full":  # pre_seq_len: a new prefix to train on top (old full checkpoints record their own)
        return load_model_and_tokenizer(checkpoint, **quantization, pre_seq_len=pre_seq_len,
                                        prefix_projection=bool(prefix_projection), **options)
    if kind == "lora":
        from peft import PeftModel

        # Merged before quantizing: the adapters' deltas are added to full-precision weights.
        model, tokenizer = load_model_and_tokenizer(model_path, **options)
        model = PeftModel.from_pretrained(model, checkpoint).merge_and_unload()
        if quantize:
            model.quantize(quantize, quantize_embeddings=quantize_embeddings)
        return model.eval(), tokenizer

    config_path = os.path.join(checkpoint, "config.json")
    recorded = {}
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            recorded = json.load(f)
    shape = prefix_shape(checkpoint)
    pre_seq_len = pre_seq_len or recorded.get("pre_seq_len") or (shape[0] if shape else None)
    if prefix_projection is None:
        prefix_projection = recorded.get("prefix_projection", False)
    model, tokenizer = load_model_and_tokenizer(model_path, **quantization, ptuning_checkpoint=checkpoint,
                                                pre_seq_len=pre_seq_len, prefix_projection=prefix_projection,
                                                **options)
    model.transformer.prefix_encoder.float()  # trained in fp32, kept so (it is small)
    return model, tokenizer
