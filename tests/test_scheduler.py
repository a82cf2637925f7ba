"""runtime/scheduler.py and runtime/kv_cache.py on their own: the step budget, layer-major prefill segments, first
come first served admission by free blocks, preemption of the newest sequence, and the cache's block accounting."""
import pytest
import torch

from runtime.kv_cache import PagedKVCache, SeenKeys
from runtime.scheduler import LAYER_UNITS, Phase, Scheduler, Sequence, StepBudget

LAYERS = 3


def cache(blocks: int, block_size: int = 4) -> PagedKVCache:
    return PagedKVCache(LAYERS, 2, 8, blocks, torch.float32, "cpu", block_size)


def sequence(length: int, context: int = None) -> Sequence:
    positions = torch.stack([torch.arange(length), torch.zeros(length, dtype=torch.long)])
    return Sequence(reply=None, tokens=list(range(length)), prompt_length=length,
                    context_length=length - 1 if context is None else context, prompt_positions=positions,
                    position_step=torch.tensor([[0], [1]]))


def run_prefill(scheduler: Scheduler, steps: int = 1000):
    """Schedules until nothing prefills; returns every step's segments."""
    plan = []
    for _ in range(steps):
        step = scheduler.schedule()
        plan.append(step.segments)
        for s in step.completing:
            s.computed = s.prefill_length
        if not any(s.prefilling for s in scheduler.admitted) and not scheduler.waiting:
            return plan
    raise AssertionError("the prefill did not end")


def test_a_prompt_is_prefilled_layer_major_in_bounded_slices():
    scheduler = Scheduler(cache(50), LAYERS, 4, StepBudget(LAYERS, max_step_tokens=2))
    prompt = sequence(10)
    scheduler.waiting.append(prompt)
    plan = run_prefill(scheduler)
    budget = 2 * LAYER_UNITS * LAYERS
    for segments in plan:
        assert sum((g.end - g.start) * (1 if g.phase == Phase.PROJECT else 3) for g in segments) <= budget
    order = [(g.layer, g.phase, g.start, g.end) for segments in plan for g in segments]
    # every token through every layer's PROJECT, then FINISH, in that order; the last layer's FINISH for the
    # last token only (the first reply token needs nothing else)
    covered = {}
    for layer, phase, start, end in order:
        first = 9 if (layer, phase) == (LAYERS - 1, Phase.FINISH) else 0
        assert covered.get((layer, phase), first) == start  # contiguous token ranges
        covered[(layer, phase)] = end
        if phase == Phase.FINISH:
            assert covered[(layer, Phase.PROJECT)] == 10  # FINISH waits for the whole layer's keys
        if layer:
            assert covered[(layer - 1, Phase.FINISH)] == 10
    assert order[-1] == (LAYERS - 1, Phase.FINISH, 9, 10) and len(plan) > 3
    assert prompt.computed == 10 and len(prompt.blocks) == 3  # 10 tokens in blocks of 4


def test_decoding_rows_come_first_and_prompts_get_the_rest():
    budget = StepBudget(LAYERS, max_step_tokens=4)
    assert budget.prefill_units(0) == 4 * LAYER_UNITS * LAYERS
    assert budget.prefill_units(3) == 1 * LAYER_UNITS * LAYERS
    assert budget.prefill_units(10) == 4 * LAYER_UNITS * LAYERS // 4  # prompts are never starved


def test_the_automatic_budget_follows_the_measured_costs():
    budget = StepBudget(LAYERS)
    first = budget.prefill_units(0)
    budget.observe(seconds=2.0, decoding=0, units=1000)  # 2 ms a unit
    budget.observe(seconds=0.1, decoding=2, units=0)  # a decoding step of 2 rows: 100 ms
    assert first > 0 and budget.prefill_units(2) == 50  # about as long on the prompt as on the rows
    assert budget.prefill_units(0) == 500  # about a second when nothing decodes
    budget.observe(seconds=0.3, decoding=2, units=100)  # mixed: the rows' share is known, the rest is the prompt's
    assert budget.unit_seconds == pytest.approx(0.002)
    budget.observe(seconds=0.5, decoding=5, units=100)  # 5 rows never decoded alone: their share is learnt so
    assert budget.decode_seconds[5] == pytest.approx(0.3)


