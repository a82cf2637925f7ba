"""The CPU kernels, and how a model's products run on the device it is placed on.

Building: the C++ source (quantization_kernels.py) is compiled once per source, flags, CPU, torch and Python into
torch's extensions directory, then loaded (`cpu_kernels()`). `prepare_cpu_kernels()` does it while a model loads,
with a line saying so, so that no reply waits for a compile. A build reports what it can do (CpuKernels.simd,
.integer_path, .bf16_dot); nothing is read off a description string.

Dispatch: `backend_for(device)` says how linears and attention compute on a device, and a module takes its backend
once per placement of its weights (`placed_backend`), not per call:
    CPU    bf16 products of a few rows and bf16 decoding attention on the kernels (once loaded), quantized linears
           on the kernels (activations as `settings.activations` says, below); the rest torch
    CUDA   INT8 linears through torch._weight_int8pack_mm; the rest torch
    other  torch
A quantized linear no backend takes is computed by its format's definition (quantization.py).

`settings` come from the environment, or from tests and benchmarks: CHATGLM_QUANT_FORCE_TORCH=1 (torch only),
CHATGLM_ACTIVATIONS=int8x2|int8|fp32 (how the quantized kernels take their input; CHATGLM_QUANT_FP32_ACTIVATIONS=1,
the older switch, is fp32), CHATGLM_CPU_ISA=native|avx2|scalar (the SIMD the kernels are built for).

This file is Hugging Face remote code too: imports are torch, stdlib and siblings only.
"""
import hashlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .quantization_kernels import CPP_SOURCE

logger = logging.getLogger(__name__)

# The SIMD the kernels are compiled for: "native" (this CPU's, -march=native), or a narrower one to run (and test)
# the AVX2 or plain scalar code on a CPU that has more.
CPU_ISA_FLAGS = {"native": ["-march=native"], "avx2": ["-mavx2", "-mfma", "-mf16c"], "scalar": []}
# Up to this many input rows the bf16 kernel beats torch's bf16 matmul here: with bf16 dot products (AVX512-BF16)
# for 1 to 16 rows by 1.3-2.8x (above 64 rows torch's blocked GEMM wins, 2x at 128); the widening AVX2/scalar
# code only for a few rows (2.9x at one row, half torch's speed at 16). Decoding (a row per sequence) stays on it.
BF16_KERNEL_ROWS, BF16_KERNEL_ROWS_WIDENING = 64, 4
# Query rows up to which a bf16 attention on the CPU is a decoding step: torch's CPU SDPA in bf16 costs 0.5 ms per
# call for a single query (10x its fp32 time, 28 calls a token), and its matmul copies a cache that is a view of a
# longer buffer, while the kernel reads the cache in place.
DECODE_ROWS = 16


def _environment_flag(name: str, value: str) -> bool:
    return os.environ.get(name, "0") == value


# How the quantized kernels take a layer's input (`settings.activations`), and the kernel's number of int8 passes:
#   int8x2  int8 per block of 128 values, and a second int8 pass of the first one's rounding error at 1/256 of its
#           scale: about 15 bits a value, less logit error than bf16 activations on a model with outlier channels
#           (benchmarks/bench_accuracy.py --outliers), for twice the integer products
#   int8    the first pass alone: half the products; 16-21x bf16's logit error on that model, 5x without its
#           outlier channels (the same argmax there)
#   fp32    weights decoded to fp32 for fp32 FMAs: the original's arithmetic
# A build without an integer path, and K not a multiple of 128, take fp32.
ACTIVATION_PASSES = {"int8x2": 2, "int8": 1, "fp32": 0}


def _activations_from_environment() -> str:
    if _environment_flag("CHATGLM_QUANT_FP32_ACTIVATIONS", "1"):  # the older switch
        return "fp32"
    chosen = os.environ.get("CHATGLM_ACTIVATIONS", "int8x2")
    if chosen not in ACTIVATION_PASSES:
        raise ValueError(f"CHATGLM_ACTIVATIONS={chosen!r}: expected one of {', '.join(ACTIVATION_PASSES)}")
    return chosen


@dataclass
class KernelSettings:
    torch_only: bool = field(default_factory=lambda: _environment_flag("CHATGLM_QUANT_FORCE_TORCH", "1"))
    activations: str = field(default_factory=_activations_from_environment)
    isa: str = field(default_factory=lambda: os.environ.get("CHATGLM_CPU_ISA", "native"))


settings = KernelSettings()


