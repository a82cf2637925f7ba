# Copy of chatglm_6b/modeling_chatglm.py, written by `python tools/copy_model_code.py` (runtime.saving.copy_model_code): edit chatglm_6b/modeling_chatglm.py, not this file.
"""ChatGLM-6B (GLM) in PyTorch, checkpoint-compatible with THUDM/chatglm-6b.

The network is computed exactly as the original: per layer, LayerNorm -> self-attention with a fused
`query_key_value` and 2-D rotary embeddings -> residual `ln_out * alpha + attn` -> LayerNorm -> GELU MLP
-> residual `ln_out * alpha + mlp`, alpha = sqrt(2 * num_layers). Internally tensors are batch-first
([B, L, H]); the base model returns hidden states sequence-first ([L, B, H]) like the original.
The KV cache is a transformers `Cache` ([B, heads, L, head_dim] per layer).
"""
import re
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BatchEncoding, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.generation import LogitsProcessor, LogitsProcessorList
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_chatglm import ChatGLMConfig
from .kernels import placed_backend
from .streaming import stream_generate
from .tokenization_chatglm import glm_attention_mask, glm_position_ids

# chat() and stream_chat()'s defaults, as the original's; the front-ends take theirs from here.
DEFAULT_MAX_LENGTH, DEFAULT_TOP_P, DEFAULT_TEMPERATURE = 2048, 0.7, 0.95
# Added to masked attention scores: finite, so that fully padded rows stay finite (an -inf row gives NaN).
MASK_FILL_VALUE = -10000.0
# The residual scale is sqrt(2 * 28) whatever num_layers is: the original never passed num_layers to its
# blocks, so every checkpoint made with its code (any depth) was trained with the 6B model's 28.
ORIGINAL_NUM_LAYERS = 28
# What the original puts in place of NaN/inf scores (fp16 overflow): a distribution that picks token 5.
INVALID_SCORE_TOKEN_ID, INVALID_SCORE_LOGIT = 5, 5e4
# The original's training data wrote this for the date of its training; replies fill it in.
TRAINING_TIME_PLACEHOLDER, TRAINING_TIME = "[[训练时间]]", "2023年"

# transformers 5 renamed the KV cache from `past_key_values` to `cache` (in generate() and in its output
# classes) part-way through the 5.x releases. The model takes both names and returns the installed
# release's, which is the name generate() reads back from the outputs.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def one_cache(cache: Optional[Cache], past_key_values: Optional[Cache]) -> Optional[Cache]:
    """The cache passed under either name (the original's code and older transformers say past_key_values)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("Pass the KV cache as `cache` or as `past_key_values`, not both.")
    return cache if cache is not None else past_key_values


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values [B, nh, T, hd] are views of a buffer with room to grow: a decoding
    step writes its token in place. DynamicLayer concatenates, copying the layer's whole cache every token (at
    1024 tokens of context, 6B's 28 layers copy 0.9 GB per token in bf16). Whatever replaces the views (crop,
    reorder_cache, reset) is taken into a new buffer at the next update."""

    GROWTH = 256  # tokens of room added when the buffer is full

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, new = self.get_seq_length(), key_states.shape[-2]
        room = getattr(self, "_room", None)  # (key buffer, value buffer, the views last handed out)
        if (room is None or self.keys is not room[2][0] or self.values is not room[2][1]
                or length + new > room[0].shape[-2] or room[0].shape[:-2] != key_states.shape[:-2]):
            capacity = length + new + self.GROWTH

            def buffer(old, states):
                grown = states.new_empty((*states.shape[:-2], capacity, states.shape[-1]))
                if length:
                    grown[..., :length, :] = old
                return grown

            room = (buffer(self.keys, key_states), buffer(self.values, value_states), None)
        room[0][..., length:length + new, :] = key_states
        room[1][..., length:length + new, :] = value_states
        self.keys, self.values = room[0][..., :length + new, :], room[1][..., :length + new, :]
        self._room = (room[0], room[1], (self.keys, self.values))
        return self.keys, self.values


