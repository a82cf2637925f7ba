"""The serving engine's scheduler: what the next step computes.

Every step first gives each decoding sequence its next token (running replies first), then spends the rest of the
step's budget on prompts. GLM's prompt attends in both directions, so a prompt cannot be cut into token chunks
that run one after another through the whole model, as causal engines do: from the second layer on, an early
chunk's keys depend on later tokens. It is cut layer-major instead. Per layer, the prompt runs in two phases:

    PROJECT  LayerNorm, the QKV projection, rotary positions, keys and values into the cache   (token by token)
    FINISH   attention over the layer's keys of the whole prompt, dense, residual, MLP          (token by token)

FINISH of a layer starts once PROJECT of that layer has seen every token, and PROJECT of the next layer once
FINISH has; inside a phase tokens are independent, so a phase can be split into token ranges at will. A prompt's
prefill is thus a list of (layer, phase, token range) segments of bounded work, each step taking as many as its
budget allows, and its result is exactly the unchunked prefill's. Only the last token's output of the last layer
is needed (for the first reply token), so FINISH of the last layer runs for that token alone.

The budget is counted in units of work: a token through a layer's PROJECT costs 1 unit, through FINISH 3 (3 and 9
hidden² multiply-adds), so a decoding row costs 4 units per layer. With --max-step-tokens N a step spends at most
N tokens' worth of full layers (4 * layers * N units), decoding rows included; prompts always get at least a
quarter of it. By default (auto) the budget follows the measured cost: while replies are decoding, a step spends
about as long on prompts as on their tokens (so the gap between a reply's tokens stays near twice a plain
decoding step), and about IDLE_STEP_SECONDS when none are.

Sequences are admitted first come, first served, up to max_batch_size at once, when the cache has the blocks for
the whole prompt. A decoding sequence that needs a block when none is free preempts the newest admitted sequence
(its blocks are freed and it waits at the head of the queue, to be prefilled again with what it has generated).
"""
import collections
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Deque, Dict, List, Optional, Tuple

import torch

from .kv_cache import PagedKVCache


class Phase(IntEnum):
    PROJECT = 0
    FINISH = 1


PHASE_UNITS = (1, 3)  # budget units per token: PROJECT, FINISH
LAYER_UNITS = sum(PHASE_UNITS)
# Auto budget: prompt work per step as a share of the decoding rows' own time, and when nothing decodes.
PREFILL_SHARE = 1.0
IDLE_STEP_SECONDS = 1.0
# Auto budget before anything has been measured: this many tokens through every layer.
FIRST_STEP_TOKENS = 64
EMA = 0.3  # weight of the newest measurement


@dataclass(eq=False)  # compared and hashed by identity
class Sequence:
    """A request inside the engine: its tokens (the prompt, then what has been generated), its place in the cache,
    and how far its prefill has come. `reply` is the engine's public handle (runtime/engine.py)."""
    reply: object
    tokens: List[int]
    prompt_length: int
    context_length: int  # GLM: the prompt's tokens before <sop>, which every prompt token sees
    prompt_positions: torch.Tensor  # [2, prompt_length] (or [prompt_length] for 1-D positions)
    position_step: torch.Tensor  # [2, 1] (or [1]): what each generated token adds
    prefix_length: int = 0  # P-Tuning prefix keys at the start of the cache, seen by every token
    blocks: List[int] = field(default_factory=list)
    computed: int = 0  # tokens whose keys and values are in the cache
    cursor: Optional[Tuple[int, Phase, int]] = None  # the prefill's next (layer, phase, token), while prefilling
    prefill_length: int = 0  # tokens being prefilled (the prompt, or all tokens after a preemption)
    workspace: object = None  # the runner's buffers during the prefill

    @property
    def prefilling(self) -> bool:
        return self.cursor is not None

    def positions(self, start: int, end: int) -> torch.Tensor:
        """GLM positions of tokens [start, end): the prompt's, then the last one plus the step per generated token."""
        prompt = self.prompt_positions[..., start:min(end, self.prompt_length)]
        if end <= self.prompt_length:
            return prompt
        steps = torch.arange(max(start, self.prompt_length) - self.prompt_length + 1, end - self.prompt_length + 1)
        generated = self.prompt_positions[..., -1:] + self.position_step * steps
        return torch.cat([prompt, generated], dim=-1)

    def visible(self, index: int) -> int:
        """Keys the token at `index` attends to: the prefix, then the whole context or the tokens up to itself."""
        return self.prefix_length + max(self.context_length, index + 1)

    def keys_needed(self) -> int:
        """Cache slots once its next step is done."""
        return self.prefix_length + (self.prefill_length if self.prefilling else self.computed + 1)


@dataclass
class Segment:
    """Tokens [start, end) of a prefilling sequence through one phase of one layer."""
    sequence: Sequence
    layer: int
    phase: Phase
    start: int
    end: int


@dataclass
class Step:
    decode: List[Sequence]  # one token each
    segments: List[Segment]  # prompt work, in order
    completing: List[Sequence]  # prefills that end with this step (their first token is sampled)
    units: int  # the work done, in budget units

    def __bool__(self):
        return bool(self.decode or self.segments)


