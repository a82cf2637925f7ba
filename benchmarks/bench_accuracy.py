"""Accuracy of every CPU compute path against fp32 on the demo checkpoint: the share of response positions of the
whole demo corpus where the next-token argmax equals fp32's, and whether the greedy reply to 你好 is fp32's.

    python benchmarks/bench_accuracy.py
    python benchmarks/bench_accuracy.py --outliers   # activation quantization on a model with outlier channels

--outliers: real 6B-scale activations have a few hidden channels 20-60x the median magnitude (LLM.int8(),
Dettmers et al. 2022); the demo model and random weights have none. `with_outlier_channels` gives the demo
model some without changing its function: the input of each layer's attention `dense` is linear in V, so a few
value rows of `query_key_value` are multiplied by s and the matching input columns of `dense` divided by s.
Each activation scheme is then applied to the inputs of every linear of the layers (float weights, so that only
the activations differ) and compared with fp32 activations: argmax agreement and the largest logit difference
over the corpus' response positions. The last rows run the real INT4 kernel with each activation setting.

Rows: bf16 (the CPU kernel's bf16 products), INT8/INT4 with the default activations (int8x2), with one int8 pass
and with fp32 activations, and both with --quantize-embeddings (word embeddings and the tied lm_head quantized too, the
original's -qe format at 4 bits).
"""
import argparse
import copy
import os
import sys
from typing import Callable, Dict, List

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks.common import machine_summary  # noqa: E402
from chatglm_6b import kernels  # noqa: E402
from runtime.loading import load_model_and_tokenizer  # noqa: E402
from tools.train_demo_model import encode_example, load_corpus  # noqa: E402

HELLO = "你好"


def argmax_agreement(reference, other, tokenizer, examples) -> float:
    """Share of response positions where `other`'s next-token argmax equals `reference`'s (two callables taking
    input_ids=, e.g. two models)."""
    agree = total = 0
    with torch.no_grad():
        for _, query, history, response in examples:
            input_ids, labels = encode_example(tokenizer, query, history, response)
            ids = torch.tensor([input_ids])
            scored = torch.tensor(labels[1:]) != -100
            a = reference(input_ids=ids).logits[0, :-1].argmax(-1)[scored]
            b = other(input_ids=ids).logits[0, :-1].argmax(-1)[scored]
            agree += int((a == b).sum())
            total += int(scored.sum())
    return agree / total


CONFIGURATIONS = [  # name, load options, the quantized kernels' activations (kernels.ACTIVATION_PASSES)
    ("bf16", dict(dtype=torch.bfloat16), "int8x2"),
    ("int8", dict(quantize=8), "int8x2"),
    ("int8, int8 activations", dict(quantize=8), "int8"),
    ("int8, fp32 activations", dict(quantize=8), "fp32"),
    ("int8 + embeddings", dict(quantize=8, quantize_embeddings=True), "int8x2"),
    ("int4", dict(quantize=4), "int8x2"),
    ("int4, int8 activations", dict(quantize=4), "int8"),
    ("int4, fp32 activations", dict(quantize=4), "fp32"),
    ("int4 + embeddings (-qe)", dict(quantize=4, quantize_embeddings=True), "int8x2"),
]


# ---- outlier channels ----------------------------------------------------------------------------------

OUTLIER_CHANNELS = 4  # per layer, at the input of the attention's dense
OUTLIER_RATIO = 40.0  # their magnitude over the median channel's, in the middle of LLM.int8()'s 20-60x


def dense_inputs(model, tokenizer, examples) -> List[torch.Tensor]:
    """Each layer's dense input over some corpus tokens, [tokens, hidden] per layer."""
    seen: Dict[int, List[torch.Tensor]] = {}
    hooks = [layer.attention.dense.register_forward_pre_hook(
        lambda module, args, i=i: seen.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1]).detach()))
        for i, layer in enumerate(model.transformer.layers)]
    with torch.no_grad():
        for _, query, history, response in examples:
            model(input_ids=torch.tensor([encode_example(tokenizer, query, history, response)[0]]))
    for hook in hooks:
        hook.remove()
    return [torch.cat(seen[i]) for i in range(len(model.transformer.layers))]


