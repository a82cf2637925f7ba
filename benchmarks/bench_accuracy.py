"""Accuracy of every CPU compute path against fp32 on the demo checkpoint: the share of response positions of the
whole demo corpus where the next-token argmax equals fp32's, and whether the greedy reply to 你好 is fp32's.

    python benchmarks/bench_accuracy.py

Rows: bf16 (the CPU kernel's bf16 products), INT8/INT4 with int8 activations (the integer path) and with fp32
activations, and both with --quantize-embeddings (word embeddings and the tied lm_head quantized too, the
original's -qe format at 4 bits).
"""
import os
import sys

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


CONFIGURATIONS = [  # name, load options, integer activations
    ("bf16", dict(dtype=torch.bfloat16), True),
    ("int8", dict(quantize=8), True),
    ("int8, fp32 activations", dict(quantize=8), False),
    ("int8 + embeddings", dict(quantize=8, quantize_embeddings=True), True),
    ("int4", dict(quantize=4), True),
    ("int4, fp32 activations", dict(quantize=4), False),
    ("int4 + embeddings (-qe)", dict(quantize=4, quantize_embeddings=True), True),
]


def main():
    torch.set_num_threads(2)
    reference, tokenizer = load_model_and_tokenizer(device="cpu")
    examples = load_corpus()
    hello = reference.chat(tokenizer, HELLO, do_sample=False)[0]
    rows = []
    for name, options, integer in tqdm(CONFIGURATIONS, desc="configurations"):
        kernels.settings.integer_activations = integer
        model, _ = load_model_and_tokenizer(device="cpu", **options)
        rows.append((name, argmax_agreement(reference, model, tokenizer, examples),
                     model.chat(tokenizer, HELLO, do_sample=False)[0] == hello))
    kernels.settings.integer_activations = True
    print(f"\ndemo checkpoint, {len(examples)} corpus examples, argmax agreement with fp32 over their responses")
    loaded = kernels.loaded_cpu_kernels()
    print(machine_summary() + f"; CPU kernel: {loaded.description if loaded else 'not loaded'}")
    print(f"{'configuration':<26} {'agreement':>9} {HELLO + ' reply = fp32':>14}")
    for name, agreement, same in rows:
        print(f"{name:<26} {agreement * 100:>8.2f}% {'yes' if same else 'no':>14}")


if __name__ == "__main__":
    main()
