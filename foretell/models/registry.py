"""From a checkpoint directory (or hub id) to a ready model and its tokenizer.

A checkpoint is a Hugging Face model directory: ``config.json``, weights as one
``model.safetensors`` or shards listed by ``model.safetensors.index.json``, and tokenizer files
(optional: a directory without them loads, for token-id prompts). The family is chosen from
``architectures`` (or ``model_type``) in the config: the full-attention LLaDA and Dream, the
block-causal SDAR and LLaDA2.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from foretell.models.block_causal import BlockCausalLM
from foretell.models.dream import DreamModel
from foretell.models.llada import LLaDAModelLM
from foretell.models.llada2 import LLaDA2Model
from foretell.models.sdar import SDARModel
from foretell.models.transformer import DiffusionLM

# Any loaded family: full-attention (DiffusionLM) or block-causal (BlockCausalLM).
AnyModel = Union[DiffusionLM, BlockCausalLM]  # noqa: UP007 (a runtime alias on Python 3.10)
ARCHITECTURES: dict[str, type[AnyModel]] = {
    "LLaDAModelLM": LLaDAModelLM,
    "DreamModel": DreamModel,
    "SDARForCausalLM": SDARModel,
    "LLaDA2MoeModelLM": LLaDA2Model,
}
MODEL_TYPES: dict[str, type[AnyModel]] = {
    "llada": LLaDAModelLM,
    "dream": DreamModel,
    "sdar": SDARModel,
    "llada2_moe": LLaDA2Model,
    "llada2_moe_veomni": LLaDA2Model,  # dFactory's training copy of the config
}
# Files any transformers tokenizer is saved with; a directory with none of them has none.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
)
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class LoadedModel:
    model: AnyModel
    tokenizer: object  # a transformers tokenizer, or None (token-id prompts only)
    path: Path


def model_class(config: dict) -> type[AnyModel]:
    """The family class for a config.json, or a ValueError naming what was found."""
    for arch in config.get("architectures") or []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    model_type = str(config.get("model_type", "")).lower()
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    raise ValueError(
        f"model: unknown architecture {config.get('architectures')} / model_type "
        f"{config.get('model_type')!r}; supported: {sorted(ARCHITECTURES)}"
    )


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _local_dir(path_or_id: str | os.PathLike) -> Path:
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model: {path} is a file; give the checkpoint directory")
        return path
    name = str(path_or_id)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name))
        except Exception as err:  # offline, unknown repo, no permission...
            raise ValueError(
                f"model: {name!r} is not a local directory and the hub download failed: {err}"
            ) from err
    raise ValueError(f"model: no such directory {path}")


def _weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
    elif (directory / WEIGHTS_NAME).exists():
        files = [directory / WEIGHTS_NAME]
    else:
        raise ValueError(f"model: {directory} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise ValueError(f"model: weight shards listed in the index are missing: {missing}")
    return files


def load_weights(model: AnyModel, directory: Path) -> None:
    """Copy a checkpoint's tensors into ``model``, naming any tensor that does not fit.

    A checkpoint tensor fills a whole parameter or, where the family says so
    (``checkpoint_target``), one slice of it along the first dimension (an MoE's experts
    stored one tensor each); a parameter counts as loaded once every slice is.
    """
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    slices: dict[str, set[int]] = {}
    for file in _weight_files(directory):
        with safe_open(str(file), framework="pt") as shard:
            for name in shard.keys():  # noqa: SIM118 (safe_open is not a dict)
                where = model.checkpoint_target(name)
                internal, index = where if where is not None else (None, None)
                if internal is None or internal not in params:
                    if model.config.tie_embeddings and internal == "lm_head.weight":
                        continue
                    raise ValueError(f"model: unexpected tensor {name!r} in {file.name}")
                tensor = shard.get_tensor(name)
                target = params[internal]
                if index is not None:
                    if not 0 <= index < target.shape[0]:
                        raise ValueError(
                            f"model: tensor {name!r} is slice {index} of a parameter with "
                            f"{target.shape[0]} (the config's count)"
                        )
                    target = target[index]
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ValueError(
                        f"model: tensor {name!r} has shape {tuple(tensor.shape)}, "
                        f"the config implies {tuple(target.shape)}"
                    )
                with torch.no_grad():
                    target.copy_(tensor.to(target.dtype))
                if index is None:
                    loaded.add(internal)
                else:
                    slices.setdefault(internal, set()).add(index)
    loaded.update(n for n, got in slices.items() if len(got) == params[n].shape[0])
    missing = sorted(model.to_checkpoint_name(n) for n in params if n not in loaded)
    if missing:
        raise ValueError(
            f"model: checkpoint is missing tensors {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}"
        )


def load_model(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attention_backend: str = "auto",
    load_tokenizer: bool = True,
    ignore_unknown_config_keys: bool = False,
) -> LoadedModel:
    """Load a LLaDA, Dream, SDAR or LLaDA2 checkpoint directory (or hub id) for inference.

    ``ignore_unknown_config_keys``: load a config.json with keys foretell does not know (by
    default refused, since one may change the numerics); they are named in a warning.
    The tokenizer is loaded first when the directory has one, because the block-causal
    families take their mask and EOS ids from it when config.json has none.
    """
    directory = _local_dir(path)
    config_file = directory / "config.json"
    if not config_file.exists():
        raise ValueError(f"model: {directory} has no config.json")
    config = json.loads(config_file.read_text())
    cls = model_class(config)
    torch_dtype = resolve_dtype(dtype)
    tokenizer = _load_tokenizer(directory) if load_tokenizer else None
    generation_file = directory / "generation_config.json"
    generation = json.loads(generation_file.read_text()) if generation_file.exists() else None
    with torch.device("meta"):
        if issubclass(cls, BlockCausalLM):
            model = cls.from_checkpoint_config(
                config,
                tokenizer=tokenizer,
                generation_config=generation,
                ignore_unknown_keys=ignore_unknown_config_keys,
            )
        else:
            model = cls.from_checkpoint_config(
                config, ignore_unknown_keys=ignore_unknown_config_keys
            )
    model = model.to(torch_dtype).to_empty(device=device)
    load_weights(model, directory)
    model.eval().requires_grad_(False)
    model.set_attention_backend(attention_backend)
    return LoadedModel(model=model, tokenizer=tokenizer, path=directory)


def _load_tokenizer(directory: Path) -> object | None:
    """The directory's tokenizer (with its chat template), or None when it has none."""
    if not any((directory / name).exists() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # transformers does not know the dLLM model types and warns about it while looking for the
    # tokenizer class; the tokenizer itself loads fine.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as err:
        raise ValueError(f"model: cannot load the tokenizer from {directory}: {err}") from err
    finally:
        hf_logging.set_verbosity(verbosity)


def save_model(
    model: AnyModel,
    directory: str | os.PathLike,
    tokenizer: object | None = None,
    *,
    max_shard_bytes: int = 2 * 1024**3,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` in its family's Hugging Face format, sharding above ``max_shard_bytes``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = model.checkpoint_tensors(dtype)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    for stale in (out / WEIGHTS_NAME, out / INDEX_NAME, *out.glob("model-*.safetensors")):
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(model.checkpoint_config(), indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
