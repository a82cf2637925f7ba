"""Serving throughput and latency through the real server: starts api.py, drives 1, 4 and 16 concurrent
clients (half streaming, half not, greedy), and prints aggregate completion tokens/s, p50/p99 time to first
token and time between streamed tokens, and the server's resident memory; then, with --soak N, N more
requests to show whether its memory stays flat.

    python benchmarks/bench_serving.py                          # the demo checkpoint
    python benchmarks/bench_serving.py --model 6b-int4          # ChatGLM-6B-shaped, random INT4 weights
    python benchmarks/bench_serving.py --ray-replicas 2         # api.py --ray-replicas 2 (threads split among them)

The 6B-shaped checkpoint is written once (about 4.4 GB, in the original -int4 layout: config with
quantization_bit 4, packed int8 weights and their scales, bf16 embeddings) to --cache-dir, with the demo
model's tokenizer: its token ids are the config's, and the embedding rows past the tokenizer's vocabulary (and
of its end token and invisible tokens) are zero, so that the random model only writes visible text the
tokenizer can decode, to the full max_tokens (the whole 130528-row lm_head is still read every step).
"""
import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository root

from benchmarks.common import machine_summary  # noqa: E402
from tools.local_server import LocalServer  # noqa: E402

DEMO = os.path.join(ROOT, "demo_model")
QUESTIONS = ["你好", "介绍一下北京", "什么是人工智能？", "用 Python 实现快速排序", "晚上睡不着怎么办", "谢谢"]


def write_random_6b_int4(path: str) -> None:
    import torch

    from benchmarks.bench_decode import random_6b
    from chatglm_6b.tokenization_chatglm import ChatGLMTokenizer
    from runtime.loading import save_checkpoint

    tokenizer = ChatGLMTokenizer.from_pretrained(DEMO)
    with open(os.path.join(DEMO, "config.json")) as f:
        demo = json.load(f)
    ids = {name: demo[name] for name in ("bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id",
                                         "pad_token_id")}
    torch.manual_seed(0)
    model = random_6b("int4", **ids)
    # Rows of zeros score 0 while the random rows' scores spread around it, so that these are never the argmax
    # (nor in the top 50): ids past the tokenizer's vocabulary, the end token (every reply runs to max_tokens)
    # and the ids that decode to nothing visible (a reply of those would stream no text to time).
    silent = [i for i in range(len(tokenizer)) if not tokenizer.decode([i]).strip()] + [tokenizer.eos_token_id]
    with torch.no_grad():
        model.transformer.word_embeddings.weight[len(tokenizer):] = 0
        model.transformer.word_embeddings.weight[silent] = 0
    model.config.quantization_bit, model.quantized = 4, True
    save_checkpoint(model, tokenizer, path)


