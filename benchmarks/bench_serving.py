"""Serving throughput and latency through the real server: starts api.py and drives concurrent clients over
HTTP (greedy; half of the clients stream). Two workloads:

    short        each client asks independent one-line questions (no history), one after another
    multi-turn   each client holds a seeded conversation and asks --turns more questions, its history growing
                 turn by turn (the history goes back each time: GLM re-reads it); half of the clients start
                 from 256-1024 tokens of history, the other half from none; clients arrive --arrival-gap apart

For each (workload, client count) it prints aggregate completion tokens/s, time to first token and time between
streamed tokens (p50/p99), and the server's memory, and `ideal_tokens_per_s`: that run's completion tokens ÷
(its prompt tokens at the single-client prefill rate + the longest client's decode steps at the step time of
that many rows decoding together), i.e. prefill done one prompt after another, decode perfectly batched, no other
cost. The prefill rate and the step times are measured first, through the same server (a long prompt alone; n
streams decoding together).

    python benchmarks/bench_serving.py                                # demo checkpoint, both workloads
    python benchmarks/bench_serving.py --model 6b-int4 --clients 1,16 # ChatGLM-6B-shaped, random INT4 weights
    python benchmarks/bench_serving.py --workload multi-turn --json   # one JSON object per (workload, clients)
    python benchmarks/bench_serving.py --ray-replicas 2               # api.py --ray-replicas 2
    python benchmarks/bench_serving.py --server-root ../old-checkout  # the api.py of another checkout

The 6B-shaped checkpoint is written once (about 4.4 GB, in the original -int4 layout: config with
quantization_bit 4, packed int8 weights and their scales, bf16 embeddings) to --cache-dir, with the demo
model's tokenizer: its token ids are the config's, and the embedding rows past the tokenizer's vocabulary (and
of its end token and invisible tokens) are zero, so that the random model only writes visible text the
tokenizer can decode, to the full max_tokens (the whole 130528-row lm_head is still read every step).
"""
import argparse
import concurrent.futures
import glob
import json
import os
import random
import re
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository root

from benchmarks.common import machine_summary  # noqa: E402
from tools.local_server import LocalServer  # noqa: E402

DEMO = os.path.join(ROOT, "demo_model")
QUESTIONS = ["你好", "介绍一下北京", "什么是人工智能？", "用 Python 实现快速排序", "晚上睡不着怎么办", "谢谢",
             "能再详细一点吗？", "用英文说一下", "举个例子", "总结一下我们刚才聊的内容"]
# Half of the multi-turn clients start with this much history (tokens), drawn per client.
LONG_HISTORY_TOKENS = (256, 1024)


def write_random_6b_int4(path: str) -> None:
    import torch

    from benchmarks.bench_decode import random_6b
    from chatglm_6b.tokenization_chatglm import ChatGLMTokenizer
    from runtime.saving import save_checkpoint

    tokenizer = ChatGLMTokenizer.from_pretrained(DEMO)
    with open(os.path.join(DEMO, "config.json")) as f:
        demo = json.load(f)
    ids = {name: demo[name] for name in ("bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id",
                                         "pad_token_id")}
    torch.manual_seed(0)
    model = random_6b("int4", tokenizer, **ids)  # visible text to the full max_tokens
    model.config.quantization_bit, model.quantized = 4, True
    save_checkpoint(model, tokenizer, path)


def percentile(values, q):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


@dataclass
class Exchange:
    """One request as the client saw it."""
    started: float
    ended: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    text: str = ""
    arrivals: List[float] = field(default_factory=list)  # when each streamed content chunk came


