"""Checkpoint path or hub id -> (model, tokenizer), by one loading path for every checkpoint: the original's
sharded .bin with its index or safetensors; float, already quantized, or quantized while loading; on one device or
placed over several GPUs. Memory is handed back to the OS as the shards are read. Saving is runtime/saving.py."""
import ctypes
import ctypes.util
import functools
import json
import logging
import mmap
import os
import re
import sys
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from tqdm import tqdm

from chatglm_6b.configuration_chatglm import ChatGLMConfig
from chatglm_6b.modeling_chatglm import ChatGLMForConditionalGeneration
from chatglm_6b.quantization import QuantizedEmbedding, QuantizedLinear, quantize_weight
from chatglm_6b.tokenization_chatglm import ChatGLMTokenizer

from . import ROOT
from .devices import DeviceError, available_memory, default_dtype, gpu_device_map, pick_device, require_gpus

DEMO_MODEL_PATH = os.path.join(ROOT, "demo_model")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# The weights may take at most this share of the free memory (the rest: activations, the OS, the server).
WEIGHTS_SHARE_OF_FREE_MEMORY = 0.9
MADV_DONTNEED = 4  # madvise(2): drop the pages of a range (a file-backed mapping reads them back when touched)
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


class WeightFile:
    """One weight file, safetensors or a torch .bin, read without loading it whole: its names, a tensor's shape,
    and its tensors one at a time, memory-mapped, so only the tensor in hand is resident (a .bin tensor's pages
    are dropped when the next one is asked for: touching it again re-reads the file)."""

    def __init__(self, path: str):
        self.path, self.safetensors = path, path.endswith(".safetensors")

    def _torch(self) -> Dict[str, torch.Tensor]:
        return torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)

    def names(self) -> List[str]:
        if self.safetensors:
            from safetensors import safe_open

            with safe_open(self.path, framework="pt") as f:
                return list(f.keys())
        return list(self._torch().keys())

    def shape(self, name: str) -> Optional[Tuple[int, ...]]:
        if self.safetensors:
            from safetensors import safe_open

            with safe_open(self.path, framework="pt") as f:
                return tuple(f.get_slice(name).get_shape()) if name in f.keys() else None
        tensor = self._torch().get(name)
        return None if tensor is None else tuple(tensor.shape)

    def tensors(self) -> Iterator[Tuple[str, torch.Tensor]]:
        if self.safetensors:
            from safetensors import safe_open

            with safe_open(self.path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            for name, tensor in self._torch().items():
                yield name, tensor
                drop_mapped_pages(tensor)  # the caller has copied what it needed by now


def single_weight_file(directory: str) -> Optional[WeightFile]:
    """The directory's one-file weights, model.safetensors before pytorch_model.bin, or None."""
    return next((WeightFile(os.path.join(directory, name)) for name in WEIGHT_FILES
                 if os.path.isfile(os.path.join(directory, name))), None)


def weight_files(path: str) -> List[WeightFile]:
    """The checkpoint's weight files: a sharded index (safetensors or the original .bin) or one file."""
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        path = snapshot_download(path)
    for index in WEIGHT_INDEXES:
        if os.path.isfile(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
            return [WeightFile(os.path.join(path, name)) for name in names]
    single = single_weight_file(path)
    if single is not None:
        return [single]
    raise CheckpointError(f"no model.safetensors or pytorch_model.bin (or their index) in {path!r}.")


PREFIX_TABLE = "transformer.prefix_encoder.embedding.weight"


def prefix_shape(checkpoint: str) -> Optional[Tuple[int, int]]:
    """[pre_seq_len, width] of a P-Tuning checkpoint's prefix table, read without loading it, or None."""
    file = single_weight_file(checkpoint)
    return None if file is None else file.shape(PREFIX_TABLE)


def weight_names(checkpoint: str) -> List[str]:
    """Names of the weights in a single-file checkpoint, read without loading the tensors; [] when sharded."""
    file = single_weight_file(checkpoint)
    return [] if file is None else file.names()


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
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)


# ---- loading ----------------------------------------------------------------------------------------

def converted(name: str, tensor: torch.Tensor, module: torch.nn.Module, target: torch.Tensor, dtype: torch.dtype,
              device: torch.device) -> Dict[str, torch.Tensor]:
    """A checkpoint tensor as the module it is for holds it, on its device: a float weight of a quantized layer is
    quantized as it arrives (the weight and its scale); rotary frequencies stay fp32; other floats take dtype."""
    quantizing = (isinstance(module, (QuantizedLinear, QuantizedEmbedding)) and name.endswith(".weight")
                  and tensor.is_floating_point())
    if quantizing:
        expected = ((module.out_features, module.in_features) if isinstance(module, QuantizedLinear)
                    else (module.num_embeddings, module.embedding_dim))
    else:
        expected = tuple(target.shape)
    if tuple(tensor.shape) != expected:
        raise CheckpointError(f"{name} is {list(tensor.shape)} in the checkpoint but {list(expected)} in a model of "
                              "its config.json: the config does not describe these weights.")
    if quantizing:
        weight, scale = quantize_weight(tensor, module.bits)
        return {name: weight.to(device), name + "_scale": scale.to(device, dtype)}
    if name.endswith("rotary_emb.inv_freq"):  # fp16-rounded in the original's checkpoints; held in fp32 here
        return {name: tensor.to(device, torch.float32, copy=True)}
    return {name: tensor.to(device, dtype if tensor.is_floating_point() else tensor.dtype, copy=True)}


def load_weights(path: str, config: ChatGLMConfig, dtype: torch.dtype,
                 placement: Callable[[str], torch.device]) -> ChatGLMForConditionalGeneration:
    """The one loading path. The model is built on the meta device with the layers its config asks for (INT8/INT4
    where config.quantization_bit says so); the checkpoint's tensors are read one at a time, converted for their
    module (`converted`: a float checkpoint is quantized while loading, so peak memory stays near the quantized
    model's size, where the original loaded the whole fp16 model first, ~13 GB for 6B) and assigned in place
    (load_state_dict(assign=True)) on the device `placement` gives their name. Tied weights follow the model's
    _tied_weights_keys. What a checkpoint may lack (the model's _keys_to_ignore_on_load_missing, such as a new
    P-Tuning prefix, and the rotary frequencies) is made by the model's own _init_weights; anything else missing
    is an error."""
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)
    targets = model.state_dict(keep_vars=True)
    modules = dict(model.named_modules())
    tied = set(model._tied_weights_keys) if config.tie_word_embeddings else set()
    unexpected = []
    for file in tqdm(weight_files(path), desc="loading", unit="shard"):
        shard = {}
        for name, tensor in file.tensors():
            if name in tied:  # the word embeddings, once more
                continue
            if name not in targets:
                unexpected.append(name)
                continue
            shard.update(converted(name, tensor, modules[name.rpartition(".")[0]], targets[name], dtype,
                                   placement(name)))
        model.load_state_dict(shard, strict=False, assign=True)
        release_freed_memory()
    if unexpected:
        logger.warning("%d weights of %s are not used by the model, e.g. %s", len(unexpected), path, sorted(unexpected)[0])
    model.tie_weights()
    optional = [re.compile(pattern) for pattern in [*(model._keys_to_ignore_on_load_missing or []),
                                                    r"rotary_emb\.inv_freq$"]]
    missing = [name for name, tensor in model.state_dict(keep_vars=True).items() if tensor.is_meta]
    required = [name for name in missing if not any(pattern.search(name) for pattern in optional)]
    if required:
        raise CheckpointError(f"checkpoint {path!r} is incomplete: {len(required)} weights missing, e.g. {required[0]}")
    for module_name in sorted({name.rpartition(".")[0] for name in missing}):
        module = modules[module_name]
        module.to_empty(device=placement(module_name + "."), recurse=False)
        model._init_weights(module)
        if not module_name.endswith("rotary_emb"):
            module.to(dtype)
    if config.pre_seq_len is not None:
        model.freeze_all_but_prefix()
    return model


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
    room = WEIGHTS_SHARE_OF_FREE_MEMORY * available
    count = parameter_count(config)
    needed = count * dtype.itemsize
    if needed < room:
        return dtype
    if not explicit and count * torch.bfloat16.itemsize < room:
        logger.warning("fp32 weights would take %.1f GB of the %.1f GB of free memory: loading in bf16 "
                       "(--dtype fp32 insists on fp32)", needed / 1e9, available / 1e9)
        return torch.bfloat16
    raise CheckpointError(f"the weights need {needed / 1e9:.1f} GB in {str(dtype).split('.')[-1]} but {available / 1e9:.1f} GB "
                          "of memory is free: load with --dtype bf16, --quantize 8 or --quantize 4 "
                          "(INT4 needs about 4.5 GB for ChatGLM-6B).")


