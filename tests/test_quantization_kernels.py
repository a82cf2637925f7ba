"""Tests for chatglm_6b/quantization.py: checkpoint format, CPU kernel vs reference, autograd,
torch fallback, and quantize() model surgery. The first run compiles the C++ kernel (~15 s)."""
import pytest
import torch
from torch import nn

from chatglm_6b import kernels as kernel_module
from chatglm_6b import quantization as Q


@pytest.fixture(scope="module")
def kernels():
    k = kernel_module.cpu_kernels()
    assert k, "C++ CPU kernel failed to compile/load"
    return k.ops


@pytest.fixture
def torch_fallback(monkeypatch):
    monkeypatch.setattr(kernel_module.settings, "torch_only", True)


def reference(x, q, s, b, bits):
    y = x.float() @ Q.dequantize_weight(q, s, bits).T
    return y + b.float() if b is not None else y


# ------------------------------------------------------------------------------------------------
# Format
# ------------------------------------------------------------------------------------------------
def test_int4_nibble_order_hand_computed():
    q = torch.tensor([[1, -2, 7, -8], [-1, 3, -8, 0]], dtype=torch.int8)
    # element 2j -> high nibble, 2j+1 -> low nibble (two's complement):
    # (1, -2) -> 0x1E = 30, (7, -8) -> 0x78 = 120, (-1, 3) -> 0xF3 = -13, (-8, 0) -> 0x80 = -128
    packed = Q.pack_int4(q)
    assert packed.dtype == torch.int8
    assert packed.tolist() == [[30, 120], [-13, -128]]
    assert torch.equal(Q.unpack_int4(packed), q)


def test_int4_pack_roundtrip_all_values():
    q = torch.arange(-8, 8, dtype=torch.int8)
    q = torch.cartesian_prod(q, q).to(torch.int8).reshape(1, -1)  # every (hi, lo) pair
    assert torch.equal(Q.unpack_int4(Q.pack_int4(q)), q)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows,cols", [(12, 10), (1000, 2048)])  # the second is quantized in two row blocks
