"""runtime/sampling.py, the engine's one sampler, against transformers' own sampling on the same logits and seeds:
the logits processors generate() builds for chat()'s settings (ChatGLM's invalid-score guard, temperature, top-k
50, top-p), a softmax and torch.multinomial with the seeded generator; and what OpenAI's API adds (penalties,
logit_bias, logprobs) against OpenAI's definitions written out here."""
import pytest
import torch
from transformers.generation import LogitsProcessorList

from chatglm_6b.modeling_chatglm import INVALID_SCORE_TOKEN_ID, InvalidScoreLogitsProcessor
from runtime.sampling import SamplingParams, sample

SETTINGS = [(0.95, 0.7), (1.0, 1.0), (2.0, 0.9), (0.5, 1.0), (0.95, 0.7)]


def transformers_draw(model, logits: torch.Tensor, temperature: float, top_p: float, seed: int) -> int:
    """What generate() picks for one row: the generation config it makes for these settings, the processors it
    builds from it, then softmax and multinomial."""
    config, _ = model._prepare_generation_config(None, do_sample=True, temperature=temperature, top_p=top_p)
    assert config.top_k == 50  # generate()'s default, filled in for chat()
    processors = model._get_logits_processor(
        generation_config=config, input_ids_seq_length=1, encoder_input_ids=torch.zeros(1, 1, dtype=torch.long),
        prefix_allowed_tokens_fn=None, logits_processor=LogitsProcessorList([InvalidScoreLogitsProcessor()]))
    scores = processors(torch.zeros(1, 1, dtype=torch.long), logits[None].float().clone())
    probs = torch.softmax(scores, dim=-1)
    torch.manual_seed(seed)
    return int(torch.multinomial(probs, num_samples=1))


@pytest.mark.parametrize("vocab", [4000, 130528])
def test_each_row_draws_what_transformers_draws(tiny, vocab):
    torch.manual_seed(0)
    logits = torch.randn(len(SETTINGS), vocab) * 3
    rows = [SamplingParams(True, t, p, torch.Generator().manual_seed(100 + i)) for i, (t, p) in enumerate(SETTINGS)]
    tokens, _ = sample(logits, rows)
    assert tokens == [transformers_draw(tiny[0], logits[i], t, p, 100 + i) for i, (t, p) in enumerate(SETTINGS)]
    # the same rows again, in another batch order: each row's draw is its own
    again = [SamplingParams(True, t, p, torch.Generator().manual_seed(100 + i)) for i, (t, p) in enumerate(SETTINGS)]
    assert sample(logits.flip(0), again[::-1])[0] == tokens[::-1]


def test_greedy_and_invalid_rows(tiny):
    logits = torch.randn(3, 50)
    logits[1, 7] = float("nan")
    rows = [SamplingParams(), SamplingParams(), SamplingParams(True, 0.9, 0.8, torch.Generator().manual_seed(1))]
    tokens, _ = sample(logits, rows)
    assert tokens[0] == int(logits[0].argmax()) and tokens[1] == INVALID_SCORE_TOKEN_ID
    assert tokens[2] == transformers_draw(tiny[0], logits[2], 0.9, 0.8, 1)
    # inf and -inf rows are replaced too; rows of finite scores whose sum overflows fp32 are not
    logits = torch.randn(4, 50)
    logits[0, 3], logits[1, 4], logits[2, :] = float("inf"), float("-inf"), 3e38
    logits[3, 9] = 3.1e38
    tokens, _ = sample(logits, [SamplingParams()] * 4)
    assert tokens == [INVALID_SCORE_TOKEN_ID, INVALID_SCORE_TOKEN_ID, 0, 9]


def openai_adjusted(logits: torch.Tensor, generated, presence: float, frequency: float, bias) -> torch.Tensor:
    """OpenAI's definition: mu[j] - c[j] * alpha_frequency - (c[j] > 0) * alpha_presence, plus the bias."""
    adjusted = logits.clone().float()
    for token, value in bias.items():
        adjusted[token] += value
    for token in set(generated):
        count = generated.count(token)
        adjusted[token] -= count * frequency + presence
    return adjusted


def test_penalties_and_logit_bias_adjust_the_scores_as_openai_defines_them():
    torch.manual_seed(1)
    logits = torch.randn(2, 300)
    generated = [[5, 5, 5, 17, 200], [9]]
    rows = [SamplingParams(presence_penalty=0.7, frequency_penalty=1.3, logit_bias={3: 4.0, 17: -100}, logprobs=5),
            SamplingParams(logprobs=0)]
    tokens, logprobs = sample(logits, rows, generated)
    expected = openai_adjusted(logits[0], generated[0], 0.7, 1.3, {3: 4.0, 17: -100}).log_softmax(-1)
    assert tokens[0] == int(expected.argmax())
    assert logprobs[0].logprob == pytest.approx(float(expected[tokens[0]]), abs=1e-5)
    top = expected.topk(5)
    assert [t for t, _ in logprobs[0].top] == top.indices.tolist()
    assert [v for _, v in logprobs[0].top] == pytest.approx(top.values.tolist(), abs=1e-5)
    # the unpenalised row is untouched: its logprob is the plain log-softmax's, and no alternatives were asked for
    assert logprobs[1].logprob == pytest.approx(float(logits[1].log_softmax(-1).max()), abs=1e-5)
    assert logprobs[1].top == []
    # a bias of +100 makes a token certain
    tokens, _ = sample(logits, [SamplingParams(logit_bias={42: 100.0})] * 2, generated)
    assert tokens == [42, 42]


def test_sampled_logprobs_come_from_the_warped_distribution(tiny):
    """A sampling row reports the distribution it drew from: after temperature, top-k and top-p, so tokens
    outside the nucleus are not among the alternatives and the chosen one's logprob is from the warped softmax."""
    torch.manual_seed(2)
    logits = torch.randn(1, 500) * 3
    row = SamplingParams(True, 0.8, 0.5, torch.Generator().manual_seed(7), logprobs=20)
    tokens, logprobs = sample(logits, [row])
    config, _ = tiny[0]._prepare_generation_config(None, do_sample=True, temperature=0.8, top_p=0.5)
    processors = tiny[0]._get_logits_processor(
        generation_config=config, input_ids_seq_length=1, encoder_input_ids=torch.zeros(1, 1, dtype=torch.long),
        prefix_allowed_tokens_fn=None, logits_processor=LogitsProcessorList([InvalidScoreLogitsProcessor()]))
    warped = processors(torch.zeros(1, 1, dtype=torch.long), logits.clone()).log_softmax(-1)[0]
    assert logprobs[0].logprob == pytest.approx(float(warped[tokens[0]]), abs=1e-5)
    nucleus = int(torch.isfinite(warped).sum())
    assert len(logprobs[0].top) == min(20, nucleus)
    assert all(torch.isfinite(warped[t]) for t, _ in logprobs[0].top)
