"""LLaDA (GSAI-ML/LLaDA-8B-Base and -Instruct): OLMo-style names over the shared body.

LLaDA's checkpoints carry an OLMo-derived ``config.json`` (``d_model``, ``n_heads``,
``mlp_hidden_size``...) and weights named ``model.transformer.blocks.N.ff_proj`` and so on. Only
the LLaMA block variant is supported; options LLaDA's released models do not use (ALiBi, QK
layer norm, logit scaling...) are refused by name rather than silently ignored.
"""

from __future__ import annotations

from foretell.models.config_keys import resolve_config
from foretell.models.transformer import DiffusionLM, TransformerConfig, token_ids

# Every key of LLaDA's config.json, by what foretell does with it. A missing key takes the
# default of the official ``configuration_llada.ModelConfig`` (not the 8B model's value), as
# the official code would; docs/guide.md lists them.
DEFAULTS = {
    "d_model": 768,
    "n_heads": 12,
    "n_kv_heads": None,
    "multi_query_attention": None,
    "n_layers": 12,
    "mlp_ratio": 4,
    "mlp_hidden_size": None,
    "vocab_size": 50257,
    "embedding_size": 50304,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-05,
    "include_qkv_bias": False,
    "weight_tying": True,
    "rope_full_precision": True,
    "block_type": "sequential",
    "activation_type": "swiglu",
    "layer_norm_type": "default",
    "layer_norm_with_affine": True,
    "bias_for_layer_norm": None,
    "rope": False,
    "alibi": False,
    "attention_layer_norm": False,
    "input_emb_norm": False,
    "scale_logits": False,
    "include_bias": False,
}
# Honoured: they shape the body or its numerics and are read into TransformerConfig.
HONOURED = (
    "d_model",
    "n_heads",
    "n_kv_heads",
    "multi_query_attention",
    "n_layers",
    "mlp_ratio",
    "mlp_hidden_size",
    "vocab_size",
    "embedding_size",
    "rope_theta",
    "rms_norm_eps",
    "include_qkv_bias",
    "weight_tying",
    "rope_full_precision",
)
# Change the numerics and are implemented for one value only: any other is refused by name.
REQUIRED = {
    "block_type": "llama",
    "activation_type": "silu",
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "bias_for_layer_norm": (None, False),
    "rope": True,
    "alibi": False,
    "attention_layer_norm": False,
    "input_emb_norm": False,
    "scale_logits": False,
    "include_bias": False,
    "clip_qkv": None,  # an OLMo key LLaDA's code never reads; a value means a fork that clips
}
# Read by the official code, but they do not change an inference forward pass.
IGNORED = {
    "block_group_size": "groups blocks for FSDP wrapping only",
    "alibi_bias_max": "read only with alibi (refused)",
    "attention_layer_norm_with_affine": "read only with attention_layer_norm (refused)",
    "flash_attention": "attention kernel choice",
    "attention_dropout": "dropout, training only",
    "residual_dropout": "dropout, training only",
    "embedding_dropout": "dropout, training only",
    "init_device": "initialisation",
    "init_fn": "initialisation",
    "init_std": "initialisation",
    "init_cutoff_factor": "initialisation",
    "precision": "training precision; the dtype is chosen at load",
    "max_sequence_length": "the longest canvas (checked at admission) and the rotary table",
    "mask_token_id": "token id",
    "tie_word_embeddings": "transformers' key; LLaDA ties by weight_tying",
    # Added by forks that copy LLaDA's config without changing its forward pass.
    "train_max_sequence_length": "Fast-dLLM's copy: training sequence length, read by no forward",
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
    def from_checkpoint_config(
        cls, hf: dict, *, tokenizer: object | None = None, ignore_unknown_keys: bool = False
    ) -> LLaDAModelLM:
        """``tokenizer`` is unused: LLaDA's special ids come from config.json or its defaults."""
        c = resolve_config(
            "LLaDA",
            hf,
            honoured=HONOURED,
            required=REQUIRED,
            ignored=IGNORED,
            defaults=DEFAULTS,
            ignore_unknown=ignore_unknown_keys,
        )
        try:
            d_model, n_heads = int(c["d_model"]), int(c["n_heads"])
            cfg = TransformerConfig(
                vocab_size=int(c["embedding_size"] or c["vocab_size"]),
                hidden_size=d_model,
                intermediate_size=int(c["mlp_hidden_size"] or int(c["mlp_ratio"]) * d_model),
                num_layers=int(c["n_layers"]),
                num_heads=n_heads,
                num_kv_heads=_kv_heads(c["n_kv_heads"], c["multi_query_attention"], n_heads),
                rope_theta=float(c["rope_theta"]),
                rms_norm_eps=float(c["rms_norm_eps"]),
                qkv_bias=bool(c["include_qkv_bias"]),
                tie_embeddings=bool(c["weight_tying"]),
                rope_full_precision=bool(c["rope_full_precision"]),
            )
        except (TypeError, KeyError) as err:
            raise ValueError(f"config.json: LLaDA config is invalid: {err}") from None
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
                "rope_full_precision": c.rope_full_precision,
                "mask_token_id": self.mask_token_id,
                "eos_token_id": self.eos_token_ids[0] if self.eos_token_ids else None,
                **{k: v for k, v in REQUIRED.items() if v is not None and not isinstance(v, tuple)},
            }
        )
        return out


def _kv_heads(n_kv_heads: int | None, multi_query: bool | None, n_heads: int) -> int:
    """LLaDA's ``effective_n_kv_heads``."""
    if n_kv_heads is None:
        return 1 if multi_query is True else n_heads
    if multi_query is not None and int(n_kv_heads) != (1 if multi_query else n_heads):
        raise ValueError("config.json: LLaDA options n_kv_heads and multi_query_attention disagree")
    return int(n_kv_heads)
