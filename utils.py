"""The public entry for code written for the original ChatGLM-6B: `from utils import ...` keeps working.

    load_model_on_gpus(checkpoint_path, num_gpus=2, device_map=None, **kwargs)   the original's helpers,
    auto_configure_device_map(num_gpus)                                         with its signatures
    load_model_and_tokenizer(model_path=None, ...)                              this repository's loader

The work is done in runtime/ (devices, loading, fine-tunes, front-end options); this module only names it.
"""
from typing import Dict, Optional

from chatglm_6b.modeling_chatglm import ORIGINAL_NUM_LAYERS
from runtime.devices import DeviceError, gpu_device_map
from runtime.finetunes import load_finetuned
from runtime.loading import DEMO_MODEL_PATH, CheckpointError, load_model_and_tokenizer
from runtime.options import add_model_args, load_from_args
from runtime.saving import save_checkpoint

__all__ = ["CheckpointError", "DEMO_MODEL_PATH", "DeviceError", "add_model_args", "auto_configure_device_map",
           "load_finetuned", "load_from_args", "load_model_and_tokenizer", "load_model_on_gpus", "save_checkpoint"]


def auto_configure_device_map(num_gpus: int) -> Dict[str, int]:
    """The original's placement of ChatGLM-6B over `num_gpus` GPUs: the embeddings, final norm and lm_head
    on GPU 0 (counted as two layers), then the 28 layers in order."""
    return gpu_device_map(ORIGINAL_NUM_LAYERS, num_gpus)


def load_model_on_gpus(checkpoint_path: str, num_gpus: int = 2, device_map: Optional[Dict[str, int]] = None,
                       **kwargs):
    """The original's: the model in fp16 on one CUDA GPU, or over `num_gpus` GPUs (placed by `device_map`,
    by default as auto_configure_device_map does for the checkpoint's depth). `kwargs` go to
    load_model_and_tokenizer (dtype, quantize, ...). Returns the model, as the original did."""
    if num_gpus < 2 and device_map is None:
        return load_model_and_tokenizer(checkpoint_path, device="cuda", **kwargs)[0]
    return load_model_and_tokenizer(checkpoint_path, device="cuda", num_gpus=max(num_gpus, 2), device_map=device_map,
                                    **kwargs)[0]
