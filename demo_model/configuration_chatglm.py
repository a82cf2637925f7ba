# Copy of chatglm_6b/configuration_chatglm.py, written by `python tools/copy_model_code.py` (runtime.saving.copy_model_code): edit chatglm_6b/configuration_chatglm.py, not this file.
"""ChatGLM-6B configuration: the keys of THUDM/chatglm-6b's config.json, with the 6B values as defaults."""
from transformers import PretrainedConfig


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"
    attribute_map = {"num_hidden_layers": "num_layers", "max_position_embeddings": "max_sequence_length"}

    def __init__(
        self,
        vocab_size=130528,
        hidden_size=4096,
        num_layers=28,
        num_attention_heads=32,
        layernorm_epsilon=1e-5,
        use_cache=True,
        bos_token_id=130004,
        eos_token_id=130005,
        mask_token_id=130000,
        gmask_token_id=130001,
        pad_token_id=3,
        max_sequence_length=2048,
        inner_hidden_size=16384,
        position_encoding_2d=True,
        quantization_bit=0,
        quantization_embeddings=False,
        pre_seq_len=None,
        prefix_projection=False,
        tie_word_embeddings=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.layernorm_epsilon = layernorm_epsilon
        self.use_cache = use_cache
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.mask_token_id = mask_token_id
        self.gmask_token_id = gmask_token_id
        self.pad_token_id = pad_token_id
        self.max_sequence_length = max_sequence_length
        self.inner_hidden_size = inner_hidden_size
        self.position_encoding_2d = position_encoding_2d
        self.quantization_bit = quantization_bit
        self.quantization_embeddings = quantization_embeddings
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        # lm_head is the word embeddings' table, also when both are quantized (-qe: they share the int4 table
        # and its scales), so a -qe checkpoint holds no lm_head.* weights.
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(**kwargs)
