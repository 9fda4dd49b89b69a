"""Dream (Dream-org/Dream-v0-Instruct-7B): Qwen2 blocks, bidirectional, shifted logits.

Dream keeps Qwen2's weight names and config keys. Its head predicts token ``i`` at position
``i - 1`` (it was adapted from an autoregressive model); ``DiffusionLM.logits_at`` undoes that
shift so the decoders always see the logits *for* the position they reveal.
"""

from __future__ import annotations

from foretell.models.transformer import DiffusionLM, TransformerConfig, token_ids


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
    def from_checkpoint_config(cls, hf: dict) -> DreamModel:
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported")
        if hf.get("rope_scaling"):
            raise ValueError("config.json: rope_scaling is not supported")
        try:
            heads = int(hf["num_attention_heads"])
            cfg = TransformerConfig(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=int(hf["hidden_size"]),
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                rope_theta=float(hf.get("rope_theta", 10000.0)),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                qkv_bias=True,
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            )
        except KeyError as err:
            raise ValueError(f"config.json: Dream config is missing {err.args[0]!r}") from None
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
