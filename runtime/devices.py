"""Device and dtype choice, the memory a device has free, and the original's placement of ChatGLM-6B's layers over
several GPUs."""
import os
from typing import Dict, Optional

import torch


class DeviceError(RuntimeError):
    """A device that was asked for but is not there; the message is one line for the user."""


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(device: str = "auto") -> torch.device:
    """auto: CUDA, then MPS, then CPU; a named device must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but torch sees no CUDA GPU (or no driver).")
    if device == "mps" and not mps_available():
        raise DeviceError("--device mps was asked for, but MPS is not available on this machine.")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on GPUs (the original's choice), fp32 on CPU (fp16 matmuls are slow or missing there)."""
    return torch.float32 if device.type == "cpu" else torch.float16


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


def require_gpus(num_gpus: int) -> None:
    if torch.cuda.device_count() < num_gpus:
        raise DeviceError(f"{num_gpus} GPUs were asked for; torch sees {torch.cuda.device_count()} CUDA GPUs.")


def available_memory(device: Optional[torch.device] = None) -> Optional[int]:
    """Bytes that can still be allocated on `device` (default: the CPU) without swapping: a GPU's free memory, or
    Linux's MemAvailable (elsewhere the free physical pages, or None if unknown)."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
