"""Linear-layer speed on CPU: float weights vs the int8/int4 kernels of chatglm_6b/kernels.py.

It first measures the machine's compute peak on all threads: tight loops of the kernel build's int8
instruction (vpdpbusd with AVX512-VNNI), its bf16 one (vdpbf16ps) and fp32 FMAs. For each weight shape
[out, in] and number of input rows M (1 = decode, 16 = batched steps, 128 = prefill) it prints ms per call,
the weight bytes streamed per second and that rate as a fraction of the measured memory read bandwidth (the
roofline of a weight-streaming GEMV), the multiply-accumulates per second and that rate as a fraction of the
peak of the arithmetic the method runs (the roofline of a compute-bound GEMM), and the speed-up over fp32
F.linear measured in the same run. By default every call uses a different copy of the weight and the copies together exceed
--ws-mb, so weights come from DRAM as in real decoding (a 6B model does not fit in any cache); --hot
reuses one weight (cache resident, flatters small weights).

    python benchmarks/bench_matmul.py [--threads 2] [--ws-mb 512] [--hot] [--seconds 0.3]
    CHATGLM_CPU_ISA=avx2 python benchmarks/bench_matmul.py    # the AVX2 build's paths, on a CPU with more
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks.common import machine_summary, read_bandwidth  # noqa: E402
from chatglm_6b import quantization as Q  # noqa: E402
from chatglm_6b.kernels import ACTIVATION_PASSES, cpu_kernels  # noqa: E402


def pool(make, nbytes, args):
    """Enough copies of one weight (tuple of tensors) that their total size exceeds the working set."""
    base = make()
    n = 1 if args.hot else max(1, min(64, -(-args.ws_mb * 2**20 // nbytes)))
    return [base] + [tuple(t.clone() for t in base) for _ in range(n - 1)]


def timeit(fn, weights, seconds, batches=5):
    """Seconds per call: best mean over `batches` batches, which filters out other load on the box."""
    for w in weights[:2]:
        fn(*w)  # warm-up (and first-call allocations)
    best, i = float("inf"), 0
    for _ in range(batches):
        calls, t0 = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - t0 < seconds / batches:
            fn(*weights[i % len(weights)])
            calls, i = calls + 1, i + 1
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


# The arithmetic each method runs, whose peak its GEMM rate is measured against, and that arithmetic's products per
# multiply-accumulate of the GEMM (int8x2 activations take two int8 passes).
ARITHMETIC = {"ours int8 (int8x2 x)": ("int8", 2), "ours int4 (int8x2 x)": ("int8", 2),
              "ours int8 (int8 x)": ("int8", 1), "ours int4 (int8 x)": ("int8", 1), "bf16 F.linear": ("bf16", 1),
              "ours bf16": ("bf16", 1), "torch._weight_int8pack_mm (bf16 x)": ("bf16", 1)}


def peaks(kernels, iterations=5_000_000, repeats=3):
    """kind -> the best of a few peak_macs runs, multiply-accumulates per second."""
    return {kind: max(kernels.peak_macs(kind, iterations) for _ in range(repeats)) for kind in ("int8", "bf16", "fp32")}


def methods(N, K, M):
    """name -> (weight factory, weight bytes, fn(*weight) using an input of M rows)."""
    torch.manual_seed(0)
    w32 = torch.randn(N, K) * 0.02
    x = torch.randn(M, K)
    xb, xh = x.bfloat16(), x.half()
    q8, s8 = Q.quantize_weight(w32, 8)
    q4, s4 = Q.quantize_weight(w32, 4)
    s8f, s4f, s8b = s8.float(), s4.float(), s8.bfloat16()
    k = cpu_kernels().ops
    ours = lambda bits, integer: (lambda q, s: k.linear(x, q, s, None, bits, integer))  # noqa: E731
    return {
        "fp32 F.linear": (lambda: (w32,), N * K * 4, lambda w: F.linear(x, w)),
        "bf16 F.linear": (lambda: (w32.bfloat16(),), N * K * 2, lambda w: F.linear(xb, w)),
        "ours bf16": (lambda: (w32.bfloat16(),), N * K * 2, lambda w: k.bf16_linear(xb, w, None)),
        "fp16 F.linear": (lambda: (w32.half(),), N * K * 2, lambda w: F.linear(xh, w)),
        "torch._weight_int8pack_mm (bf16 x)": (lambda: (q8, s8b), N * K,
                                               lambda q, s: torch._weight_int8pack_mm(xb, q, s)),
        "ours int8 (int8x2 x)": (lambda: (q8, s8f), N * K, ours(8, ACTIVATION_PASSES["int8x2"])),
        "ours int8 (int8 x)": (lambda: (q8, s8f), N * K, ours(8, ACTIVATION_PASSES["int8"])),
        "ours int8 (fp32 x)": (lambda: (q8, s8f), N * K, ours(8, ACTIVATION_PASSES["fp32"])),
        "ours int4 (int8x2 x)": (lambda: (q4, s4f), N * K // 2, ours(4, ACTIVATION_PASSES["int8x2"])),
        "ours int4 (int8 x)": (lambda: (q4, s4f), N * K // 2, ours(4, ACTIVATION_PASSES["int8"])),
        "ours int4 (fp32 x)": (lambda: (q4, s4f), N * K // 2, ours(4, ACTIVATION_PASSES["fp32"])),
        "torch fallback int4 (dequant+mm)": (lambda: (q4, s4f), N * K // 2,
                                             lambda q, s: Q.reference_linear(x, q, s, None, 4)),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ws-mb", type=int, default=512, help="working set per method (> L3 size)")
    ap.add_argument("--hot", action="store_true", help="reuse one weight (cache resident)")
    ap.add_argument("--seconds", type=float, default=0.3, help="measuring time per row")
    ap.add_argument("--skip-fp16", action="store_true", help="skip fp16 F.linear (slow on most CPUs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    print(machine_summary())
    t = time.perf_counter()
    assert cpu_kernels(), "CPU kernel did not compile"
    print(f"kernel: {cpu_kernels().description}")
    print(f"kernel load/compile: {time.perf_counter() - t:.1f} s, threads: {torch.get_num_threads()}, "
          f"weights: {'hot (one copy)' if args.hot else f'cold (>= {args.ws_mb} MB rotating copies)'}")
    bw = read_bandwidth()
    print(f"measured read bandwidth (1 GiB, best of tensor.sum / fp32 GEMV): {bw:.1f} GB/s")
    peak = peaks(cpu_kernels().ops)
    print("measured compute peak, all threads (tight loop of one instruction): "
          + ", ".join(f"{kind} {rate / 1e9:.0f} GMAC/s" for kind, rate in peak.items()))

    cases = [((N, K), M) for (N, K) in ((4096, 4096), (16384, 4096)) for M in (1, 16, 128)]
    names = [n for n in methods(8, 8, 1) if not (args.skip_fp16 and n.startswith("fp16"))]
    rows, fp32_ms = [], {}
    with torch.inference_mode(), tqdm(total=len(cases) * len(names), desc="measuring", leave=False) as bar:
        for (N, K), M in cases:
            ms = methods(N, K, M)
            for name in names:
                make, nbytes, fn = ms[name]
                bar.set_postfix_str(f"{N}x{K} M={M} {name}")
                sec = timeit(fn, pool(make, nbytes, args), args.seconds)
                if name.startswith("fp32"):
                    fp32_ms[(N, K, M)] = sec * 1e3
                rows.append((f"{N}x{K}", M, name, sec * 1e3, nbytes / sec / 1e9))
                bar.update()

    head = (f"{'weight':>10} {'M':>3}  {'method':<36} {'ms/call':>9} {'GB/s':>7} {'of BW':>6} {'GMAC/s':>7} "
            f"{'of peak':>8} {'vs fp32':>8}")
    print(head + "\n" + "-" * len(head))
    for shape, M, name, ms, gbs in rows:
        N, K = map(int, shape.split("x"))
        macs = M * N * K / (ms / 1e3)
        kind, products = ARITHMETIC.get(name, ("fp32", 1))
        print(f"{shape:>10} {M:>3}  {name:<36} {ms:>9.3f} {gbs:>7.1f} {gbs / bw:>6.0%} {macs / 1e9:>7.1f} "
              f"{macs * products / peak[kind]:>8.0%} {fp32_ms[(N, K, M)] / ms:>7.2f}x")
    print("GB/s = weight bytes / time; 'of BW' = that rate / measured read bandwidth; GMAC/s = M*N*K / time; "
          "'of peak' = that rate times the products per MAC (2 for int8x2 x) / the measured peak of the method's "
          "arithmetic (int8 for int8 x, bf16 for bf16, else fp32); 'vs fp32' = fp32 time / this time (same run).")


if __name__ == "__main__":
    main()
