"""Every config.json key is known: honoured, refused unless it has the one supported value, or
known not to change an inference forward pass. Anything else fails to load, naming the key,
because a key foretell has never seen may change the numerics (a fork's option, a quantisation
config) and ignoring it would decode with a different model than the checkpoint describes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

# transformers' PretrainedConfig fields that checkpoints carry and that no forward pass reads:
# bookkeeping, output switches, labels, token ids, the saved dtype (foretell's is chosen at
# load) and the attention kernel choice.
HF_GENERIC_KEYS = (
    "_name_or_path",
    "architectures",
    "auto_map",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "is_encoder_decoder",
    "chunk_size_feed_forward",
    "id2label",
    "label2id",
    "problem_type",
    "tokenizer_class",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attn_implementation",
    "_attn_implementation_autoset",
)


def check_keys(
    family: str, config: dict, known: Iterable[str], *, ignore_unknown: bool = False
) -> list[str]:
    """Refuse a config with a key outside ``known``, naming it.

    ``ignore_unknown`` (the loader's ``ignore_unknown_config_keys``) loads anyway: the unknown
    keys are ignored, named in a warning, and returned, so the user who asked for it sees
    exactly what the model may be missing.
    """
    unknown = sorted(set(config) - set(known))
    if unknown and ignore_unknown:
        warnings.warn(
            f"config.json: ignoring unknown {family} config keys {unknown} "
            "(ignore_unknown_config_keys=True); if one of them changes the model's numerics, "
            "foretell decodes with a different model than the checkpoint describes",
            stacklevel=3,
        )
    elif unknown:
        raise ValueError(
            f"config.json: unknown {family} config key {unknown[0]!r}"
            f"{f' (and {unknown[1:]})' if unknown[1:] else ''}: foretell cannot tell whether "
            "it changes the model's numerics, so it does not load it (docs/guide.md lists the "
            "keys it knows; load_model(..., ignore_unknown_config_keys=True) loads anyway)"
        )
    return unknown


def resolve_config(
    family: str,
    config: dict,
    *,
    honoured: Iterable[str],
    required: dict,
    ignored: Iterable[str],
    defaults: dict,
    ignore_unknown: bool = False,
) -> dict:
    """A family's config.json checked and completed: a key outside the family's lists is refused
    (see :func:`check_keys`), a ``required`` option outside its allowed value (or tuple of
    values) is refused by name, and ``defaults`` fill the keys the file leaves out."""
    known = (*honoured, *required, *ignored, *HF_GENERIC_KEYS)
    check_keys(family, config, known, ignore_unknown=ignore_unknown)
    resolved = {**defaults, **config}
    for key, wanted in required.items():
        allowed = wanted if isinstance(wanted, tuple) else (wanted,)
        if resolved.get(key) not in allowed:
            raise ValueError(
                f"config.json: {family} option {key}={resolved.get(key)!r} is not supported "
                f"(only {' or '.join(repr(v) for v in allowed)})"
            )
    return resolved
