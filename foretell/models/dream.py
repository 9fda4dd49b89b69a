"""Dream (Dream-org/Dream-v0-Instruct-7B): Qwen2 blocks, bidirectional, shifted logits.

Dream keeps Qwen2's weight names and config keys. Its head predicts token ``i`` at position
``i - 1`` (it was adapted from an autoregressive model); ``DiffusionLM.logits_at`` undoes that
shift so the decoders always see the logits *for* the position they reveal.
"""

from __future__ import annotations

from foretell.models.config_keys import resolve_config
from foretell.models.transformer import DiffusionLM, TransformerConfig, token_ids

# Every key of Dream's config.json (``configuration_dream.DreamConfig``), by what foretell does
# with it; a missing key takes DreamConfig's default. docs/guide.md lists them.
DEFAULTS = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "rope_scaling": None,
}
HONOURED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "rope_theta",
    "tie_word_embeddings",
)
# Implemented for these values only (rope_scaling: none, or the default rotary by name).
REQUIRED = {
    "hidden_act": ("silu",),
    "rope_scaling": (None, {"rope_type": "default"}, {"type": "default"}),
}
IGNORED = {
    "max_position_embeddings": "the longest canvas, checked at admission",
    "use_sliding_window": "Dream's code only warns about it; attention stays full",
    "sliding_window": "Dream's code only warns about it; attention stays full",
    "max_window_layers": "read only with a sliding window",
    "initializer_range": "initialisation",
    "attention_dropout": "dropout, training only",
    "mask_token_id": "token id",
}


class DreamModel(DiffusionLM):
    family = "dream"
    architecture = "DreamModel"
    shifted_logits = True
    weight_names = (
        ("model.embed_tokens.weight", "embed.weight"),
        ("model.layers.{i}.input_layernorm.weight", "blocks.{i}.attn_norm.weight"),
        ("model.layers.{i}.self_attn.q_proj.weight", "blocks.{i}.q_proj.weight"),
        ("model.layers.{i}.self_attn.q_proj.bias", "blocks.{i}.q_proj.bias"),
        ("model.layers.{i}.self_attn.k_proj.weight", "blocks.{i}.k_proj.weight"),
        ("model.layers.{i}.self_attn.k_proj.bias", "blocks.{i}.k_proj.bias"),
        ("model.layers.{i}.self_attn.v_proj.weight", "blocks.{i}.v_proj.weight"),
        ("model.layers.{i}.self_attn.v_proj.bias", "blocks.{i}.v_proj.bias"),
        ("model.layers.{i}.self_attn.o_proj.weight", "blocks.{i}.o_proj.weight"),
        ("model.layers.{i}.post_attention_layernorm.weight", "blocks.{i}.mlp_norm.weight"),
        ("model.layers.{i}.mlp.gate_proj.weight", "blocks.{i}.gate_proj.weight"),
        ("model.layers.{i}.mlp.up_proj.weight", "blocks.{i}.up_proj.weight"),
        ("model.layers.{i}.mlp.down_proj.weight", "blocks.{i}.down_proj.weight"),
        ("model.norm.weight", "norm.weight"),
        ("lm_head.weight", "lm_head.weight"),
    )

    @classmethod
    def from_checkpoint_config(
        cls, hf: dict, *, tokenizer: object | None = None, ignore_unknown_keys: bool = False
    ) -> DreamModel:
        """``tokenizer`` is unused: Dream's special ids come from config.json or its defaults."""
        c = resolve_config(
            "Dream",
            hf,
            honoured=HONOURED,
            required=REQUIRED,
            ignored=IGNORED,
            defaults=DEFAULTS,
            ignore_unknown=ignore_unknown_keys,
        )
        try:
            heads = int(c["num_attention_heads"])
            kv_heads = c["num_key_value_heads"]
            cfg = TransformerConfig(
                vocab_size=int(c["vocab_size"]),
                hidden_size=int(c["hidden_size"]),
                intermediate_size=int(c["intermediate_size"]),
                num_layers=int(c["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=heads if kv_heads is None else int(kv_heads),
                rope_theta=float(c["rope_theta"]),
                rms_norm_eps=float(c["rms_norm_eps"]),
                qkv_bias=True,
                tie_embeddings=bool(c["tie_word_embeddings"]),
            )
        except (TypeError, KeyError) as err:
            raise ValueError(f"config.json: Dream config is invalid: {err}") from None
        return cls(
            cfg,
            mask_token_id=int(hf.get("mask_token_id", 151666)),
            eos_token_ids=token_ids(hf.get("eos_token_id")),
            hf_config=hf,
        )

    def checkpoint_config(self) -> dict:
        c = self.config
        out = dict(self.hf_config)
        out.update(
            {
                "architectures": [self.architecture],
                "model_type": "Dream",
                "hidden_size": c.hidden_size,
                "intermediate_size": c.intermediate_size,
                "num_hidden_layers": c.num_layers,
                "num_attention_heads": c.num_heads,
                "num_key_value_heads": c.num_kv_heads,
                "vocab_size": c.vocab_size,
                "rope_theta": c.rope_theta,
                "rms_norm_eps": c.rms_norm_eps,
                "tie_word_embeddings": c.tie_embeddings,
                "hidden_act": "silu",
                "mask_token_id": self.mask_token_id,
                "eos_token_id": self.eos_token_ids[0] if self.eos_token_ids else None,
            }
        )
        return out
