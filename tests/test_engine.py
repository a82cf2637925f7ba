"""The serving engine (runtime/engine.py with its scheduler, paged KV cache and runner): every request gets what
running it alone through chat() gives, whatever joins, leaves, is preempted or fails around it; prompts are
prefilled exactly in layer-major slices between the running replies' tokens."""
import threading
import time

import pytest
import torch

from chatglm_6b.configuration_chatglm import ChatGLMConfig
from chatglm_6b.modeling_chatglm import ChatGLMForConditionalGeneration, encode_chat
from chatglm_6b.tokenization_chatglm import ChatGLMTokenizer
from runtime.engine import DoesNotFit, EngineClosed, GenerationEngine, QueueFull
from runtime.kv_cache import BLOCK_SIZE, kv_bytes_per_token

# Prompts of different lengths, with and without history.
CHATS = [("你好", []), ("介绍一下北京", [("你好", "你好！")]), ("Write a poem about the sea, the sky and the wind", []),
         ("1+1=?", []), ("什么是人工智能？", [("a", "b"), ("晚上睡不着怎么办", "试试规律作息。")])]
# A conversation a few hundred tokens long (GLM re-reads it every turn).
LONG_HISTORY = [("你好", "你好👋！我是 ChatGLM-6B 的演示小模型。"), ("介绍一下北京", "北京是中国的首都。" * 12),
                ("晚上睡不着怎么办", "可以试试规律作息，睡前少看手机。" * 8), ("用英文说一下", "Try to keep a regular schedule. " * 8)]


@pytest.fixture(scope="module")
def demo():
    from runtime.loading import load_model_and_tokenizer

    return load_model_and_tokenizer()


def alone(model, tokenizer, query, history, max_length):
    return model.chat(tokenizer, query, history, do_sample=False, max_length=max_length)[0]


def run_together(engine, tokenizer, jobs, start_after=None):
    """Submits each (query, history, max_length, sampling) from its own thread; job i waits until job
    start_after[i] has produced 3 tokens, so that rows join a running batch. Returns the replies."""
    replies = [None] * len(jobs)
    submitted = [threading.Event() for _ in jobs]

    def run(i):
        query, history, max_length, sampling = jobs[i]
        if start_after and start_after[i] is not None:
            submitted[start_after[i]].wait(30)
            while len(replies[start_after[i]].tokens) < 3 and replies[start_after[i]].finish_reason is None:
                time.sleep(0.002)
        replies[i] = engine.submit(encode_chat(tokenizer, query, history), max_length, **sampling)
        submitted[i].set()
        for _ in replies[i]:
            pass

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return replies


GREEDY = {"do_sample": False}
SAMPLED = {"do_sample": True, "temperature": 0.95, "top_p": 0.7}


@pytest.mark.parametrize("max_step_tokens", [None, 1])
def test_batched_greedy_rows_equal_chat_alone(demo, max_step_tokens):
    """Mixed prompt lengths and max lengths (rows leave at different steps), rows joining while others run,
    sampled rows in the same batch, and (max_step_tokens 1) every prompt prefilled in many small slices between
    the other rows' tokens: every greedy row's tokens and text equal chat() alone."""
    model, tokenizer = demo
    jobs = [(query, history, 40 + 17 * i, GREEDY) for i, (query, history) in enumerate(CHATS)]
    jobs += [("总结一下", LONG_HISTORY, 400, GREEDY), ("你好", [], 80, SAMPLED), ("介绍一下北京", [], 80, SAMPLED)]
    expected = [alone(model, tokenizer, query, history, max_length) for query, history, max_length, _ in jobs[:6]]
    engine = GenerationEngine(model, tokenizer, max_batch_size=4, max_queue=8, max_step_tokens=max_step_tokens).start()
    try:
        replies = run_together(engine, tokenizer, jobs, start_after=[None, 0, None, 2, 1, 0, None, 0])
    finally:
        engine.stop()
    assert [reply.text for reply in replies[:6]] == expected
    assert all(reply.finish_reason in ("stop", "length") and reply.error is None for reply in replies)
    lengths = [len(encode_chat(tokenizer, q, h)) + len(r.tokens) for (q, h, _, _), r in zip(jobs, replies)]
    assert [reply.finish_reason == "length" for reply in replies] == [n == job[2] for n, job in zip(lengths, jobs)]


