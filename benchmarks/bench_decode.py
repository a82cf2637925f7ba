"""End-to-end CPU speed and memory per dtype: decode ms/token (batch 1, KV cache, steady state), prefill
tokens/s, weight bytes, peak RSS, and each decode time against the memory-bandwidth roofline.

    python benchmarks/bench_decode.py                      # demo checkpoint, every dtype
    python benchmarks/bench_decode.py --model 6b --dtypes bf16,int8,int4
                                                           # ChatGLM-6B-shaped, random weights built in memory

Every configuration runs in its own process, so that its peak RSS is its own. fp32 6B (24.7 GB) does not fit
in this machine's 24 GiB and is skipped.
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

from benchmarks.common import machine_summary, peak_rss, read_bandwidth  # noqa: E402
from chatglm_6b.configuration_chatglm import ChatGLMConfig  # noqa: E402
from chatglm_6b.modeling_chatglm import CACHE_FIELD, ChatGLMForConditionalGeneration  # noqa: E402
from chatglm_6b.quantization import LAYER_LINEARS, QuantizedLinear, rows_per_block, set_quantized_weight  # noqa: E402
from runtime.loading import load_model_and_tokenizer, release_freed_memory  # noqa: E402
from runtime.options import DTYPES  # noqa: E402

def random_6b(dtype_name: str, **config) -> ChatGLMForConditionalGeneration:
    """ChatGLM-6B's shapes with random weights (`config` overrides ChatGLMConfig's defaults, e.g. token ids).
    The model is built on the meta device and each tensor is then allocated directly in its final dtype;
    quantized linears are filled a block of rows at a time, so no float copy of the model (nor of one
    linear) exists when an integer dtype is asked for."""
    bits = {"int8": 8, "int4": 4}.get(dtype_name)
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
    return model.eval()


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


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


@torch.inference_mode()
def measure(model, prompt_length: int, decode_steps: int, rounds: int = 3) -> dict:
    """Prefill and decode speed through the forward loop (the model alone) and through generate() (what
    chat() and stream_chat() run), on the same prompt and the same number of new tokens. The two take
    turns, `rounds` times, so that a change in the machine's speed (another tenant's memory traffic)
    falls on both alike; each figure is the median step over all rounds."""
    vocab = model.config.vocab_size
    prompt = torch.randint(10, min(vocab, 20000), (1, prompt_length))
    prompt[0, -2:] = torch.tensor([model.config.gmask_token_id, model.config.bos_token_id])
    model(input_ids=prompt[:, :8], use_cache=True)  # warm-up (kernel compile/load, allocator)
    prefills, forward_steps, generate_steps, first_tokens = [], [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        prefills.append(prompt_length / (time.perf_counter() - start))
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
        start = time.perf_counter()
        model.generate(prompt, do_sample=False, max_new_tokens=decode_steps + 1, min_new_tokens=decode_steps + 1,
                       streamer=streamer)
        first_tokens.append(streamer.times[1] - start)
        generate_steps += step_times(streamer.times[1:])
    return {"prefill_tok_s": median(prefills), "forward_ms": median(forward_steps) * 1000,
            "generate_ttft_s": median(first_tokens), "generate_ms": median(generate_steps) * 1000}


def run_one(args) -> dict:
    torch.set_num_threads(args.threads)
    if args.model == "demo":
        bits = {"int8": 8, "int4": 4}.get(args.one)
        model, _ = load_model_and_tokenizer(device="cpu", dtype=DTYPES.get(args.one, torch.float32),
                                            quantize=bits)
    else:
        model = random_6b(args.one)
    return {"dtype": args.one, "weight_bytes": weight_bytes(model), "peak_rss": peak_rss(),
            **measure(model, args.prompt_length, args.decode_steps)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["demo", "6b"], default="demo")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16,int8,int4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--decode-steps", type=int, default=16, help="decoding steps per round (3 rounds)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one dtype in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return

    torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth()
    rows = []
    for dtype in tqdm(args.dtypes.split(","), desc="configurations"):
        if args.model == "6b" and dtype == "fp32":
            tqdm.write("fp32 6B: 24.7 GB of weights do not fit in 24 GiB of RAM, skipped")
            continue
        command = [sys.executable, __file__, "--model", args.model, "--one", dtype, "--threads", str(args.threads),
                   "--prompt-length", str(args.prompt_length), "--decode-steps", str(args.decode_steps)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            tqdm.write(f"{dtype}: failed: {result.stderr.strip().splitlines()[-1:]}")
            continue
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))

    print(f"\n{args.model} model, {args.threads} threads, prompt {args.prompt_length} tokens, "
          f"{args.decode_steps} decoding steps, measured read bandwidth {bandwidth:.1f} GB/s")
    print(machine_summary())
    baseline = next((r for r in rows if r["dtype"] in ("fp32", "bf16")), None)
    print("decode ms/tok: median step of generate() (what chat()/stream_chat() run) and of a bare forward loop")
    print(f"{'dtype':<6} {'weights GB':>10} {'peak RSS GB':>11} {'prefill tok/s':>13} {'generate':>9} "
          f"{'forward':>8} {'gen/fwd':>7} {'roofline ms':>11} {'x roofline':>10} "
          f"{'speed vs ' + (baseline['dtype'] if baseline else '-'):>13}")
    for r in rows:
        roofline = r["weight_bytes"] / (bandwidth * 1e9) * 1000
        speed = f"{baseline['generate_ms'] / r['generate_ms']:.2f}x" if baseline else "-"
        print(f"{r['dtype']:<6} {r['weight_bytes'] / 1e9:>10.3f} {r['peak_rss'] / 1e9:>11.2f} "
              f"{r['prefill_tok_s']:>13.1f} {r['generate_ms']:>9.2f} {r['forward_ms']:>8.2f} "
              f"{r['generate_ms'] / r['forward_ms']:>7.3f} {roofline:>11.2f} {r['generate_ms'] / roofline:>10.2f} "
              f"{speed:>13}")

if __name__ == "__main__":
    main()
