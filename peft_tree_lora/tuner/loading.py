"""Loading checks and clean-up of the tuner: a checkpoint that does not fit is refused with every reason, and an
adapter whose injection or loading failed is taken out again, so that the user's model is left as it was."""

from __future__ import annotations

import warnings

import torch
from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes
from peft.utils.error import NoMatchingPeftModuleError
from peft.utils.other import _get_submodules
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import TreeLoraConfig
from .errors import TreeLoraUsageError
from .layer import TreeLoraLayer


class NoTargetModulesError(TreeLoraUsageError, NoMatchingPeftModuleError):
    """The config's target_modules matched nothing; still a PEFT `NoMatchingPeftModuleError` for code catching that."""


def adaptable_modules_hint(model: nn.Module) -> str:
    """Name the modules a TreeLoRA can adapt (PEFT's own message says only that nothing matched)."""
    names = sorted(
        {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D))}
    )
    if not names:
        return f"{type(model).__name__} has no torch.nn.Linear or Conv1D layer for TreeLoRA to adapt."
    return f"Layers TreeLoRA can adapt in {type(model).__name__}: {names}, or target_modules='all-linear'."


def fit_problems(
    model: nn.Module, config: TreeLoraConfig, adapter_name: str, remapped: dict[str, torch.Tensor]
) -> list[str]:
    prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
    expected = _filter_state_dict_by_key_prefixes(model.state_dict(), prefixes)
    peft_prefix = "base_model.model."
    checkpoint = {k.removeprefix(peft_prefix): v for k, v in remapped.items() if ".treelora_" in k}
    problems = []
    seen = set()
    for key, param in expected.items():
        short = key.removeprefix(peft_prefix)
        seen.add(short)
        readable = short.replace(f".{adapter_name}", "")
        if short not in checkpoint:
            what = "router tensor" if ".treelora_router." in short else "tensor"
            problems.append(f"missing {what} {readable}")
            continue
        found = tuple(checkpoint[short].shape)
        if found != tuple(param.shape):
            module = readable.rsplit(".treelora_", 1)[0]
            detail = f"{module}: checkpoint has {found}, the model needs {tuple(param.shape)}"
            if ".treelora_A" in short and found[1:] == tuple(param.shape)[1:]:
                leaves = found[0]
                depth = leaves.bit_length() - 1
                detail += (
                    f" (the weights hold {leaves} leaves, depth {depth}, but adapter_config.json says "
                    f"depth={config.depth}, {config.num_leaves} leaves)"
                )
            problems.append(detail)
    for key in sorted(set(checkpoint) - seen):
        problems.append(f"unexpected tensor {key.replace(f'.{adapter_name}', '')}: no such module in this model")
    return problems


def take_out(model: nn.Module, adapter_name: str) -> None:
    """Remove one adapter from every TreeLoRA layer of `model`; layers left without adapters give way to their
    base layer again."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, TreeLoraLayer) or adapter_name not in module.depth:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module.delete_adapter(adapter_name)
        if not module.depth:
            parent, _, child_name = _get_submodules(model, name)
            setattr(parent, child_name, module.get_base_layer())


def roll_back(model: nn.Module, adapter_name: str) -> None:
    """Take a just-injected adapter out of `model` (a PeftModel or a model with injected layers)."""
    from .model import TreeLoraModel

    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, TreeLoraModel):
        return
    if len(tuner.peft_config) > 1:
        model.delete_adapter(adapter_name)
        return
    tuner.unload()
    requires_grad = getattr(tuner, "_base_requires_grad", {})
    for name, param in tuner.model.named_parameters():
        if name in requires_grad:
            param.requires_grad = requires_grad[name]
