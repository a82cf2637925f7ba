"""Weight-only INT8 / INT4 quantization for ChatGLM-6B, in the format of the THUDM checkpoints.

Format (per output row n, symmetric):
    scale[n] = max_k |w[n, k]| / (2**(bits-1) - 1)          stored as fp16, shape [out]
    q[n, k]  = round(w[n, k] / scale[n])                     int8
    int8: weight = q                                         int8 [out, in]
    int4: weight[n, j] = (q[n, 2j] << 4) | (q[n, 2j+1] & 15)  int8 [out, in // 2]
          (element 2j in the high nibble, 2j+1 in the low nibble, both two's complement)
QuantizedLinear has parameters weight / weight_scale / bias, so state-dict keys match the original
(`...query_key_value.weight`, `...query_key_value.weight_scale`, `...query_key_value.bias`).

Compute: y = x @ (q * scale).T + b
    CPU:  compiled C++ kernel (quantization_kernels.py) that streams the int8/int4 weight once: with AVX512-VNNI
          or AVX2, x quantized to int8 per block of 128 and integer dot products; else weights decoded in
          registers for fp32 FMAs. Falls back to dequantize-then-matmul in torch. The same kernel runs bf16
          models' few-row products (float_linear).
    CUDA: INT8 through torch._weight_int8pack_mm; INT4 dequantizes blocks of rows, 64 MB transient at most (see _cuda_linear).
Gradients flow to the input only (the quantized weights are frozen), which is what P-Tuning needs.

This file is also shipped as Hugging Face remote code: imports are torch, stdlib and siblings only.
"""
import hashlib
import logging
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from .quantization_kernels import CPP_SOURCE

logger = logging.getLogger(__name__)

# Force the pure-torch path on CPU (tests, debugging). Also settable via the environment.
FORCE_TORCH_FALLBACK = os.environ.get("CHATGLM_QUANT_FORCE_TORCH", "0") == "1"
# The CPU kernel's integer path (int8 activations, VNNI dot products) where the CPU has it; off: its fp32 path.
INTEGER_ACTIVATIONS = os.environ.get("CHATGLM_QUANT_FP32_ACTIVATIONS", "0") != "1"


# ------------------------------------------------------------------------------------------------
# Format: quantize / pack / unpack / dequantize
# ------------------------------------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [n, m] with values in [-8, 7] -> int8 [n, m // 2]; q[:, 2j] -> high nibble of byte j."""
    assert q.dtype == torch.int8 and q.shape[-1] % 2 == 0
    # q << 4 stays in int8 range for q in [-8, 7]; & 15 keeps the low nibble's two's complement bits
    return (q[..., 0::2] << 4) | (q[..., 1::2] & 15)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """int8 [n, m] packed -> int8 [n, 2m] in [-8, 7] (arithmetic shifts sign-extend each nibble)."""
    hi = p >> 4          # q[2j]
    lo = (p << 4) >> 4   # q[2j+1]: move the low nibble up (int8 wraps), shift back down
    return torch.stack((hi, lo), dim=-1).flatten(-2)


# Float weights are quantized and dequantized this many bytes of fp32 rows at a time, so that the
# transient float copies stay a few MB (in cache) whatever the layer's size.
TRANSIENT_BYTES = 4 << 20