# ------------------------------------------------------------------------------------------------
# Building and loading
# ------------------------------------------------------------------------------------------------
class CpuKernels:
    """One loaded build: its ops (torch.ops.chatglm_quant) and what it can do, as the build reports it."""

    def __init__(self, ops, flags: List[str]):
        self.ops, self.flags = ops, list(flags)
        self.simd: str = ops.simd()
        self.integer_path: bool = bool(ops.has_integer_path())
        self.bf16_dot: bool = bool(ops.has_bf16_dot())

    @property
    def description(self) -> str:
        """The log line's words: the SIMD paths and how it was built."""
        if not self.flags:
            return f"{self.simd} (already loaded in this process)"
        threads = "" if "-fopenmp" in self.flags else "; no OpenMP: one thread"
        return f"{self.simd} ({' '.join(self.flags)}{threads})"

    @property
    def bf16_rows(self) -> int:
        """Most input rows a bf16 product takes the kernel for."""
        return BF16_KERNEL_ROWS if self.bf16_dot else BF16_KERNEL_ROWS_WIDENING


class _Build:
    """The process's build: None until tried, False if it could not be had, else the CpuKernels."""
    kernels = None
    warned = set()


def _warn_once(key: str, message: str, *args) -> None:
    if key not in _Build.warned:
        _Build.warned.add(key)
        logger.warning(message, *args)


def _cpu_id() -> bytes:
    # -march=native code must not be reused on a different CPU sharing the same cache dir
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        import platform
        return platform.processor().encode()


def build_tag(flags: List[str]) -> str:
    """Everything that changes the binary: the source, the flags, the CPU (-march=native), torch and Python.
    Two environments sharing a cache directory then never load or rebuild each other's kernel."""
    key = [CPP_SOURCE, " ".join(flags), torch.__version__, sys.version, os.environ.get("CXX", "c++")]
    return hashlib.sha1("\0".join(key).encode() + _cpu_id()).hexdigest()[:12]


def build_flags() -> List[List[str]]:
    """The flags to try, in order: with OpenMP first; then a portable build (Apple clang has no -fopenmp)."""
    if settings.isa not in CPU_ISA_FLAGS:
        raise ValueError(f"CHATGLM_CPU_ISA={settings.isa!r}: choose one of {', '.join(CPU_ISA_FLAGS)}")
    return [["-O3", *CPU_ISA_FLAGS[settings.isa], "-fopenmp"], ["-O3"]]


def _load() -> None:
    try:
        if hasattr(torch.ops.chatglm_quant, "linear"):  # already registered in this process
            _Build.kernels = CpuKernels(torch.ops.chatglm_quant, [])
            return
    except (AttributeError, RuntimeError):
        pass
    errors = []
    for flags in build_flags():
        try:
            from torch.utils.cpp_extension import _get_build_directory, load

            name = f"chatglm_quant_{build_tag(flags)}"
            source = os.path.join(_get_build_directory(name, verbose=False), name + ".cpp")
            if not os.path.exists(source):  # keep the file (and its mtime) so the cached build is reused
                with open(source + ".tmp", "w") as f:
                    f.write(CPP_SOURCE)
                os.replace(source + ".tmp", source)
            load(name=name, sources=[source], extra_cflags=flags + ["-std=c++17"],
                 extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [], is_python_module=False, verbose=False)
            _Build.kernels = CpuKernels(torch.ops.chatglm_quant, flags)
            return
        except Exception as error:  # no compiler, unsupported flags, ...
            errors.append(f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}")
    _warn_once("cpu", "chatglm kernels: CPU kernel unavailable (%s); using the slower torch path", "; ".join(errors))
    _Build.kernels = False


def cpu_kernels() -> Optional[CpuKernels]:
    """The CPU kernels, loaded (and the first time compiled) now if need be; None if unavailable or turned off."""
    if settings.torch_only:
        return None
    if _Build.kernels is None:
        _load()
    return _Build.kernels or None


def loaded_cpu_kernels() -> Optional[CpuKernels]:
    """The CPU kernels if they are loaded already (and not turned off), else None: float paths use them only then,
    so that no reply waits for a compile."""
    return None if settings.torch_only else _Build.kernels or None


def prepare_cpu_kernels() -> bool:
    """Loads (and the first time compiles) the CPU kernels now, with a line saying so, rather than inside the first
    reply; then one line on how they were built, or why the slower torch path runs. True if they loaded."""
    if _Build.kernels is None and not settings.torch_only:
        start = time.perf_counter()
        logger.warning("chatglm kernels: loading the INT8/INT4/bf16 CPU kernel (compiled on first use here, about "
                       "30 s; cached after that)")
        if cpu_kernels():
            logger.warning("chatglm kernels: CPU kernel ready in %.1f s: %s", time.perf_counter() - start,
                           _Build.kernels.description)
    return loaded_cpu_kernels() is not None