class StepBudget:
    """How many units of prompt work the next step may do (see the module's docstring)."""

    def __init__(self, num_layers: int, max_step_tokens: Optional[int] = None):
        self.num_layers, self.max_step_tokens = num_layers, max_step_tokens
        self.unit_seconds: Optional[float] = None
        self.decode_seconds: Dict[int, float] = {}

    def prefill_units(self, decoding: int) -> int:
        layers = LAYER_UNITS * self.num_layers
        if self.max_step_tokens is not None:
            total = self.max_step_tokens * layers
            return max(total - decoding * layers, total // 4)
        if self.unit_seconds is None:
            return FIRST_STEP_TOKENS * layers
        target = IDLE_STEP_SECONDS
        if decoding:
            known = sorted(self.decode_seconds, key=lambda rows: (abs(rows - decoding), rows))
            target = PREFILL_SHARE * (self.decode_seconds[known[0]] if known else IDLE_STEP_SECONDS)
        return max(layers, int(target / max(self.unit_seconds, 1e-9)))

    def observe(self, seconds: float, decoding: int, units: int) -> None:
        """Learns from a step that took `seconds` with `decoding` rows and `units` of prompt work. A step with both
        teaches the part not known yet (under steady load every step may have both)."""
        def mix(old, new):
            return new if old is None else (1 - EMA) * old + EMA * new

        if not units:
            self.decode_seconds[decoding] = mix(self.decode_seconds.get(decoding), seconds)
        elif not decoding:
            self.unit_seconds = mix(self.unit_seconds, seconds / units)
        elif decoding in self.decode_seconds:
            self.unit_seconds = mix(self.unit_seconds, max(seconds - self.decode_seconds[decoding], 0.0) / units)
        elif self.unit_seconds is not None:
            self.decode_seconds[decoding] = max(seconds - units * self.unit_seconds, 0.0)


class Scheduler:
    """Owns the waiting queue and the admitted sequences (engine thread only)."""

    def __init__(self, cache: PagedKVCache, num_layers: int, max_batch_size: int, budget: StepBudget):
        self.cache, self.num_layers, self.max_batch_size, self.budget = cache, num_layers, max_batch_size, budget
        self.waiting: Deque[Sequence] = collections.deque()
        self.admitted: List[Sequence] = []  # in admission order: the newest is preempted first
        self.out_of_room: List[Sequence] = []  # sequences that alone fill the cache: they end ("length")

    def fits(self, tokens: int, prefix_length: int) -> bool:
        """Whether a prompt of `tokens` tokens (and its first reply token) can ever fit the cache."""
        return self.cache.blocks_for(prefix_length + tokens + 1) <= self.cache.num_blocks

    def remove(self, sequence: Sequence) -> None:
        """A sequence that ended or was cancelled: its blocks go back to the cache."""
        if sequence in self.admitted:
            self.admitted.remove(sequence)
        elif sequence in self.waiting:
            self.waiting.remove(sequence)
        self.cache.release(sequence.blocks)
        sequence.blocks, sequence.workspace = [], None

    def schedule(self) -> Step:
        decode = self._decoding_rows()
        units = self.budget.prefill_units(len(decode))
        segments, completing = [], []
        for sequence in [s for s in self.admitted if s.prefilling]:
            units = self._take(sequence, units, segments, completing)
        while self.waiting and units >= LAYER_UNITS and len(self.admitted) < self.max_batch_size:
            sequence = self.waiting[0]
            needed = self.cache.blocks_for(sequence.prefix_length + len(sequence.tokens))
            # room for the newcomer, and for each admitted sequence's next block
            if self.cache.num_free - needed < len(self.admitted):
                break
            self.waiting.popleft()
            sequence.blocks, sequence.computed = self.cache.allocate(needed), 0
            sequence.prefill_length, sequence.cursor = len(sequence.tokens), (0, Phase.PROJECT, 0)
            self.admitted.append(sequence)
            units = self._take(sequence, units, segments, completing)
        spent = sum((segment.end - segment.start) * PHASE_UNITS[segment.phase] for segment in segments)
        return Step(decode, segments, completing, spent)

    def _decoding_rows(self) -> List[Sequence]:
        """Every decoding sequence, each with a cache slot for its next token; preempts where the cache is full."""
        rows = []
        for sequence in [s for s in self.admitted if not s.prefilling]:
            if sequence not in self.admitted:  # preempted while making room for an older one
                continue
            needed = self.cache.blocks_for(sequence.keys_needed()) - len(sequence.blocks)
            while needed > self.cache.num_free:
                victim = self.admitted[-1]
                if victim is sequence and len(self.admitted) == 1:
                    self.admitted.remove(sequence)
                    self.out_of_room.append(sequence)
                    break
                self._preempt(victim)
                if victim is sequence:
                    break
            if sequence in self.admitted:
                sequence.blocks += self.cache.allocate(needed)
                rows.append(sequence)
        return [s for s in rows if s in self.admitted]

    def _preempt(self, sequence: Sequence) -> None:
        """Back to the head of the queue, its cache freed: it will be prefilled again with all its tokens."""
        self.admitted.remove(sequence)
        self.cache.release(sequence.blocks)
        sequence.blocks, sequence.workspace, sequence.cursor, sequence.computed = [], None, None, 0
        self.waiting.appendleft(sequence)

    def _take(self, sequence: Sequence, units: int, segments: List[Segment], completing: List[Sequence]) -> int:
        """Appends the sequence's next segments that `units` pay for; returns the units left."""
        last_layer = self.num_layers - 1
        while sequence.cursor is not None:
            layer, phase, offset = sequence.cursor
            length = sequence.prefill_length
            start = max(offset, length - 1) if (layer, phase) == (last_layer, Phase.FINISH) else offset
            count = min(length - start, units // PHASE_UNITS[phase])
            if count <= 0:
                break
            segments.append(Segment(sequence, layer, phase, start, start + count))
            units -= count * PHASE_UNITS[phase]
            if start + count < length:
                sequence.cursor = (layer, phase, start + count)
            elif phase == Phase.PROJECT:
                sequence.cursor = (layer, Phase.FINISH, 0)
            elif layer < last_layer:
                sequence.cursor = (layer + 1, Phase.PROJECT, 0)
            else:
                sequence.cursor = None
                completing.append(sequence)
        return units