def load_prefix_encoder(model: ChatGLMForConditionalGeneration, ptuning_checkpoint: str) -> None:
    """Loads the P-Tuning prefix encoder weights saved by ptuning/ (the only trained weights there)."""
    file = single_weight_file(ptuning_checkpoint)
    if file is None:
        raise CheckpointError(f"no model.safetensors or pytorch_model.bin in P-Tuning checkpoint {ptuning_checkpoint!r}.")
    shape = file.shape(PREFIX_TABLE)
    expected = tuple(model.transformer.prefix_encoder.embedding.weight.shape)
    if shape is not None and shape != expected:
        raise CheckpointError(f"P-Tuning checkpoint {ptuning_checkpoint!r} holds a prefix of {shape[0]} tokens "
                              f"(width {shape[1]}); the model was built for {expected[0]} (width {expected[1]}): "
                              f"pass --pre-seq-len {shape[0]}, or leave it out.")
    prefix = {k.split("prefix_encoder.", 1)[1]: v for k, v in file.tensors() if "prefix_encoder." in k}
    if not prefix:
        raise CheckpointError(f"{ptuning_checkpoint!r} holds no prefix_encoder weights.")
    model.transformer.prefix_encoder.load_state_dict(prefix)


def placement(target: torch.device, device_map: Optional[Dict[str, int]]) -> Callable[[str], torch.device]:
    """Where a weight goes, by its name: `target`, or the GPU of the longest device_map entry its name starts with."""
    if device_map is None:
        return lambda name: target
    entries = sorted(device_map.items(), key=lambda entry: -len(entry[0]))

    def device_of(name: str) -> torch.device:
        gpu = next((gpu for prefix, gpu in entries if name == prefix or name.startswith(prefix + ".")), 0)
        return torch.device("cuda", gpu) if isinstance(gpu, int) else torch.device(gpu)

    return device_of


