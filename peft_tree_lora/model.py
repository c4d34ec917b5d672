"""`TreeLoraModel`: the PEFT tuner that puts TreeLoRA layers into a model."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
)
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.error import NoMatchingPeftModuleError
from peft.utils.other import _get_submodules
from torch import nn
from transformers.pytorch_utils import Conv1D

from .checkpoint import verify_adapter_weights
from .config import TreeLoraConfig
from .context import RoutingContext
from .errors import TreeLoraUsageError
from .layer import TreeLoraLayer, TreeLoraLinear, TreeLoraSequenceRouter

_ADAPTER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


class TreeLoraModel(BaseTuner):
    """Creates a TreeLoRA model from a pretrained transformers model; use it through `peft.get_peft_model`.

    Besides PEFT's tuner API it offers `leaf_routes` (which leaf an input takes), `set_inference_routing`
    (hard or soft evaluation), `pin_leaf`/`unpin_leaf` (one leaf for every sequence) and `auxiliary_losses`
    (the router losses of the last training forward pass).
    """

    prefix: str = "treelora_"
    tuner_layer_cls = TreeLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    # --- injection --------------------------------------------------------------------------------------------

    def _pre_injection_hook(self, model: nn.Module, config: TreeLoraConfig, adapter_name: str) -> None:
        self.routing_context = _find_routing_context(model) or RoutingContext()
        if not any(isinstance(m, TreeLoraLayer) for m in model.modules()):
            self._base_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if not isinstance(adapter_name, str) or not _ADAPTER_NAME.match(adapter_name):
            raise ValueError(
                f"TreeLoRA adapter names must start with a letter or '_' and hold only letters, digits, '_' and '-' "
                f"(no '.'); got {adapter_name!r}."
            )
        if not hasattr(self, "routing_context"):
            self.routing_context = _find_routing_context(model) or RoutingContext()
        config = self.peft_config[adapter_name]
        source = getattr(config, "_weights_source", None)
        if source is not None:  # loading a saved adapter: fail now if its weights are unreadable, before injecting
            verify_adapter_weights(source)
            config._weights_source = None
        if config.routing == "sequence" and config.depth > 0 and not hasattr(model, "get_input_embeddings"):
            raise ValueError("TreeLoraConfig.routing='sequence' needs a model with get_input_embeddings().")
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
            if config.routing == "sequence" and config.depth > 0:
                self._attach_sequence_router(model, adapter_name, config)
        except NoMatchingPeftModuleError as error:
            _take_out(model, adapter_name)
            raise NoTargetModulesError(f"{error} {_adaptable_modules_hint(model)}") from None
        except Exception:
            _take_out(model, adapter_name)  # PEFT replaces modules one by one: undo the ones already replaced
            raise
        self._refresh_context()

    def _create_and_replace(
        self,
        peft_config: TreeLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        is_input_embedding = (
            target is self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else False
        )
        if is_input_embedding and peft_config.routing == "sequence" and peft_config.depth > 0:
            # only reached when injecting from a state dict, which names the router's embedding module
            self._attach_sequence_router(self.model, adapter_name, peft_config)
            return
        if isinstance(target, TreeLoraLinear):
            target.update_layer(adapter_name, peft_config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        try:
            new_module = TreeLoraLinear(target, adapter_name, peft_config, self.routing_context, current_key)
        except TypeError:
            raise ValueError(
                f"TreeLoRA adapts torch.nn.Linear and transformers Conv1D layers; target module '{current_key}' is a "
                f"{type(base).__name__}. Adjust target_modules / exclude_modules."
            ) from None
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _attach_sequence_router(self, model: nn.Module, adapter_name: str, config: TreeLoraConfig) -> None:
        embeddings = model.get_input_embeddings()
        if isinstance(embeddings, TreeLoraSequenceRouter):
            if adapter_name not in embeddings.treelora_router:
                embeddings.update_layer(adapter_name, config)
        else:
            name = next(n for n, m in model.named_modules() if m is embeddings)
            parent, target, target_name = _get_submodules(model, name)
            router = TreeLoraSequenceRouter(target, adapter_name, config, self.routing_context, name)
            if adapter_name not in self.active_adapters:
                router.requires_grad_(False)
            self._replace_module(parent, target_name, router, target)
        context = self.routing_context
        if context.hook_handle is None:
            context.hook_handle = model.register_forward_pre_hook(context.before_model_forward, with_kwargs=True)

    def _refresh_context(self) -> None:
        """Recount the trees sharing each adapter's auxiliary-loss weight, and refresh per-adapter settings."""
        context = self.routing_context
        context.num_routed_trees.clear()
        for module in self.model.modules():
            if isinstance(module, TreeLoraLinear):
                for adapter, depth in module.depth.items():
                    if depth > 0 and module.routing[adapter] == "token":
                        context.num_routed_trees[adapter] = context.num_routed_trees.get(adapter, 0) + 1
        for adapter, config in self.peft_config.items():
            if config.routing == "sequence":
                context.num_routed_trees[adapter] = 1
            context.aux_weights[adapter] = (config.hardening_loss_weight, config.load_balance_loss_weight)
            context.soft_inference.setdefault(adapter, config.inference_routing == "soft")
        if not any(c.routing == "sequence" and c.depth > 0 for c in self.peft_config.values()):
            self._remove_sequence_hook()

    def _remove_sequence_hook(self) -> None:
        context = self.routing_context
        if context.hook_handle is not None:
            context.hook_handle.remove()
            context.hook_handle = None

    # --- forward ----------------------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any):
        """Run the model; in training with `labels`, the returned loss includes the routers' auxiliary losses.

        The auxiliary losses' gradients are attached to the layers that computed them (see
        `routing.attach_auxiliary_loss`), so the value added here is detached: adding it makes the reported loss
        the loss that is optimised, without counting its gradient twice.
        """
        self.routing_context.records.clear()
        outputs = self.model(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        if self.training and kwargs.get("labels") is not None and loss is not None:
            aux = self.routing_context.auxiliary_losses()
            if aux:
                outputs.loss = loss + aux["total"].to(loss.dtype)
        return outputs

    def auxiliary_losses(self) -> dict[str, float]:
        """The router losses of the last training forward pass: mean `hardening` and `load_balance` over the trees,
        and the weighted `total` that was added to the loss. Empty before any training forward pass."""
        return {name: float(value) for name, value in self.routing_context.auxiliary_losses().items()}

    def parameter_counts(self, adapter_name: str | None = None) -> dict[str, int]:
        """Adapter size of one adapter: `total` (every leaf and router) and `active_per_token` (what one token
        touches under hard routing: one leaf per module, plus the `depth` routers on its path for token routing;
        a sequence router runs once per sequence and is not counted per token)."""
        adapter = adapter_name or self.active_adapters[0]
        self._check_adapter(adapter)
        total = active = 0
        for module in self.model.modules():
            if not isinstance(module, TreeLoraLayer) or adapter not in module.depth:
                continue
            depth = module.depth[adapter]
            router_params = (
                sum(p.numel() for p in module.treelora_router[adapter].parameters())
                if (adapter in module.treelora_router)
                else 0
            )
            total += router_params
            if isinstance(module, TreeLoraLinear):
                leaf_params = module.r[adapter] * (module.in_features + module.out_features)
                total += leaf_params * 2**depth
                active += leaf_params
                if router_params:
                    active += depth * (module.in_features + 1)
        return {"total": total, "active_per_token": active}

    # --- routing controls -------------------------------------------------------------------------------------

    @torch.no_grad()
    def leaf_routes(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, Any]:
        """Which leaf each input takes under hard routing.

        Returns `{module_name: LongTensor (batch, seq)}` for token-routed adapters and `{"sequence": LongTensor
        (batch,)}` for sequence-routed ones (of the active adapter). Runs one evaluation forward pass.
        """
        context = self.routing_context
        was_training = self.model.training
        previous_soft = dict(context.soft_inference)
        context.captured_routes = {}
        try:
            self.model.eval()
            for adapter in context.soft_inference:
                context.soft_inference[adapter] = False
            context._routed_input_ids = None  # never treat this call as a continuation
            self.model(input_ids=input_ids, attention_mask=attention_mask)
            captured = context.captured_routes
        finally:
            context.captured_routes = None
            context.soft_inference.update(previous_soft)
            self.model.train(was_training)
        router = context.sequence_router
        routes = {}
        for name, leaf in captured.items():
            is_router = router is not None and name == router.module_name
            routes["sequence" if is_router else name] = leaf
        return routes

    def set_inference_routing(self, mode: str, adapter_name: str | None = None) -> None:
        """Evaluate with `"hard"` routing (one leaf per token or sequence) or `"soft"` routing (all leaves mixed)."""
        if mode not in ("hard", "soft"):
            raise ValueError(f"inference routing must be 'hard' or 'soft'; got {mode!r}.")
        for adapter in [adapter_name] if adapter_name else list(self.peft_config):
            self._check_adapter(adapter)
            self.routing_context.soft_inference[adapter] = mode == "soft"

    def pin_leaf(self, leaf: int, adapter_name: str | None = None) -> None:
        """Send every sequence to `leaf` (sequence routing only): the adapter then acts as one plain LoRA, which
        `merge_and_unload()` can merge."""
        adapter = adapter_name or self.active_adapters[0]
        self._check_adapter(adapter)
        config = self.peft_config[adapter]
        if config.routing != "sequence":
            raise ValueError(
                f"pin_leaf needs routing='sequence'; adapter '{adapter}' routes by token, so each module picks its "
                "own leaf and no leaf index means the same thing across modules."
            )
        if isinstance(leaf, bool) or not isinstance(leaf, int) or not 0 <= leaf < config.num_leaves:
            raise ValueError(
                f"leaf must be an integer in [0, {config.num_leaves - 1}] for adapter '{adapter}'; got {leaf!r}."
            )
        self.routing_context.pinned_leaf[adapter] = leaf

    def unpin_leaf(self, adapter_name: str | None = None) -> None:
        self.routing_context.pinned_leaf.pop(adapter_name or self.active_adapters[0], None)

    @contextmanager
    def pinned_leaf(self, leaf: int, adapter_name: str | None = None) -> Iterator[None]:
        """Context manager form of `pin_leaf`."""
        self.pin_leaf(leaf, adapter_name)
        try:
            yield
        finally:
            self.unpin_leaf(adapter_name)

    def _check_adapter(self, adapter: str) -> None:
        if adapter not in self.peft_config:
            raise ValueError(f"No adapter named '{adapter}'; the model has {sorted(self.peft_config)}.")

    # --- merging, unloading, deleting -------------------------------------------------------------------------

    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        for module in self.model.modules():
            if isinstance(module, TreeLoraLinear):
                for adapter in module.active_adapters:
                    if adapter in module.treelora_A:
                        module.mergeable_leaf(adapter)  # raises before anything is merged

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ):
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        self._remove_sequence_hook()
        return model

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        context = self.routing_context
        for per_adapter in (
            context.pinned_leaf,
            context.soft_inference,
            context.aux_weights,
            context.pooled,
            context.sequence_leaf,
        ):
            per_adapter.pop(adapter_name, None)
        self._refresh_context()

    # --- loading ----------------------------------------------------------------------------------------------

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: TreeLoraConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Map checkpoint keys to the model, and refuse a checkpoint that does not fit: missing or unexpected tree
        tensors, shapes that differ from the base model's, or a depth that differs from the config's. On refusal
        the adapter is taken out of the model again, so the model is left as it was."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        problems = _fit_problems(model, config, adapter_name, remapped)
        if problems:
            _roll_back(model, adapter_name)
            listing = "\n  - ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise ValueError(
                f"The TreeLoRA checkpoint for adapter '{adapter_name}' does not fit this model (nothing was "
                f"loaded):\n  - {listing}{more}"
            )
        return remapped