def percentile(values, q):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def one_request(url: str, question: str, max_tokens: int, stream: bool) -> dict:
    """A greedy request; for a streamed one, when each content chunk arrived."""
    body = {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": max_tokens,
            "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}
    started = time.perf_counter()
    reply = requests.post(url + "/v1/chat/completions", json=body, stream=stream, timeout=3600)
    reply.raise_for_status()
    if not stream:
        return {"tokens": reply.json()["usage"]["completion_tokens"], "arrivals": [], "started": started,
                "ended": time.perf_counter()}
    arrivals, tokens = [], 0
    for line in reply.iter_lines():
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            arrivals.append(time.perf_counter())
    return {"tokens": tokens, "arrivals": arrivals, "started": started, "ended": time.perf_counter()}


def drive(url: str, clients: int, requests_per_client: int, max_tokens: int) -> list:
    """`clients` threads, each sending its requests one after another; client i streams when i is even."""
    def client(i):
        return [one_request(url, QUESTIONS[(i + k) % len(QUESTIONS)], max_tokens, stream=i % 2 == 0)
                for k in range(requests_per_client)]

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return [result for results in pool.map(client, range(clients)) for result in results]


def memory_kb(pid: int, field: str) -> int:
    """VmRSS or VmHWM of a process and all its descendants (Ray's replicas are the server's children)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except OSError:
                pass
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            with open(f"/proc/{current}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith(field + ":")), 0)
        except OSError:
            pass
    return total


def wait_until_serving(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(url + "/health", timeout=10).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not become healthy in {timeout} s")
        time.sleep(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["demo", "6b-int4"], default="demo")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/chatglm-6b-bench"))
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests-per-client", type=int, default=None, help="default: 6 (demo), 2 (6B)")
    parser.add_argument("--max-tokens", type=int, default=None, help="per request; default: 128 (demo), 32 (6B)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in all (split among Ray replicas)")
    parser.add_argument("--ray-replicas", type=int, default=0, help="serve with api.py --ray-replicas N")
    parser.add_argument("--dtype", default=None, help="api.py --dtype; default: bf16 for 6b-int4 (the README's CPU "
                                                      "command: its fp32 lm_head would be read at a fraction of "
                                                      "the bandwidth for a few rows), the loader's for demo")
    parser.add_argument("--soak", type=int, default=0, help="then this many more requests (16 clients), to "
                                                            "watch the server's memory")
    args = parser.parse_args()
    six_b = args.model == "6b-int4"
    requests_per_client = args.requests_per_client or (2 if six_b else 6)
    max_tokens = args.max_tokens or (32 if six_b else 128)
    path = DEMO
    if six_b:
        path = os.path.join(args.cache_dir, "random-6b-int4")
        if not os.path.isfile(os.path.join(path, "config.json")):
            print(f"writing the 6B-shaped INT4 checkpoint to {path} (once) ...", flush=True)
            write_random_6b_int4(path)

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    log = os.path.join(args.cache_dir, f"bench_serving_{args.model}.log")
    os.makedirs(args.cache_dir, exist_ok=True)
    server_args = ["--model-path", path, "--max-batch-size", str(args.max_batch_size), "--max-queue", "256"]
    dtype = args.dtype or ("bf16" if six_b else None)
    if dtype:
        server_args += ["--dtype", dtype]
    if args.ray_replicas:
        server_args += ["--ray-replicas", str(args.ray_replicas),
                        "--ray-num-cpus", str(args.threads / args.ray_replicas)]
        env["RAY_USAGE_STATS_ENABLED"] = "0"
    server = LocalServer(os.path.join(ROOT, "api.py"), server_args, log_path=log, env=env)
    try:
        wait_until_serving(server.url, timeout=1800)
        for _ in range(2 * max(1, args.ray_replicas)):  # warm-up (kernel load, first allocations), every replica
            one_request(server.url, "你好", 4, stream=False)
        print(machine_summary())
        replicas = f"{args.ray_replicas} Ray Serve replicas, " if args.ray_replicas else ""
        print(f"model: {args.model} ({path}{', ' + dtype if dtype else ''}), {replicas}{args.threads} threads, "
              f"--max-batch-size {args.max_batch_size}, "
              f"{requests_per_client} requests per client of at most {max_tokens} tokens, greedy, half the "
              "clients streaming\n")
        print("| clients | completion tokens/s | vs 1 client | TTFT p50 / p99 (s) | between tokens p50 / p99 (ms) "
              "| server RSS (GB) |")
        print("| --- | --- | --- | --- | --- | --- |")
        baseline = None
        for clients in [int(c) for c in args.clients.split(",")]:
            started = time.perf_counter()
            results = drive(server.url, clients, requests_per_client, max_tokens)
            elapsed = time.perf_counter() - started
            rate = sum(r["tokens"] for r in results) / elapsed
            baseline = baseline or rate
            streamed = [r for r in results if r["arrivals"]]
            ttft = [r["arrivals"][0] - r["started"] for r in streamed]
            gaps = [(b - a) * 1000 for r in streamed for a, b in zip(r["arrivals"], r["arrivals"][1:])]
            rss = memory_kb(server.process.pid, "VmRSS") / 2**20
            print(f"| {clients} | {rate:.1f} | {rate / baseline:.2f}x | {percentile(ttft, 50):.2f} / "
                  f"{percentile(ttft, 99):.2f} | {percentile(gaps, 50):.0f} / {percentile(gaps, 99):.0f} | "
                  f"{rss:.2f} |", flush=True)
        print(f"\nserver peak RSS: {memory_kb(server.process.pid, 'VmHWM') / 2**20:.2f} GB")
        if args.soak:
            print(f"\nsoak: {args.soak} requests from 16 clients; server RSS (GB) after each quarter:")
            marks = [memory_kb(server.process.pid, "VmRSS") / 2**20]
            for _ in range(4):
                drive(server.url, 16, -(-args.soak // 64), 16)  # 16 clients x this x 4 >= soak
                marks.append(memory_kb(server.process.pid, "VmRSS") / 2**20)
            print(" -> ".join(f"{m:.3f}" for m in marks), f"(spread {max(marks) - min(marks):.3f} GB, "
                  f"median {statistics.median(marks):.3f})")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