def rows_per_block(row_length: int) -> int:
    """Rows of `row_length` fp32 values that fit in TRANSIENT_BYTES (at least one)."""
    return max(1, TRANSIENT_BYTES // max(1, 4 * row_length))


def quantize_weight(weight: torch.Tensor, bits: int):
    """float [out, in] -> (int8 [out, in * bits // 8], fp16 scale [out]), exactly the original format.

    One rule whatever dtype the weights come in: they are taken as fp16 (the dtype of the original
    checkpoints) and scale and quotient are computed in fp16, as the original's `model.half().quantize(bits)`
    does. (The original's result depended on the model's dtype at that moment: an fp32 CPU model divided in
    fp32, and a few weights per thousand came out one step apart.)"""
    assert bits in (4, 8), "only 4-bit or 8-bit quantization is supported"
    qmax = 2 ** (bits - 1) - 1
    packed = torch.empty(weight.shape[0], weight.shape[1] * bits // 8, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.half, device=weight.device)
    step = rows_per_block(weight.shape[1])
    for n0 in range(0, weight.shape[0], step):
        rows = weight[n0:n0 + step].half()
        scale[n0:n0 + step] = rows_scale = rows.abs().amax(dim=-1) / qmax
        # the original's fp16 arithmetic (w / scale); all-zero rows give q = 0
        div = torch.where(rows_scale == 0, torch.ones_like(rows_scale), rows_scale)
        q = torch.round(rows / div[:, None]).clamp_(-qmax - 1, qmax).to(torch.int8)
        packed[n0:n0 + step] = pack_int4(q) if bits == 4 else q
    return packed, scale


def set_quantized_weight(module: nn.Module, weight: torch.Tensor, dtype: torch.dtype, rows: slice = slice(None)) -> None:
    """Quantizes a float `weight` into a QuantizedLinear or QuantizedEmbedding (its `bits`), the scale in
    `dtype`: the whole weight, or into the already allocated `rows` of the module's weight."""
    with torch.no_grad():
        q, scale = quantize_weight(weight.detach(), module.bits)
        if rows != slice(None):
            module.weight[rows], module.weight_scale[rows] = q, scale.to(dtype)
            return
    module.weight = nn.Parameter(q, requires_grad=False)
    module.weight_scale = nn.Parameter(scale.to(dtype), requires_grad=False)


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, bits: int, dtype=torch.float32):
    """int8 [out, in * bits // 8], scale [out] -> dtype [out, in]."""
    q = unpack_int4(qweight) if bits == 4 else qweight
    return q.to(dtype) * scale.to(dtype)[:, None]


# ------------------------------------------------------------------------------------------------
# CPU kernel loading (compiled once, cached in the torch extensions dir)
# ------------------------------------------------------------------------------------------------
_cpu_kernels = None  # None: not tried yet, False: unavailable, else the torch.ops namespace
_cpu_kernel_build = ""  # how the loaded kernel was built, for the log line
_warned = set()


def _warn_once(key, msg, *args):
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg, *args)


def _cpu_id() -> bytes:
    # -march=native code must not be reused on a different CPU sharing the same cache dir
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        import platform
        return platform.processor().encode()


def _build_tag(flags) -> str:
    """Everything that changes the binary: the source, the flags, the CPU (-march=native), torch and Python.
    Two environments sharing a cache directory then never load or rebuild each other's kernel."""
    key = [CPP_SOURCE, " ".join(flags), torch.__version__, sys.version, os.environ.get("CXX", "c++")]
    return hashlib.sha1("\0".join(key).encode() + _cpu_id()).hexdigest()[:12]


# The SIMD the kernel is compiled for: "native" (this CPU's, -march=native), or a narrower one to run (and test)
# the AVX2 or plain scalar code on a CPU that has more.
CPU_ISA_FLAGS = {"native": ["-march=native"], "avx2": ["-mavx2", "-mfma", "-mf16c"], "scalar": []}
CPU_ISA = os.environ.get("CHATGLM_CPU_ISA", "native")


def _build_flags():
    if CPU_ISA not in CPU_ISA_FLAGS:
        raise ValueError(f"CHATGLM_CPU_ISA={CPU_ISA!r}: choose one of {', '.join(CPU_ISA_FLAGS)}")
    # with OpenMP first; then a portable build (e.g. Apple clang has no -fopenmp)
    return [["-O3", *CPU_ISA_FLAGS[CPU_ISA], "-fopenmp"], ["-O3"]]