def test_quantize_weight_format(bits, rows, cols):
    torch.manual_seed(0)
    w = torch.randn(rows, cols).half()
    w[3] = 0  # an all-zero row must not produce NaNs
    q, s = Q.quantize_weight(w, bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and q.shape == (rows, cols * bits // 8)
    assert s.dtype == torch.float16 and s.shape == (rows,)
    assert torch.equal(s, (w.abs().max(dim=-1).values / qmax).half())
    expected = torch.round(w / s[:, None]).nan_to_num(0).to(torch.int8)
    unpacked = Q.unpack_int4(q) if bits == 4 else q
    assert torch.equal(unpacked, expected) and unpacked.abs().max() <= qmax
    err = (Q.dequantize_weight(q, s, bits) - w.float()).abs()
    # half a step, plus the fp16 rounding of w / scale (the original's arithmetic): 1/32 of a step near 127
    assert (err <= s.float()[:, None] * (0.5 + 2 ** -5) + 1e-6).all()


# ------------------------------------------------------------------------------------------------
# CPU kernel vs dequantized reference
# ------------------------------------------------------------------------------------------------
SHAPES = [(1, 4096, 4096), (1, 37, 130), (3, 50, 258), (7, 64, 1000), (16, 33, 1026), (80, 40, 98)]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_kernel_matches_reference_fp32(kernels, monkeypatch, bits, M, N, K):
    monkeypatch.setattr(kernel_module.settings, "activations", "fp32")  # the fp32 path (the only one of a scalar build)
    torch.manual_seed(M * N + K)
    w, b = torch.randn(N, K), torch.randn(N)
    q, s = Q.quantize_weight(w, bits)
    x = torch.randn(M, K)
    y = Q.quantized_linear(x, q, s, b, bits)
    ref = reference(x, q, s, b, bits)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * K ** 0.5)
    y_nb = Q.quantized_linear(x, q, s, None, bits)
    torch.testing.assert_close(y_nb, ref - b, rtol=1e-5, atol=1e-5 * K ** 0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_low_precision_inputs(kernels, bits, dtype):
    torch.manual_seed(1)
    w = torch.randn(70, 322)
    q, s = Q.quantize_weight(w, bits)
    x = torch.randn(2, 5, 322).to(dtype)  # 3-D input, like [seq, batch, hidden]
    b = torch.randn(70).to(dtype)
    y = Q.quantized_linear(x, q, s.to(dtype), b, bits)
    assert y.dtype == dtype and y.shape == (2, 5, 70)
    ref = reference(x.reshape(-1, 322), q, s.to(dtype), b, bits).reshape(2, 5, 70)
    torch.testing.assert_close(y.float(), ref.to(dtype).float(), rtol=1e-2, atol=1e-2)


def same_quantization_reference(x, q, s, b, bits, passes=1):
    """The integer path's arithmetic in torch: x rounded to int8 per block of the kernel's activation_block() values
    (bench_accuracy's activation scheme, written as the kernel computes it), in one or two passes."""
    from benchmarks.bench_accuracy import quantized_groups

    block = kernel_module.cpu_kernels().ops.activation_block()
    return reference(quantized_groups(x.float(), block, passes), q, s, b, bits)


@pytest.fixture(params=["int8", "int8x2"])
def activations(request, monkeypatch):
    """Each integer setting of the kernels, and its number of passes."""
    monkeypatch.setattr(kernel_module.settings, "activations", request.param)
    return kernel_module.ACTIVATION_PASSES[request.param]


needs_integer_path = pytest.mark.skipif(not (kernel_module.cpu_kernels() and kernel_module.cpu_kernels().integer_path),
                                        reason="a build without AVX2 has no integer path")


# Shapes that reach every part of the tiling: a few rows (the row-major kernel, up to 4), sweeps of the decoded tile
# with their tails (5, 13 rows), output rows that do not fill a tile (N % 32), K in two segments of decoded blocks
# (34 blocks of 128: 32 + 2), and input rows in two chunks (520 rows of 4096 values in two passes exceed the 4 MB a
# sweep of the tiles takes).
INTEGER_SHAPES = [(1, 5, 128), (2, 40, 256), (3, 17, 256), (4, 64, 4096), (5, 12, 1024), (13, 70, 512),
                  (16, 33, 1024), (7, 37, 4352), (65, 9, 384), (600, 7, 256), (520, 40, 4096)]


@needs_integer_path
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M,N,K", INTEGER_SHAPES)
def test_integer_path_is_the_int8_activation_arithmetic(kernels, activations, bits, M, N, K):
    torch.manual_seed(M + N + K)
    q, s = Q.quantize_weight(torch.randn(N, K) * 0.02, bits)
    x, b = torch.randn(M, K) * 3, torch.randn(N)
    y = Q.quantized_linear(x, q, s, b, bits)
    torch.testing.assert_close(y, same_quantization_reference(x, q, s, b, bits, activations), rtol=1e-5, atol=1e-5)
    exact = reference(x, q, s, b, bits)  # the fp32 path's result: within the int8 rounding of x
    assert ((y - exact).abs().max() / exact.abs().max()) < (1e-2 if activations == 1 else 1e-4)


@needs_integer_path
@pytest.mark.parametrize("bits", [8, 4])
def test_rows_that_are_not_whole_activation_blocks_take_the_fp32_path(kernels, bits):
    K = kernels.activation_block() + 64
    q, s = Q.quantize_weight(torch.randn(9, K), bits)
    x = torch.randn(3, K)
    torch.testing.assert_close(Q.quantized_linear(x, q, s, None, bits), reference(x, q, s, None, bits),
                               rtol=1e-5, atol=1e-4)


@needs_integer_path
@pytest.mark.parametrize("rows", [3, 7])  # the row-major kernel and the decoded tile
def test_integer_path_takes_strided_low_precision_and_zero_inputs(kernels, activations, rows):
    q, s = Q.quantize_weight(torch.randn(40, 256), 4)
    wide = torch.randn(rows, 512).bfloat16()
    x = wide[:, ::2]  # strided
    x[1] = 0  # an all-zero row: scale 0, output = bias
    b = torch.randn(40)
    y = Q.quantized_linear(x, q, s, b, 4)
    assert y.dtype == torch.bfloat16 and torch.equal(y[1], b.bfloat16())
    torch.testing.assert_close(y.float(), same_quantization_reference(x.float(), q, s, b, 4, activations),
                               rtol=1e-2, atol=1e-2)


@needs_integer_path
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [2, 9])  # the row-major kernel and the decoded tile
def test_integer_path_takes_scales_and_bias_in_the_models_dtype(kernels, activations, dtype, rows):
    """A module holds its scales and bias in the model's dtype: the integer path gives the bits of the same values
    given in fp32, with and without a bias."""
    q, s = Q.quantize_weight(torch.randn(72, 256), 4)
    s, b = s.to(dtype), torch.randn(72).to(dtype)
    x = torch.randn(rows, 256)
    for bias in (b, None):
        given = kernels.linear(x, q, s, bias, 4, activations)
        widened = kernels.linear(x, q, s.float(), None if bias is None else bias.float(), 4, activations)
        assert torch.equal(given, widened)
    assert not torch.equal(kernels.linear(x, q, s, b, 4, activations), kernels.linear(x, q, s, None, 4, activations))


@needs_integer_path
@pytest.mark.parametrize("rows", [2, 9])  # the row-major kernel and the decoded tile
def test_bf16_rows_are_quantized_and_written_as_they_are(kernels, activations, rows):
    """The kernel reads bf16 rows and writes bf16 results itself (no converted copies): the bits are those of the
    fp32 route, which widens x exactly and rounds the fp32 result to nearest even as torch does, ties included."""
    q, s = Q.quantize_weight(torch.randn(96, 384), 4)
    b = torch.randn(96)
    x = torch.randn(rows, 384).bfloat16()
    via_fp32 = Q.quantized_linear(x.float(), q, s, b, 4)
    direct = Q.quantized_linear(x, q, s, b, 4)
    assert direct.dtype == torch.bfloat16 and torch.equal(direct, via_fp32.bfloat16())
    assert (via_fp32.bfloat16().float() != via_fp32).any()  # the rounding was exercised


@needs_integer_path
@pytest.mark.parametrize("bits", [8, 4])
def test_a_row_gives_the_same_result_alone_and_in_a_batch(kernels, activations, bits):
    """Alone a row takes the row-major kernel, in 9 or 13 rows the decoded tile: the same products, exactly."""
    q, s = Q.quantize_weight(torch.randn(70, 512), bits)
    b = torch.randn(70)
    x = torch.randn(13, 512)
    batched = Q.quantized_linear(x, q, s, b, bits)
    assert torch.equal(Q.quantized_linear(x[:9], q, s, b, bits), batched[:9])
    for i in range(13):
        assert torch.equal(Q.quantized_linear(x[i:i + 1], q, s, b, bits), batched[i:i + 1])
    assert torch.equal(Q.quantized_linear(x[3:7], q, s, b, bits), batched[3:7])


@needs_integer_path
def test_two_passes_take_the_first_ones_error_below_bf16s(kernels, monkeypatch):
    """The default int8x2 activations against fp32 activations: a smaller error than rounding x to bf16 gives, on
    inputs with outlier channels (40x, as bench_accuracy --outliers makes them); one int8 pass, a larger one."""
    torch.manual_seed(0)
    q, s = Q.quantize_weight(torch.randn(256, 1024) * 0.02, 4)
    x = torch.randn(24, 1024)
    x[:, [3, 200, 517, 900]] *= 40
    exact = reference(x, q, s, None, 4)
    bf16_error = (reference(x.bfloat16().float(), q, s, None, 4) - exact).abs().max()
    errors = {}
    for setting in ("int8x2", "int8"):
        monkeypatch.setattr(kernel_module.settings, "activations", setting)
        errors[setting] = (Q.quantized_linear(x, q, s, None, 4) - exact).abs().max()
    assert errors["int8x2"] < bf16_error < errors["int8"]


# ------------------------------------------------------------------------------------------------
# bf16 weights (lm_head, bf16 models)
# ------------------------------------------------------------------------------------------------
def bf16_reference(x, w, b):
    """What the kernel computes: bf16 inputs, products and sums in fp32 (more exact than its bf16 output)."""
    y = x.float() @ w.float().T
    return y + b.float() if b is not None else y


@pytest.mark.parametrize("M,N,K", [(1, 7, 33), (1, 4096, 4096), (3, 70, 512), (5, 130, 4096), (16, 9, 1000),
                                   (17, 33, 130), (64, 13, 256)])
def test_bf16_kernel_matches_reference(kernels, M, N, K):
    torch.manual_seed(M * N + K)
    w, x, b = torch.randn(N, K).bfloat16(), torch.randn(M, K).bfloat16(), torch.randn(N).bfloat16()
    for bias in (b, None):
        y = kernels.bf16_linear(x, w, bias)
        assert y.dtype == torch.bfloat16 and y.shape == (M, N)
        ref = bf16_reference(x, w, bias)
        # the output's bf16 rounding (2^-8 relative) plus fp32 sums in another order
        torch.testing.assert_close(y.float(), ref, rtol=2 ** -8, atol=1e-4 * K ** 0.5)


def test_bf16_kernel_takes_strided_3d_and_fp32_inputs(kernels):
    torch.manual_seed(8)
    w = torch.randn(40, 256).bfloat16()
    wide = torch.randn(2, 3, 512).bfloat16()
    x = wide[..., ::2]  # strided, [seq, batch, hidden]-like
    y = kernels.bf16_linear(x, w, None)
    assert y.shape == (2, 3, 40)
    torch.testing.assert_close(y.float(), bf16_reference(x.reshape(-1, 256), w, None).view(2, 3, 40),
                               rtol=2 ** -8, atol=1e-3)
    x32 = torch.randn(4, 256)  # an fp32 input is taken as bf16 (as torch's bf16 matmul needs it) and stays fp32 out
    y32 = kernels.bf16_linear(x32, w, None)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32, bf16_reference(x32.bfloat16(), w, None), rtol=1e-3, atol=1e-3)


