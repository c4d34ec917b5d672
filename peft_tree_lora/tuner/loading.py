"""Loading checks and clean-up of the tuner: a checkpoint that does not fit is refused with every reason, and an
adapter whose injection or loading failed is taken out again, so that the user's model is left as it was."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import (
    BaseTunerLayer,
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
)
from peft.utils.error import NoMatchingPeftModuleError
from peft.utils.other import AuxiliaryTrainingWrapper, _get_submodules
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


def weight_problems(remapped: dict[str, torch.Tensor], adapter_name: str) -> list[str]:
    """Integer (or bool) tree tensors are refused: loading would cast them to floats without a word, and quantized
    weights read as plain numbers are no adapter. NaN or inf values load (a checkpoint of a diverged run is still
    worth inspecting) but each tensor holding them is named in a warning."""
    problems = []
    for key, tensor in remapped.items():
        readable = key.removeprefix("base_model.model.").replace(f".{adapter_name}", "")
        if ".treelora_" in key and not (tensor.is_floating_point() or tensor.is_complex()):
            problems.append(
                f"{readable} is a {str(tensor.dtype).removeprefix('torch.')} tensor; TreeLoRA weights must be "
                "floating point (float32, float16 or bfloat16)"
            )
        elif tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            warnings.warn(
                f"The TreeLoRA checkpoint for adapter '{adapter_name}' has {bad} NaN or inf value(s) in {readable}; "
                "the model's outputs will be NaN wherever that tensor is used.",
                stacklevel=4,
            )
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


@dataclass
class ModelSnapshot:
    """What adding one adapter may change in a model, taken just before the adapter is injected, so that a refused
    load can put every module, active adapter and `requires_grad` flag back as it was."""

    adapter_name: str
    modules: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)  # (parent, child name, child)
    layer_active: dict[int, object] = field(default_factory=dict)  # id(tuner layer) -> its _active_adapter
    requires_grad: dict[str, bool] = field(default_factory=dict)
    active_adapter: object = None

    @classmethod
    def take(cls, tuner: nn.Module, model: nn.Module, adapter_name: str) -> ModelSnapshot:
        snapshot = cls(adapter_name, active_adapter=_copied(getattr(tuner, "active_adapter", None)))
        for parent in model.modules():
            for child_name, child in parent.named_children():
                snapshot.modules.append((parent, child_name, child))
            if isinstance(parent, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
                snapshot.layer_active[id(parent)] = _copied(parent._active_adapter)
        snapshot.requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        return snapshot

    def restore(self, tuner: nn.Module, model: nn.Module) -> None:
        take_out(model, self.adapter_name)
        for module in model.modules():
            if isinstance(module, AuxiliaryTrainingWrapper) and self.adapter_name in module._adapters:
                module._adapters.remove(self.adapter_name)
                getattr(module, "modules_to_save", {}).pop(self.adapter_name, None)
        for parent, child_name, child in self.modules:  # parents first: modules wrapped since are unwrapped
            if getattr(parent, child_name, None) is not child:
                setattr(parent, child_name, child)
        for module in model.modules():
            if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)) and id(module) in self.layer_active:
                module._active_adapter = _copied(self.layer_active[id(module)])
        for name, param in model.named_parameters():
            if name in self.requires_grad:
                param.requires_grad = self.requires_grad[name]
        tuner.peft_config.pop(self.adapter_name, None)
        tuner.active_adapter = _copied(self.active_adapter)


def _copied(value: object) -> object:
    return list(value) if isinstance(value, list) else value


def roll_back(model: nn.Module, adapter_name: str) -> None:
    """Take a just-injected adapter out of `model` (a PeftModel or a model with injected layers), leaving the model
    as it was before: its modules, its active adapters, which parameters train."""
    from .model import TreeLoraModel

    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, TreeLoraModel):
        return
    snapshot = getattr(tuner, "_before_injection", None)
    if len(tuner.peft_config) > 1 and snapshot is not None and snapshot.adapter_name == adapter_name:
        snapshot.restore(tuner, tuner.model)
        tuner._before_injection = None
        return
    if len(tuner.peft_config) > 1:
        model.delete_adapter(adapter_name)
        return
    tuner.unload()
    requires_grad = getattr(tuner, "_base_requires_grad", {})
    for name, param in tuner.model.named_parameters():
        if name in requires_grad:
            param.requires_grad = requires_grad[name]
