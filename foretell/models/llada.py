"""LLaDA (GSAI-ML/LLaDA-8B-Base and -Instruct): OLMo-style names over the shared body.

LLaDA's checkpoints carry an OLMo-derived ``config.json`` (``d_model``, ``n_heads``,
``mlp_hidden_size``...) and weights named ``model.transformer.blocks.N.ff_proj`` and so on. Only
the LLaMA block variant is supported; options LLaDA's released models do not use (ALiBi, QK
layer norm, logit scaling...) are refused by name rather than silently ignored.
"""

from __future__ import annotations

from foretell.models.transformer import DiffusionLM, TransformerConfig, token_ids

# Options of LLaDA's config that change the numerics, with the only value we implement.
_REQUIRED = {
    "block_type": "llama",
    "layer_norm_type": "rms",
    "activation_type": "silu",
    "alibi": False,
    "rope": True,
    "attention_layer_norm": False,
    "input_emb_norm": False,
    "scale_logits": False,
    "include_bias": False,
    "clip_qkv": None,
    "multi_query_attention": None,
}


class LLaDAModelLM(DiffusionLM):
    family = "llada"
    architecture = "LLaDAModelLM"
    shifted_logits = False
    weight_names = (
        ("model.transformer.wte.weight", "embed.weight"),
        ("model.transformer.blocks.{i}.attn_norm.weight", "blocks.{i}.attn_norm.weight"),
        ("model.transformer.blocks.{i}.q_proj.weight", "blocks.{i}.q_proj.weight"),
        ("model.transformer.blocks.{i}.q_proj.bias", "blocks.{i}.q_proj.bias"),
        ("model.transformer.blocks.{i}.k_proj.weight", "blocks.{i}.k_proj.weight"),
        ("model.transformer.blocks.{i}.k_proj.bias", "blocks.{i}.k_proj.bias"),
        ("model.transformer.blocks.{i}.v_proj.weight", "blocks.{i}.v_proj.weight"),
        ("model.transformer.blocks.{i}.v_proj.bias", "blocks.{i}.v_proj.bias"),
        ("model.transformer.blocks.{i}.attn_out.weight", "blocks.{i}.o_proj.weight"),
        ("model.transformer.blocks.{i}.ff_norm.weight", "blocks.{i}.mlp_norm.weight"),
        ("model.transformer.blocks.{i}.ff_proj.weight", "blocks.{i}.gate_proj.weight"),
        ("model.transformer.blocks.{i}.up_proj.weight", "blocks.{i}.up_proj.weight"),
        ("model.transformer.blocks.{i}.ff_out.weight", "blocks.{i}.down_proj.weight"),
        ("model.transformer.ln_f.weight", "norm.weight"),
        ("model.transformer.ff_out.weight", "lm_head.weight"),
    )

    @classmethod
    def from_checkpoint_config(cls, hf: dict) -> LLaDAModelLM:
        for key, wanted in _REQUIRED.items():
            if hf.get(key, wanted) != wanted:
                raise ValueError(
                    f"config.json: LLaDA option {key}={hf[key]!r} is not supported "
                    f"(only {wanted!r})"
                )
        try:
            d_model, n_heads = int(hf["d_model"]), int(hf["n_heads"])
            hidden = hf.get("mlp_hidden_size") or int(hf.get("mlp_ratio", 4)) * d_model
            cfg = TransformerConfig(
                vocab_size=int(hf.get("embedding_size") or hf["vocab_size"]),
                hidden_size=d_model,
                intermediate_size=int(hidden),
                num_layers=int(hf["n_layers"]),
                num_heads=n_heads,
                num_kv_heads=int(hf.get("n_kv_heads") or n_heads),
                rope_theta=float(hf.get("rope_theta", 10000.0)),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                qkv_bias=bool(hf.get("include_qkv_bias", False)),
                tie_embeddings=bool(hf.get("weight_tying", False)),
            )
        except KeyError as err:
            raise ValueError(f"config.json: LLaDA config is missing {err.args[0]!r}") from None
        return cls(
            cfg,
            mask_token_id=int(hf.get("mask_token_id", 126336)),
            eos_token_ids=token_ids(hf.get("eos_token_id")),
            hf_config=hf,
        )

    def checkpoint_config(self) -> dict:
        c = self.config
        out = dict(self.hf_config)
        out.update(
            {
                "architectures": [self.architecture],
                "model_type": "llada",
                "d_model": c.hidden_size,
                "n_heads": c.num_heads,
                "n_kv_heads": c.num_kv_heads,
                "n_layers": c.num_layers,
                "mlp_hidden_size": c.intermediate_size,
                "vocab_size": c.vocab_size,
                "embedding_size": c.vocab_size,
                "rope_theta": c.rope_theta,
                "rms_norm_eps": c.rms_norm_eps,
                "include_qkv_bias": c.qkv_bias,
                "weight_tying": c.tie_embeddings,
                "mask_token_id": self.mask_token_id,
                "eos_token_id": self.eos_token_ids[0] if self.eos_token_ids else None,
                **{k: v for k, v in _REQUIRED.items() if v is not None},
            }
        )
        return out
