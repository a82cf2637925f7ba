"""What every benchmark prints and measures alike: the machine it ran on, the memory read bandwidth (the
roofline of weight-streaming decoding) and a process's peak resident memory."""
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F


def read_bandwidth(mb=1024, reps=5):
    """Best streaming-read rate (GB/s) over a buffer far larger than the caches: max of tensor.sum
    and of an fp32 GEMV (MKL's GEMV streams slightly faster than the reduction)."""
    buf = torch.ones(mb * 2**20 // 4)
    mat, x = buf.view(-1, 4096), torch.ones(1, 4096)
    best = 0.0
    for fn in (buf.sum, lambda: F.linear(x, mat)) * reps:
        fn()
        t = time.perf_counter()
        fn()
        best = max(best, buf.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return best


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16",
              "amx_int8", "asimd", "sve")


def machine_summary() -> str:
    """CPU model, the SIMD features that matter for these kernels, and the load average (a busy second
    core slows OpenMP kernels several times): printed with every table."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    simd = " ".join(flag for flag in SIMD_FLAGS if flag in flags) or "none of " + ",".join(SIMD_FLAGS)
    return f"CPU: {model}, {os.cpu_count()} logical cores; SIMD: {simd}; load average: {load}"


def peak_rss() -> int:
    """This process's peak resident set size in bytes. On Linux from /proc (VmHWM starts afresh at exec,
    while getrusage's ru_maxrss carries the parent's peak into a child process)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
