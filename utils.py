"""The one loader of this repository: a checkpoint path or hub id -> (model, tokenizer), on the right
device and dtype, optionally quantized or with a P-Tuning prefix. Every script goes through here."""
import argparse
import functools
import json
import logging
import os
import sys
from typing import Dict, Optional, Tuple

import torch
from tqdm import tqdm

from chatglm_6b.configuration_chatglm import ChatGLMConfig
from chatglm_6b.modeling_chatglm import ChatGLMForConditionalGeneration
from chatglm_6b.tokenization_chatglm import ChatGLMTokenizer

ROOT = os.path.dirname(os.path.abspath(__file__))
DEMO_MODEL_PATH = os.path.join(ROOT, "demo_model")
logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or unreadable; the message is one line for the user."""


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device cuda was asked for, but torch sees no CUDA GPU (or no driver).")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CheckpointError("--device mps was asked for, but MPS is not available on this machine.")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on GPUs (the original's choice), fp32 on CPU (fp16 matmuls are slow or missing there)."""
    return torch.float32 if device.type == "cpu" else torch.float16


def _resolve(model_path: str) -> str:
    """A local directory as is; anything that looks like a path but is not a directory is an error;
    everything else is taken as a hub id."""
    expanded = os.path.expanduser(model_path)
    if os.path.isdir(expanded):
        for required in ("config.json", "ice_text.model"):
            if not os.path.isfile(os.path.join(expanded, required)):
                raise CheckpointError(f"{model_path!r} is not a ChatGLM checkpoint: it has no {required}.")
        return expanded
    if os.path.exists(expanded) or model_path.startswith((".", "/", "~")) or model_path.count("/") > 1:
        raise CheckpointError(f"model path {model_path!r} is not a checkpoint directory.")
    return model_path


def load_prefix_encoder(model: ChatGLMForConditionalGeneration, ptuning_checkpoint: str) -> None:
    """Loads the P-Tuning prefix encoder weights saved by ptuning/ (the only trained weights there)."""
    file = _single_weight_file(ptuning_checkpoint)
    if file is None:
        raise CheckpointError(f"no model.safetensors or pytorch_model.bin in P-Tuning checkpoint {ptuning_checkpoint!r}.")
    prefix = {k.split("prefix_encoder.", 1)[1]: v for k, v in _read_weights(file) if "prefix_encoder." in k}
    if not prefix:
        raise CheckpointError(f"{ptuning_checkpoint!r} holds no prefix_encoder weights.")
    model.transformer.prefix_encoder.load_state_dict(prefix)


def load_model_and_tokenizer(model_path: Optional[str] = None, device: str = "auto", dtype: Optional[torch.dtype] = None,
                             quantize: Optional[int] = None, ptuning_checkpoint: Optional[str] = None,
                             pre_seq_len: Optional[int] = None, prefix_projection: bool = False,
                             num_gpus: int = 1) -> Tuple[ChatGLMForConditionalGeneration, ChatGLMTokenizer]:
    """Loads a ChatGLM-6B-format checkpoint (the demo checkpoint by default) in eval mode.

    model_path: a local directory (sharded .bin with its index, or safetensors) or a hub id.
    device: auto | cpu | cuda | mps. dtype: default fp16 on GPUs, fp32 on CPU.
    quantize: 4 or 8 for weight-only INT4/INT8. ptuning_checkpoint/pre_seq_len: a P-Tuning v2 prefix.
    num_gpus: > 1 splits the layers over that many CUDA GPUs (embeddings, final norm and head on GPU 0).
    Raises CheckpointError with a one-line message when the checkpoint cannot be used.
    """
    path = _resolve(model_path or DEMO_MODEL_PATH)
    target = pick_device(device)
    dtype = dtype or default_dtype(target)
    if num_gpus > 1 and (target.type != "cuda" or torch.cuda.device_count() < num_gpus):
        raise CheckpointError(f"--num-gpus {num_gpus} needs that many CUDA GPUs; torch sees {torch.cuda.device_count()}.")
    try:
        config = ChatGLMConfig.from_pretrained(path)
        if ptuning_checkpoint is not None or pre_seq_len is not None:
            config.pre_seq_len = pre_seq_len or config.pre_seq_len
            config.prefix_projection = prefix_projection
            if not config.pre_seq_len:
                raise CheckpointError("a P-Tuning checkpoint needs --pre-seq-len (the PRE_SEQ_LEN it was trained with).")
        tokenizer = ChatGLMTokenizer.from_pretrained(path)
        if quantize and not config.quantization_bit and num_gpus <= 1:
            model, info = load_quantized(path, config, quantize, dtype)
        else:
            device_map = gpu_device_map(config.num_layers, num_gpus) if num_gpus > 1 else None
            model, info = ChatGLMForConditionalGeneration.from_pretrained(
                path, config=config, dtype=dtype, device_map=device_map, output_loading_info=True)
    except CheckpointError:
        raise
    except Exception as error:  # every library error becomes one line naming the checkpoint
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot load checkpoint {model_path or DEMO_MODEL_PATH!r}: {message}") from error
    missing = [k for k in info["missing_keys"] if "prefix_encoder" not in k]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} is incomplete: {len(missing)} weights missing, e.g. {missing[0]}")
    if ptuning_checkpoint is not None:
        load_prefix_encoder(model, ptuning_checkpoint)
    if quantize:
        model.quantize(quantize)
    if num_gpus <= 1:
        model = model.to(target)
    return model.eval(), tokenizer


