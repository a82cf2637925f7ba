"""runtime/sampling.py, the engine's one sampler, against transformers' own sampling on the same logits and seeds:
the logits processors generate() builds for chat()'s settings (ChatGLM's invalid-score guard, temperature, top-k
50, top-p), a softmax and torch.multinomial with the seeded generator."""
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
    tokens = sample(logits, rows).tolist()
    assert tokens == [transformers_draw(tiny[0], logits[i], t, p, 100 + i) for i, (t, p) in enumerate(SETTINGS)]
    # the same rows again, in another batch order: each row's draw is its own
    again = [SamplingParams(True, t, p, torch.Generator().manual_seed(100 + i)) for i, (t, p) in enumerate(SETTINGS)]
    assert sample(logits.flip(0), again[::-1]).tolist() == tokens[::-1]


def test_greedy_and_invalid_rows(tiny):
    logits = torch.randn(3, 50)
    logits[1, 7] = float("nan")
    rows = [SamplingParams(), SamplingParams(), SamplingParams(True, 0.9, 0.8, torch.Generator().manual_seed(1))]
    tokens = sample(logits, rows).tolist()
    assert tokens[0] == int(logits[0].argmax()) and tokens[1] == INVALID_SCORE_TOKEN_ID
    assert tokens[2] == transformers_draw(tiny[0], logits[2], 0.9, 0.8, 1)
