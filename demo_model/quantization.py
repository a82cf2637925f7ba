# Copy of chatglm_6b/quantization.py, written by `python tools/copy_model_code.py` (runtime.saving.copy_model_code): edit chatglm_6b/quantization.py, not this file.
"""Weight-only INT8 / INT4 quantization for ChatGLM-6B, in the format of the THUDM checkpoints.

Format (per output row n, symmetric):
    scale[n] = max_k |w[n, k]| / (2**(bits-1) - 1)          stored as fp16, shape [out]
    q[n, k]  = round(w[n, k] / scale[n])                     int8
    int8: weight = q                                         int8 [out, in]
    int4: weight[n, j] = (q[n, 2j] << 4) | (q[n, 2j+1] & 15)  int8 [out, in // 2]
          (element 2j in the high nibble, 2j+1 in the low nibble, both two's complement)
QuantizedLinear has parameters weight / weight_scale / bias, so state-dict keys match the original
(`...query_key_value.weight`, `...query_key_value.weight_scale`, `...query_key_value.bias`).

Compute: y = x @ (q * scale).T + b, by the backend of the weight's device where it has a kernel (kernels.py: the
CPU kernel, CUDA's fused INT8 op), else by this definition in torch: blocks of weight rows dequantized, then
multiplied (fp32 on the CPU, x's dtype on GPUs).
Gradients flow to the input only (the quantized weights are frozen), which is what P-Tuning needs.

This file is also shipped as Hugging Face remote code: imports are torch, stdlib and siblings only.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .kernels import backend_for, cpu_kernels, placed_backend, prepare_cpu_kernels


# ------------------------------------------------------------------------------------------------
# Format: quantize / pack / unpack / dequantize
# ------------------------------------------------------------------------------------------------
def check_bits(bits: int, features: int = 0) -> None:
    if bits not in (4, 8):
        raise ValueError(f"only 4-bit and 8-bit quantization are supported, not {bits!r}")
    if bits == 4 and features % 2:
        raise ValueError(f"INT4 packs two values a byte: {features} features is not an even number")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [n, m] with values in [-8, 7] -> int8 [n, m // 2]; q[:, 2j] -> high nibble of byte j."""
    if q.dtype != torch.int8 or q.shape[-1] % 2:
        raise ValueError(f"pack_int4 takes int8 values with an even last dimension, not {q.dtype} {list(q.shape)}")
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
    check_bits(bits)
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
# Compute
# ------------------------------------------------------------------------------------------------
# On a GPU the dequantized rows of one call take at most this much memory in x's dtype (fp16: 2048 rows of
# 4096), enough for cuBLAS to run at speed; unpacking them holds up to three more temporaries of that size, so a
# call's transient stays under 4x this (64 MB), where dequantizing dense_h_to_4h whole took about 320 MB.
GPU_TRANSIENT_BYTES = 16 << 20


def reference_linear(x, qweight, scale, bias, bits):
    """The format's definition in torch: a block of weight rows dequantized at a time, then multiplied (fp32 on
    CPU, x's dtype on GPUs). The transient float rows are TRANSIENT_BYTES on the CPU (they stay in cache),
    GPU_TRANSIENT_BYTES on a GPU."""
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


def _forward(backend, x, qweight, scale, bias, bits):
    out = backend.quantized_linear(x, qweight, scale, bias, bits)
    return out if out is not None else reference_linear(x, qweight, scale, bias, bits)


def _dequantize_rows(qweight, scale, bits, dtype):
    kernels = cpu_kernels() if qweight.device.type == "cpu" else None
    if kernels is not None:
        return kernels.ops.dequantize(qweight, scale, bits).to(dtype)
    return dequantize_weight(qweight, scale, bits, dtype)


class _QuantizedLinearFn(torch.autograd.Function):
    """y = x @ W.T + b with frozen quantized W; backward gives grad_x = grad_y @ W (and grad_b)."""

    @staticmethod
    def forward(ctx, x, qweight, scale, bias, bits, backend):
        ctx.save_for_backward(qweight, scale)
        ctx.bits = bits
        return _forward(backend, x, qweight, scale, bias, bits)

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
        return grad_x, None, None, grad_b, None, None


def quantized_linear(x, qweight, scale, bias, bits, backend=None):
    """y[..., out] = x[..., in] @ dequantize(qweight, scale).T + bias, in x's dtype, by `backend` (default: the
    one of x's device)."""
    backend = backend or backend_for(x.device)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _QuantizedLinearFn.apply(x, qweight, scale, bias, bits, backend)
    return _forward(backend, x, qweight, scale, bias, bits)


# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """Drop-in for nn.Linear with a frozen int8/int4 weight. Constructed empty (to be filled by
    load_state_dict, as for THUDM/chatglm-6b-int4), or from an nn.Linear with `from_linear`."""

    def __init__(self, bits, in_features, out_features, bias=True, dtype=torch.half, device=None):
        super().__init__()
        check_bits(bits, in_features)
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
        return quantized_linear(x, self.weight, self.weight_scale, self.bias, self.bits,
                                placed_backend(self, self.weight))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bits={self.bits}, bias={self.bias is not None}"


class QuantizedEmbedding(nn.Module):
    """nn.Embedding with an int8/int4 table (the -int4-qe variant): weight int8 [vocab, dim * bits // 8],
    weight_scale [vocab]. Looks rows up, then dequantizes only those rows (output in the scale's dtype)."""

    def __init__(self, bits, num_embeddings, embedding_dim, dtype=torch.half, device=None):
        super().__init__()
        check_bits(bits, embedding_dim)
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
    check_bits(bits)
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
        prepare_cpu_kernels()  # `model.quantize(4)` on CPU, as users of the original write it: ready now
    return model