def test_a_chunked_prefill_gives_the_unchunked_logits(demo):
    """Layer-major slices of a few tokens (every phase of every layer cut into several ranges): the first reply
    token's logits equal the model's own forward pass over the whole prompt, within fp32 rounding."""
    model, tokenizer = demo
    prompt = encode_chat(tokenizer, "总结一下", LONG_HISTORY)
    assert len(prompt) > 300
    with torch.inference_mode():
        whole = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    engine = GenerationEngine(model, tokenizer, max_step_tokens=1)  # not started: driven step by step here
    engine.scheduler.waiting.append(engine._sequence(_reply(engine, prompt)))
    steps = []
    while not steps or not steps[-1].completing:
        steps.append(engine.scheduler.schedule())
        logits = engine.runner.run(steps[-1])
    assert len(steps) > 2 * model.config.num_layers  # many slices, several per layer
    torch.testing.assert_close(logits[0], whole, rtol=1e-4, atol=1e-4)


def _reply(engine, prompt):
    from runtime.engine import Reply
    from runtime.generation import TextStream
    from runtime.sampling import SamplingParams

    return Reply(prompt, 2048, SamplingParams(), None, TextStream(engine.tokenizer), None)


def test_a_long_prompt_does_not_freeze_the_running_replies(demo):
    """While a long prompt is prefilled slice by slice, a reply that was already running keeps getting tokens."""
    model, tokenizer = demo
    engine = GenerationEngine(model, tokenizer, max_step_tokens=2).start()
    try:
        running = engine.submit(encode_chat(tokenizer, "Write a poem about the sea, the sky and the wind"), 2048)
        tokens = iter(running)
        next(tokens)
        joining = engine.submit(encode_chat(tokenizer, "总结一下", LONG_HISTORY), 2048)
        before = len(running.tokens)
        next(iter(joining))  # the long prompt's first token: its prefill is done
        during = len(running.tokens) - before
        list(tokens)
        list(joining)
    finally:
        engine.stop()
    assert during >= 10, f"only {during} tokens of the running reply during the long prefill"
    assert running.text == alone(model, tokenizer, "Write a poem about the sea, the sky and the wind", [], 2048)


def test_a_seeded_sampled_row_is_the_same_alone_in_a_batch_and_in_chat(demo):
    """Each row draws from its own generator: what the others in its batch do does not change its tokens, and a
    seed gives what chat() gives after torch.manual_seed with that seed (the same sampler as transformers')."""
    model, tokenizer = demo
    engine = GenerationEngine(model, tokenizer, max_batch_size=4).start()
    prompt, wide = encode_chat(tokenizer, "介绍一下北京"), {"do_sample": True, "temperature": 2.0, "top_p": 0.9}
    try:
        solo = engine.submit(prompt, 80, seed=7, **wide)
        list(solo)
        others = [engine.submit(encode_chat(tokenizer, q, h), 80, **SAMPLED) for q, h in CHATS[:3]]
        batched = engine.submit(prompt, 80, seed=7, **wide)
        list(batched)
        for other in others:
            list(other)
        different = engine.submit(prompt, 80, seed=8, **wide)
        list(different)
    finally:
        engine.stop()
    assert batched.tokens == solo.tokens
    assert different.tokens != solo.tokens  # the seed matters: these are draws, not the argmax
    torch.manual_seed(7)
    assert solo.text == model.chat(tokenizer, "介绍一下北京", max_length=80, **wide)[0]


@pytest.mark.parametrize("variant", ["ptuning", "int8", "bf16"])
def test_prefix_quantized_and_bf16_models_batch_like_chat(tiny_dir, variant):
    config = ChatGLMConfig.from_pretrained(tiny_dir)
    if variant == "ptuning":
        config.pre_seq_len = 4
    torch.manual_seed(0)
    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    model = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, config=config, dtype=dtype).eval()
    if variant == "int8":
        model.quantize(8)
    tokenizer = ChatGLMTokenizer.from_pretrained(tiny_dir)
    jobs = [(query, history, len(encode_chat(tokenizer, query, history)) + 8 + 5 * i, GREEDY)
            for i, (query, history) in enumerate(CHATS)]
    expected = [alone(model, tokenizer, query, history, max_length) for query, history, max_length, _ in jobs]
    engine = GenerationEngine(model, tokenizer, max_batch_size=3, max_step_tokens=3).start()
    try:
        replies = run_together(engine, tokenizer, jobs, start_after=[None, None, 0, 1, None])
    finally:
        engine.stop()
    assert [reply.text for reply in replies] == expected


def test_cancel_frees_the_row_and_the_queue_is_bounded(tiny):
    model, tokenizer = tiny
    engine = GenerationEngine(model, tokenizer, max_batch_size=2, max_queue=1).start()
    try:
        prompt = encode_chat(tokenizer, "long")
        running = [engine.submit(prompt, 500) for _ in range(2)]
        queued = engine.submit(prompt, 500)
        with pytest.raises(QueueFull):
            engine.submit(prompt, 500)
        queued.cancel()  # a waiting request's place is free at once
        again = engine.submit(prompt, 20)
        iterator = iter(running[0])
        next(iterator)
        iterator.close()  # a consumer that leaves cancels its reply
        list(again)
        assert again.finish_reason == "length" and running[0].finish_reason == "cancelled"
        assert queued.finish_reason == "cancelled" and queued.tokens == []
        list(running[1])
        assert running[1].finish_reason == "length"
        deadline = time.time() + 10
        while engine.batch_size or engine.accepted:
            assert time.time() < deadline
            time.sleep(0.01)
        assert engine.cache.num_free == engine.cache.num_blocks  # every block is back
    finally:
        engine.stop()
    with pytest.raises(EngineClosed):
        engine.submit(prompt, 20)


