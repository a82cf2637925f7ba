"""Builds the demo checkpoint in demo_model/: trains an ice-style tokenizer on the demo corpus, then a
small ChatGLM from scratch with this repository's own model code, on exactly the prompts chat() builds.

    python tools/train_demo_model.py            # ~20 min on 2 CPU cores, seeded and reproducible
    python tools/train_demo_model.py --eval-only  # re-measure the shipped checkpoint
"""
import argparse
import json
import math
import os
import random
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from chatglm_6b.configuration_chatglm import ChatGLMConfig  # noqa: E402
from chatglm_6b.modeling_chatglm import ChatGLMForConditionalGeneration, build_prompt  # noqa: E402
from chatglm_6b.tokenization_chatglm import ChatGLMTokenizer, glm_training_labels  # noqa: E402
from runtime import ROOT  # noqa: E402
from runtime.loading import DEMO_MODEL_PATH, load_model_and_tokenizer  # noqa: E402
from runtime.saving import save_checkpoint  # noqa: E402
from tools.ice_tokenizer import train_ice_tokenizer  # noqa: E402

CORPUS_DIR = os.path.join(ROOT, "data", "demo_corpus")


def load_corpus():
    """(kind, query, history, response) for every single-turn item and every turn of every conversation."""
    examples = []
    with open(os.path.join(CORPUS_DIR, "single_turn.jsonl"), encoding="utf-8") as f:
        examples += [("single", item["prompt"], [], item["response"]) for item in map(json.loads, f)]
    with open(os.path.join(CORPUS_DIR, "multi_turn.jsonl"), encoding="utf-8") as f:
        for item in map(json.loads, f):
            history = []
            for turn in item["conversation"]:
                examples.append(("multi", turn["prompt"], list(history), turn["response"]))
                history.append((turn["prompt"], turn["response"]))
    return examples


def encode_example(tokenizer, query, history, response):
    """Prompt + [gMASK] <sop> + response + <eop>; labels only on what follows the prompt (as ptuning/)."""
    prompt_ids = tokenizer.encode(build_prompt(query, history), add_special_tokens=False)
    response_ids = tokenizer.encode(response, add_special_tokens=False)
    input_ids = tokenizer.build_inputs_with_special_tokens(prompt_ids, response_ids)
    return input_ids, glm_training_labels(input_ids, tokenizer.bos_token_id)


def batches(encoded, batch_size, rng, pad_id):
    """Shuffled batches of similar length (sorted inside windows of 8 batches), right-padded."""
    order = list(range(len(encoded)))
    rng.shuffle(order)
    window = batch_size * 8
    groups = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: len(encoded[i][0]))
        groups += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(groups)
    for group in groups:
        length = max(len(encoded[i][0]) for i in group)
        input_ids = [encoded[i][0] + [pad_id] * (length - len(encoded[i][0])) for i in group]
        labels = [encoded[i][1] + [-100] * (length - len(encoded[i][1])) for i in group]
        yield torch.tensor(input_ids), torch.tensor(labels)


def evaluate(model, tokenizer, examples):
    """Exact-match rate of greedy chat() against the corpus, single-turn and multi-turn separately."""
    hits = {"single": [0, 0], "multi": [0, 0]}
    failures = []
    for kind, query, history, response in tqdm(examples, desc="evaluating", leave=False):
        answer, _ = model.chat(tokenizer, query, history, do_sample=False)
        hits[kind][0] += answer == response
        hits[kind][1] += 1
        if answer != response:
            failures.append((query, answer, response))
    return {k: (h / n if n else 0.0) for k, (h, n) in hits.items()}, failures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=DEMO_MODEL_PATH)
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-only", action="store_true", help="only measure the checkpoint in --output")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    examples = load_corpus()

    if not args.eval_only:
        started = time.time()
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        os.makedirs(args.output, exist_ok=True)
        vocab_path = os.path.join(args.output, "ice_text.model")
        texts = [build_prompt(q, h) for _, q, h, _ in examples] + [r for *_, r in examples]
        token_ids = train_ice_tokenizer(texts, vocab_path, args.vocab_size)
        tokenizer = ChatGLMTokenizer(vocab_path, num_image_tokens=0)
        config = ChatGLMConfig(hidden_size=args.hidden_size, num_layers=args.num_layers,
                               num_attention_heads=args.num_heads, inner_hidden_size=4 * args.hidden_size,
                               max_sequence_length=2048, **token_ids)
        model = ChatGLMForConditionalGeneration(config).train()
        encoded = [encode_example(tokenizer, *example[1:]) for example in examples]
        steps_per_epoch = math.ceil(len(encoded) / args.batch_size)
        total_steps = steps_per_epoch * args.epochs
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))
        warmup = steps_per_epoch * 2
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total_steps))))
        rng = random.Random(args.seed)
        tokens = sum(len(ids) for ids, _ in encoded)
        print(f"{len(examples)} examples, {tokens} tokens per epoch, vocabulary {config.vocab_size}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
        progress = tqdm(total=total_steps, desc="training")
        for epoch in range(args.epochs):
            for input_ids, labels in batches(encoded, args.batch_size, rng, tokenizer.pad_token_id):
                loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                progress.update()
                progress.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
        progress.close()
        save_checkpoint(model.eval(), tokenizer, args.output)
        print(f"trained and saved to {args.output} in {(time.time() - started) / 60:.1f} min")

    model, tokenizer = load_model_and_tokenizer(args.output, device="cpu")
    rates, failures = evaluate(model, tokenizer, examples)
    for query, answer, response in failures[:10]:
        print(f"MISMATCH {query!r}\n  got:      {answer[:120]!r}\n  expected: {response[:120]!r}")
    print(f"exact greedy reproduction: single-turn {rates['single']:.1%}, multi-turn {rates['multi']:.1%}")


if __name__ == "__main__":
    main()