def _load_cpu_kernels():
    global _cpu_kernels, _cpu_kernel_build
    if _cpu_kernels is not None:
        return _cpu_kernels
    try:
        if hasattr(torch.ops.chatglm_quant, "linear"):  # already registered in this process
            _cpu_kernels = torch.ops.chatglm_quant
            _cpu_kernel_build = _cpu_kernels.simd()
            return _cpu_kernels
    except (AttributeError, RuntimeError):
        pass
    errors = []
    for flags in _build_flags():
        try:
            from torch.utils.cpp_extension import _get_build_directory, load

            name = f"chatglm_quant_{_build_tag(flags)}"
            src = os.path.join(_get_build_directory(name, verbose=False), name + ".cpp")
            if not os.path.exists(src):  # keep the file (and its mtime) so the cached build is reused
                with open(src + ".tmp", "w") as f:
                    f.write(CPP_SOURCE)
                os.replace(src + ".tmp", src)
            ldflags = ["-fopenmp"] if "-fopenmp" in flags else []
            load(name=name, sources=[src], extra_cflags=flags + ["-std=c++17"], extra_ldflags=ldflags,
                 is_python_module=False, verbose=False)
            _cpu_kernels = torch.ops.chatglm_quant
            _cpu_kernel_build = f"{_cpu_kernels.simd()} ({' '.join(flags)}" + \
                ("" if "-fopenmp" in flags else "; no OpenMP: one thread") + ")"
            return _cpu_kernels
        except Exception as e:  # no compiler, unsupported flags, ...
            errors.append(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
    _warn_once("cpu", "chatglm quantization: CPU kernel unavailable (%s); using the slower "
                      "dequantize-then-matmul torch path", "; ".join(errors))
    _cpu_kernels = False
    return _cpu_kernels


def prepare_cpu_kernel() -> bool:
    """Loads (and the first time compiles) the CPU kernel now, with a line saying so, rather than inside the
    first reply; then one line on how it was built, or why the slower torch path runs. True if it loaded."""
    if _cpu_kernels is None:
        start = time.perf_counter()
        logger.warning("chatglm quantization: loading the INT8/INT4/bf16 CPU kernel (compiled on first use here, "
                       "about 30 s; cached after that)")
        if _load_cpu_kernels():
            logger.warning("chatglm quantization: CPU kernel ready in %.1f s: %s", time.perf_counter() - start,
                           _cpu_kernel_build or "already loaded in this process")
    return bool(_cpu_kernels)


# ------------------------------------------------------------------------------------------------
# Linear compute paths
# ------------------------------------------------------------------------------------------------
# On a GPU the dequantized rows of one call take at most this much memory in x's dtype (fp16: 2048 rows of
# 4096), enough for cuBLAS to run at speed; unpacking them holds up to three more temporaries of that size, so a
# call's transient stays under 4x this (64 MB), where dequantizing dense_h_to_4h whole took about 320 MB.
GPU_TRANSIENT_BYTES = 16 << 20


def _torch_linear(x, qweight, scale, bias, bits):
    """Fallback: dequantize a block of weight rows at a time, then matmul (fp32 on CPU, x's dtype on GPUs). The
    transient float rows are TRANSIENT_BYTES on the CPU (they stay in cache), GPU_TRANSIENT_BYTES on a GPU."""
    cpu = x.device.type == "cpu"
    dtype = torch.float32 if cpu else x.dtype
    b = bias.to(dtype) if bias is not None else None
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)                                        # [M, K]
    out = torch.empty(x2.shape[0], qweight.shape[0], dtype=dtype, device=x.device)  # [M, N]
    step = rows_per_block(x2.shape[1]) if cpu else max(1, GPU_TRANSIENT_BYTES // (x2.shape[1] * x2.element_size()))
    for n0 in range(0, qweight.shape[0], step):
        w = dequantize_weight(qweight[n0:n0 + step], scale[n0:n0 + step], bits, dtype)  # [nb, K]
        out[:, n0:n0 + step] = F.linear(x2, w, None if b is None else b[n0:n0 + step])
    return out.view(*x.shape[:-1], -1).to(x.dtype)


_fused_int8_failed = False


def fused_int8_linear(x, qweight, scale, bias):
    """INT8 through torch's fused weight-only op, torch._weight_int8pack_mm: it reads the int8 weight as it is
    (the checkpoint's layout, no repacking) and scales each output column, with no dequantized copy. The same op
    runs on the CPU, where the tests check it."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()                                  # [M, K]
    out = torch._weight_int8pack_mm(x2, qweight.contiguous(), scale.to(x.dtype))  # [M, N]
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.view(*x.shape[:-1], -1)


def _cuda_linear(x, qweight, scale, bias, bits):
    # The original runs THUDM's own CUDA kernels through cpm_kernels, which ship only as a compiled blob inside
    # the original file. INT8 takes torch's fused op (above). INT4 dequantizes blocks of rows (transient
    # GPU_TRANSIENT_BYTES per call): torch's fused INT4 op needs its own tile layout in place of the checkpoint's,
    # which would either change what save_pretrained writes or hold a second copy of every weight on the GPU.
    global _fused_int8_failed
    if bits == 8 and not _fused_int8_failed:
        try:
            return fused_int8_linear(x, qweight, scale, bias)
        except (RuntimeError, NotImplementedError) as error:  # an older torch or an unsupported dtype/GPU
            _fused_int8_failed = True
            _warn_once("cuda8", "chatglm quantization: torch._weight_int8pack_mm is unavailable here (%s); "
                                "dequantizing blocks of rows instead", (str(error).splitlines() or [""])[0])
    return _torch_linear(x, qweight, scale, bias, bits)


def _forward(x, qweight, scale, bias, bits):
    if x.device.type == "cpu":
        kernels = None if FORCE_TORCH_FALLBACK else _load_cpu_kernels()
        if kernels:
            return kernels.linear(x, qweight, scale, bias, bits, int(INTEGER_ACTIVATIONS))
        return _torch_linear(x, qweight, scale, bias, bits)
    if x.device.type == "cuda":
        return _cuda_linear(x, qweight, scale, bias, bits)
    return _torch_linear(x, qweight, scale, bias, bits)


def _dequantize_rows(qweight, scale, bits, dtype):
    if qweight.device.type == "cpu" and not FORCE_TORCH_FALLBACK and _load_cpu_kernels():
        return torch.ops.chatglm_quant.dequantize(qweight, scale, bits).to(dtype)
    return dequantize_weight(qweight, scale, bits, dtype)


class _QuantizedLinearFn(torch.autograd.Function):
    """y = x @ W.T + b with frozen quantized W; backward gives grad_x = grad_y @ W (and grad_b)."""

    @staticmethod
    def forward(ctx, x, qweight, scale, bias, bits):
        ctx.save_for_backward(qweight, scale)
        ctx.bits = bits
        return _forward(x, qweight, scale, bias, bits)

    @staticmethod
    def backward(ctx, grad_out):
        qweight, scale = ctx.saved_tensors
        grad_x = grad_b = None
        g = grad_out.reshape(-1, grad_out.shape[-1])  # [M, N]
        if ctx.needs_input_grad[0]:
            dtype = torch.float32 if g.device.type == "cpu" else g.dtype
            gd = g.to(dtype)
            grad_x = torch.zeros(g.shape[0], qweight.shape[1] * 8 // ctx.bits, dtype=dtype, device=g.device)
            step = rows_per_block(grad_x.shape[1])  # the transient float weight stays small
            for n0 in range(0, qweight.shape[0], step):
                w = _dequantize_rows(qweight[n0:n0 + step], scale[n0:n0 + step], ctx.bits, dtype)
                grad_x.addmm_(gd[:, n0:n0 + step], w)  # [M, nb] @ [nb, K]
            grad_x = grad_x.to(grad_out.dtype).view(*grad_out.shape[:-1], -1)
        if ctx.needs_input_grad[3]:
            grad_b = g.sum(0)
        return grad_x, None, None, grad_b, None


def quantized_linear(x, qweight, scale, bias, bits):
    """y[..., out] = x[..., in] @ dequantize(qweight, scale).T + bias, in x's dtype."""
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _QuantizedLinearFn.apply(x, qweight, scale, bias, bits)
    return _forward(x, qweight, scale, bias, bits)


# Up to this many input rows the bf16 kernel beats torch's bf16 matmul here: with AVX512-BF16 for 1 to 16 rows by
# 1.3-2.8x (above 64 rows torch's blocked GEMM wins, 2x at 128); the widening AVX2/scalar code only for a few rows
# (2.9x at one row, half torch's speed at 16). Decoding (one row per sequence) stays on the kernel.
BF16_KERNEL_ROWS = 64
BF16_KERNEL_ROWS_WIDENING = 4


def float_linear(x, weight, bias=None):
    """F.linear, run by the CPU kernel's bf16 product where that applies: bf16 weight and input on the CPU, at
    most BF16_KERNEL_ROWS rows, no gradient wanted, and the kernel already loaded (prepare_cpu_kernel: it is never
    compiled here, inside a reply). torch's own bf16 matmul reads the weight of a few-row product at about half
    the memory bandwidth."""
    kernels = loaded_cpu_kernels()
    if (kernels and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu"
            and x.numel() <= _bf16_kernel_rows() * x.shape[-1]
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))):
        return kernels.bf16_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _bf16_kernel_rows() -> int:
    return BF16_KERNEL_ROWS if "AVX512-BF16" in _cpu_kernel_build else BF16_KERNEL_ROWS_WIDENING