def test_a_failing_prefill_fails_only_its_request(demo, monkeypatch):
    model, tokenizer = demo
    engine = GenerationEngine(model, tokenizer, max_step_tokens=2).start()
    poisoned = encode_chat(tokenizer, "总结一下", LONG_HISTORY)
    start_prefill = engine.runner._start_prefill

    def fails_for_the_poisoned_prompt(sequence):
        if sequence.tokens == poisoned:
            raise RuntimeError("boom")
        start_prefill(sequence)

    monkeypatch.setattr(engine.runner, "_start_prefill", fails_for_the_poisoned_prompt)
    try:
        running = engine.submit(encode_chat(tokenizer, "介绍一下北京"), 200)
        tokens = iter(running)
        next(tokens)
        failed = engine.submit(poisoned, 2048)
        with pytest.raises(RuntimeError, match="boom"):
            list(failed)
        list(tokens)
        served = engine.submit(encode_chat(tokenizer, "你好"), 100)
        list(served)
    finally:
        engine.stop()
    assert running.error is None and running.text == alone(model, tokenizer, "介绍一下北京", [], 200)
    assert served.text == alone(model, tokenizer, "你好", [], 100) and failed.tokens == []


def test_a_failing_decode_step_fails_only_the_row_that_fails_alone(demo, monkeypatch):
    model, tokenizer = demo
    engine = GenerationEngine(model, tokenizer).start()
    run = engine.runner.run
    bad = encode_chat(tokenizer, "1+1=?")

    def fails_with_the_bad_row(step):
        if any(s.tokens[:len(bad)] == bad and len(s.tokens) > len(bad) + 2 for s in step.decode):
            raise RuntimeError("boom")
        return run(step)

    monkeypatch.setattr(engine.runner, "run", fails_with_the_bad_row)
    try:
        replies = [engine.submit(encode_chat(tokenizer, q, h), 120) for q, h in CHATS[:4]]
        for reply in replies:
            try:
                list(reply)
            except RuntimeError:
                pass
    finally:
        engine.stop()
    assert [reply.error is not None for reply in replies] == [False, False, False, True]
    assert len(replies[3].tokens) == 3
    for (query, history), reply in zip(CHATS[:3], replies):
        assert reply.text == alone(model, tokenizer, query, history, 120)


def test_the_cache_budget_bounds_what_runs(demo):
    """A prompt the cache can never hold is refused; requests that do not fit together wait or are preempted
    and recomputed, and still get chat()'s replies; every block comes back."""
    model, tokenizer = demo
    per_block = kv_bytes_per_token(model.config, torch.float32) * BLOCK_SIZE
    engine = GenerationEngine(model, tokenizer, max_batch_size=4, kv_cache_bytes=10 * per_block).start()
    try:
        with pytest.raises(DoesNotFit, match="KV cache holds 160"):
            engine.submit(encode_chat(tokenizer, "总结一下", LONG_HISTORY), 2048)
        preempted = []
        preempt = engine.scheduler._preempt
        engine.scheduler._preempt = lambda sequence: preempted.append(sequence) or preempt(sequence)
        # Each fits alone (prompt and reply: 146, 83 and 42 tokens), not together (160 tokens).
        jobs = [("用 Python 实现快速排序", [], 300, GREEDY), ("介绍一下北京", [], 300, GREEDY),
                ("什么是人工智能？", [], 300, GREEDY)]
        replies = run_together(engine, tokenizer, jobs)
        assert preempted and engine.cache.num_free == engine.cache.num_blocks
    finally:
        engine.stop()
    assert [r.text for r in replies] == [alone(model, tokenizer, q, h, n) for q, h, n, _ in jobs]


def test_stop_strings_end_the_reply_in_the_engine(demo):
    model, tokenizer = demo
    whole = alone(model, tokenizer, "你好", [], 2048)
    cut = whole.index("我是")
    engine = GenerationEngine(model, tokenizer).start()
    try:
        reply = engine.submit(encode_chat(tokenizer, "你好"), 2048, stops=["我是"])
        text = "".join(delta.text for delta in reply)
    finally:
        engine.stop()
    assert text == reply.text == whole[:cut] and reply.finish_reason == "stop"
    assert reply.completion_tokens == len(reply.tokens) < len(tokenizer(whole)["input_ids"])