def growing(cache: Cache) -> Cache:
    """`cache` (generate()'s DynamicCache, before its first token) with layers that grow in place."""
    if type(cache) is DynamicCache and cache.get_seq_length() == 0:
        if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
            cache.layer_class_to_replicate = GrowingLayer
        cache.layers = [GrowingLayer() if type(layer) is DynamicLayer and not layer.is_initialized else layer
                        for layer in cache.layers]
    return cache


def build_prompt(query: str, history: Optional[List[Tuple[str, str]]] = None) -> str:
    """The multi-turn prompt of the original: the bare query without history, else `[Round i]` turns."""
    if not history:
        return query
    prompt = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
    return prompt + f"[Round {len(history)}]\n问：{query}\n答："


def encode_chat(tokenizer, query: str, history: Optional[List[Tuple[str, str]]] = None) -> List[int]:
    """The token ids chat() feeds the model for this turn. What users wrote is text, even where it spells a
    control token ("<sop>", "[gMASK]"): only build_inputs_with_special_tokens adds the prompt's [gMASK] <sop>."""
    return tokenizer(build_prompt(query, history), return_attention_mask=False, split_special_tokens=True)["input_ids"]


# ASCII marks that process_response makes full-width next to a Chinese character (CHINESE_CHARACTERS, a regex class).
CHINESE_PUNCTUATION = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}
CHINESE_CHARACTERS = "[\u4e00-\u9fff]"


def process_response(response: str) -> str:
    """The original's post-processing: strip, fill the training-time placeholder, and use Chinese
    punctuation next to Chinese characters (the tokenizer's NFKC normaliser turns it into ASCII)."""
    response = response.strip().replace(TRAINING_TIME_PLACEHOLDER, TRAINING_TIME)
    for ascii_mark, chinese_mark in CHINESE_PUNCTUATION.items():
        response = re.sub(f"({CHINESE_CHARACTERS}){re.escape(ascii_mark)}", rf"\1{chinese_mark}", response)
        response = re.sub(f"{re.escape(ascii_mark)}({CHINESE_CHARACTERS})", rf"{chinese_mark}\1", response)
    return response


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """Replaces NaN/inf scores (fp16 overflow) by a distribution that picks INVALID_SCORE_TOKEN_ID, as the
    original: any invalid score in the batch replaces every row. Decided on the device (no host sync per
    token). Runs before transformers' temperature/top-p warpers, which add their own -inf later."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        replacement = torch.zeros_like(scores)
        replacement[..., INVALID_SCORE_TOKEN_ID] = INVALID_SCORE_LOGIT
        return torch.where(torch.isfinite(scores).all(), scores, replacement)


def check_padding_mask(padding_mask: torch.Tensor) -> torch.Tensor:
    """A prompt's [B, L] padding mask (1/True = token) as int64, refusing what it cannot mean here: GLM
    generates at the right end, so padding must be on the left (the tokenizer pads so)."""
    padding_mask = padding_mask.long()
    if bool((padding_mask[:, 1:] < padding_mask[:, :-1]).any()):
        raise ValueError("attention_mask pads on the right; ChatGLM needs left padding (the tokenizer's "
                         "padding side), since generation continues at the right end.")
    return padding_mask


class PrefixEmbedding(nn.Embedding):
    """The prefix encoder's table (its own class so that initialisation can tell it apart)."""