@functools.lru_cache(maxsize=None)
def _libc():
    """The C library on Linux (for malloc_trim and madvise), else None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None


def release_freed_memory() -> None:
    """Hands memory that was freed back to the OS. Quantizing while loading frees many float temporaries
    between small long-lived tensors; glibc keeps those holes mapped, ~0.2 GB for 6B, unless asked."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc only (not musl)
        libc.malloc_trim(0)


def _drop_mapped_pages(tensor: torch.Tensor) -> None:
    """Drops a memory-mapped, never-written tensor's pages from this process's memory. They still belong
    to the file: touching the tensor again reads them back. Without this, every page of the shard being
    read stays resident until the shard is closed (1.6 GB for a ChatGLM-6B shard)."""
    libc = _libc()
    if libc is None or tensor.numel() == 0:
        return
    import ctypes
    import mmap

    start = tensor.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    end = -(-(tensor.data_ptr() + tensor.numel() * tensor.element_size()) // mmap.PAGESIZE) * mmap.PAGESIZE
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED


def _single_weight_file(directory: str) -> Optional[str]:
    """The directory's one-file weights, model.safetensors before pytorch_model.bin, or None."""
    return next((os.path.join(directory, name) for name in ("model.safetensors", "pytorch_model.bin")
                 if os.path.isfile(os.path.join(directory, name))), None)


def _weight_files(path: str):
    """The checkpoint's weight files: a sharded index (safetensors or the original .bin) or one file."""
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        path = snapshot_download(path)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.isfile(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                return [os.path.join(path, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    single = _single_weight_file(path)
    if single is not None:
        return [single]
    raise CheckpointError(f"no model.safetensors or pytorch_model.bin (or their index) in {path!r}.")


def _read_weights(file: str):
    """(name, tensor) one at a time, memory-mapped, so only the tensor in hand is resident: a .bin tensor's
    pages are dropped when the caller asks for the next one (touching it again re-reads the file)."""
    if file.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    else:
        for name, tensor in torch.load(file, map_location="cpu", mmap=True, weights_only=True).items():
            yield name, tensor
            _drop_mapped_pages(tensor)  # the caller has copied what it needed by now


def load_quantized(path: str, config: ChatGLMConfig, bits: int, dtype: torch.dtype):
    """Quantize while loading: the model is built with empty INT8/INT4 layers and each float weight is
    quantized as it is read, shard by shard, so peak memory stays near the quantized model's size (the
    original loaded the whole fp16 model first, ~13 GB for 6B)."""
    from chatglm_6b.quantization import QuantizedLinear, set_quantized_weight

    config.quantization_bit = bits
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)
    modules = dict(model.named_modules())
    tied = config.tie_word_embeddings
    unexpected = set()
    for file in tqdm(_weight_files(path), desc="loading and quantizing", unit="shard"):
        for name, tensor in _read_weights(file):
            module_name, _, attr = name.rpartition(".")
            module = modules.get(module_name)
            if module is None:
                unexpected.add(name)
                continue
            if tied and name == "lm_head.weight":  # the word embeddings, once more
                continue
            if attr in module._buffers:  # rotary inv_freq: kept as stored (fp16-rounded, as the original)
                module._buffers[attr] = tensor.clone()
            elif isinstance(module, QuantizedLinear) and attr == "weight" and tensor.is_floating_point():
                set_quantized_weight(module, tensor, dtype)
            else:
                value = tensor.to(dtype if tensor.is_floating_point() else tensor.dtype, copy=True)  # one copy, off the file
                module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
        release_freed_memory()
    if tied:
        model.lm_head.weight = model.transformer.word_embeddings.weight
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    for name, module in model.named_modules():  # a new P-Tuning prefix encoder: the one thing a checkpoint may lack
        if "prefix_encoder" in name and any(t.is_meta for t in module.parameters(recurse=False)):
            module.to_empty(device="cpu")
            model._init_weights(module)
            module.to(dtype)
    if config.pre_seq_len is not None:
        model.freeze_all_but_prefix()
    return model, {"missing_keys": [n for n in missing if "prefix_encoder" not in n], "unexpected_keys": unexpected}


# ---- what ptuning/ trains: P-Tuning v2 prefixes, LoRA adapters, full fine-tunes ----------------------

def _weight_names(checkpoint: str):
    """Names of the weights in a single-file checkpoint, read without loading the tensors; [] when sharded."""
    path = _single_weight_file(checkpoint)
    if path is None:
        return []
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    return list(torch.load(path, map_location="cpu", mmap=True, weights_only=True).keys())


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


def gpu_device_map(num_layers: int, num_gpus: int) -> Dict[str, int]:
    """The original's multi-GPU placement: embeddings, final norm and lm_head on GPU 0, counted as two
    layers; then the layers in order, each GPU filled up to (num_layers + 2) / num_gpus before the next."""
    per_gpu = (num_layers + 2) / num_gpus
    device_map = {"transformer.word_embeddings": 0, "transformer.final_layernorm": 0, "lm_head": 0}
    gpu, used = 0, 2
    for i in range(num_layers):
        if used >= per_gpu:
            gpu, used = gpu + 1, 0
        device_map[f"transformer.layers.{i}"] = gpu
        used += 1
    return device_map


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The model options every front-end takes."""
    group = parser.add_argument_group("model")
    group.add_argument("--model-path", default=None,
                       help="checkpoint directory or hub id (default: the demo checkpoint in demo_model/; "
                            "THUDM/chatglm-6b for the real model)")
    group.add_argument("--quantize", type=int, choices=[4, 8], default=None, help="weight-only INT4 or INT8")
    group.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                       help="auto picks CUDA, then MPS, then CPU")
    group.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                       help="dtype of the unquantized weights and activations (default: fp16 on GPUs, fp32 on "
                            "CPU; bf16 halves a CPU model's memory)")
    group.add_argument("--num-gpus", type=int, default=1, help="split the model over this many GPUs")
    group.add_argument("--ptuning-checkpoint", default=None,
                       help="a checkpoint from ptuning/: P-Tuning v2 prefix, LoRA adapter or full fine-tune")
    group.add_argument("--pre-seq-len", type=int, default=None,
                       help="PRE_SEQ_LEN of a P-Tuning checkpoint (default: what its config.json records)")
    return parser


def load_from_args(args: argparse.Namespace):
    """(model, tokenizer) from add_model_args' options, with a fine-tuned checkpoint applied if given;
    a bad checkpoint exits with one line."""
    try:
        return load_finetuned(args.ptuning_checkpoint, args.model_path, pre_seq_len=args.pre_seq_len,
                              device=args.device, dtype=DTYPES.get(args.dtype), quantize=args.quantize,
                              num_gpus=args.num_gpus)
    except CheckpointError as error:
        sys.exit(f"error: {error}")


CODE_DIR = os.path.join(ROOT, "chatglm_6b")
AUTO_MAP = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}


def save_checkpoint(model: ChatGLMForConditionalGeneration, tokenizer: ChatGLMTokenizer, out_dir: str) -> None:
    """Saves weights (safetensors), config, tokenizer and our model code side by side, so the directory
    loads with `AutoModel.from_pretrained(out_dir, trust_remote_code=True)` as well as with this repo."""
    os.makedirs(out_dir, exist_ok=True)
    model.config.auto_map = AUTO_MAP
    model.save_pretrained(out_dir)
    tokenizer.init_kwargs["auto_map"] = {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}
    tokenizer.save_pretrained(out_dir)
    copy_model_code(out_dir)


def copy_model_code(out_dir: str) -> None:
    """Puts the current chatglm_6b/*.py beside a checkpoint (transformers' remote code)."""
    import shutil

    for name in sorted(os.listdir(CODE_DIR)):
        if name.endswith(".py") and name != "__init__.py":
            shutil.copyfile(os.path.join(CODE_DIR, name), os.path.join(out_dir, name))
