"""Checks an adapter's weights file before anything is injected into a model.

PEFT injects the adapter layers first and reads the weights afterwards, so a missing or corrupt file would leave
the user's base model half-wrapped. `TreeLoraConfig.from_pretrained` remembers where the config came from, and
`TreeLoraModel.inject_adapter` calls `verify_adapter_weights` before touching the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import safe_open

from .errors import TreeLoraUsageError


@dataclass
class WeightsSource:
    """Where an adapter config was loaded from: a local directory or a Hub repo id (+ download options)."""

    location: str
    subfolder: str | None = None
    download_kwargs: dict[str, Any] = field(default_factory=dict)


def verify_adapter_weights(source: WeightsSource) -> str:
    """Return the path of the adapter's weights file (safetensors, or a tensors-only `.bin`), or raise a
    `TreeLoraUsageError` saying what is wrong."""
    local_dir = os.path.join(source.location, source.subfolder) if source.subfolder else source.location
    if os.path.isdir(local_dir):
        weights = os.path.join(local_dir, SAFETENSORS_WEIGHTS_NAME)
        if not os.path.isfile(weights):
            present = sorted(os.listdir(local_dir))
            if WEIGHTS_NAME in present:
                return _verified_torch_file(os.path.join(local_dir, WEIGHTS_NAME))
            raise TreeLoraUsageError(
                f"No {SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME} in {local_dir} (it holds: {present})."
            )
    else:
        try:
            weights = hf_hub_download(
                source.location, SAFETENSORS_WEIGHTS_NAME, subfolder=source.subfolder, **source.download_kwargs
            )
        except EntryNotFoundError:
            raise TreeLoraUsageError(
                f"The Hub repo {source.location!r} has no {SAFETENSORS_WEIGHTS_NAME}"
                + (f" in subfolder {source.subfolder!r}" if source.subfolder else "")
                + "; TreeLoRA adapters load from safetensors only."
            ) from None
    try:
        with safe_open(weights, framework="pt") as reader:
            reader.keys()
    except Exception as error:  # safetensors raises its own error types for every kind of damage
        raise TreeLoraUsageError(f"{weights} is not a readable safetensors file ({error}).") from None
    return weights


def _verified_torch_file(path: str) -> str:
    """An `adapter_model.bin` (written by `save_pretrained(safe_serialization=False)`) is read the way PEFT reads
    it, `torch.load(weights_only=True)`, which loads tensors and refuses pickled code."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file, or one holding more than tensors
        raise TreeLoraUsageError(
            f"{path} cannot be read as tensors only ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "TreeLoRA never unpickles code. Re-save the adapter with save_pretrained()."
        ) from None
    if not isinstance(state, dict) or not all(hasattr(value, "shape") for value in state.values()):
        raise TreeLoraUsageError(f"{path} does not hold a dictionary of tensors.")
    return path
