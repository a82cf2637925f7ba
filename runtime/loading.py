"""Checkpoint path or hub id -> (model, tokenizer): the checkpoint formats (sharded .bin with its index as
the original ships, safetensors), quantizing while loading, handing memory back to the OS, and saving
checkpoints that load anywhere (weights, config, tokenizer and the model code side by side)."""
import ctypes
import ctypes.util
import functools
import json
import logging
import mmap
import os
import sys
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from tqdm import tqdm

from chatglm_6b.configuration_chatglm import ChatGLMConfig
from chatglm_6b.modeling_chatglm import ChatGLMForConditionalGeneration
from chatglm_6b.tokenization_chatglm import ChatGLMTokenizer

from . import ROOT
from .devices import DeviceError, default_dtype, gpu_device_map, pick_device, require_gpus

DEMO_MODEL_PATH = os.path.join(ROOT, "demo_model")
CODE_DIR = os.path.join(ROOT, "chatglm_6b")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
AUTO_MAP = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}
COPY_HEADER = ("# Copy of chatglm_6b/{name}, written by `python tools/copy_model_code.py` "
               "(runtime.loading.copy_model_code): edit chatglm_6b/{name}, not this file.\n")
logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or unreadable; the message is one line for the user."""


# Raised while loading, these are not the checkpoint's fault and keep their traceback.
PROGRAM_ERRORS = (TypeError, AttributeError, NameError, AssertionError, MemoryError, torch.OutOfMemoryError,
                  NotImplementedError, RecursionError)


# ---- formats ----------------------------------------------------------------------------------------

def resolve_checkpoint(model_path: str) -> str:
    """A local directory as is; anything that looks like a path but is not a directory is an error;
    everything else is taken as a hub id."""
    expanded = os.path.expanduser(model_path)
    if os.path.isdir(expanded):
        for required in ("config.json", "ice_text.model"):
            if not os.path.isfile(os.path.join(expanded, required)):
                raise CheckpointError(f"{model_path!r} is not a ChatGLM checkpoint: it has no {required}.")
        return expanded
    if os.path.exists(expanded):
        raise CheckpointError(f"model path {model_path!r} is a file, not a checkpoint directory.")
    if model_path.startswith((".", "/", "~")) or model_path.count("/") > 1:
        raise CheckpointError(f"model path {model_path!r} does not exist.")
    return model_path


def single_weight_file(directory: str) -> Optional[str]:
    """The directory's one-file weights, model.safetensors before pytorch_model.bin, or None."""
    return next((os.path.join(directory, name) for name in WEIGHT_FILES
                 if os.path.isfile(os.path.join(directory, name))), None)


