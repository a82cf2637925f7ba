"""End-to-end CPU speed and memory per dtype, through generate() (what chat() and stream_chat() run) and the
serving engine: decode ms/token (batch 1, KV cache, steady state) against the memory-bandwidth roofline, time to
first token for several prompt lengths, the step time of 1 to 16 rows decoding together, weight bytes, peak RSS.

    python benchmarks/bench_decode.py                      # demo checkpoint, every dtype
    python benchmarks/bench_decode.py --model 6b --dtypes bf16,int8,int4,int4-qe --prompt-lengths 128,512,1024
                                                           # ChatGLM-6B-shaped, random weights built in memory;
                                                           # -qe: with --quantize-embeddings

Every configuration runs in its own process, so that its peak RSS is its own. fp32 6B (24.7 GB) does not fit
in this machine's 24 GiB and is skipped. CHATGLM_ACTIVATIONS=int8x2|int8|fp32 (how the int8/int4 kernels take their
input) and CHATGLM_CPU_ISA reach every configuration.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch
from tqdm import tqdm
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks.bench_matmul import peaks  # noqa: E402
from benchmarks.common import machine_summary, peak_rss, read_bandwidth  # noqa: E402
from chatglm_6b import kernels  # noqa: E402
from chatglm_6b.configuration_chatglm import ChatGLMConfig  # noqa: E402
from chatglm_6b.modeling_chatglm import CACHE_FIELD, ChatGLMForConditionalGeneration  # noqa: E402
from chatglm_6b.quantization import (LAYER_LINEARS, QuantizedLinear, quantize, rows_per_block,  # noqa: E402
                                     set_quantized_weight)
from runtime.engine import GenerationEngine  # noqa: E402
from runtime.loading import load_model_and_tokenizer, release_freed_memory  # noqa: E402
from runtime.options import DTYPES  # noqa: E402

# dtypes of --dtypes that are quantized; -qe: with --quantize-embeddings
QUANTIZED = {"int8": 8, "int4": 4, "int8-qe": 8, "int4-qe": 4}


def random_6b(dtype_name: str, tokenizer=None, **config) -> ChatGLMForConditionalGeneration:
    """ChatGLM-6B's shapes with random weights (`config` overrides ChatGLMConfig's defaults, e.g. token ids); with
    a tokenizer, writing only what it shows (write_only_what_the_tokenizer_shows).
    The model is built on the meta device and each tensor is then allocated directly in its final dtype;
    quantized linears are filled a block of rows at a time, so no float copy of the model (nor of one
    linear) exists when an integer dtype is asked for."""
    bits = QUANTIZED.get(dtype_name)
    dtype = torch.bfloat16 if bits else DTYPES[dtype_name]
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(ChatGLMConfig(**config))

    def materialize(module, name, std=None):
        meta = getattr(module, name)
        tensor = torch.empty(meta.shape, dtype=dtype)
        if std is None:  # layer norms: weight 1, bias 0
            tensor.fill_(1.0 if name == "weight" else 0.0)
        else:
            tensor.normal_(0, std)
        setattr(module, name, torch.nn.Parameter(tensor, requires_grad=False))

    materialize(model.transformer.word_embeddings, "weight", std=0.02)
    model.lm_head.weight = model.transformer.word_embeddings.weight
    for norm in [model.transformer.final_layernorm] + [n for layer in model.transformer.layers
                                                       for n in (layer.input_layernorm, layer.post_attention_layernorm)]:
        materialize(norm, "weight")
        materialize(norm, "bias")
    for layer in tqdm(model.transformer.layers, desc=f"building 6B {dtype_name}"):
        rotary = layer.attention.rotary_emb
        rotary.inv_freq = rotary.compute_inv_freq()
        for parent_name, name in LAYER_LINEARS:
            parent = getattr(layer, parent_name)
            linear = getattr(parent, name)
            if bits:  # random rows quantized a block at a time: no float copy of the whole linear exists
                linear = QuantizedLinear(bits, linear.in_features, linear.out_features, dtype=dtype)
                linear.bias.zero_()
                step = rows_per_block(linear.in_features)
                block = torch.empty(step, linear.in_features, dtype=dtype)
                for n0 in range(0, linear.out_features, step):
                    rows = slice(n0, min(n0 + step, linear.out_features))
                    set_quantized_weight(linear, block[:rows.stop - n0].normal_(0, 0.02), dtype, rows)
                setattr(parent, name, linear)
                release_freed_memory()
            else:
                materialize(linear, "weight", std=0.02)
                materialize(linear, "bias", std=0.0)
    if tokenizer is not None:
        write_only_what_the_tokenizer_shows(model, tokenizer)
    if dtype_name.endswith("-qe"):  # the word embeddings and the tied lm_head too (--quantize-embeddings)
        quantize(model, bits, quantize_embeddings=True)
    return model.eval()


def write_only_what_the_tokenizer_shows(model, tokenizer) -> None:
    """Zeroes the embedding rows (tied to lm_head) of the ids a random model should never write: past the
    tokenizer's vocabulary (the demo tokenizer's, for the 6B shape), its end token (every reply then runs to its
    length) and the ids that decode to nothing visible. Zero rows score 0 while random rows' scores spread around
    it, so these are never the argmax nor in the top 50; the whole lm_head is still read every step."""
    silent = [i for i in range(len(tokenizer)) if not tokenizer.decode([i]).strip()] + [tokenizer.eos_token_id]
    with torch.no_grad():
        model.transformer.word_embeddings.weight[len(tokenizer):] = 0
        model.transformer.word_embeddings.weight[silent] = 0


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def arithmetic(model) -> dict:
    """Multiply-accumulates per token, and the arithmetic they run on (a peak of bench_matmul.peaks, or "quantized":
    the int8 peak times the activations' passes): the layers' linears, lm_head (per row that gets logits) and
    attention (per key a query sees: q.k and the weighted value, 2 x hidden per layer)."""
    def kind(linear):
        if isinstance(linear, QuantizedLinear):
            return "quantized"
        return "bf16" if linear.weight.dtype == torch.bfloat16 else "fp32"

    layers = model.transformer.layers
    linears = [getattr(getattr(layer, parent), name) for layer in layers for parent, name in LAYER_LINEARS]
    head = model.lm_head
    return {"linear_macs": sum(linear.in_features * linear.out_features for linear in linears),
            "linear_kind": kind(linears[0]), "head_macs": head.in_features * head.out_features,
            "head_kind": kind(head), "attention_macs_per_key": 2 * model.config.hidden_size * len(layers),
            "attention_kind": "bf16" if model.dtype == torch.bfloat16 else "fp32",
            "kv_bytes_per_token": 2 * model.config.hidden_size * len(layers) * model.dtype.itemsize}


def arithmetic_seconds(a: dict, peak: dict, tokens: int, logit_rows: int, key_visits: int) -> float:
    """The least time the arithmetic of `tokens` tokens takes at the machine's measured peaks."""
    passes = kernels.ACTIVATION_PASSES[kernels.settings.activations]

    def at_peak(macs, kind):
        if kind == "quantized":
            return macs * passes / peak["int8"] if passes and peak["int8"] else macs / peak["fp32"]
        return macs / peak[kind]
    return (at_peak(a["linear_macs"] * tokens, a["linear_kind"]) + at_peak(a["head_macs"] * logit_rows, a["head_kind"])
            + at_peak(a["attention_macs_per_key"] * key_visits, a["attention_kind"]))


class TokenTimes(BaseStreamer):
    """A generate() streamer that notes when each new token arrives (generate() first puts the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def step_times(times):
    """Seconds between consecutive token times, past the first decoding step."""
    return [b - a for a, b in zip(times[1:], times[2:])]


def median(values):
    return sorted(values)[len(values) // 2]


def random_prompt(model, length: int) -> torch.LongTensor:
    """[1, length] random text ids ending in [gMASK] <sop>, as chat() builds a prompt."""
    prompt = torch.randint(10, min(model.config.vocab_size, 20000), (1, length))
    prompt[0, -2:] = torch.tensor([model.config.gmask_token_id, model.config.bos_token_id])
    return prompt


@torch.inference_mode()
def measure_decode(model, tokenizer, prompt_length: int, decode_steps: int, rounds: int = 3) -> dict:
    """Decode speed through the forward loop (the model alone), through generate() and through the serving
    engine with one request, on the same prompt and the same number of new tokens. The three take turns, `rounds`
    times, so that a change in the machine's speed (another tenant's memory traffic) falls on all alike; each
    figure is the median step over all rounds."""
    prompt = random_prompt(model, prompt_length)
    model(input_ids=prompt[:, :8], use_cache=True)  # warm-up (kernel load, allocator)
    forward_steps, generate_steps, engine_steps = [], [], []
    engine = GenerationEngine(model, tokenizer, max_batch_size=1).start()
    for _ in range(rounds):
        times = [time.perf_counter() for delta in engine.submit(prompt[0].tolist(), prompt_length + decode_steps + 1)
                 if delta.token is not None]
        engine_steps += step_times(times)
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        cache = getattr(out, CACHE_FIELD)
        position_ids, step = model.glm_generation_positions(prompt)
        position_ids = position_ids[..., -1:]
        times = [time.perf_counter()]
        for _ in range(decode_steps):
            token = out.logits[:, -1:].argmax(-1)
            position_ids = position_ids + step
            out = model(input_ids=token, position_ids=position_ids, cache=cache, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter())
        forward_steps += step_times(times)

        streamer = TokenTimes()
        model.generate(prompt, do_sample=False, max_new_tokens=decode_steps + 1, min_new_tokens=decode_steps + 1,
                       streamer=streamer)
        generate_steps += step_times(streamer.times[1:])
    engine.stop()
    return {"forward_ms": median(forward_steps) * 1000, "generate_ms": median(generate_steps) * 1000,
            "engine_ms": median(engine_steps) * 1000}


@torch.inference_mode()
def measure_first_token(model, lengths, rounds: int = 2) -> dict:
    """Seconds from calling generate() to its first new token, per prompt length (median of `rounds`): the
    whole prompt is processed first, and ChatGLM re-processes the whole conversation every turn."""
    ttft = {}
    for length in lengths:
        prompt, times = random_prompt(model, length), []
        for _ in range(rounds):
            streamer = TokenTimes()
            start = time.perf_counter()
            model.generate(prompt, do_sample=False, max_new_tokens=1, streamer=streamer)
            times.append(streamer.times[1] - start)
        ttft[str(length)] = median(times)
    return ttft


def measure_engine(model, tokenizer, rows_list, prompt_length: int, decode_steps: int, lengths) -> dict:
    """Through the serving engine (api.py, web_demo.py): ms per step with `rows` requests decoding together (they
    are submitted at once; once every one of them is decoding, the median gap between the first reply's tokens over
    decode_steps steps is one step of all of them), and the time to the first token of a prompt alone, per length
    (its prefill in the engine's slices)."""
    engine = GenerationEngine(model, tokenizer, max_batch_size=max(rows_list, default=1)).start()
    try:
        steps, ttft = {}, {}
        for rows in rows_list:
            prompt = random_prompt(model, prompt_length)[0].tolist()
            replies = [engine.submit(prompt, max_length=model.config.max_sequence_length) for _ in range(rows)]
            times = []
            for delta in replies[0]:
                if delta.token is not None and all(reply.tokens for reply in replies):
                    times.append(time.perf_counter())
                    if len(times) > decode_steps + 1:
                        break
            for reply in replies:
                reply.cancel()
            steps[str(rows)] = median(step_times(times)) * 1000
        for length in lengths:
            reply = engine.submit(random_prompt(model, length)[0].tolist(), max_length=length + 2)
            start = time.perf_counter()
            next(iter(reply))
            ttft[str(length)] = time.perf_counter() - start
            list(reply)
        return {"step_ms": steps, "engine_ttft_s": ttft}
    finally:
        engine.stop()


def run_one(args) -> dict:
    torch.set_num_threads(args.threads)
    if args.model == "demo":
        bits = QUANTIZED.get(args.one)
        model, tokenizer = load_model_and_tokenizer(device="cpu", dtype=DTYPES.get(args.one, torch.float32),
                                                    quantize=bits, quantize_embeddings=args.one.endswith("-qe"))
    else:
        _, tokenizer = load_model_and_tokenizer(device="cpu")  # the demo tokenizer: the engine decodes the replies
        model = random_6b(args.one, tokenizer)
        if args.one != "fp16":
            from chatglm_6b.kernels import prepare_cpu_kernels

            prepare_cpu_kernels()  # as loading does for these dtypes on the CPU
    lengths = [int(n) for n in args.prompt_lengths.split(",") if n]
    rows = [int(n) for n in args.batch_rows.split(",") if n]
    return {"dtype": args.one, "weight_bytes": weight_bytes(model), "peak_rss": peak_rss(), **arithmetic(model),
            **measure_decode(model, tokenizer, args.prompt_length, args.decode_steps),
            "ttft_s": measure_first_token(model, lengths),
            **measure_engine(model, tokenizer, rows, args.prompt_length, args.decode_steps, lengths)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["demo", "6b"], default="demo")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16,int8,int4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=64, help="prompt of the decoding measurements")
    parser.add_argument("--decode-steps", type=int, default=16, help="decoding steps per round (3 rounds)")
    parser.add_argument("--prompt-lengths", default="128,512", help="prompts timed to the first token (2 rounds)")
    parser.add_argument("--batch-rows", default="1,4,8,16", help="rows decoding together through the engine")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one dtype in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return

    torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth()
    peak = peaks(kernels.cpu_kernels().ops) if kernels.cpu_kernels() else None
    rows = []
    for dtype in tqdm(args.dtypes.split(","), desc="configurations"):
        if args.model == "6b" and dtype == "fp32":
            tqdm.write("fp32 6B: 24.7 GB of weights do not fit in 24 GiB of RAM, skipped")
            continue
        command = [sys.executable, __file__, "--model", args.model, "--one", dtype, "--threads", str(args.threads),
                   "--prompt-length", str(args.prompt_length), "--decode-steps", str(args.decode_steps),
                   "--prompt-lengths", args.prompt_lengths, "--batch-rows", args.batch_rows]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            tqdm.write(f"{dtype}: failed: {result.stderr.strip().splitlines()[-1:]}")
            continue
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))

    print(f"\n{args.model} model, {args.threads} threads, measured read bandwidth {bandwidth:.1f} GB/s, quantized "
          f"kernels' activations {kernels.settings.activations}, CPU kernels built for {kernels.settings.isa}")
    if peak:
        print(f"compute peak on {args.threads} threads: int8 {peak['int8'] / 1e9:.0f}, bf16 {peak['bf16'] / 1e9:.0f}, "
              f"fp32 {peak['fp32'] / 1e9:.0f} GMAC/s (bench_matmul.py's loops)")
    print(machine_summary())
    baseline = next((r for r in rows if r["dtype"] in ("fp32", "bf16")), None)
    print(f"\ndecode ms/token, prompt {args.prompt_length} tokens, {args.decode_steps} steps: median step of "
          f"generate(), of the serving engine with one request and of a bare forward loop, taking turns; "
          f"roofline = weight bytes read per token / bandwidth")
    print(f"{'dtype':<8} {'weights GB':>10} {'peak RSS GB':>11} {'generate':>9} {'engine':>8} {'forward':>8} "
          f"{'gen/fwd':>7} {'eng/fwd':>7} {'roofline ms':>11} {'x roofline':>10} "
          f"{'speed vs ' + (baseline['dtype'] if baseline else '-'):>13}")
    for r in rows:
        roofline = r["weight_bytes"] / (bandwidth * 1e9) * 1000
        speed = f"{baseline['generate_ms'] / r['generate_ms']:.2f}x" if baseline else "-"
        print(f"{r['dtype']:<8} {r['weight_bytes'] / 1e9:>10.3f} {r['peak_rss'] / 1e9:>11.2f} "
              f"{r['generate_ms']:>9.2f} {r['engine_ms']:>8.2f} {r['forward_ms']:>8.2f} "
              f"{r['generate_ms'] / r['forward_ms']:>7.3f} {r['engine_ms'] / r['forward_ms']:>7.3f} "
              f"{roofline:>11.2f} {r['generate_ms'] / roofline:>10.2f} {speed:>13}")
    lengths = args.prompt_lengths.split(",") if args.prompt_lengths else []
    for key, where in (("ttft_s", "generate()"), ("engine_ttft_s", "the serving engine (sliced prefill)")):
        if lengths:
            print(f"\ntime to first token through {where}, s (prompt tokens/s, share of the compute peak: the "
                  f"prompt's arithmetic at the measured peaks / the time)")
            print(f"{'dtype':<8} " + " ".join(f"{n + ' tokens':>25}" for n in lengths))
            for r in rows:
                share = lambda n: (f"{arithmetic_seconds(r, peak, int(n), 1, int(n) ** 2) / r[key][n]:>5.0%}"  # noqa: E731
                                   if peak else "    -")
                print(f"{r['dtype']:<8} " + " ".join(f"{r[key][n]:>8.2f} ({int(n) / r[key][n]:>6.1f}/s, {share(n)})"
                                                     for n in lengths))
    batch = args.batch_rows.split(",") if args.batch_rows else []
    if batch:
        print(f"\nengine step with N rows decoding together, ms (x one row's step), prompt {args.prompt_length} tokens")
        print(f"{'dtype':<8} " + " ".join(f"{n + ' rows':>16}" for n in batch))
        for r in rows:
            one = r["step_ms"][batch[0]]
            print(f"{r['dtype']:<8} " + " ".join(f"{r['step_ms'][n]:>8.1f} ({r['step_ms'][n] / one:.2f}x)"
                                                 for n in batch))
        if peak:
            keys = args.prompt_length + args.decode_steps  # what each row's query sees, about
            print(f"\nengine step roofline, ms: the step's arithmetic at the measured peaks | its bytes (weights, "
                  f"each row's {keys} cached tokens) at the measured bandwidth; the measured step / the larger")
            print(f"{'dtype':<8} " + " ".join(f"{n + ' rows':>24}" for n in batch))
            for r in rows:
                cells = []
                for n in batch:
                    compute = arithmetic_seconds(r, peak, int(n), int(n), int(n) * keys) * 1000
                    memory = (r["weight_bytes"] + int(n) * keys * r["kv_bytes_per_token"]) / (bandwidth * 1e9) * 1000
                    cells.append(f"{compute:>6.1f} | {memory:>5.1f} ({r['step_ms'][n] / max(compute, memory):.2f}x)")
                print(f"{r['dtype']:<8} " + " ".join(f"{cell:>24}" for cell in cells))


if __name__ == "__main__":
    main()