# ------------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------------
def wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def eager_attention(q, k, v, bias) -> Tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(head_dim) + bias) v with the probabilities: (context [B, nh, L, hd], probs [B, nh, L,
    keys])."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # [B, nh, L, keys]
    if bias is not None:
        scores = scores + bias
    probs = F.softmax(scores.float(), dim=-1).to(v.dtype)
    return probs @ v, probs


class TorchBackend:
    """Plain torch: any device, and the reference for the others."""

    def linear(self, x, weight, bias=None):
        return F.linear(x, weight, bias)

    def quantized_linear(self, x, qweight, scale, bias, bits) -> Optional[torch.Tensor]:
        """y = x @ (q * scale).T + b, or None: the format's own definition computes it (quantization.py)."""
        return None

    def attention(self, q, k, v, bias, output_attentions: bool = False):
        """softmax(q k^T / sqrt(head_dim) + bias) v: (context [B, nh, L, hd], probs or None) for q [B, nh, L, hd], k
        and v [B, nh, keys, hd], bias additive [B or 1, 1, L, keys] or None; probs only with output_attentions."""
        if output_attentions:
            return eager_attention(q, k, v, bias)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias), None


class CpuBackend(TorchBackend):
    def linear(self, x, weight, bias=None):
        kernels = loaded_cpu_kernels()
        if (kernels and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
                and x.numel() <= kernels.bf16_rows * x.shape[-1] and not wants_grad(x, weight, bias)):
            return kernels.ops.bf16_linear(x, weight, bias)
        return F.linear(x, weight, bias)

    def quantized_linear(self, x, qweight, scale, bias, bits):
        kernels = cpu_kernels()
        if kernels is None:
            return None
        return kernels.ops.linear(x, qweight, scale, bias, bits, ACTIVATION_PASSES[settings.activations])

    def attention(self, q, k, v, bias, output_attentions: bool = False):
        if q.dtype == torch.bfloat16 and q.shape[2] <= DECODE_ROWS and not output_attentions:
            kernels = None if wants_grad(q) else loaded_cpu_kernels()
            if kernels:
                return kernels.ops.decode_attention(q, k, v, bias, q.shape[-1] ** -0.5), None
            return eager_attention(q, k, v, bias)[0], None
        return super().attention(q, k, v, bias, output_attentions)


def fused_int8_linear(x, qweight, scale, bias):
    """INT8 through torch's fused weight-only op, torch._weight_int8pack_mm: it reads the int8 weight as it is
    (the checkpoint's layout, no repacking) and scales each output column, with no dequantized copy. The same op
    runs on the CPU, where the tests check it."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()                                  # [M, K]
    out = torch._weight_int8pack_mm(x2, qweight.contiguous(), scale.to(x.dtype))  # [M, N]
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.view(*x.shape[:-1], -1)


class CudaBackend(TorchBackend):
    # The original ran THUDM's own CUDA kernels through cpm_kernels, which ship only as a compiled blob inside the
    # original file. INT8 takes torch's fused op; INT4 is dequantized in blocks of rows (quantization.py): torch's
    # fused INT4 op needs its own tile layout in place of the checkpoint's, which would either change what
    # save_pretrained writes or hold a second copy of every weight on the GPU.
    fused_int8_failed = False

    def quantized_linear(self, x, qweight, scale, bias, bits):
        if bits != 8 or self.fused_int8_failed:
            return None
        try:
            return fused_int8_linear(x, qweight, scale, bias)
        except (RuntimeError, NotImplementedError) as error:  # an older torch or an unsupported dtype/GPU
            self.fused_int8_failed = True
            _warn_once("cuda8", "chatglm kernels: torch._weight_int8pack_mm is unavailable here (%s); "
                                "dequantizing blocks of rows instead", (str(error).splitlines() or [""])[0])
            return None


BACKENDS = {"cpu": CpuBackend(), "cuda": CudaBackend()}
TORCH_BACKEND = TorchBackend()


def backend_for(device) -> TorchBackend:
    """How products compute on `device` (torch alone when the settings say so)."""
    return TORCH_BACKEND if settings.torch_only else BACKENDS.get(torch.device(device).type, TORCH_BACKEND)


def placed_backend(module: torch.nn.Module, weight: torch.Tensor) -> TorchBackend:
    """The backend for the device of a module's weight, taken once per placement of that weight (a model moved by
    .to() or placed by a device map gets its new device's backend at its next call)."""
    placed = module.__dict__.get("_placed_backend")
    if placed is None or placed[0] != weight.device or placed[2] != settings.torch_only:
        placed = (weight.device, backend_for(weight.device), settings.torch_only)
        module.__dict__["_placed_backend"] = placed
    return placed[1]
