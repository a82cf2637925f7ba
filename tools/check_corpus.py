#!/usr/bin/env python3
"""Validate the demo dialogue corpus in data/demo_corpus/ and print its statistics.

The demo model must memorise this corpus and reproduce every response exactly
with greedy decoding, so each response has to survive the whole round trip:
tokenizer normalisation (NFKC), decoding, and ``process_response``.

Usage:  python3 tools/check_corpus.py [corpus_dir]
Exits with status 1 if any rule is violated.
"""
import json
import os
import re
import sys
import unicodedata

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from chatglm_6b.modeling_chatglm import process_response  # noqa: E402  (the chat code's own post-processing)
from runtime import ROOT  # noqa: E402

DEFAULT_DIR = os.path.join(ROOT, "data", "demo_corpus")

MIN_SINGLE = 330
MIN_CONVERSATIONS = 34
MIN_TURNS, MAX_TURNS = 2, 4
MIN_RESPONSE_LEN = 10
SOFT_RESPONSE_LEN = 220
HARD_RESPONSE_LEN = 400
MAX_LONG_RESPONSES = 40
MAX_PROMPT_LEN = 60
MAX_TOTAL_CHARS = 60000
MAX_SPACE_RUN = 80
ENGLISH_RATIO = (0.12, 0.35)

FULLWIDTH_PUNCT = "，！：；？"
CJK = re.compile(r"[\u4e00-\u9fff]")

HELLO_PROMPT = "你好"
HELLO_RESPONSE = (
    "你好👋！我是 ChatGLM-6B 的演示小模型，由本项目用自己的代码训练而成。"
    "我只记得训练语料里的对话，回答能力很有限；想要完整的能力，请加载真正的 ChatGLM-6B 权重。"
)
REQUIRED_PROMPTS = [
    "你好", "hello", "Hello", "Hi", "你是谁", "你叫什么名字", "介绍一下你自己",
    "Who are you?", "你能做什么", "晚上睡不着应该怎么办",
]
MIN_FEATURES = {"list": 12, "code": 8, "latex": 4, "table": 2}


def is_cjk(ch):
    return bool(ch) and CJK.match(ch) is not None


def text_problems(text, what):
    """Problems shared by prompts and responses."""
    out = []
    if "\t" in text:
        out.append(f"{what} contains a tab")
    if "\r" in text:
        out.append(f"{what} contains \\r")
    if re.search(r" {%d,}" % (MAX_SPACE_RUN + 1), text):
        out.append(f"{what} contains a run of more than {MAX_SPACE_RUN} spaces")
    return out


def response_problems(resp):
    out = text_problems(resp, "response")
    n = len(resp)
    if n < MIN_RESPONSE_LEN:
        out.append(f"response shorter than {MIN_RESPONSE_LEN} chars ({n})")
    if n > HARD_RESPONSE_LEN:
        out.append(f"response longer than {HARD_RESPONSE_LEN} chars ({n})")
    fixed = process_response(resp)
    if fixed != resp:
        for i, (a, b) in enumerate(zip(resp, fixed)):
            if a != b:
                ctx = resp[max(0, i - 8): i + 8]
                out.append(f"not a fixed point of process_response near {ctx!r}")
                break
        else:
            out.append("not a fixed point of process_response (whitespace at the ends)")
    for i, ch in enumerate(resp):
        if ch in FULLWIDTH_PUNCT:
            prev = resp[i - 1] if i > 0 else ""
            nxt = resp[i + 1] if i + 1 < len(resp) else ""
            if not (is_cjk(prev) or is_cjk(nxt)):
                ctx = resp[max(0, i - 8): i + 8]
                out.append(f"{ch!r} not adjacent to a CJK ideograph near {ctx!r}")
        elif unicodedata.normalize("NFKC", ch) != ch:
            ctx = resp[max(0, i - 8): i + 8]
            out.append(f"character {ch!r} (U+{ord(ch):04X}) changes under NFKC near {ctx!r}")
    if resp.count("```") % 2:
        out.append("unbalanced ``` code fence")
    return out


def prompt_problems(prompt):
    out = text_problems(prompt, "prompt")
    if not prompt.strip():
        out.append("empty prompt")
    if prompt != prompt.strip():
        out.append("prompt has leading/trailing whitespace")
    if len(prompt) > MAX_PROMPT_LEN:
        out.append(f"prompt longer than {MAX_PROMPT_LEN} chars ({len(prompt)})")
    for ch in prompt:
        if ch not in FULLWIDTH_PUNCT and unicodedata.normalize("NFKC", ch) != ch:
            out.append(f"prompt character {ch!r} (U+{ord(ch):04X}) changes under NFKC")
    return out


def features(resp):
    found = set()
    if re.search(r"^\s*(\d+\.|[-*]) \S", resp, re.M):
        found.add("list")
    if re.search(r"^```[a-z]+\n", resp, re.M):
        found.add("code")
    if re.search(r"\$[^$\n]+\$", resp):
        found.add("latex")
    if re.search(r"^\|.*\|\n\|( ?-+ ?\|)+", resp, re.M):
        found.add("table")
    return found


def read_jsonl(path, errors):
    rows = []
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        errors.append(f"{path}: not valid UTF-8 ({e})")
        return rows
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{os.path.basename(path)}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"{where}: invalid JSON ({e})")
            continue
        if line != json.dumps(obj, ensure_ascii=False):
            errors.append(f"{where}: line is not json.dumps(obj, ensure_ascii=False)")
        rows.append((where, obj))
    return rows