def loaded_cpu_kernels():
    """The CPU kernel's ops if they are loaded already (and not turned off), else None: the model's float paths
    use them only then, so that no reply waits for a compile."""
    return _cpu_kernels if _cpu_kernels and not FORCE_TORCH_FALLBACK else None


# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """Drop-in for nn.Linear with a frozen int8/int4 weight. Constructed empty (to be filled by
    load_state_dict, as for THUDM/chatglm-6b-int4), or from an nn.Linear with `from_linear`."""

    def __init__(self, bits, in_features, out_features, bias=True, dtype=torch.half, device=None):
        super().__init__()
        assert bits in (4, 8), "only 4-bit or 8-bit quantization is supported"
        assert bits == 8 or in_features % 2 == 0, "int4 needs an even number of input features"
        self.bits = self.weight_bit_width = bits
        self.in_features, self.out_features = in_features, out_features
        empty = lambda *shape, dt: nn.Parameter(torch.empty(*shape, dtype=dt, device=device), requires_grad=False)
        self.weight = empty(out_features, in_features * bits // 8, dt=torch.int8)
        self.weight_scale = empty(out_features, dt=dtype)
        self.register_parameter("bias", empty(out_features, dt=dtype) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, empty_init: bool = False):
        """Quantize `linear` on its own device. The scale is kept in the weight's dtype (its values
        are the fp16-rounded scales of the original format) so the module computes in that dtype."""
        w = linear.weight
        self = cls(bits, linear.in_features, linear.out_features, bias=False, dtype=w.dtype, device=w.device)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        if not empty_init:
            set_quantized_weight(self, w, w.dtype)
        return self

    def forward(self, x):
        return quantized_linear(x, self.weight, self.weight_scale, self.bias, self.bits)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bits={self.bits}, bias={self.bias is not None}"


class QuantizedEmbedding(nn.Module):
    """nn.Embedding with an int8/int4 table (the -int4-qe variant): weight int8 [vocab, dim * bits // 8],
    weight_scale [vocab]. Looks rows up, then dequantizes only those rows (output in the scale's dtype)."""

    def __init__(self, bits, num_embeddings, embedding_dim, dtype=torch.half, device=None):
        super().__init__()
        assert bits in (4, 8) and (bits == 8 or embedding_dim % 2 == 0)
        self.bits = self.weight_bit_width = bits
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim * bits // 8, dtype=torch.int8,
                                               device=device), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(num_embeddings, dtype=dtype, device=device),
                                         requires_grad=False)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int, empty_init: bool = False):
        w = emb.weight
        self = cls(bits, emb.num_embeddings, emb.embedding_dim, dtype=w.dtype, device=w.device)
        if not empty_init:
            set_quantized_weight(self, w, w.dtype)
        return self

    def forward(self, ids):
        q = self.weight[ids.reshape(-1)]           # [T, dim * bits // 8]
        s = self.weight_scale[ids.reshape(-1)]     # [T]
        dtype = self.weight_scale.dtype
        return dequantize_weight(q, s, self.bits, dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}"


