"""The batching engine (runtime/engine.py): every row of a batch gets what running it alone through chat()
gives, whatever joins or leaves the batch around it."""
import threading
import time

import pytest
import torch

from chatglm_6b.configuration_chatglm import ChatGLMConfig
from chatglm_6b.modeling_chatglm import ChatGLMForConditionalGeneration, encode_chat, process_response
from chatglm_6b.tokenization_chatglm import ChatGLMTokenizer
from runtime.engine import BatchCache, EngineClosed, GenerationEngine, QueueFull

# Prompts of different lengths, with and without history.
CHATS = [("你好", []), ("介绍一下北京", [("你好", "你好！")]), ("Write a poem about the sea, the sky and the wind", []),
         ("1+1=?", []), ("什么是人工智能？", [("a", "b"), ("晚上睡不着怎么办", "试试规律作息。")])]


@pytest.fixture(scope="module")
def demo():
    from runtime.loading import load_model_and_tokenizer

    return load_model_and_tokenizer()


def alone(model, tokenizer, query, history, max_length):
    return model.chat(tokenizer, query, history, do_sample=False, max_length=max_length)[0]


def text(tokenizer, reply) -> str:
    return process_response(tokenizer.decode(reply.tokens))


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


def test_batched_greedy_rows_equal_chat_alone(demo):
    """Mixed prompt lengths and max lengths (rows leave at different steps), rows joining while others run,
    and sampled rows in the same batch: every greedy row equals chat() alone."""
    model, tokenizer = demo
    jobs = [(query, history, 40 + 17 * i, GREEDY) for i, (query, history) in enumerate(CHATS)]
    jobs += [("你好", [], 80, SAMPLED), ("介绍一下北京", [], 80, SAMPLED)]
    expected = [alone(model, tokenizer, query, history, max_length) for query, history, max_length, _ in jobs[:5]]
    engine = GenerationEngine(model, tokenizer, max_batch_size=4, max_queue=8).start()
    try:
        replies = run_together(engine, tokenizer, jobs, start_after=[None, 0, None, 2, 1, None, 0])
    finally:
        engine.stop()
    assert [text(tokenizer, reply) for reply in replies[:5]] == expected
    assert all(reply.finish_reason in ("stop", "length") and reply.error is None for reply in replies)
    lengths = [len(encode_chat(tokenizer, q, h)) + len(r.tokens) for (q, h, _, _), r in zip(jobs, replies)]
    assert [reply.finish_reason == "length" for reply in replies] == [n == job[2] for n, job in zip(lengths, jobs)]


def test_a_seeded_sampled_row_is_the_same_alone_and_in_a_batch(demo):
    """Each row draws from its own generator: what the others in its batch do does not change its tokens."""
    model, tokenizer = demo
    engine = GenerationEngine(model, tokenizer, max_batch_size=4).start()
    try:
        prompt, wide = encode_chat(tokenizer, "介绍一下北京"), {"do_sample": True, "temperature": 2.0, "top_p": 1.0}
        solo = engine.submit(prompt, 80, seed=7, **wide)
        list(solo)
        others = [engine.submit(encode_chat(tokenizer, q, h), 80, **SAMPLED) for q, h in CHATS[:3]]
        batched = engine.submit(prompt, 80, seed=7, **wide)
        list(batched)
        for other in others:
            list(other)
        assert batched.tokens == solo.tokens
        different = engine.submit(prompt, 80, seed=8, **wide)
        assert list(different) != solo.tokens  # the seed matters: these are draws, not the argmax
    finally:
        engine.stop()


@pytest.mark.parametrize("variant", ["ptuning", "int8"])
def test_prefix_and_quantized_models_batch_like_chat(tiny_dir, variant):
    config = ChatGLMConfig.from_pretrained(tiny_dir)
    if variant == "ptuning":
        config.pre_seq_len = 4
    torch.manual_seed(0)
    model = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, config=config, dtype=torch.float32).eval()
    if variant == "int8":
        model.quantize(8)
    tokenizer = ChatGLMTokenizer.from_pretrained(tiny_dir)
    jobs = [(query, history, len(encode_chat(tokenizer, query, history)) + 8 + 5 * i, GREEDY)
            for i, (query, history) in enumerate(CHATS)]
    expected = [alone(model, tokenizer, query, history, max_length) for query, history, max_length, _ in jobs]
    engine = GenerationEngine(model, tokenizer, max_batch_size=3).start()
    try:
        replies = run_together(engine, tokenizer, jobs, start_after=[None, None, 0, 1, None])
    finally:
        engine.stop()
    assert [text(tokenizer, reply) for reply in replies] == expected


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
    finally:
        engine.stop()
    with pytest.raises(EngineClosed):
        engine.submit(prompt, 20)


def test_a_failing_step_fails_its_batch_and_the_engine_goes_on(tiny, monkeypatch):
    model, tokenizer = tiny
    engine = GenerationEngine(model, tokenizer).start()
    forward, calls = model.forward, []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", fails_once)
    try:
        failed = engine.submit(encode_chat(tokenizer, "你好"), 100)
        with pytest.raises(RuntimeError, match="boom"):
            list(failed)
        monkeypatch.setattr(model, "forward", forward)
        served = engine.submit(encode_chat(tokenizer, "你好"), 30)
        assert served.tokens == [] and len(list(served)) > 0 and engine.alive
    finally:
        engine.stop()


def test_batch_cache_join_and_leave_keep_each_rows_keys():
    """Rows of different lengths are right-aligned; leaving trims the padding no row needs."""
    short, long = BatchCache(1, 1, 8, "cpu"), BatchCache(1, 2, 8, "cpu")
    short.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4), 0)
    short.blocked[:, :3] = False
    long.update(torch.full((2, 2, 5, 4), 2.0), torch.full((2, 2, 5, 4), 2.0), 0)
    long.blocked[:, :5] = False
    short.extend(long)
    assert short.length == 5 and short.lead == [2, 0, 0]
    assert short.blocked[:, :5].tolist() == [[True, True, False, False, False]] + [[False] * 5] * 2
    assert torch.equal(short.keys[0][0, :, 2:5], torch.ones(2, 3, 4))
    short.attention_mask(1)
    short.update(torch.full((3, 2, 1, 4), 3.0), torch.full((3, 2, 1, 4), 3.0), 0)
    short.keep([0])
    assert short.length == 4 and short.lead == [0] and not short.blocked[:, :4].any()
    assert short.keys[0][0, 0, :, 0].tolist()[:4] == [1, 1, 1, 3]