class PrefixEncoder(nn.Module):
    """P-Tuning v2: `pre_seq_len` learned prefix tokens -> past keys and values of every layer.
    Output: [B, pre_seq_len, num_layers * 2 * hidden_size]."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        kv_size = config.num_layers * config.hidden_size * 2
        self.prefix_projection = config.prefix_projection
        if self.prefix_projection:
            self.embedding = PrefixEmbedding(config.pre_seq_len, config.hidden_size)
            self.trans = nn.Sequential(nn.Linear(config.hidden_size, config.hidden_size), nn.Tanh(),
                                       nn.Linear(config.hidden_size, kv_size))
        else:
            self.embedding = PrefixEmbedding(config.pre_seq_len, kv_size)

    def forward(self, prefix: torch.LongTensor) -> torch.Tensor:
        embedded = self.embedding(prefix)
        return self.trans(embedded) if self.prefix_projection else embedded


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int, base: int = 10000):
        super().__init__()
        self.dim, self.base = dim, base
        # Part of the original state dict, rounded to fp16 there: the same rounding gives the same logits.
        # Held in fp32 whatever the model's dtype (see _apply).
        self.register_buffer("inv_freq", self.compute_inv_freq())

    def compute_inv_freq(self) -> torch.Tensor:
        return (1.0 / (self.base ** (torch.arange(0, self.dim, 2).float() / self.dim))).half().float()

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) would cast the frequencies too: in bf16 they are 0.4% off, and angles near
        # position 2000 drift by whole radians. Follow device moves, keep fp32.
        super()._apply(fn, recurse)
        if self.inv_freq.is_floating_point() and self.inv_freq.dtype != torch.float32 and not self.inv_freq.is_meta:
            self.inv_freq = self.compute_inv_freq().to(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.LongTensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """position_ids [...] -> cos, sin [..., dim] in fp32 (the original's fp16 tables lose integer precision
        past position 2048)."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1) and signed_sin = (-sin1, sin2): the same bits
    (a sign moves exactly from one factor to the other) with one operation fewer. cos, signed_sin in x's dtype."""
    return x * cos + swap_halves(x) * signed_sin


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) computed by the backend of its weight's device (kernels.py):
    on the CPU, bf16 products of a few rows run on the CPU kernel, about twice torch's speed for decoding."""

    def forward(self, input):
        return placed_backend(self, self.weight).linear(input, self.weight, self.bias)


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.position_encoding_2d = config.position_encoding_2d
        self.rotary_emb = RotaryEmbedding(self.head_dim // 2 if self.position_encoding_2d else self.head_dim)
        self.query_key_value = Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = Linear(config.hidden_size, config.hidden_size)

    def rotation(self, position_ids: torch.LongTensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """The angles of position_ids [B, 2, L] (or [B, L] for the 1-D variant) as apply_rotary takes them: cos and
        signed sin in `dtype`, shaped to rotate the q|k pairs of project() ([B, L, 1, 1, 2, hd / 2], 1-D: [B, L, 1, 1,
        hd]). Every layer's are the same: a forward computes them once for all layers (ChatGLMModel.forward, the
        serving engine's runner)."""
        if self.position_encoding_2d:
            # The first half of each head rotates by the position, the second half by the block position.
            cos, sin = self.rotary_emb(position_ids.transpose(-2, -1))  # [B, L, 2, hd / 2]
        else:
            cos, sin = self.rotary_emb(position_ids)  # [B, L, hd]
        sin1, sin2 = sin.to(dtype).chunk(2, dim=-1)
        return cos.to(dtype)[:, :, None, None], torch.cat((-sin1, sin2), dim=-1)[:, :, None, None]

    def project(self, hidden_states: torch.Tensor, position_ids: Optional[torch.LongTensor] = None,
                rotation: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        """The layer's queries, keys and values, rotated by their positions: hidden_states [B, L, H], position_ids
        [B, 2, L] (or [B, L] for the 1-D variant) or their rotation() -> q, k, v [B, L, nh, hd]. Each token's are its
        own (the serving engine runs tokens of different sequences through it as one batch row)."""
        B, L, _ = hidden_states.shape
        # The fused projection is laid out per head as [q_h, k_h, v_h].
        qkv = self.query_key_value(hidden_states).view(B, L, self.num_heads, 3 * self.head_dim)
        qk, v = qkv[..., :2 * self.head_dim], qkv[..., 2 * self.head_dim:]  # [B, L, nh, 2 hd], [B, L, nh, hd]
        cos, signed_sin = rotation if rotation is not None else self.rotation(position_ids, qk.dtype)
        # q and k rotated together: [B, L, nh, q|k, half, hd / 2] (1-D: [B, L, nh, q|k, hd])
        qk = qk.unflatten(-1, (2, 2, self.head_dim // 2) if self.position_encoding_2d else (2, self.head_dim))
        # (a no-op unless the layer computes in another dtype or on another device: autocast, a split model)
        cos, signed_sin = cos.to(qk.device, qk.dtype), signed_sin.to(qk.device, qk.dtype)
        rotated = apply_rotary(qk, cos, signed_sin)
        q, k = rotated.reshape(B, L, self.num_heads, 2, self.head_dim).unbind(3)
        return q, k, v

    def forward(self, hidden_states, position_ids, attention_bias, prefix_key=None, prefix_value=None,
                cache: Optional[Cache] = None, output_attentions: bool = False, rotation=None):
        # hidden_states [B, L, H]; position_ids [B, 2, L] (or [B, L] for the 1-D variant), or their rotation()
        # attention_bias [B or 1, 1, L, prefix + past + L] additive, or None
        B, L, _ = hidden_states.shape
        q, k, v = self.project(hidden_states, position_ids, rotation)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, nh, L, hd]
        if prefix_key is not None:
            k, v = torch.cat([prefix_key, k], dim=2), torch.cat([prefix_value, v], dim=2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_id)  # [B, nh, past + L, hd]

        backend = placed_backend(self, self.query_key_value.weight)
        context, probs = backend.attention(q, k, v, attention_bias, output_attentions)  # [B, nh, L, hd]
        if probs is not None:
            probs = probs.reshape(B * self.num_heads, L, -1)  # the original's layout
        context = context.transpose(1, 2).reshape(B, L, -1)  # [B, L, H]
        return self.dense(context), probs


class MLP(nn.Module):
    """h -> inner -> h with GELU (the original calls it GLU, but nothing is gated)."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        inner = config.inner_hidden_size or 4 * config.hidden_size
        self.dense_h_to_4h = Linear(config.hidden_size, inner)
        self.dense_4h_to_h = Linear(inner, config.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class GLMBlock(GradientCheckpointingLayer):
    def __init__(self, config: ChatGLMConfig, layer_id: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config, layer_id)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = MLP(config)
        self.alpha = (2 * ORIGINAL_NUM_LAYERS) ** 0.5

    def forward(self, hidden_states, position_ids, attention_bias, prefix_key=None, prefix_value=None,
                cache: Optional[Cache] = None, output_attentions: bool = False, rotation=None):
        # GLM's residual adds the *normalised* input, scaled by alpha.
        attention_input = self.input_layernorm(hidden_states)
        attention_output, probs = self.attention(attention_input, position_ids, attention_bias, prefix_key,
                                                 prefix_value, cache=cache, output_attentions=output_attentions,
                                                 rotation=rotation)
        return self.feed_forward(attention_input, attention_output), probs

    def feed_forward(self, attention_input: torch.Tensor, attention_output: torch.Tensor) -> torch.Tensor:
        """The layer after its attention, token by token: residual, LayerNorm, MLP, residual ([..., H] each)."""
        hidden_states = attention_input * self.alpha + attention_output
        mlp_input = self.post_attention_layernorm(hidden_states)
        return mlp_input * self.alpha + self.mlp(mlp_input)


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _supports_sdpa = True
    # A base checkpoint has no P-Tuning prefix: it is new (or comes from a P-Tuning checkpoint right after).
    _keys_to_ignore_on_load_missing = [r"prefix_encoder\."]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # transformers makes every loaded float weight trainable; P-Tuning trains the prefix alone.
        result = super().from_pretrained(*args, **kwargs)
        model = result[0] if isinstance(result, tuple) else result
        if model.config.pre_seq_len is not None:
            model.freeze_all_but_prefix()
        return result

    @property
    def is_gradient_checkpointing(self) -> bool:
        # peft still asks under this name, which newer transformers answer with a FutureWarning.
        return any(getattr(module, "gradient_checkpointing", False) for module in self.modules())

    def freeze_all_but_prefix(self):
        for name, param in self.named_parameters():
            param.requires_grad = "prefix_encoder." in name

    def _init_weights(self, module):
        if isinstance(module, PrefixEmbedding):  # the original left it to PyTorch: N(0, 1)
            init.normal_(module.weight, mean=0.0, std=1.0)
            return
        super()._init_weights(module)
        if isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())

    def get_masks(self, input_ids: torch.LongTensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """GLM attention mask [B, 1, L, L], True = blocked. `padding_mask` [B, L] (1 = token, 0 = left
        padding) blocks the padding the way the tokenizer's left padding does."""
        return self._per_sequence(input_ids, padding_mask, lambda ids: glm_attention_mask(ids, self.config.bos_token_id),
                                  pad_value=True)

    def get_position_ids(self, input_ids: torch.LongTensor, padding_mask: Optional[torch.Tensor] = None):
        """[B, 2, L] (positions, block positions), or [B, L] for the 1-D variant."""
        c = self.config
        return self._per_sequence(
            input_ids, padding_mask,
            lambda ids: glm_position_ids(ids, c.bos_token_id, c.mask_token_id, c.gmask_token_id, c.position_encoding_2d),
            pad_value=0)

    @staticmethod
    def _per_sequence(input_ids, padding_mask, build, pad_value):
        """Apply `build` to each unpadded sequence and left-pad its result (last dims are positions)."""
        rows = []
        for i, ids in enumerate(input_ids.tolist()):
            pad = 0 if padding_mask is None else int((padding_mask[i] == 0).sum())
            row = build(ids[pad:])
            widths = [(0, 0)] * (row.ndim - 1) + [(pad, 0)]
            if row.ndim == 3:  # attention mask [1, L, L]: pad the query dimension too
                widths[1] = (pad, 0)
            rows.append(np.pad(row, widths, constant_values=pad_value))
        return torch.from_numpy(np.stack(rows)).to(input_ids.device)


class ChatGLMModel(ChatGLMPreTrainedModel):
    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.num_layers = config.num_layers
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.pre_seq_len = config.pre_seq_len
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([GLMBlock(config, i) for i in range(config.num_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        if self.pre_seq_len is not None:
            self.prefix_encoder = PrefixEncoder(config)
            self.dropout = nn.Dropout(0.1)
        self.gradient_checkpointing = False
        self.post_init()
        if self.pre_seq_len is not None:
            self.freeze_all_but_prefix()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, new_embeddings):
        self.word_embeddings = new_embeddings

    def get_prompt(self, batch_size: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prefix keys and values, each [num_layers, B, heads, pre_seq_len, head_dim]."""
        prefix_tokens = torch.arange(self.pre_seq_len, device=self.word_embeddings.weight.device)
        prefix = self.prefix_encoder(prefix_tokens.unsqueeze(0).expand(batch_size, -1)).to(dtype)
        prefix = prefix.view(batch_size, self.pre_seq_len, self.num_layers * 2, self.num_heads, self.head_dim)
        prefix = self.dropout(prefix).permute(2, 0, 3, 1, 4)  # [2 * layers, B, nh, pre, hd]
        return prefix[0::2], prefix[1::2]

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, cache=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, past_key_values=None, **kwargs):
        cache = one_cache(cache, past_key_values)
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        B, L, _ = inputs_embeds.shape

        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if cache is not None:
            cache = growing(cache)
        past_length = cache.get_seq_length() if cache is not None else 0

        # attention_mask is either a padding mask [B, past + L] in Hugging Face's sense (1 or True = token,
        # 0 = left padding) or the GLM mask [B, 1, L, L] / [B, L, L] (bool, True = blocked) the tokenizer
        # builds. Masks and positions are derived from the prompt on the first step only, as in the
        # original; later steps get them from generate() or attend to everything.
        padding_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            if past_length == 0:
                padding_mask = check_padding_mask(attention_mask)
                attention_mask = self.get_masks(input_ids, padding_mask)
            else:  # [B, past + L] while decoding: the padding stays blocked
                attention_mask = attention_mask[:, None, None, :] == 0
        elif attention_mask is not None:
            if attention_mask.dtype != torch.bool or attention_mask.dim() not in (3, 4):
                raise ValueError(f"attention_mask must be a padding mask [batch, length] or the tokenizer's GLM mask "
                                 f"(bool [batch, 1, length, length], True = blocked); got {attention_mask.dtype} "
                                 f"{list(attention_mask.shape)}.")
            attention_mask = attention_mask if attention_mask.dim() == 4 else attention_mask[:, None]
        elif past_length == 0 and input_ids is not None:
            attention_mask = self.get_masks(input_ids)
        if position_ids is None:
            if input_ids is None:
                raise ValueError("position_ids are required with inputs_embeds.")
            if past_length:
                raise ValueError("position_ids are required when decoding with a cache: a new token's GLM position "
                                 "depends on the whole prompt (generate() passes them).")
            position_ids = self.get_position_ids(input_ids, padding_mask)

        prefix_keys = prefix_values = None
        if self.pre_seq_len is not None and past_length == 0:
            prefix_keys, prefix_values = self.get_prompt(B, inputs_embeds.dtype)
        attention_bias = None
        if attention_mask is not None:  # built even when nothing is blocked: testing would be a host sync
            num_keys = past_length + L + (self.pre_seq_len if prefix_keys is not None else 0)
            if attention_mask.shape[-1] < num_keys:  # the P-Tuning prefix, always visible
                attention_mask = F.pad(attention_mask, (num_keys - attention_mask.shape[-1], 0), value=False)
            attention_bias = torch.zeros(attention_mask.shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
            attention_bias.masked_fill_(attention_mask.to(inputs_embeds.device), MASK_FILL_VALUE)

        hidden_states = inputs_embeds
        rotation = self.layers[0].attention.rotation(position_ids, inputs_embeds.dtype) if self.layers else None
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states.transpose(0, 1),)
            hidden_states, probs = layer(
                hidden_states, position_ids, attention_bias,
                prefix_keys[i] if prefix_keys is not None else None,
                prefix_values[i] if prefix_values is not None else None,
                cache=cache if use_cache else None, output_attentions=output_attentions, rotation=rotation)
            if output_attentions:
                all_attentions += (probs,)
        hidden_states = self.final_layernorm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states.transpose(0, 1),)

        last_hidden_state = hidden_states.transpose(0, 1)  # [L, B, H], the original's layout
        cache = cache if use_cache else None
        if not return_dict:
            return tuple(v for v in (last_hidden_state, cache, all_hidden_states, all_attentions) if v is not None)
        return BaseModelOutputWithPast(last_hidden_state=last_hidden_state, hidden_states=all_hidden_states,
                                       attentions=all_attentions, **{CACHE_FIELD: cache})


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}
    # forward() returns the batch-mean loss and ignores num_items_in_batch: the Trainer must divide
    # by the gradient accumulation steps itself.
    accepts_loss_kwargs = False

    def __init__(self, config: ChatGLMConfig, empty_init: bool = True):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.quantized = False
        if config.quantization_bit:
            self.quantize(config.quantization_bit, empty_init=empty_init)
        # the quantized table's scales are tied too; a float checkpoint asked for quantization_embeddings (the
        # original -qe code's way) keeps float embeddings until quantize() quantizes them with the rest
        if self.quantized and config.quantization_embeddings and config.tie_word_embeddings:
            self._tied_weights_keys = {**type(self)._tied_weights_keys,
                                       "lm_head.weight_scale": "transformer.word_embeddings.weight_scale"}
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, logits_to_keep: int = 0, past_key_values=None, **kwargs):
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.transformer(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                   cache=one_cache(cache, past_key_values), inputs_embeds=inputs_embeds, use_cache=use_cache,
                                   output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                   return_dict=True)
        hidden_states = outputs.last_hidden_state.transpose(0, 1)  # [B, L, H]
        if logits_to_keep:  # generate() only needs the last position: skip the vocabulary projection elsewhere
            hidden_states = hidden_states[:, -logits_to_keep:]
        batch, length, hidden = hidden_states.shape
        # Projected as a 2-D matrix: from a strided 3-D input torch's CPU matmul takes a batched path that
        # copies the [vocab, H] weight once per batch row (1 GB each for 6B in bf16).
        logits = self.lm_head(hidden_states.reshape(batch * length, hidden)).view(batch, length, -1)  # [B, L, vocab]

        loss = None
        if labels is not None:
            shift_logits = logits[..., :-1, :].float()
            shift_labels = labels[..., 1:].to(logits.device)
            loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                                   ignore_index=-100).to(hidden_states.dtype)

        cache = getattr(outputs, CACHE_FIELD)
        if not return_dict:
            output = tuple(v for v in (logits, cache, outputs.hidden_states, outputs.attentions) if v is not None)
            return (loss,) + output if loss is not None else output
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                      attentions=outputs.attentions, **{CACHE_FIELD: cache})

    # ---- generation hooks -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        """transformers' generate() with GLM inputs. transformers only carries 2-D padding masks, so the
        tokenizer's GLM mask [B, 1, L, L] is reduced to its padding (the fully blocked rows); the model
        rebuilds the GLM mask from the tokens at the prefill. The GLM positions of the prompt and the step
        that every generated token adds to them are worked out here once, so that each decoding step
        costs the same whatever the length (the original rescanned the whole sequence per token)."""
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = (~attention_mask[:, 0].all(dim=-1)).long()
        if input_ids is not None and "glm_position_ids" not in kwargs:
            kwargs.update(zip(("glm_position_ids", "glm_position_step"),
                              self.glm_generation_positions(input_ids, attention_mask)))
        return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def glm_generation_positions(self, input_ids: torch.LongTensor, padding_mask: Optional[torch.Tensor] = None):
        """(positions of the prompt [B, 2, L], what each generated token adds to the last one [B, 2, 1]).
        The step is read off the rules themselves: the positions of the prompt plus one more token."""
        extended = F.pad(input_ids, (0, 1), value=self.config.pad_token_id)
        if padding_mask is not None:
            padding_mask = F.pad(padding_mask, (0, 1), value=1)
        positions = self.get_position_ids(extended, padding_mask)
        return positions[..., :-1], positions[..., -1:] - positions[..., -2:-1]

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        return None  # GLM positions travel as glm_position_ids, not as transformers' 1-D arange

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if model_kwargs.get("glm_position_ids") is not None:  # the next token's positions [B, 2, 1]
            model_kwargs["glm_position_ids"] = model_kwargs["glm_position_ids"][..., -1:] + model_kwargs["glm_position_step"]
        return model_kwargs

    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None, attention_mask=None,
                                      use_cache=True, glm_position_ids=None, glm_position_step=None, **kwargs):
        # attention_mask here is transformers' [B, L] padding mask (1 = token, 0 = left padding) or None.
        cache = one_cache(cache, past_key_values)
        inputs = {CACHE_FIELD: cache, "use_cache": use_cache, "attention_mask": attention_mask}
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        past_length = cache.get_seq_length() if cache is not None else 0
        if past_length == 0:  # prefill (every step without a cache): the model builds the GLM mask itself
            whole = glm_position_ids is not None and glm_position_ids.shape[-1] == input_ids.shape[-1]
            inputs.update(input_ids=input_ids, position_ids=glm_position_ids if whole else None)
        else:  # decoding: only the newest token, at the position kept since the prefill
            if glm_position_ids is None:
                glm_position_ids = self.get_position_ids(input_ids, attention_mask)
            inputs.update(input_ids=input_ids[:, -1:], position_ids=glm_position_ids[..., -1:])
        return inputs

    # ---- chat -------------------------------------------------------------------------------------

    def _chat_inputs(self, tokenizer, query, history, max_length, num_beams, do_sample, top_p, temperature,
                     logits_processor, kwargs):
        logits_processor = LogitsProcessorList(logits_processor or [])
        logits_processor.append(InvalidScoreLogitsProcessor())
        gen_kwargs = {"max_length": max_length, "num_beams": num_beams, "do_sample": do_sample,
                      "logits_processor": logits_processor, **kwargs}
        if do_sample:
            gen_kwargs.update(top_p=top_p, temperature=temperature)
        inputs = BatchEncoding({"input_ids": [encode_chat(tokenizer, query, history)]}, tensor_type="pt")
        prompt_length = inputs["input_ids"].shape[1]
        if "max_new_tokens" not in kwargs and prompt_length >= max_length:
            raise ValueError(f"the prompt is {prompt_length} tokens and leaves no room for a reply within "
                             f"max_length={max_length}: shorten the conversation or raise max_length.")
        return inputs.to(self.device), gen_kwargs

    def _chat_response(self, tokenizer, inputs, output_ids) -> str:
        return process_response(tokenizer.decode(output_ids[0, inputs["input_ids"].shape[1]:].tolist()))

    def process_response(self, response: str) -> str:
        """The original's post-processing of a reply, as a method like the original's."""
        return process_response(response)

    @torch.inference_mode()
    def chat(self, tokenizer, query: str, history: Optional[List[Tuple[str, str]]] = None,
             max_length: int = DEFAULT_MAX_LENGTH, num_beams: int = 1, do_sample: bool = True,
             top_p: float = DEFAULT_TOP_P, temperature: float = DEFAULT_TEMPERATURE, logits_processor=None, **kwargs):
        history = list(history or [])
        inputs, gen_kwargs = self._chat_inputs(tokenizer, query, history, max_length, num_beams, do_sample, top_p,
                                               temperature, logits_processor, kwargs)
        outputs = self.generate(**inputs, **gen_kwargs)
        response = self._chat_response(tokenizer, inputs, outputs)
        return response, history + [(query, response)]

    def stream_chat(self, tokenizer, query: str, history: Optional[List[Tuple[str, str]]] = None,
                    max_length: int = DEFAULT_MAX_LENGTH, do_sample: bool = True, top_p: float = DEFAULT_TOP_P,
                    temperature: float = DEFAULT_TEMPERATURE, logits_processor=None, **kwargs):
        """Yields (response so far, history with it) after every new token; the last yield equals chat()."""
        history = list(history or [])
        inputs, gen_kwargs = self._chat_inputs(tokenizer, query, history, max_length, 1, do_sample, top_p,
                                               temperature, logits_processor, kwargs)
        for output_ids in self.stream_generate(**inputs, **gen_kwargs):
            response = self._chat_response(tokenizer, inputs, output_ids)
            yield response, history + [(query, response)]

    def stream_generate(self, input_ids, **kwargs) -> Iterator[torch.LongTensor]:
        """Yields the sequences [B, L + n] after every new token (see streaming.stream_generate)."""
        return stream_generate(self, input_ids, **kwargs)

    def quantize(self, bits: int, quantize_embeddings: bool = False, use_quantization_cache: bool = False,
                 empty_init: bool = False, **kwargs):
        """Weight-only INT8/INT4 in the original checkpoint format; returns the model for chaining. The
        signature is the original -qe checkpoints' (a superset of chatglm-6b's `quantize(bits, empty_init)`,
        whose empty_init is passed by name): quantize_embeddings also quantizes the word embeddings and
        lm_head. use_quantization_cache is accepted and has nothing to do here."""
        if bits == 0:
            return self
        if bits not in (4, 8):
            raise ValueError(f"quantize({bits!r}): only 4 and 8 bits are supported.")
        if self.quantized:
            if bits != self.config.quantization_bit or quantize_embeddings and not self.config.quantization_embeddings:
                raise ValueError(f"the model is already quantized to {self.config.quantization_bit} bits"
                                 f"{' with its embeddings' if self.config.quantization_embeddings else ''}: "
                                 "load the float checkpoint to quantize it otherwise.")
            return self
        from .quantization import quantize

        self.config.quantization_bit = bits
        self.config.quantization_embeddings = quantize_embeddings = quantize_embeddings or self.config.quantization_embeddings
        quantize(self, bits, empty_init=empty_init, quantize_embeddings=quantize_embeddings, **kwargs)
        self.quantized = True
        return self