def weight_files(path: str) -> List[str]:
    """The checkpoint's weight files: a sharded index (safetensors or the original .bin) or one file."""
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        path = snapshot_download(path)
    for index in WEIGHT_INDEXES:
        if os.path.isfile(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                return [os.path.join(path, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    single = single_weight_file(path)
    if single is not None:
        return [single]
    raise CheckpointError(f"no model.safetensors or pytorch_model.bin (or their index) in {path!r}.")


def read_weights(file: str) -> Iterator[Tuple[str, torch.Tensor]]:
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
            drop_mapped_pages(tensor)  # the caller has copied what it needed by now


def prefix_shape(checkpoint: str) -> Optional[Tuple[int, int]]:
    """[pre_seq_len, width] of a P-Tuning checkpoint's prefix table, read without loading it, or None."""
    path = single_weight_file(checkpoint)
    name = "transformer.prefix_encoder.embedding.weight"
    if path is None:
        return None
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return tuple(f.get_slice(name).get_shape()) if name in f.keys() else None
    tensor = torch.load(path, map_location="cpu", mmap=True, weights_only=True).get(name)
    return None if tensor is None else tuple(tensor.shape)


def weight_names(checkpoint: str) -> List[str]:
    """Names of the weights in a single-file checkpoint, read without loading the tensors; [] when sharded."""
    path = single_weight_file(checkpoint)
    if path is None:
        return []
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    return list(torch.load(path, map_location="cpu", mmap=True, weights_only=True).keys())


# ---- memory -----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _libc():
    """The C library on Linux (for malloc_trim and madvise), else None."""
    if not sys.platform.startswith("linux"):
        return None
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


def drop_mapped_pages(tensor: torch.Tensor) -> None:
    """Drops a memory-mapped, never-written tensor's pages from this process's memory. They still belong
    to the file: touching the tensor again reads them back. Without this, every page of the shard being
    read stays resident until the shard is closed (1.6 GB for a ChatGLM-6B shard)."""
    libc = _libc()
    if libc is None or tensor.numel() == 0:
        return
    start = tensor.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    end = -(-(tensor.data_ptr() + tensor.numel() * tensor.element_size()) // mmap.PAGESIZE) * mmap.PAGESIZE
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED


# ---- loading ----------------------------------------------------------------------------------------

def expected_shape(module: torch.nn.Module, attr: str) -> Optional[Tuple[int, ...]]:
    """The shape a checkpoint tensor must have to fill module.attr; a quantized linear's (or embedding's) weight
    is filled from a float [out, in] ([vocab, hidden]) one."""
    from chatglm_6b.quantization import QuantizedEmbedding, QuantizedLinear

    if isinstance(module, QuantizedLinear) and attr == "weight":
        return module.out_features, module.in_features
    if isinstance(module, QuantizedEmbedding) and attr == "weight":
        return module.num_embeddings, module.embedding_dim
    tensor = module._parameters.get(attr, module._buffers.get(attr))
    return None if tensor is None else tuple(tensor.shape)


def load_and_quantize(path: str, config: ChatGLMConfig, bits: int, dtype: torch.dtype, embeddings: bool = False):
    """Loads a float checkpoint and quantizes it on the way: the model is built with empty INT8/INT4 layers
    and each float weight is quantized as it is read, shard by shard, so peak memory stays near the
    quantized model's size (the original loaded the whole fp16 model first, ~13 GB for 6B). embeddings: the word
    embeddings (and the tied lm_head) too."""
    from chatglm_6b.quantization import QuantizedEmbedding, QuantizedLinear, set_quantized_weight

    config.quantization_bit = bits
    config.quantization_embeddings = embeddings
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)
    modules = dict(model.named_modules())
    tied = config.tie_word_embeddings
    unexpected = set()
    for file in tqdm(weight_files(path), desc="loading and quantizing", unit="shard"):
        for name, tensor in read_weights(file):
            module_name, _, attr = name.rpartition(".")
            module = modules.get(module_name)
            if module is None:
                unexpected.add(name)
                continue
            if tied and name == "lm_head.weight":  # the word embeddings, once more
                continue
            expected = expected_shape(module, attr)
            if expected is not None and tuple(tensor.shape) != expected:
                raise CheckpointError(f"{name} is {list(tensor.shape)} in the checkpoint but {list(expected)} in "
                                      "a model of its config.json: the config does not describe these weights.")
            if attr in module._buffers:  # rotary inv_freq (fp16-rounded in the original; fp32 here)
                module._buffers[attr] = tensor.float()
            elif isinstance(module, (QuantizedLinear, QuantizedEmbedding)) and attr == "weight" and tensor.is_floating_point():
                set_quantized_weight(module, tensor, dtype)
            else:
                value = tensor.to(dtype if tensor.is_floating_point() else tensor.dtype, copy=True)  # one copy, off the file
                module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
        release_freed_memory()
    if unexpected:
        logger.warning("%d weights of %s are not used by the model, e.g. %s", len(unexpected), path, sorted(unexpected)[0])
    if tied:
        model.lm_head.weight = model.transformer.word_embeddings.weight
        if embeddings:
            model.lm_head.weight_scale = model.transformer.word_embeddings.weight_scale
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    for name, module in model.named_modules():  # a new P-Tuning prefix encoder: the one thing a checkpoint may lack
        if "prefix_encoder" in name and any(t.is_meta for t in module.parameters(recurse=False)):
            module.to_empty(device="cpu")
            model._init_weights(module)
            module.to(dtype)
    if config.pre_seq_len is not None:
        model.freeze_all_but_prefix()
    return model, {"missing_keys": [n for n in missing if "prefix_encoder" not in n], "unexpected_keys": unexpected}


def available_memory() -> Optional[int]:
    """Bytes of memory the OS could give this process now (Linux's MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def parameter_count(config: ChatGLMConfig) -> int:
    """Float parameters of a model of this config, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)
    unique = {id(p): p for p in model.parameters()}.values()  # lm_head shares the word embeddings
    return sum(p.numel() for p in unique)


def dtype_that_fits(config: ChatGLMConfig, dtype: torch.dtype, explicit: bool) -> torch.dtype:
    """The CPU dtype to load in: the default fp32 turns into bf16 when fp32 weights would not fit in the
    memory there is (ChatGLM-6B: 24.7 GB in fp32, 12.3 GB in bf16); a model that fits in neither stops
    here, before anything is read, with the options that would make it fit."""
    available = available_memory()
    if available is None:
        return dtype
    count = parameter_count(config)
    needed = count * dtype.itemsize
    if needed < 0.9 * available:
        return dtype
    if not explicit and count * torch.bfloat16.itemsize < 0.9 * available:
        logger.warning("fp32 weights would take %.1f GB of the %.1f GB of free memory: loading in bf16 "
                       "(--dtype fp32 insists on fp32)", needed / 1e9, available / 1e9)
        return torch.bfloat16
    raise CheckpointError(f"the weights need {needed / 1e9:.1f} GB in {str(dtype).split('.')[-1]} but {available / 1e9:.1f} GB "
                          "of memory is free: load with --dtype bf16, --quantize 8 or --quantize 4 "
                          "(INT4 needs about 4.5 GB for ChatGLM-6B).")


def load_prefix_encoder(model: ChatGLMForConditionalGeneration, ptuning_checkpoint: str) -> None:
    """Loads the P-Tuning prefix encoder weights saved by ptuning/ (the only trained weights there)."""
    shape = prefix_shape(ptuning_checkpoint)
    expected = tuple(model.transformer.prefix_encoder.embedding.weight.shape)
    if shape is not None and shape != expected:
        raise CheckpointError(f"P-Tuning checkpoint {ptuning_checkpoint!r} holds a prefix of {shape[0]} tokens "
                              f"(width {shape[1]}); the model was built for {expected[0]} (width {expected[1]}): "
                              f"pass --pre-seq-len {shape[0]}, or leave it out.")
    file = single_weight_file(ptuning_checkpoint)
    if file is None:
        raise CheckpointError(f"no model.safetensors or pytorch_model.bin in P-Tuning checkpoint {ptuning_checkpoint!r}.")
    prefix = {k.split("prefix_encoder.", 1)[1]: v for k, v in read_weights(file) if "prefix_encoder." in k}
    if not prefix:
        raise CheckpointError(f"{ptuning_checkpoint!r} holds no prefix_encoder weights.")
    model.transformer.prefix_encoder.load_state_dict(prefix)


def load_model_and_tokenizer(model_path: Optional[str] = None, device: str = "auto", dtype: Optional[torch.dtype] = None,
                             quantize: Optional[int] = None, ptuning_checkpoint: Optional[str] = None,
                             pre_seq_len: Optional[int] = None, prefix_projection: bool = False,
                             num_gpus: int = 1, device_map: Optional[Dict[str, int]] = None,
                             quantize_embeddings: bool = False,
                             ) -> Tuple[ChatGLMForConditionalGeneration, ChatGLMTokenizer]:
    """Loads a ChatGLM-6B-format checkpoint (the demo checkpoint by default) in eval mode.

    model_path: a local directory (sharded .bin with its index, or safetensors) or a hub id.
    device: auto | cpu | cuda | mps. dtype: default fp16 on GPUs, fp32 on CPU.
    quantize: 4 or 8 for weight-only INT4/INT8; quantize_embeddings: the word embeddings and lm_head too (-qe).
    ptuning_checkpoint/pre_seq_len: a P-Tuning v2 prefix.
    num_gpus: > 1 splits the layers over that many CUDA GPUs (embeddings, final norm and head on GPU 0),
    or as `device_map` places them. Raises CheckpointError (or DeviceError) with a one-line message.
    """
    path = resolve_checkpoint(model_path or DEMO_MODEL_PATH)
    target = pick_device(device)
    explicit_dtype = dtype is not None
    dtype = dtype or default_dtype(target)
    spread = num_gpus > 1 or device_map is not None
    if spread:
        if target.type != "cuda":
            raise DeviceError(f"placing the model over several GPUs needs CUDA; the device is {target.type}.")
        gpus = [gpu for gpu in (device_map or {}).values() if isinstance(gpu, int)]
        require_gpus(num_gpus if device_map is None else 1 + max(gpus, default=0))
    try:
        config = ChatGLMConfig.from_pretrained(path)
        if ptuning_checkpoint is not None or pre_seq_len is not None:
            config.pre_seq_len = pre_seq_len or config.pre_seq_len
            config.prefix_projection = prefix_projection
            if not config.pre_seq_len:
                raise CheckpointError("a P-Tuning checkpoint needs --pre-seq-len (the PRE_SEQ_LEN it was trained with).")
        if quantize and config.quantization_bit and quantize != config.quantization_bit:
            raise CheckpointError(f"checkpoint {model_path!r} is already quantized to {config.quantization_bit} bits: "
                                  f"it cannot be quantized to {quantize}; load the float checkpoint for that.")
        if quantize_embeddings and config.quantization_bit and not config.quantization_embeddings:
            raise CheckpointError(f"checkpoint {model_path!r} is quantized without its embeddings: load the float "
                                  "checkpoint to quantize them too.")
        if target.type == "cpu" and not quantize and not config.quantization_bit:
            dtype = dtype_that_fits(config, dtype, explicit_dtype)
        tokenizer = ChatGLMTokenizer.from_pretrained(path)
        if quantize and not config.quantization_bit and not spread:
            model, info = load_and_quantize(path, config, quantize, dtype, quantize_embeddings)
        else:
            if spread and device_map is None:
                device_map = gpu_device_map(config.num_layers, num_gpus)
            model, info = ChatGLMForConditionalGeneration.from_pretrained(
                path, config=config, dtype=dtype, device_map=device_map, output_loading_info=True)
    except CheckpointError:
        raise
    except PROGRAM_ERRORS:  # a bug or the machine running out of memory: the traceback says more than one line
        raise
    except Exception as error:  # what the libraries say about an unreadable checkpoint, in one line
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot load checkpoint {model_path or DEMO_MODEL_PATH!r}: {message}") from error
    missing = [k for k in info["missing_keys"] if "prefix_encoder" not in k]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} is incomplete: {len(missing)} weights missing, e.g. {missing[0]}")
    if ptuning_checkpoint is not None:
        load_prefix_encoder(model, ptuning_checkpoint)
    if quantize:
        model.quantize(quantize, quantize_embeddings=quantize_embeddings)
    if not spread:
        model = model.to(target)
    # A checkpoint quantized while loading, or already quantized, never ran quantize() with its weights; a bf16
    # model runs its few-row products on the same kernel: it is compiled now, not inside the first reply.
    if target.type == "cpu" and (model.config.quantization_bit or model.dtype == torch.bfloat16):
        from chatglm_6b.quantization import prepare_cpu_kernel

        prepare_cpu_kernel()
    return model.eval(), tokenizer


# ---- saving -----------------------------------------------------------------------------------------

def save_checkpoint(model: ChatGLMForConditionalGeneration, tokenizer: ChatGLMTokenizer, out_dir: str,
                    state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Saves weights (safetensors), config, tokenizer and our model code side by side, so the directory
    loads with `AutoModel.from_pretrained(out_dir, trust_remote_code=True)` as well as with this repo.
    state_dict, if given, is saved instead of the model's own (DeepSpeed ZeRO-3 gathers it from the ranks)."""
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
    """Puts the current chatglm_6b/*.py beside a checkpoint (transformers' remote code), each under a
    one-line header that says where it comes from."""
    for name in model_code_files():
        with open(os.path.join(CODE_DIR, name), encoding="utf-8") as source:
            code = source.read()
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as copy:
            copy.write(COPY_HEADER.format(name=name) + code)