def test_admission_is_first_come_first_served_by_free_blocks():
    scheduler = Scheduler(cache(6), LAYERS, 8, StepBudget(LAYERS, max_step_tokens=1000))
    big, small = sequence(20), sequence(3)  # 5 blocks, then 1 (+1 kept free per admitted sequence)
    scheduler.waiting.extend([big, small])
    scheduler.schedule()
    assert scheduler.admitted == [big] and list(scheduler.waiting) == [small]  # small waits its turn
    scheduler.remove(big)
    scheduler.schedule()
    assert scheduler.admitted == [small] and scheduler.cache.num_free == 5


def test_a_full_cache_preempts_the_newest_sequence():
    kv = cache(3)
    scheduler = Scheduler(kv, LAYERS, 8, StepBudget(LAYERS, max_step_tokens=1000))
    old, new = sequence(4), sequence(3)
    old.tokens += [4, 5, 6, 7]  # 4 generated: its next input is token 7, with 7 tokens in 2 blocks
    old.blocks, old.computed = kv.allocate(2), 7
    new.tokens.append(7)
    new.blocks, new.computed = kv.allocate(1), 3
    scheduler.admitted = [old, new]
    assert scheduler.schedule().decode == [old, new]  # both have room for their next token
    old.tokens.append(8)
    old.computed = 8  # its next token needs a third block, and none is free
    step = scheduler.schedule()
    assert step.decode == [old] and len(old.blocks) == 3 and list(scheduler.waiting) == [new]
    assert new.blocks == [] and new.computed == 0 and not new.prefilling
    assert new.tokens == [0, 1, 2, 7]  # it will be prefilled again with what it generated


def test_a_sequence_that_alone_fills_the_cache_ends():
    scheduler = Scheduler(cache(2), LAYERS, 8, StepBudget(LAYERS, max_step_tokens=1000))
    alone = sequence(7)
    scheduler.waiting.append(alone)
    run_prefill(scheduler)
    alone.tokens.append(1)
    alone.computed = 8  # 8 tokens in 2 full blocks: the next one has nowhere to go
    step = scheduler.schedule()
    assert not step and scheduler.out_of_room == [alone] and scheduler.admitted == []
    assert not scheduler.fits(8, 0) and scheduler.fits(7, 0)


def test_blocks_are_handed_out_and_taken_back():
    kv = cache(5)
    first, second = kv.allocate(2), kv.allocate(3)
    assert sorted(first + second) == list(range(5)) and kv.num_free == 0
    kv.release(first)
    assert kv.allocate(2) == first  # the lowest free blocks first
    keys = torch.arange(4 * 2 * 8, dtype=torch.float32).view(4, 2, 8)
    kv.write(1, kv.places([3, 1], 2, 6), keys, -keys)  # tokens 2, 3 (block 3) and 4, 5 (block 1)
    assert torch.equal(kv.keys[1][3, :, 2:].transpose(0, 1), keys[:2])
    assert torch.equal(kv.values[1][1, :, :2].transpose(0, 1), -keys[2:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_by_kernel_and_by_gathering_agree(dtype, monkeypatch):
    """PagedKVCache.attend: a prompt slice (many queries of one sequence) by SDPA on its gathered keys, decoding
    queries by the kernel; without the kernel (GPUs, no compiler) everything is gathered. All give the kernel's
    result for every query."""
    from chatglm_6b import kernels as K

    kernels = K.cpu_kernels().ops
    torch.manual_seed(0)
    kv = PagedKVCache(1, 4, 16, 12, dtype, "cpu", block_size=4)
    kv.keys[0].normal_()
    kv.values[0].normal_()
    tables = torch.tensor([[5, 2, 9, 0, 11, 3], [1, 7, 0, 0, 0, 0]], dtype=torch.int32)
    rows = [1] + [0] * 20 + [1, 1]  # a decoding query, a 20-token prompt slice, two more of the other sequence
    visible = [3] + [max(12, t + 1) for t in range(20)] + [3, 6]
    q = torch.randn(len(rows), 4, 16).to(dtype)
    every = kernels.paged_attention(q, kv.keys[0], kv.values[0], tables, torch.tensor(rows, dtype=torch.int32),
                                    torch.tensor(visible, dtype=torch.int32), kv.scale)
    tolerance = {"rtol": 2 ** -7, "atol": 1e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(kv.attend(0, q, tables, SeenKeys(rows, visible)), every, **tolerance)
    monkeypatch.setattr(K.settings, "torch_only", True)
    torch.testing.assert_close(kv.attend(0, q, tables, SeenKeys(rows, visible)), every, **tolerance)
