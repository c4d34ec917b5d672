"""`TreeLoraModel`: the PEFT tuner that puts TreeLoRA layers into a model and opens a routing call per model call."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.error import NoMatchingPeftModuleError
from peft.utils.other import _get_submodules
from torch import nn

from .call import (
    RouteRecorder,
    RoutingCall,
    close_call,
    current_call,
    entered,
    open_call,
    reenter_call_on_recompute,
    routing_mask,
)
from .checkpoint import verify_adapter_weights
from .config import TreeLoraConfig
from .controls import RoutingControls
from .errors import TreeLoraUsageError
from .layer import TreeLoraLayer, TreeLoraLinear
from .loading import (
    ModelSnapshot,
    NoTargetModulesError,
    adaptable_modules_hint,
    fit_problems,
    roll_back,
    take_out,
    weight_problems,
)
from .quantized import broken_merge_error, dequantized_weight, quantization
from .sequence_router import TreeLoraSequenceRouter

# Put on the base model (transformers' `add_model_tags`): PEFT's `save_pretrained` card and `Trainer.push_to_hub`
# read them as `model_tags`, so a card written by plain PEFT or the Trainer says which plugin reads the adapter.
MODEL_TAGS = ("tree-lora", "peft-tree-lora")
_ADAPTER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")  # a module's outermost numbered ancestor: "model.layers.3"


class TreeLoraModel(RoutingControls, BaseTuner):
    """Creates a TreeLoRA model from a pretrained transformers model; use it through `peft.get_peft_model`.

    Besides PEFT's tuner API it offers `leaf_routes` (which leaf an input takes), `set_inference_routing` (hard or
    soft evaluation), `pin_leaf`/`unpin_leaf` (one leaf for every sequence) and `recording` (routes of the calls
    made inside it, for telemetry). In training with labels, the loss of the output includes the routers' auxiliary
    losses, which the output also carries as `aux_loss`.
    """

    prefix: str = "treelora_"
    tuner_layer_cls = TreeLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    # --- injection --------------------------------------------------------------------------------------------

    def _pre_injection_hook(self, model: nn.Module, config: TreeLoraConfig, adapter_name: str) -> None:
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
        config = self.peft_config[adapter_name]
        source = getattr(config, "_weights_source", None)
        if source is not None:  # loading a saved adapter: fail now if its weights are unreadable, before injecting
            verify_adapter_weights(source)
            config._weights_source = None
        if config.routing == "sequence" and config.depth > 0 and not hasattr(model, "get_input_embeddings"):
            raise ValueError("TreeLoraConfig.routing='sequence' needs a model with get_input_embeddings().")
        self._before_injection = ModelSnapshot.take(self, model, adapter_name)  # for a load refused afterwards
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
            if config.routing == "block":
                _assign_blocks(model, adapter_name)
        except NoMatchingPeftModuleError as error:
            take_out(model, adapter_name)
            raise NoTargetModulesError(f"{error} {adaptable_modules_hint(model)}") from None
        except Exception:
            take_out(model, adapter_name)  # PEFT replaces modules one by one: undo the ones already replaced
            raise
        self._install_call_hooks(model)
        if callable(getattr(model, "add_model_tags", None)):
            model.add_model_tags(list(MODEL_TAGS))

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
            new_module = TreeLoraLinear(target, adapter_name, peft_config, current_key)
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
            return
        name = next(n for n, m in model.named_modules() if m is embeddings)
        parent, target, target_name = _get_submodules(model, name)
        router = TreeLoraSequenceRouter(target, adapter_name, config, name)
        if adapter_name not in self.active_adapters:
            router.requires_grad_(False)
        self._replace_module(parent, target_name, router, target)

    # --- routing calls ----------------------------------------------------------------------------------------

    def _install_call_hooks(self, model: nn.Module) -> None:
        """Hooks on the adapted model, so that calling it directly (not through the PeftModel) opens a call too."""
        if getattr(self, "_call_hooks", None):
            return
        self._call_hooks = [
            model.register_forward_pre_hook(self._before_model_call, with_kwargs=True),
            model.register_forward_hook(self._after_model_call, with_kwargs=True, always_call=True),
        ]
        self._recorder: RouteRecorder | None = None

    def _remove_call_hooks(self) -> None:
        for handle in getattr(self, "_call_hooks", None) or []:
            handle.remove()
        self._call_hooks = []

    def _new_call(self, hold_sequence_route: bool = False, recorder: RouteRecorder | None = None) -> RoutingCall:
        training = self.model.training
        if training:
            self._replay_checkpoints_in_call()
        recorder = recorder or getattr(self, "_recorder", None)
        records = [] if recorder is not None else None
        return RoutingCall(training, hold_sequence_route, recorder=recorder, records=records)

    def _before_model_call(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        call = current_call()
        if call is None:  # the model is called directly, not through the PeftModel or this tuner
            call = self._new_call()
            call.hook_token = open_call(call)
        input_ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        pad_token_id = getattr(getattr(self.model, "config", None), "pad_token_id", None)
        call.routing_mask = routing_mask(kwargs.get("attention_mask"), input_ids, pad_token_id)
        embeds = kwargs.get("inputs_embeds")
        router = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        if torch.is_tensor(embeds) and isinstance(router, TreeLoraSequenceRouter) and not router.disable_adapters:
            return args, {**kwargs, "inputs_embeds": router.route(embeds, call)}  # the embeddings will not run
        return None

    def _after_model_call(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        call = current_call()  # runs on errors too (always_call), so a failed call does not stay current
        if call is not None and call.hook_token is not None:
            close_call(call.hook_token)
            call.end(output, kwargs)

    def _replay_checkpoints_in_call(self) -> None:
        """Make every checkpointed layer recompute inside the call that ran it (cross-module routes need it)."""
        for module in self.model.modules():
            function = getattr(module, "_gradient_checkpointing_func", None)
            if getattr(module, "gradient_checkpointing", False) and function is not None:
                module._gradient_checkpointing_func = reenter_call_on_recompute(function)

    def forward(self, *args: Any, **kwargs: Any):
        """Run the model in a call of its own. In training with `labels`, the returned loss includes the routers'
        auxiliary losses (detached here: their gradients flow from the layers that computed them, see
        `routing.attach_auxiliary_loss`), and `outputs.aux_loss` holds them."""
        current = current_call()
        if current is not None and current.shared:
            first_aux = len(current.aux_losses)
            outputs = self.model(*args, **kwargs)
            aux = torch.stack(current.aux_losses[first_aux:]).sum() if current.aux_losses[first_aux:] else None
            return self._with_aux(outputs, aux, kwargs)
        call = self._new_call()
        with entered(call):
            outputs = self.model(*args, **kwargs)
        outputs = self._with_aux(outputs, call.aux_total(), kwargs)
        call.end(outputs, kwargs)
        return outputs

    def _with_aux(self, outputs: Any, aux: torch.Tensor | None, kwargs: dict[str, Any]) -> Any:
        loss = getattr(outputs, "loss", None)
        if aux is not None and self.training and kwargs.get("labels") is not None and loss is not None:
            outputs["loss"] = loss + aux.to(loss.dtype)
            outputs.aux_loss = aux  # an attribute, not a new key: DDP rebuilds the output from its keys
        return outputs

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Entered by `PeftModel.forward` and `PeftModel.generate`: one call for the whole of it, in which a sequence
        route, once picked from the prompt, holds for every step."""
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "TreeLoRA does not support adapter_names= (a different adapter per row of one batch); call the model "
                "once per adapter with model.set_adapter(name)."
            )
        current = current_call()
        if current is not None and current.shared:
            yield
            return
        call = self._new_call(hold_sequence_route=True)
        with entered(call):
            yield
        call.end(None, kwargs)

    @contextmanager
    def holding_routes(self) -> Iterator[RoutingCall]:
        """One routing call for every model call made inside the block (in this thread), as `generate` has: a
        sequence route picked by the first call holds for the later ones. The log-likelihood pattern of a
        sequence-routed tree: call the model on the prompts, then on prompt + continuation, inside one block."""
        call = self._new_call(hold_sequence_route=True)
        call.shared = True
        with entered(call):
            yield call
        call.end(None, {})

    @contextmanager
    def recording(self, recorder: RouteRecorder) -> Iterator[RouteRecorder]:
        """Give `recorder` the routes of every call opened until the block ends (telemetry is opt-in: without a
        recorder the forward pass computes only what the output and the loss need)."""
        previous, self._recorder = getattr(self, "_recorder", None), recorder
        try:
            yield recorder
        finally:
            self._recorder = previous

    def start_recording(self, recorder: RouteRecorder) -> None:
        self._recorder = recorder

    def stop_recording(self) -> None:
        self._recorder = None

    # --- merging, unloading, loading --------------------------------------------------------------------------

    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        for module in self.model.modules():
            if isinstance(module, TreeLoraLinear):
                for adapter in module.active_adapters:
                    if adapter in module.treelora_A:
                        module.mergeable_leaf(adapter)  # raises before anything is merged
                quantization(module.get_base_layer())  # so does a quantised weight that merging does not support

    def add_weighted_adapter(self, adapters: list[str], *args: Any, **kwargs: Any) -> None:
        """Not supported: raises a `TreeLoraUsageError` that says so and what to do instead."""
        raise TreeLoraUsageError(
            "TreeLoRA does not support add_weighted_adapter: each tree sends an input to one of its leaves by its "
            "own routers, so there is no weighted sum of two trees to build. Use one adapter at a time with "
            "model.set_adapter(name), or pin a leaf of a sequence-routed adapter (model.base_model.pin_leaf(k)) and "
            "merge it into the base model with merge_and_unload() before adding the next adapter."
        )

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        if safe_merge:
            self._check_merge_allowed()
            self._check_safe_merge(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _check_safe_merge(self, adapter_names: list[str] | None) -> None:
        """`safe_merge` checks every layer before any is merged, so a broken leaf leaves no layer merged."""
        for name, module in self.model.named_modules():
            if not isinstance(module, TreeLoraLinear):
                continue
            for adapter in adapter_names or module.active_adapters:
                if adapter in module.treelora_A and adapter not in module.merged_adapters:
                    layer = module.get_base_layer()
                    base = dequantized_weight(layer) if quantization(layer) is not None else layer.weight
                    if not torch.isfinite(base + module.get_delta_weight(adapter).to(base.dtype)).all():
                        raise broken_merge_error(adapter, f" (in {name}; nothing was merged)")

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ):
        if merge and safe_merge:
            self._check_merge_allowed()
            self._check_safe_merge(adapter_names)
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        self._remove_call_hooks()
        if not merge and getattr(model, "model_tags", None):  # the plain base model again; merged weights keep them
            model.model_tags = [tag for tag in model.model_tags if tag not in MODEL_TAGS]
        return model

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: TreeLoraConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Map checkpoint keys to the model, and refuse a checkpoint that does not fit: missing or unexpected tree
        tensors, shapes that differ from the base model's, or a depth that differs from the config's. On refusal
        the adapter is taken out of the model again, so the model is left as it was."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        problems = fit_problems(model, config, adapter_name, remapped) + weight_problems(remapped, adapter_name)
        if problems:
            roll_back(model, adapter_name)
            listing = "\n  - ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise ValueError(
                f"The TreeLoRA checkpoint for adapter '{adapter_name}' does not fit this model (nothing was "
                f"loaded):\n  - {listing}{more}"
            )
        tuner = getattr(model, "base_model", None)
        if isinstance(tuner, TreeLoraModel):
            tuner._before_injection = None  # the load went through: nothing left to undo
        return remapped


def _assign_blocks(model: nn.Module, adapter: str) -> None:
    """Block routing: the first target module of each numbered block keeps the router, the others read its route."""
    leaders: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, TreeLoraLinear) or module.routing.get(adapter) != "block":
            continue
        match = _BLOCK.match(name)
        block = match.group(1) if match else name
        module.block_name[adapter] = block
        if block in leaders:
            if adapter in module.treelora_router:
                del module.treelora_router[adapter]
        else:
            leaders.add(block)