def with_outlier_channels(model, tokenizer, examples, channels: int = OUTLIER_CHANNELS,
                          ratio: float = OUTLIER_RATIO) -> List[float]:
    """Scales, in place, `channels` value channels per layer so that their typical magnitude at the dense input is
    `ratio` times the median channel's, and divides dense's matching input columns by the same factor: the model
    computes the same function (up to rounding). Returns each layer's resulting max-channel / median-channel ratio
    (of mean magnitudes over the calibration tokens)."""
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    before = dense_inputs(model, tokenizer, examples)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer, x in zip(model.transformer.layers, before):
            magnitude = x.abs().mean(0)  # [hidden]
            picked = torch.randperm(len(magnitude), generator=generator)[:channels]
            factors = ratio * magnitude.median() / magnitude[picked]
            qkv, dense = layer.attention.query_key_value, layer.attention.dense
            for channel, factor in zip(picked.tolist(), factors.tolist()):
                head, d = divmod(channel, head_dim)
                row = head * 3 * head_dim + 2 * head_dim + d  # v of this head and dim in qkv's output
                qkv.weight[row] *= factor
                if qkv.bias is not None:
                    qkv.bias[row] *= factor
                dense.weight[:, channel] /= factor
    after = dense_inputs(model, tokenizer, examples)
    return [float(x.abs().mean(0).max() / x.abs().mean(0).median()) for x in after]


def quantized_groups(x: torch.Tensor, group: int, passes: int = 1) -> torch.Tensor:
    """x with each run of `group` values along its last dim (group 0: the whole row) quantized to symmetric int8 by
    its absolute maximum and back, in the CPU kernel's arithmetic: scaled by 127 / absmax (a true division: a Python
    number over a tensor would be a reciprocal, then a product) and rounded to nearest; passes=2 adds the kernel's
    second int8 pass, the first one's rounding error at 1/256 of its scale."""
    shape = x.shape
    g = shape[-1] if group == 0 else group
    blocks = x.reshape(-1, shape[-1] // g, g)
    amax = blocks.abs().amax(-1, keepdim=True)
    scaled = blocks * torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax))
    first = torch.round(scaled)
    if passes == 2:
        first = first + torch.round((scaled - first) * 256).clamp(-127, 127) / 256
    return (first * (amax / 127)).reshape(shape)


def outliers_in_bf16(x: torch.Tensor, group: int = 128, threshold: float = 6.0) -> torch.Tensor:
    """LLM.int8()'s decomposition: the channels where some token exceeds `threshold` times that token's RMS stay in
    bf16, the rest are quantized per `group` with those channels zeroed."""
    rows = x.reshape(-1, x.shape[-1])
    rms = rows.pow(2).mean(-1, keepdim=True).sqrt()
    outlier = (rows.abs() > threshold * rms).any(0)
    kept = torch.where(outlier, rows, torch.zeros_like(rows))
    rest = quantized_groups(torch.where(outlier, torch.zeros_like(rows), rows), group)
    return (rest + kept.bfloat16().float()).reshape(x.shape)


SCHEMES: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "fp32": lambda x: x,
    "bf16": lambda x: x.bfloat16().float(),
    "int8 per 128, two passes (int8x2)": lambda x: quantized_groups(x, 128, passes=2),
    "int8 per 128 (int8)": lambda x: quantized_groups(x, 128),
    "int8 per 32": lambda x: quantized_groups(x, 32),
    "int8 per token": lambda x: quantized_groups(x, 0),
    "int8 per 128, outliers in bf16": outliers_in_bf16,
}


class ActivationScheme:
    """While active, every linear of the model's layers sees its input passed through `scheme`."""

    def __init__(self, model, scheme: Callable[[torch.Tensor], torch.Tensor]):
        self.linears = [module for layer in model.transformer.layers for module in layer.modules()
                        if isinstance(module, torch.nn.Linear)]
        self.scheme, self.hooks = scheme, []

    def __enter__(self):
        self.hooks = [linear.register_forward_pre_hook(lambda module, args: (self.scheme(args[0]),) + args[1:])
                      for linear in self.linears]
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()


def logits_over(model, tokenizer, examples) -> List[torch.Tensor]:
    """The next-token logits at every response position of each example."""
    out = []
    with torch.no_grad():
        for _, query, history, response in examples:
            input_ids, labels = encode_example(tokenizer, query, history, response)
            scored = torch.tensor(labels[1:]) != -100
            out.append(model(input_ids=torch.tensor([input_ids])).logits[0, :-1][scored].float())
    return out