def test_bf16_kernel_gives_a_row_the_same_result_alone_and_in_a_batch(kernels):
    w, x = torch.randn(70, 512).bfloat16(), torch.randn(9, 512).bfloat16()
    batched = kernels.bf16_linear(x, w, None)
    for i in range(9):
        assert torch.equal(kernels.bf16_linear(x[i:i + 1], w, None), batched[i:i + 1])


def attention_reference(q, k, v, bias, scale):
    scores = q.float() @ k.float().transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias.float()
    return torch.softmax(scores, -1) @ v.float()


@pytest.mark.parametrize("B,H,L,T,D", [(1, 32, 1, 80, 128), (2, 3, 1, 1, 128), (2, 3, 3, 300, 128), (1, 2, 2, 17, 40)])
def test_decode_attention_reads_cache_views_in_place(kernels, B, H, L, T, D):
    """Keys and values as a growing cache holds them: views of a longer buffer; a padding bias broadcast over
    heads (the engine's blocked columns) or over the batch too."""
    torch.manual_seed(B * T + D)
    q = torch.randn(B, H, L, D).bfloat16()
    k_buffer, v_buffer = torch.randn(B, H, T + 7, D).bfloat16(), torch.randn(B, H, T + 7, D).bfloat16()
    k, v = k_buffer[:, :, :T], v_buffer[:, :, :T]
    assert not k.is_contiguous()
    scale = D ** -0.5
    for bias in (None, torch.zeros(B, 1, L, T), torch.zeros(1, 1, L, T).bfloat16()):
        if bias is not None and T > 1:
            bias[..., : T // 3] = -10000.0  # blocked columns: the model's additive mask value (MASK_FILL_VALUE)
        y = kernels.decode_attention(q, k, v, bias, scale)
        assert y.dtype == torch.bfloat16 and y.shape == (B, H, L, D)
        torch.testing.assert_close(y.float(), attention_reference(q, k, v, bias, scale), rtol=2 ** -7, atol=2e-3)


def paged_reference(q, key_cache, value_cache, tables, rows, visible):
    """Each query over the first visible[i] keys of its row's blocks, gathered by hand."""
    out = []
    for i in range(q.shape[0]):
        blocks = tables[rows[i]].long()
        keys = key_cache[blocks].transpose(0, 1).flatten(1, 2)[:, :visible[i]]  # [H, visible, D]
        values = value_cache[blocks].transpose(0, 1).flatten(1, 2)[:, :visible[i]]
        out.append(attention_reference(q[i][:, None], keys, values, None, q.shape[-1] ** -0.5)[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,D,block", [(4, 20, 16), (32, 128, 16), (2, 64, 5)])
def test_paged_attention_reads_each_querys_blocks(kernels, dtype, H, D, block):
    """Sequences scattered over shuffled blocks; a prefill chunk's queries (more than one group of 8, each seeing
    the whole context or the tokens up to itself) beside decoding queries of other sequences."""
    torch.manual_seed(H * D + block)
    num_blocks, max_blocks = 40, 9
    key_cache, value_cache = (torch.randn(num_blocks, H, block, D).to(dtype) for _ in range(2))
    tables = torch.randperm(num_blocks)[:3 * max_blocks].view(3, max_blocks).int()
    context, length = 11, 19  # row 0: a prompt of 19 tokens whose first 11 every token sees
    rows = [0] * length + [1, 2, 1]
    visible = [max(context, t + 1) for t in range(length)] + [max_blocks * block, 1, 7]
    q = torch.randn(len(rows), H, D).to(dtype)
    rows_t, visible_t = torch.tensor(rows, dtype=torch.int32), torch.tensor(visible, dtype=torch.int32)
    y = kernels.paged_attention(q, key_cache, value_cache, tables, rows_t, visible_t, D ** -0.5)
    assert y.dtype == dtype and y.shape == q.shape
    expected = paged_reference(q, key_cache, value_cache, tables, rows, visible)
    tolerance = {"rtol": 2 ** -7, "atol": 2e-3} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(y.float(), expected, **tolerance)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.paged_attention(q, key_cache, value_cache, tables, rows_t, visible_t + max_blocks * block, 1.0)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_paged_attention_gives_a_query_the_same_result_alone_and_batched(kernels, threads):
    """The kernel splits the work into query groups and head groups sized to the threads (a lone query's heads are
    split, a batch's are not): a query's result does not depend on the split, to the bit."""
    torch.manual_seed(threads)
    H, D, block, num_blocks = 8, 64, 4, 30
    key_cache, value_cache = (torch.randn(num_blocks, H, block, D).bfloat16() for _ in range(2))
    tables = torch.randperm(num_blocks)[:3 * 9].view(3, 9).int()
    rows, visible = [0, 1, 1, 1, 2], [33, 20, 21, 22, 1]  # a decoding query, a prefill slice of 3, a first token
    q = torch.randn(len(rows), H, D).bfloat16()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def attend(index):
            return kernels.paged_attention(q[index], key_cache, value_cache, tables,
                                           torch.tensor([rows[i] for i in index], dtype=torch.int32),
                                           torch.tensor([visible[i] for i in index], dtype=torch.int32), D ** -0.5)

        batched = attend(list(range(len(rows))))
        for i in range(len(rows)):
            assert torch.equal(attend([i])[0], batched[i])
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(batched.float(), paged_reference(q, key_cache, value_cache, tables, rows, visible),
                               rtol=2 ** -7, atol=2e-3)


def test_the_cpu_backend_takes_the_bf16_kernel_only_where_it_applies(kernels, monkeypatch):
    calls = []
    loaded = kernel_module.cpu_kernels()
    spy = type("Spy", (), {"bf16_linear": staticmethod(lambda *a: calls.append(a) or kernels.bf16_linear(*a))})()
    monkeypatch.setattr(loaded, "ops", spy)
    linear = kernel_module.backend_for("cpu").linear
    torch.manual_seed(9)
    w, b = torch.randn(20, 64).bfloat16(), torch.randn(20).bfloat16()
    decode = torch.randn(2, 2, 64).bfloat16()  # 4 rows: the kernel's on every build
    torch.testing.assert_close(linear(decode, w, b), torch.nn.functional.linear(decode, w, b), rtol=2 ** -7, atol=1e-2)
    assert len(calls) == 1
    linear(torch.randn(loaded.bf16_rows + 1, 64).bfloat16(), w, b)  # prefill: torch's GEMM
    linear(decode.float(), w.float(), b.float())                     # fp32: torch
    linear(decode.clone().requires_grad_(), w, b)                    # training: torch (autograd)
    with torch.no_grad():
        linear(decode.clone().requires_grad_(), w, b)                # no grad wanted: the kernel
    assert len(calls) == 2
    monkeypatch.setattr(kernel_module._Build, "kernels", None)  # not loaded yet: never compiled inside a forward pass
    linear(decode, w, b)
    assert kernel_module._Build.kernels is None and len(calls) == 2
    assert loaded.bf16_rows == (kernel_module.BF16_KERNEL_ROWS if loaded.bf16_dot else kernel_module.BF16_KERNEL_ROWS_WIDENING)


def test_a_module_takes_the_backend_of_its_placement(monkeypatch):
    from chatglm_6b.modeling_chatglm import Linear

    backend_for = kernel_module.backend_for
    assert isinstance(backend_for("cpu"), kernel_module.CpuBackend)
    assert isinstance(backend_for("cuda"), kernel_module.CudaBackend) and backend_for("mps") is kernel_module.TORCH_BACKEND
    layer = Linear(8, 4)
    layer(torch.randn(1, 8))
    assert layer._placed_backend[1] is backend_for("cpu")
    monkeypatch.setattr(kernel_module.settings, "torch_only", True)  # CHATGLM_QUANT_FORCE_TORCH=1
    layer(torch.randn(1, 8))
    assert layer._placed_backend[1] is kernel_module.TORCH_BACKEND


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_kernel(kernels, bits):
    q, s = Q.quantize_weight(torch.randn(9, 66), bits)
    assert torch.equal(kernels.dequantize(q, s, bits), Q.dequantize_weight(q, s, bits))


def test_kernel_honours_thread_count(kernels):
    q, s = Q.quantize_weight(torch.randn(256, 512), 4)
    x = torch.randn(3, 512)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = kernels.linear(x, q, s, None, 4, 0)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(y1, kernels.linear(x, q, s, None, 4, 0))  # rows are split, sums are not


# ------------------------------------------------------------------------------------------------
# Torch fallback and autograd
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
def test_fallback_matches_kernel(kernels, torch_fallback, bits):
    torch.manual_seed(2)
    q, s = Q.quantize_weight(torch.randn(50, 258), bits)
    b = torch.randn(50)
    x = torch.randn(4, 258)
    y_fallback = Q.quantized_linear(x, q, s, b, bits)
    y_kernel = kernels.linear(x, q, s, b, bits, 0)
    torch.testing.assert_close(y_fallback, y_kernel, rtol=1e-5, atol=1e-4)
    xb = x.bfloat16()
    assert Q.quantized_linear(xb, q, s, b, bits).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gpu_int8_op_matches_the_reference_on_the_cpu(dtype):
    """The CUDA INT8 path's fused op, torch._weight_int8pack_mm, exists on the CPU too: same op, same layout."""
    torch.manual_seed(10)
    q, s = Q.quantize_weight(torch.randn(70, 256), 8)
    x, b = torch.randn(2, 3, 256).to(dtype), torch.randn(70).to(dtype)
    y = kernel_module.fused_int8_linear(x, q, s.to(dtype), b)
    assert y.dtype == dtype and y.shape == (2, 3, 70)
    ref = reference(x.reshape(-1, 256), q, s.to(dtype), b, 8).view(2, 3, 70)
    tolerance = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(y.float(), ref, **tolerance)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", [8, 4])
def test_a_gpu_call_holds_a_bounded_transient(bits):
    """No dequantized fp16 copy of the whole weight per call: INT4 dequantizes GPU_TRANSIENT_BYTES of rows at a
    time (with its unpacking temporaries, 4x that at most), INT8's fused op none, beyond the output."""
    q, s = Q.quantize_weight(torch.randn(16384, 4096), bits)
    q, s, x = q.cuda(), s.cuda(), torch.randn(8, 4096, dtype=torch.half, device="cuda")
    ref = reference(x.float().cpu(), q.cpu(), s.cpu(), None, bits)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y = Q.quantized_linear(x, q, s.half(), None, bits)
    torch.cuda.synchronize()
    transient = torch.cuda.max_memory_allocated() - base - y.numel() * y.element_size()
    assert transient <= 4 * Q.GPU_TRANSIENT_BYTES, transient  # dequantizing it whole took about 320 MB
    torch.testing.assert_close(y.float().cpu(), ref, rtol=1e-2, atol=5e-2)


@pytest.mark.parametrize("fallback", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
def test_gradient_to_input(kernels, monkeypatch, bits, fallback):
    monkeypatch.setattr(kernel_module.settings, "torch_only", fallback)
    torch.manual_seed(3)
    lin = Q.QuantizedLinear.from_linear(nn.Linear(130, 45).float(), bits)
    x = torch.randn(2, 3, 130, requires_grad=True)
    g = torch.randn(2, 3, 45)
    (lin(x) * g).sum().backward()
    w = Q.dequantize_weight(lin.weight, lin.weight_scale, bits)
    x2 = x.detach().clone().requires_grad_()
    ((x2 @ w.T + lin.bias) * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    assert lin.weight.grad is None and lin.bias.grad is None


# ------------------------------------------------------------------------------------------------
# Modules and quantize()
# ------------------------------------------------------------------------------------------------
class FakeChatGLM(nn.Module):
    """Same attribute structure as ChatGLMForConditionalGeneration."""

    def __init__(self, layers=2, hidden=64, inner=256, vocab=100, tie=True):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.word_embeddings = nn.Embedding(vocab, hidden)
        self.transformer.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.input_layernorm = nn.LayerNorm(hidden)
            layer.attention = nn.Module()
            layer.attention.query_key_value = nn.Linear(hidden, 3 * hidden)
            layer.attention.dense = nn.Linear(hidden, hidden)
            layer.mlp = nn.Module()
            layer.mlp.dense_h_to_4h = nn.Linear(hidden, inner)
            layer.mlp.dense_4h_to_h = nn.Linear(inner, hidden)
            self.transformer.layers.append(layer)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.transformer.word_embeddings.weight

    def forward(self, ids):
        h = self.transformer.word_embeddings(ids)
        for layer in self.transformer.layers:
            a = layer.attention.dense(layer.attention.query_key_value(h)[..., : h.shape[-1]])
            h = h + a + layer.mlp.dense_4h_to_h(torch.relu(layer.mlp.dense_h_to_4h(h)))
        return self.lm_head(h)


LINEAR_KEYS = ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_replaces_exactly_the_right_modules(kernels, bits):
    torch.manual_seed(4)
    model = FakeChatGLM().half()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert Q.quantize(model, bits) is model
    sd = model.state_dict()
    for i in range(2):
        layer = model.transformer.layers[i]
        assert isinstance(layer.input_layernorm, nn.LayerNorm)
        for key in LINEAR_KEYS:
            mod = layer.get_submodule(key)
            assert isinstance(mod, Q.QuantizedLinear)
            p = f"transformer.layers.{i}.{key}"
            w = before[p + ".weight"]
            assert sd[p + ".weight"].dtype == torch.int8
            assert sd[p + ".weight"].shape == (w.shape[0], w.shape[1] * bits // 8)
            assert sd[p + ".weight_scale"].shape == (w.shape[0],)
            assert sd[p + ".weight_scale"].dtype == torch.float16
            assert torch.equal(sd[p + ".bias"], before[p + ".bias"])
            assert not mod.weight.requires_grad
            q, s = Q.quantize_weight(w, bits)
            assert torch.equal(sd[p + ".weight"], q) and torch.equal(sd[p + ".weight_scale"], s)
    # embeddings / lm_head untouched without quantize_embeddings
    assert isinstance(model.transformer.word_embeddings, nn.Embedding)
    assert isinstance(model.lm_head, nn.Linear)
    added = {f"transformer.layers.{i}.{k}.weight_scale" for i in range(2) for k in LINEAR_KEYS}
    assert set(sd) == set(before) | added


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_close_to_float_and_dtype_moves(kernels, bits):
    torch.manual_seed(5)
    model = FakeChatGLM(tie=False)
    ids = torch.randint(0, 100, (2, 7))
    ref = model(ids)
    Q.quantize(model, bits)
    out = model(ids)
    rel = (out - ref).norm() / ref.norm()
    assert rel < (0.02 if bits == 8 else 0.2)
    # .half() / .bfloat16() / .float() / .to() keep the int8 weights int8 and keep working
    for conv in (lambda m: m.half(), lambda m: m.bfloat16(), lambda m: m.to(torch.float32)):
        conv(model)
        qkv = model.transformer.layers[0].attention.query_key_value
        assert qkv.weight.dtype == torch.int8
        x = torch.randn(3, 64).to(qkv.weight_scale.dtype)
        assert qkv(x).dtype == x.dtype
    # back in fp32; only the bf16 round trip of the float params (bias, embeddings) differs
    torch.testing.assert_close(model(ids), out, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("bits", [8, 4])
def test_empty_init_then_load_state_dict(kernels, bits):
    torch.manual_seed(6)
    src = Q.quantize(FakeChatGLM().half(), bits, quantize_embeddings=True)
    dst = Q.quantize(FakeChatGLM().half(), bits, empty_init=True, quantize_embeddings=True)
    for key, t in dst.state_dict().items():
        assert t.shape == src.state_dict()[key].shape and t.dtype == src.state_dict()[key].dtype, key
    dst.load_state_dict(src.state_dict())
    src.float(), dst.float()
    ids = torch.randint(0, 100, (1, 5))
    assert torch.equal(src(ids), dst(ids))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_embeddings(kernels, bits):
    torch.manual_seed(7)
    model = FakeChatGLM(tie=True)
    emb_w = model.transformer.word_embeddings.weight.detach().clone()
    Q.quantize(model, bits, quantize_embeddings=True)
    emb, head = model.transformer.word_embeddings, model.lm_head
    assert isinstance(emb, Q.QuantizedEmbedding) and isinstance(head, Q.QuantizedLinear)
    assert head.bias is None and head.weight is emb.weight  # tied: one quantized table
    sd = model.state_dict()
    assert sd["transformer.word_embeddings.weight"].shape == (100, 64 * bits // 8)
    assert sd["transformer.word_embeddings.weight_scale"].shape == (100,)
    assert {"lm_head.weight", "lm_head.weight_scale"} <= set(sd) and "lm_head.bias" not in sd
    ids = torch.tensor([[0, 5, 99], [3, 3, 42]])
    q, s = Q.quantize_weight(emb_w, bits)
    torch.testing.assert_close(emb(ids), Q.dequantize_weight(q, s, bits)[ids])
    # untied lm_head is quantized on its own
    model = Q.quantize(FakeChatGLM(tie=False), bits, quantize_embeddings=True)
    assert isinstance(model.lm_head, Q.QuantizedLinear)
    assert model.lm_head.weight is not model.transformer.word_embeddings.weight


def test_quantize_accepts_transformer_directly(kernels):
    model = FakeChatGLM()
    Q.quantize(model.transformer, 8)  # original calling convention: quantize(self.transformer, ...)
    assert isinstance(model.transformer.layers[1].mlp.dense_4h_to_h, Q.QuantizedLinear)


def test_compile_failure_falls_back_with_one_warning(tmp_path):
    # fresh process, empty extensions dir and a compiler that does not exist
    import os
    import subprocess
    import sys

    code = (
        "import logging, torch\n"
        "from chatglm_6b import kernels as K, quantization as Q\n"
        "q, s = Q.quantize_weight(torch.randn(8, 16), 4)\n"
        "x = torch.randn(2, 16)\n"
        "y = Q.quantized_linear(x, q, s, None, 4); Q.quantized_linear(x, q, s, None, 4)\n"
        "torch.testing.assert_close(y, x @ Q.dequantize_weight(q, s, 4).T)\n"
        "assert K._Build.kernels is False\n"
    )
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), CXX="/nonexistent/c++")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("CPU kernel unavailable") == 1, r.stderr


def test_kernel_build_is_keyed_by_everything_that_changes_the_binary(monkeypatch):
    flags = ["-O3", "-march=native", "-fopenmp"]
    tag = kernel_module.build_tag(flags)
    assert kernel_module.build_tag(["-O3"]) != tag
    monkeypatch.setattr(kernel_module.torch, "__version__", "0.0.0-other")
    assert kernel_module.build_tag(flags) != tag
    monkeypatch.undo()
    monkeypatch.setattr(kernel_module.sys, "version", "3.0 (another Python)")
    assert kernel_module.build_tag(flags) != tag


def test_the_kernel_is_ready_when_loading_returns(monkeypatch, caplog):
    """--quantize on CPU: the kernel loads (or compiles) while the model loads, with a line saying so,
    not inside the first reply."""
    import logging

    from runtime.loading import load_model_and_tokenizer

    monkeypatch.setattr(kernel_module._Build, "kernels", None)
    with caplog.at_level(logging.WARNING, logger=kernel_module.logger.name):
        load_model_and_tokenizer(device="cpu", quantize=8)
    assert kernel_module._Build.kernels is not None  # decided before any forward pass
    assert "loading the INT8/INT4/bf16 CPU kernel" in caplog.text
    if kernel_module._Build.kernels:
        assert "CPU kernel ready" in caplog.text


def test_model_quantize_on_cpu_readies_the_kernel(monkeypatch, caplog):
    """`model.quantize(4)` as users of the original write it (and the LoRA path): the kernel is ready when it
    returns."""
    import logging

    from runtime.loading import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(device="cpu")
    monkeypatch.setattr(kernel_module._Build, "kernels", None)
    with caplog.at_level(logging.WARNING, logger=kernel_module.logger.name):
        model.quantize(4)
    assert kernel_module._Build.kernels is not None and "loading the INT8/INT4/bf16 CPU kernel" in caplog.text


# ------------------------------------------------------------------------------------------------
# The narrower builds: AVX2 and scalar code, compiled for this CPU on request (CHATGLM_CPU_ISA)
# ------------------------------------------------------------------------------------------------
def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


def test_the_build_has_the_simd_it_was_asked_for(kernels):
    """The build reports what it can do (typed flags), and the log line names its SIMD paths."""
    loaded = kernel_module.cpu_kernels()
    simd = loaded.simd
    if kernel_module.settings.isa == "scalar":
        assert simd.startswith("scalar") and not loaded.integer_path and not loaded.bf16_dot
    elif kernel_module.settings.isa == "avx2":
        assert simd.startswith("AVX2, int8 activations with AVX2,") and loaded.integer_path and not loaded.bf16_dot
    elif {"avx512_vnni", "avx512bw", "avx512_bf16"} <= cpu_flags():  # native, on this kind of CPU
        assert simd == "AVX-512, int8 activations with AVX512-VNNI, bf16 weights with AVX512-BF16"
        assert loaded.integer_path and loaded.bf16_dot
    assert loaded.bf16_dot == ("bf16 weights with AVX512-BF16" in simd)
    assert simd in loaded.description  # the log line says which path runs


def test_peak_loops_report_what_the_build_has():
    """peak_macs: a rate for fp32 and bf16 on every build, for int8 exactly where the integer path is. The rate is
    physical (two cores do well under 10^13 multiply-accumulates a second): a loop the compiler had folded away
    would report far more."""
    built = kernel_module.cpu_kernels()
    for kind in ("fp32", "bf16", "int8"):
        rate = built.ops.peak_macs(kind, 2_000_000)
        assert (1e8 < rate < 1e13) if kind != "int8" or built.integer_path else rate == 0.0, (kind, rate)
    with pytest.raises(RuntimeError, match="kind"):
        built.ops.peak_macs("int4", 10)


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_the_narrower_builds_pass_the_same_tests(isa):
    """Every test above, on the AVX2 build (its maddubs integer path, its widening bf16 path) and on the scalar
    build (no integer path): what a CPU without AVX-512 (or without AVX2) runs."""
    import os
    import subprocess
    import sys

    if kernel_module.settings.isa != "native":
        pytest.skip("already a narrower build")
    if isa == "avx2" and not {"avx2", "fma", "f16c"} <= cpu_flags():
        pytest.skip("this CPU has no AVX2")
    env = dict(os.environ, CHATGLM_CPU_ISA=isa)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                        "-k", "not narrower_builds"], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


def test_the_activation_setting_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("CHATGLM_QUANT_FP32_ACTIVATIONS", raising=False)
    monkeypatch.delenv("CHATGLM_ACTIVATIONS", raising=False)
    assert kernel_module.KernelSettings().activations == "int8x2"
    monkeypatch.setenv("CHATGLM_ACTIVATIONS", "int8")
    assert kernel_module.KernelSettings().activations == "int8"
    monkeypatch.setenv("CHATGLM_QUANT_FP32_ACTIVATIONS", "1")  # the older switch still means fp32
    assert kernel_module.KernelSettings().activations == "fp32"
    monkeypatch.delenv("CHATGLM_QUANT_FP32_ACTIVATIONS")
    monkeypatch.setenv("CHATGLM_ACTIVATIONS", "int4")
    with pytest.raises(ValueError, match="int8x2, int8, fp32"):
        kernel_module.KernelSettings()