def load_model_and_tokenizer(model_path: Optional[str] = None, device: str = "auto", dtype: Optional[torch.dtype] = None,
                             quantize: Optional[int] = None, ptuning_checkpoint: Optional[str] = None,
                             pre_seq_len: Optional[int] = None, prefix_projection: bool = False,
                             num_gpus: int = 1, device_map: Optional[Dict[str, int]] = None,
                             quantize_embeddings: bool = False,
                             ) -> Tuple[ChatGLMForConditionalGeneration, ChatGLMTokenizer]:
    """Loads a ChatGLM-6B-format checkpoint (the demo checkpoint by default) in eval mode.

    model_path: a local directory (sharded .bin with its index, or safetensors) or a hub id.
    device: auto | cpu | cuda | mps. dtype: default fp16 on GPUs, fp32 on CPU.
    quantize: 4 or 8 for weight-only INT4/INT8 (while loading); quantize_embeddings: the word embeddings and
    lm_head too (-qe). ptuning_checkpoint/pre_seq_len: a P-Tuning v2 prefix.
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
        if quantize and not config.quantization_bit:  # quantized while loading (and never again)
            config.quantization_bit, config.quantization_embeddings = quantize, quantize_embeddings
        tokenizer = ChatGLMTokenizer.from_pretrained(path)
        if spread and device_map is None:
            device_map = gpu_device_map(config.num_layers, num_gpus)
        model = load_weights(path, config, dtype, placement(target, device_map))
        load_generation_config(model, path)
    except CheckpointError:
        raise
    except PROGRAM_ERRORS:  # a bug or the machine running out of memory: the traceback says more than one line
        raise
    except Exception as error:  # what the libraries say about an unreadable checkpoint, in one line
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot load checkpoint {model_path or DEMO_MODEL_PATH!r}: {message}") from error
    if ptuning_checkpoint is not None:
        load_prefix_encoder(model, ptuning_checkpoint)
    if spread:  # hooks that move each layer's activations to its GPU
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map=device_map)
    # A quantized model runs on the CPU kernels, and a bf16 model its few-row products: they are compiled now,
    # not inside the first reply.
    if target.type == "cpu" and (model.config.quantization_bit or model.dtype == torch.bfloat16):
        from chatglm_6b.kernels import prepare_cpu_kernels

        prepare_cpu_kernels()
    return model.eval(), tokenizer


def load_generation_config(model: ChatGLMForConditionalGeneration, path: str) -> None:
    """The checkpoint's generation_config.json, where it has one (else the config's defaults stay)."""
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # none there
        pass