def main(corpus_dir):
    errors = []
    single_path = os.path.join(corpus_dir, "single_turn.jsonl")
    multi_path = os.path.join(corpus_dir, "multi_turn.jsonl")
    for p in (single_path, multi_path):
        if not os.path.isfile(p):
            print(f"missing file: {p}")
            return 1

    responses = []  # (where, prompt, response)
    total_chars = 0
    english = 0
    items = 0

    single_prompts = {}
    for where, obj in read_jsonl(single_path, errors):
        if not isinstance(obj, dict) or set(obj) != {"prompt", "response"} or not all(
                isinstance(obj[k], str) for k in obj):
            errors.append(f"{where}: expected {{'prompt': str, 'response': str}}")
            continue
        key = obj["prompt"].strip()
        if key in single_prompts:
            errors.append(f"{where}: duplicate prompt {key!r} (first at {single_prompts[key]})")
        single_prompts[key] = where
        responses.append((where, obj["prompt"], obj["response"]))

    first_prompts = {}
    n_conv = n_turns = 0
    for where, obj in read_jsonl(multi_path, errors):
        conv = obj.get("conversation") if isinstance(obj, dict) else None
        if set(obj) != {"conversation"} or not isinstance(conv, list):
            errors.append(f"{where}: expected {{'conversation': [...]}}")
            continue
        if not MIN_TURNS <= len(conv) <= MAX_TURNS:
            errors.append(f"{where}: {len(conv)} turns (need {MIN_TURNS}-{MAX_TURNS})")
        ok = True
        for t, turn in enumerate(conv):
            if not isinstance(turn, dict) or set(turn) != {"prompt", "response"} or not all(
                    isinstance(turn[k], str) for k in turn):
                errors.append(f"{where} turn {t + 1}: expected {{'prompt': str, 'response': str}}")
                ok = False
                continue
            responses.append((f"{where} turn {t + 1}", turn["prompt"], turn["response"]))
        if not ok or not conv:
            continue
        n_conv += 1
        n_turns += len(conv)
        key = conv[0]["prompt"].strip()
        if key in first_prompts:
            errors.append(f"{where}: duplicate first prompt {key!r} (first at {first_prompts[key]})")
        first_prompts[key] = where
        if key in single_prompts:
            errors.append(f"{where}: first prompt {key!r} also in single_turn ({single_prompts[key]})")

    long_responses = []
    feature_counts = {k: 0 for k in MIN_FEATURES}
    for where, prompt, resp in responses:
        for p in prompt_problems(prompt) + response_problems(resp):
            errors.append(f"{where}: {p}")
        if len(resp) > SOFT_RESPONSE_LEN:
            long_responses.append(where)
        for feat in features(resp):
            feature_counts[feat] += 1
        total_chars += len(prompt) + len(resp)
        items += 1
        if not CJK.search(prompt):
            english += 1

    if len(long_responses) > MAX_LONG_RESPONSES:
        errors.append(f"{len(long_responses)} responses longer than {SOFT_RESPONSE_LEN} chars "
                      f"(at most {MAX_LONG_RESPONSES} allowed)")
    if len(single_prompts) < MIN_SINGLE:
        errors.append(f"only {len(single_prompts)} single-turn items (need {MIN_SINGLE})")
    if n_conv < MIN_CONVERSATIONS:
        errors.append(f"only {n_conv} conversations (need {MIN_CONVERSATIONS})")
    if total_chars > MAX_TOTAL_CHARS:
        errors.append(f"corpus has {total_chars} characters (limit {MAX_TOTAL_CHARS})")
    for feat, need in MIN_FEATURES.items():
        if feature_counts[feat] < need:
            errors.append(f"only {feature_counts[feat]} responses with {feat} (need {need})")
    ratio = english / max(items, 1)
    if not ENGLISH_RATIO[0] <= ratio <= ENGLISH_RATIO[1]:
        errors.append(f"English prompt ratio {ratio:.2f} outside {ENGLISH_RATIO}")

    single = {}
    for where, obj in read_jsonl(single_path, []):
        if isinstance(obj, dict) and "prompt" in obj:
            single[obj["prompt"].strip()] = obj.get("response")
    for p in REQUIRED_PROMPTS:
        if p not in single:
            errors.append(f"required prompt {p!r} missing from single_turn.jsonl")
    if single.get(HELLO_PROMPT) != HELLO_RESPONSE:
        errors.append(f"response to {HELLO_PROMPT!r} is not the required greeting")

    print(f"single-turn items : {len(single_prompts)}")
    print(f"conversations     : {n_conv} ({n_turns} turns)")
    print(f"prompt/response pairs: {items} ({english} English prompts, {ratio:.0%})")
    print(f"characters        : {total_chars} (prompts + responses)")
    print(f"responses > {SOFT_RESPONSE_LEN} chars: {len(long_responses)}, "
          f"longest: {max((len(r) for _, _, r in responses), default=0)}")
    print("features          : " + ", ".join(f"{k}={v}" for k, v in feature_counts.items()))
    if errors:
        print(f"\n{len(errors)} problem(s):")
        for e in errors:
            print("  " + e)
        return 1
    print("OK: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_DIR))