def one_request(url: str, messages: list, max_tokens: int, stream: bool) -> Exchange:
    """A greedy chat completion; for a streamed one, when each content chunk arrived."""
    body = {"messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {})}
    exchange = Exchange(started=time.perf_counter())
    reply = requests.post(url + "/v1/chat/completions", json=body, stream=stream, timeout=7200)
    reply.raise_for_status()
    if not stream:
        answer = reply.json()
        exchange.text = answer["choices"][0]["message"]["content"]
        usage = answer["usage"]
    else:
        usage, parts = {}, []
        for line in reply.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                exchange.arrivals.append(time.perf_counter())
                parts.append(chunk["choices"][0]["delta"]["content"])
        exchange.text = "".join(parts)
    exchange.ended = time.perf_counter()
    exchange.prompt_tokens, exchange.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
    return exchange


def corpus_pairs() -> list:
    with open(os.path.join(ROOT, "data", "demo_corpus", "single_turn.jsonl"), encoding="utf-8") as f:
        return [(item["prompt"], item["response"]) for item in map(json.loads, f)]


def seeded_history(rng: random.Random, tokens: int, tokenizer, pairs: list) -> list:
    """Earlier (question, answer) turns from the demo corpus until the prompt is about `tokens` long."""
    from chatglm_6b.modeling_chatglm import encode_chat

    history = []
    while len(encode_chat(tokenizer, "", history)) < tokens:
        history.append(rng.choice(pairs))
    return history


def as_messages(history: list, question: str) -> list:
    messages = []
    for asked, answered in history:
        messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    return messages + [{"role": "user", "content": question}]


class Workload:
    """What each client asks. `requests` is how many requests a client sends (one after another)."""

    def __init__(self, name: str, requests: int, max_tokens: int, arrival_gap: float, tokenizer=None):
        self.name, self.requests, self.max_tokens, self.arrival_gap = name, requests, max_tokens, arrival_gap
        self.tokenizer, self.pairs = tokenizer, corpus_pairs() if name == "multi-turn" else None

    def client(self, url: str, i: int) -> List[Exchange]:
        rng = random.Random(i)
        stream = i % 2 == 0
        if self.name == "short":
            return [one_request(url, [{"role": "user", "content": QUESTIONS[(i + k) % len(QUESTIONS)]}],
                                self.max_tokens, stream) for k in range(self.requests)]
        history = seeded_history(rng, rng.randint(*LONG_HISTORY_TOKENS), self.tokenizer, self.pairs) \
            if i % 2 == 0 else []
        exchanges = []
        for _ in range(self.requests):
            question = rng.choice(QUESTIONS)
            exchanges.append(one_request(url, as_messages(history, question), self.max_tokens, stream))
            history.append((question, exchanges[-1].text))
        return exchanges

    def drive(self, url: str, clients: int) -> List[List[Exchange]]:
        """`clients` threads, client i starting i * arrival_gap seconds after the first; its exchanges each."""
        def run(i):
            time.sleep(i * self.arrival_gap)
            return self.client(url, i)

        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            return list(pool.map(run, range(clients)))


def memory_kb(pid: int, field_name: str) -> int:
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
                total += next((int(line.split()[1]) for line in f if line.startswith(field_name + ":")), 0)
        except OSError:
            pass
    return total


class PeakRss:
    """The highest VmRSS of the server's process tree, sampled while a run goes on (VmHWM would also keep the
    peak of earlier runs, and of the model's loading)."""

    def __init__(self, pid: int, every: float = 0.2):
        self.pid, self.every, self.peak = pid, every, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self):
        while not self.done.wait(self.every):
            self.peak = max(self.peak, memory_kb(self.pid, "VmRSS"))

    def __enter__(self):
        self.peak = memory_kb(self.pid, "VmRSS")
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


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


def kv_cache_gb(url: str) -> Optional[float]:
    """The server's KV cache budget, from /metrics (None where the server does not report one)."""
    found = re.search(r"^chatglm_kv_cache_bytes (\S+)$", requests.get(url + "/metrics", timeout=30).text, re.M)
    return float(found.group(1)) / 2**30 if found else None


def weights_gb(path: str) -> float:
    return sum(os.path.getsize(f) for pattern in ("*.safetensors", "*.bin")
               for f in glob.glob(os.path.join(path, pattern))) / 2**30


def prefill_rate(url: str, tokenizer, tokens: int) -> float:
    """Prompt tokens per second of one request alone with a prompt of about `tokens` tokens (one reply token:
    the time is its prefill)."""
    history = seeded_history(random.Random(12345), tokens, tokenizer, corpus_pairs())
    exchange = one_request(url, as_messages(history, "你好"), 1, stream=False)
    return exchange.prompt_tokens / (exchange.ended - exchange.started)


