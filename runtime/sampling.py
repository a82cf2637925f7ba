"""Choosing each row's next token the way chat() does: transformers' generate() with ChatGLM's invalid-score
guard, then temperature, top-k 50 and top-p, and a draw from the resulting distribution. The warpers are
transformers' own classes, and the draw is torch.multinomial's (for one sample it picks argmax(p / q), q drawn
from Exp(1) over the vocabulary), taken per row from the row's own generator: a row seeded with s draws what
chat() draws after torch.manual_seed(s), whatever else is in the batch."""
from dataclasses import dataclass
from typing import List, Optional

import torch
from transformers.generation import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                     TopPLogitsWarper)

from chatglm_6b.modeling_chatglm import INVALID_SCORE_LOGIT, INVALID_SCORE_TOKEN_ID

# generate()'s default top-k when sampling (transformers' GenerationConfig default, which chat() gets).
SAMPLING_TOP_K = 50


@dataclass
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    generator: Optional[torch.Generator] = None  # the row's random stream (sampling rows only)


def warpers(temperature: float, top_p: float) -> LogitsProcessorList:
    """The processors generate() adds when sampling, in its order (temperature 1 and top_p 1 add none)."""
    processors = LogitsProcessorList()
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    processors.append(TopKLogitsWarper(SAMPLING_TOP_K))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    return processors


def sample(logits: torch.Tensor, rows: List[SamplingParams]) -> torch.LongTensor:
    """Next tokens [n] for logits [n, vocab]. Greedy rows take the argmax; sampling rows are warped together with
    the rows of the same settings. A row with NaN/inf scores gets the original's replacement (token 5)."""
    scores = logits.float()
    invalid = ~torch.isfinite(scores).all(dim=-1, keepdim=True)
    replacement = torch.zeros_like(scores)
    replacement[:, INVALID_SCORE_TOKEN_ID] = INVALID_SCORE_LOGIT
    scores = torch.where(invalid, replacement, scores)
    tokens = scores.argmax(dim=-1)
    groups = {}
    for i, row in enumerate(rows):
        if row.do_sample:
            groups.setdefault((row.temperature, row.top_p), []).append(i)
    for (temperature, top_p), members in groups.items():
        index = torch.tensor(members, device=scores.device)
        probs = warpers(temperature, top_p)(None, scores[index]).softmax(dim=-1)
        noise = torch.empty_like(probs)
        for j, member in enumerate(members):
            noise[j].exponential_(generator=rows[member].generator)
        tokens[index] = (probs / noise).argmax(dim=-1)
    return tokens