class NoTargetModulesError(TreeLoraUsageError, NoMatchingPeftModuleError):
    """The config's target_modules matched nothing; still a PEFT `NoMatchingPeftModuleError` for code catching that."""


def _adaptable_modules_hint(model: nn.Module) -> str:
    """Name the modules a TreeLoRA can adapt (PEFT's own message says only that nothing matched)."""
    names = sorted(
        {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D))}
    )
    if not names:
        return f"{type(model).__name__} has no torch.nn.Linear or Conv1D layer for TreeLoRA to adapt."
    return f"Layers TreeLoRA can adapt in {type(model).__name__}: {names}, or target_modules='all-linear'."


def _find_routing_context(model: nn.Module) -> RoutingContext | None:
    for module in model.modules():
        if isinstance(module, TreeLoraLayer):
            return module.routing_context
    return None


def _fit_problems(
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


def _take_out(model: nn.Module, adapter_name: str) -> None:
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
            if isinstance(module, TreeLoraSequenceRouter) and module.routing_context.hook_handle is not None:
                module.routing_context.hook_handle.remove()
                module.routing_context.hook_handle = None


def _roll_back(model: nn.Module, adapter_name: str) -> None:
    """Take a just-injected adapter out of `model` (a PeftModel or a model with injected layers)."""
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