def step_time(url: str, rows: int, tokens: int = 24) -> float:
    """Seconds per decoding step with `rows` streams decoding together (median gap between streamed tokens,
    short prompts, all started at once)."""
    with concurrent.futures.ThreadPoolExecutor(rows) as pool:
        exchanges = list(pool.map(lambda i: one_request(url, [{"role": "user", "content": QUESTIONS[i % 6]}],
                                                        tokens, stream=True), range(rows)))
    # only the gaps while every stream was running: after the last one started, before the first one ended
    start = max(e.arrivals[0] for e in exchanges if e.arrivals)
    end = min(e.arrivals[-1] for e in exchanges if e.arrivals)
    gaps = [b - a for e in exchanges for a, b in zip(e.arrivals, e.arrivals[1:]) if a >= start and b <= end]
    return statistics.median(gaps or [b - a for e in exchanges for a, b in zip(e.arrivals, e.arrivals[1:])])


def measure(workload: Workload, url: str, clients: int, pid: int, rate: float, steps: dict) -> dict:
    with PeakRss(pid) as rss:
        started = time.perf_counter()
        per_client = workload.drive(url, clients)
        elapsed = time.perf_counter() - started
    exchanges = [e for client in per_client for e in client]
    completion = sum(e.completion_tokens for e in exchanges)
    prompt = sum(e.prompt_tokens for e in exchanges)
    longest = max(sum(e.completion_tokens for e in client) for client in per_client)
    streamed = [e for e in exchanges if e.arrivals]
    ttft = [e.arrivals[0] - e.started for e in streamed]
    gaps = [(b - a) * 1000 for e in streamed for a, b in zip(e.arrivals, e.arrivals[1:])]
    return {"workload": workload.name, "clients": clients, "tokens_per_s": completion / elapsed,
            "ideal_tokens_per_s": completion / (prompt / rate + longest * steps[clients]),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_ms": percentile(gaps, 50), "itl_p99_ms": percentile(gaps, 99), "itl_max_ms": max(gaps or [0]),
            "server_rss_gb": rss.peak / 2**20, "completion_tokens": completion, "prompt_tokens": prompt,
            "seconds": elapsed}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["demo", "6b-int4"], default="demo")
    parser.add_argument("--workload", default="short,multi-turn", help="short, multi-turn, or both")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/chatglm-6b-bench"))
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests-per-client", type=int, default=None, help="short: default 6 (demo), 2 (6B)")
    parser.add_argument("--turns", type=int, default=3, help="multi-turn: questions per client")
    parser.add_argument("--arrival-gap", type=float, default=None,
                        help="multi-turn: seconds between clients' arrivals (default: 3 for 6B, 0.2 for demo)")
    parser.add_argument("--max-tokens", type=int, default=None, help="per request; default: 128 (demo), 32 (6B)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in all (split among Ray replicas)")
    parser.add_argument("--ray-replicas", type=int, default=0, help="serve with api.py --ray-replicas N")
    parser.add_argument("--dtype", default=None, help="api.py --dtype; default: bf16 for 6b-int4 (the README's CPU "
                                                      "command: its fp32 lm_head would be read at a fraction of "
                                                      "the bandwidth for a few rows), the loader's for demo")
    parser.add_argument("--server-root", default=ROOT, help="the checkout whose api.py serves (to compare commits)")
    parser.add_argument("--server-args", default="", help="more api.py options, e.g. '--max-step-tokens 8'")
    parser.add_argument("--json", action="store_true", help="one JSON object per (workload, clients), no table")
    parser.add_argument("--soak", type=int, default=0, help="then this many more requests (16 clients), to "
                                                            "watch the server's memory")
    args = parser.parse_args()
    six_b = args.model == "6b-int4"
    max_tokens = args.max_tokens or (32 if six_b else 128)
    requests_per_client = args.requests_per_client or (2 if six_b else 6)
    arrival_gap = args.arrival_gap if args.arrival_gap is not None else (3.0 if six_b else 0.2)
    client_counts = [int(c) for c in args.clients.split(",")]
    path = DEMO
    if six_b:
        path = os.path.join(args.cache_dir, "random-6b-int4")
        if not os.path.isfile(os.path.join(path, "config.json")):
            print(f"writing the 6B-shaped INT4 checkpoint to {path} (once) ...", file=sys.stderr, flush=True)
            write_random_6b_int4(path)
    from chatglm_6b.tokenization_chatglm import ChatGLMTokenizer

    tokenizer = ChatGLMTokenizer.from_pretrained(path)
    workloads = [Workload(name, requests_per_client if name == "short" else args.turns, max_tokens,
                          0.0 if name == "short" else arrival_gap, tokenizer) for name in args.workload.split(",")]

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    log = os.path.join(args.cache_dir, f"bench_serving_{args.model}.log")
    os.makedirs(args.cache_dir, exist_ok=True)
    server_args = ["--model-path", path, "--max-batch-size", str(args.max_batch_size), "--max-queue", "256",
                   *args.server_args.split()]
    dtype = args.dtype or ("bf16" if six_b else None)
    if dtype:
        server_args += ["--dtype", dtype]
    if args.ray_replicas:
        server_args += ["--ray-replicas", str(args.ray_replicas),
                        "--ray-num-cpus", str(args.threads / args.ray_replicas)]
        env["RAY_USAGE_STATS_ENABLED"] = "0"
    server = LocalServer(os.path.join(args.server_root, "api.py"), server_args, log_path=log, env=env,
                         cwd=args.server_root)
    say = (lambda *a, **k: print(*a, **k, file=sys.stderr)) if args.json else print
    try:
        wait_until_serving(server.url, timeout=1800)
        for _ in range(2 * max(1, args.ray_replicas)):  # warm-up (kernel load, first allocations), every replica
            one_request(server.url, [{"role": "user", "content": "你好"}], 4, stream=False)
        say(machine_summary())
        rate = prefill_rate(server.url, tokenizer, 512)
        steps = {n: step_time(server.url, n) for n in sorted(set(client_counts))}
        kv_gb, w_gb = kv_cache_gb(server.url), weights_gb(path)
        replicas = f"{args.ray_replicas} Ray Serve replicas, " if args.ray_replicas else ""
        say(f"model: {args.model} ({path}{', ' + dtype if dtype else ''}), {replicas}{args.threads} threads, "
            f"--max-batch-size {args.max_batch_size} {args.server_args}; server: {args.server_root}\n"
            f"at most {max_tokens} tokens per reply, greedy, half the clients streaming; short: "
            f"{requests_per_client} requests per client; multi-turn: {args.turns} turns per client, arriving "
            f"{arrival_gap:g} s apart\nsingle-client prefill {rate:.1f} tokens/s (a 512-token prompt); decoding step "
            + ", ".join(f"{steps[n] * 1000:.0f} ms with {n} rows" for n in sorted(steps))
            + f"; weights {w_gb:.2f} GB, KV cache budget "
            + ("not reported" if kv_gb is None else f"{kv_gb:.2f} GB") + "\n")
        if not args.json:
            print("| workload | clients | completion tokens/s | vs 1 client | ideal tokens/s (achieved) | "
                  "TTFT p50 / p99 (s) | between tokens p50 / p99 / max (ms) | server peak RSS (GB) |")
            print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for workload in workloads:
            baseline = None
            for clients in client_counts:
                row = measure(workload, server.url, clients, server.process.pid, rate, steps)
                row.update(weights_gb=w_gb, kv_cache_gb=kv_gb)
                baseline = baseline or row["tokens_per_s"]
                if args.json:
                    print(json.dumps(row), flush=True)
                    continue
                print(f"| {row['workload']} | {clients} | {row['tokens_per_s']:.2f} | "
                      f"{row['tokens_per_s'] / baseline:.2f}x | {row['ideal_tokens_per_s']:.2f} "
                      f"({row['tokens_per_s'] / row['ideal_tokens_per_s']:.0%}) | {row['ttft_p50_s']:.2f} / "
                      f"{row['ttft_p99_s']:.2f} | {row['itl_p50_ms']:.0f} / {row['itl_p99_ms']:.0f} / "
                      f"{row['itl_max_ms']:.0f} | {row['server_rss_gb']:.2f} |", flush=True)
        if args.soak:
            say(f"\nsoak: {args.soak} requests from 16 clients; server RSS (GB) after each quarter:")
            marks = [memory_kb(server.process.pid, "VmRSS") / 2**20]
            soak = Workload("short", -(-args.soak // 64), 16, 0.0)  # 16 clients x this x 4 >= soak
            for _ in range(4):
                soak.drive(server.url, 16)
                marks.append(memory_kb(server.process.pid, "VmRSS") / 2**20)
            say(" -> ".join(f"{m:.3f}" for m in marks), f"(spread {max(marks) - min(marks):.3f} GB, "
                f"median {statistics.median(marks):.3f})")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