# ------------------------------------------------------------------------------------------------
# Model surgery
# ------------------------------------------------------------------------------------------------
LAYER_LINEARS = (("attention", "query_key_value"), ("attention", "dense"),
                  ("mlp", "dense_h_to_4h"), ("mlp", "dense_4h_to_h"))


def quantize(model, bits, empty_init=False, quantize_embeddings=False, **kwargs):
    """Replace, in place, the four linears of every layer by QuantizedLinear (and, with
    quantize_embeddings, transformer.word_embeddings and lm_head). Works on a
    ChatGLMForConditionalGeneration (layers at model.transformer.layers) or on the transformer
    itself (model.layers, the original's calling convention). Each module is quantized on its own
    device and its float weight is dropped right away, so the extra memory is about one linear.
    empty_init=True only allocates int8 tensors, to be filled from a pre-quantized checkpoint.
    Unused kwargs (e.g. use_quantization_cache) are accepted for compatibility with the original."""
    assert bits in (4, 8), "only 4-bit or 8-bit quantization is supported"
    root = model.transformer if hasattr(model, "transformer") else model
    for layer in root.layers:
        for parent_name, name in LAYER_LINEARS:
            parent = getattr(layer, parent_name)
            linear = getattr(parent, name)
            if isinstance(linear, nn.Linear):
                setattr(parent, name, QuantizedLinear.from_linear(linear, bits, empty_init))
            del linear  # last reference to the float weight goes here
    if quantize_embeddings:
        emb = root.word_embeddings
        head = getattr(model, "lm_head", None)
        if isinstance(emb, nn.Embedding):
            tied = isinstance(head, nn.Linear) and head.weight is emb.weight
            root.word_embeddings = qemb = QuantizedEmbedding.from_embedding(emb, bits, empty_init)
            if tied:  # tied output projection shares the quantized table (as the original -qe model)
                qhead = QuantizedLinear(bits, head.in_features, head.out_features, bias=False,
                                        dtype=qemb.weight_scale.dtype, device=qemb.weight.device)
                qhead.weight, qhead.weight_scale = qemb.weight, qemb.weight_scale
                model.lm_head = qhead
            del emb, head
        if isinstance(getattr(model, "lm_head", None), nn.Linear):
            model.lm_head = QuantizedLinear.from_linear(model.lm_head, bits, empty_init)
    if not empty_init and root.layers[0].attention.query_key_value.weight.device.type == "cpu":
        prepare_cpu_kernel()  # `model.quantize(4)` on CPU, as users of the original write it: ready now
    return model
