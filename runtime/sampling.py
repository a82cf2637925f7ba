"""Choosing each row's next token the way chat() does: transformers' generate() with ChatGLM's invalid-score
guard, then temperature, top-k 50 and top-p, and a draw from the resulting distribution. The warpers are
transformers' own classes, and the draw is torch.multinomial's (for one sample it picks argmax(p / q), q drawn
from Exp(1) over the vocabulary), taken per row from the row's own generator: a row seeded with s draws what
chat() draws after torch.manual_seed(s), whatever else is in the batch.

What OpenAI's API adds comes before the warpers, on the raw scores, as OpenAI defines it: logit_bias is added,
and each token already generated is lowered by frequency_penalty per time it appears plus presence_penalty once;
then a grammar (runtime/grammar.py) masks the tokens it does not allow. A row that asks for logprobs gets them
from the distribution its token was drawn from (after all of that; a greedy row's at temperature 1).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from transformers.generation import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                     TopPLogitsWarper)

from chatglm_6b.modeling_chatglm import INVALID_SCORE_LOGIT, INVALID_SCORE_TOKEN_ID

# generate()'s default top-k when sampling (transformers' GenerationConfig default, which chat() gets).
SAMPLING_TOP_K = 50
MOST_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclass
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    generator: Optional[torch.Generator] = None  # the row's random stream (sampling rows only)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[Dict[int, float]] = None  # token id -> added to its score
    logprobs: Optional[int] = None  # report the chosen token's logprob and this many alternatives
    grammar: Optional[object] = None  # runtime.grammar.Grammar: which tokens may come next

    @property
    def adjusts_scores(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


@dataclass
class TokenLogprobs:
    """The chosen token's log-probability and the most likely alternatives (token id, log-probability)."""
    logprob: float
    top: List[Tuple[int, float]]


def warpers(temperature: float, top_p: float) -> LogitsProcessorList:
    """The processors generate() adds when sampling, in its order (temperature 1 and top_p 1 add none)."""
    processors = LogitsProcessorList()
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    processors.append(TopKLogitsWarper(SAMPLING_TOP_K))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    return processors


def adjust_scores(scores: torch.Tensor, row: SamplingParams, generated: List[int]) -> None:
    """logit_bias, then the presence and frequency penalties of the tokens generated so far (in place, one row)."""
    vocab = scores.shape[-1]
    if row.logit_bias:
        ids = torch.tensor([i for i in row.logit_bias if i < vocab], dtype=torch.long, device=scores.device)
        if len(ids):
            scores[ids] += torch.tensor([row.logit_bias[i] for i in ids.tolist()], device=scores.device)
    if (row.presence_penalty or row.frequency_penalty) and generated:
        ids, counts = torch.tensor(generated, device=scores.device).unique(return_counts=True)
        scores[ids] -= row.frequency_penalty * counts.to(scores.dtype) + row.presence_penalty


def sample(logits: torch.Tensor, rows: List[SamplingParams], generated: Optional[List[List[int]]] = None
           ) -> Tuple[List[int], List[Optional[TokenLogprobs]]]:
    """Next tokens for logits [n, vocab], and each row's logprobs where it asks for them. Greedy rows take the
    argmax; sampling rows are warped together with the rows of the same settings. A row with NaN/inf scores gets
    the original's replacement (token 5). generated: each row's tokens so far (for the penalties)."""
    scores = logits.to(torch.float32, copy=True)  # adjusted in place below
    # A NaN or inf anywhere in a row makes its sum non-finite: one read of the scores, where the element-wise test
    # and its replacement took 4 passes and an allocation (9 ms for 16 rows of 130k). Only a non-finite sum (or a
    # finite row whose sum overflows) takes the element-wise test.
    if not bool(scores.sum(dim=-1).isfinite().all()):
        invalid = ~torch.isfinite(scores).all(dim=-1)
        scores[invalid] = 0.0
        scores[invalid, INVALID_SCORE_TOKEN_ID] = INVALID_SCORE_LOGIT
    for i, row in enumerate(rows):
        if row.adjusts_scores:
            adjust_scores(scores[i], row, (generated[i] if generated else None) or [])
        if row.grammar is not None:
            scores[i].masked_fill_(~row.grammar.allowed(scores.shape[-1]).to(scores.device), float("-inf"))
    tokens = scores.argmax(dim=-1)
    distributions = [None] * len(rows)  # the log-probabilities each row was drawn from, where asked for
    for i, row in enumerate(rows):
        if not row.do_sample and row.logprobs is not None:
            distributions[i] = scores[i].log_softmax(dim=-1)
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
        for j, member in enumerate(members):
            if rows[member].logprobs is not None:
                distributions[member] = probs[j].log()
    chosen = tokens.tolist()
    return chosen, [None if d is None else logprobs_of(d, chosen[i], rows[i].logprobs)
                    for i, d in enumerate(distributions)]


def logprobs_of(distribution: torch.Tensor, token: int, top: int) -> TokenLogprobs:
    """The chosen token's log-probability and the `top` likeliest tokens that could have been drawn at all."""
    values, ids = distribution.topk(min(top, distribution.shape[-1])) if top else (distribution[:0], distribution[:0])
    alternatives = [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist()) if v != float("-inf")]
    return TokenLogprobs(float(distribution[token]), alternatives)