def compare(reference: List[torch.Tensor], other: List[torch.Tensor]):
    """(argmax agreement, largest |logit difference|)."""
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(reference, other))
    total = sum(len(a) for a in reference)
    return agree / total, max(float((a - b).abs().max()) for a, b in zip(reference, other))


def outlier_study():
    torch.set_num_threads(2)
    default_activations = kernels.settings.activations
    model, tokenizer = load_model_and_tokenizer(device="cpu")
    examples = load_corpus()
    plain = logits_over(model, tokenizer, examples)
    without = {}  # each scheme on the unchanged model, for comparison
    for name, scheme in tqdm(SCHEMES.items(), desc="schemes, no outliers"):
        with ActivationScheme(model, scheme):
            without[name] = compare(plain, logits_over(model, tokenizer, examples))
    ratios = with_outlier_channels(model, tokenizer, examples)
    reference = logits_over(model, tokenizer, examples)
    print(f"\ndemo checkpoint with {OUTLIER_CHANNELS} outlier channels per layer at the attention dense's input "
          f"(same function: argmax agreement with the unchanged model {compare(plain, reference)[0] * 100:.2f}%)")
    print("largest channel / median channel (mean magnitudes) per layer: " + ", ".join(f"{r:.0f}x" for r in ratios))
    print(machine_summary())
    rows = []
    for name, scheme in tqdm(SCHEMES.items(), desc="schemes"):
        with ActivationScheme(model, scheme):
            rows.append((name, *compare(reference, logits_over(model, tokenizer, examples))))
    kernels.settings.activations = "fp32"
    int4 = copy.deepcopy(model).quantize(4)  # the same outlier channels, then INT4 weights
    int4_fp32 = logits_over(int4, tokenizer, examples)
    rows.append(("INT4 kernel, fp32 activations", *compare(reference, int4_fp32)))
    for activations in ("int8x2", "int8"):
        kernels.settings.activations = activations
        int4_logits = logits_over(int4, tokenizer, examples)
        rows.append((f"INT4 kernel, {activations} activations", *compare(reference, int4_logits)))
        rows.append(("  the same, against INT4 fp32 activations", *compare(int4_fp32, int4_logits)))
    kernels.settings.activations = default_activations
    print(f"{'activations (float weights unless named)':<44} {'agreement':>9} {'max |logit diff|':>17} "
          f"{'without outliers: agreement':>28} {'max |logit diff|':>17}")
    for name, agreement, error in rows:
        plain_agreement, plain_error = without.get(name, (None, None))
        tail = f" {plain_agreement * 100:>27.2f}% {plain_error:>17.4f}" if plain_agreement is not None else ""
        print(f"{name:<44} {agreement * 100:>8.2f}% {error:>17.4f}{tail}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outliers", action="store_true", help="activation schemes on a model with outlier channels")
    if parser.parse_args().outliers:
        outlier_study()
        return
    torch.set_num_threads(2)
    reference, tokenizer = load_model_and_tokenizer(device="cpu")
    examples = load_corpus()
    hello = reference.chat(tokenizer, HELLO, do_sample=False)[0]
    rows = []
    default_activations = kernels.settings.activations
    for name, options, activations in tqdm(CONFIGURATIONS, desc="configurations"):
        kernels.settings.activations = activations
        model, _ = load_model_and_tokenizer(device="cpu", **options)
        rows.append((name, argmax_agreement(reference, model, tokenizer, examples),
                     model.chat(tokenizer, HELLO, do_sample=False)[0] == hello))
    kernels.settings.activations = default_activations
    print(f"\ndemo checkpoint, {len(examples)} corpus examples, argmax agreement with fp32 over their responses")
    loaded = kernels.loaded_cpu_kernels()
    print(machine_summary() + f"; CPU kernel: {loaded.description if loaded else 'not loaded'}")
    print(f"{'configuration':<26} {'agreement':>9} {HELLO + ' reply = fp32':>14}")
    for name, agreement, same in rows:
        print(f"{name:<26} {agreement * 100:>8.2f}% {'yes' if same else 'no':>14}")


if __name__ == "__main__":
    main()
