"""The TreeLoRA-specific controls of the tuner (`model.base_model`): which leaf an input takes, how the trees are
evaluated and trained, pinning one leaf, and parameter counts. A mixin of `TreeLoraModel`, kept apart so that the
tuner's module holds injection and routing calls only."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .call import RoutingCall, entered
from .growth import grow_tree
from .layer import TreeLoraLayer, TreeLoraLinear
from .variants import TRAINING_ROUTINGS


class RoutingControls:
    """Methods of `TreeLoraModel` that read or set per-adapter routing settings on its layers."""

    @torch.no_grad()
    def leaf_routes(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, Any]:
        """Which leaf each input takes under hard routing (one evaluation forward pass, in a call of its own).

        Returns `{module_name: LongTensor (batch, seq)}` for token- and block-routed adapters and `{"sequence":
        LongTensor (batch,)}` for sequence-routed ones (of the active adapter)."""
        adapter = self.active_adapters[0]
        was_training = self.model.training
        call = RoutingCall(records=[])
        try:
            self.model.eval()
            with entered(call):
                self.model(input_ids=input_ids, attention_mask=attention_mask)
        finally:
            self.model.train(was_training)
        return {record.module_name: record.leaf for record in call.records if record.adapter == adapter}

    def set_inference_routing(self, mode: str, adapter_name: str | None = None) -> None:
        """Evaluate with `"hard"` routing (one leaf per token or sequence) or `"soft"` routing (all leaves mixed)."""
        if mode not in ("hard", "soft"):
            raise ValueError(f"inference routing must be 'hard' or 'soft'; got {mode!r}.")
        for adapter in [adapter_name] if adapter_name else list(self.peft_config):
            self._check_adapter(adapter)
            for layer in self._tree_layers(adapter):
                layer.inference_routing[adapter] = mode

    def set_training_routing(self, mode: str, adapter_name: str | None = None) -> None:
        """Train with `"hard"`, `"switch"` or `"soft"` routing from now on (e.g. a soft warm-up, see
        `integrations.schedule.SoftWarmupCallback`); the saved config keeps the mode the adapter was made with."""
        if mode not in TRAINING_ROUTINGS:
            raise ValueError(f"training routing must be one of {list(TRAINING_ROUTINGS)}; got {mode!r}.")
        for adapter in [adapter_name] if adapter_name else list(self.peft_config):
            self._check_adapter(adapter)
            for layer in self._tree_layers(adapter):
                layer.training_routing[adapter] = mode

    def pin_leaf(self, leaf: int, adapter_name: str | None = None) -> None:
        """Send every sequence to `leaf` (sequence routing only): the adapter then acts as one plain LoRA, which
        `merge_and_unload()` can merge."""
        adapter = adapter_name or self.active_adapters[0]
        self._check_adapter(adapter)
        config = self.peft_config[adapter]
        if config.routing != "sequence":
            raise ValueError(
                f"pin_leaf needs routing='sequence'; adapter '{adapter}' routes by {config.routing}, so each token "
                "picks its own leaf and no leaf index means the same thing for a whole sequence."
            )
        if isinstance(leaf, bool) or not isinstance(leaf, int) or not 0 <= leaf < config.num_leaves:
            raise ValueError(
                f"leaf must be an integer in [0, {config.num_leaves - 1}] for adapter '{adapter}'; got {leaf!r}."
            )
        self._refuse_while_merged(adapter, "pin another leaf")
        for layer in self._tree_layers(adapter):
            layer.pinned_leaf[adapter] = leaf

    def unpin_leaf(self, adapter_name: str | None = None) -> None:
        adapter = adapter_name or self.active_adapters[0]
        self._refuse_while_merged(adapter, "unpin the leaf")
        for layer in self._tree_layers(adapter):
            layer.pinned_leaf.pop(adapter, None)

    @contextmanager
    def pinned_leaf(self, leaf: int, adapter_name: str | None = None) -> Iterator[None]:
        """Context manager form of `pin_leaf`."""
        self.pin_leaf(leaf, adapter_name)
        try:
            yield
        finally:
            self.unpin_leaf(adapter_name)

    def grow_tree(self, adapter_name: str | None = None, noise_std: float = 0.0, seed: int | None = None) -> None:
        """Deepen the adapter by one level (upcycling): each leaf becomes two copies of itself under a new router,
        so that with `noise_std=0` the model computes exactly what it did. The leaves and routers are new
        parameters: create the optimizer or Trainer after growing. See `growth.py`."""
        adapter = adapter_name or self.active_adapters[0]
        self._check_adapter(adapter)
        grow_tree(self, adapter, noise_std, seed)

    def _refuse_while_merged(self, adapter: str, action: str) -> None:
        if any(adapter in layer.merged_adapters for layer in self._tree_layers(adapter)):
            raise ValueError(
                f"TreeLoRA adapter '{adapter}' is merged into the base weights; unmerge it first "
                f"(model.unmerge_adapter()) to {action}."
            )

    def _tree_layers(self, adapter: str) -> Iterator[TreeLoraLayer]:
        return (m for m in self.model.modules() if isinstance(m, TreeLoraLayer) and adapter in m.depth)

    def _check_adapter(self, adapter: str) -> None:
        if adapter not in self.peft_config:
            raise ValueError(f"No adapter named '{adapter}'; the model has {sorted(self.peft_config)}.")

    def parameter_counts(self, adapter_name: str | None = None) -> dict[str, int]:
        """Adapter size of one adapter: `total` (every leaf, inner-node LoRA and router) and `active_per_token` (what
        one token touches when served: one rank-`r` LoRA per module, which with `leaf_layout="path"` is the sum of
        its path's node LoRAs, plus the `depth` routers on its path wherever routers run per
        token, which is once per block for block routing; a sequence router runs once per sequence and is not
        counted per token)."""
        adapter = adapter_name or self.active_adapters[0]
        self._check_adapter(adapter)
        total = active = 0
        for module in self._tree_layers(adapter):
            depth = module.depth[adapter]
            router = module.treelora_router[adapter] if adapter in module.treelora_router else None
            total += sum(p.numel() for p in router.parameters()) if router is not None else 0
            if isinstance(module, TreeLoraLinear):
                factors = (module.treelora_A, module.treelora_B, module.treelora_node_A, module.treelora_node_B)
                total += sum(stack[adapter].numel() for stack in factors if adapter in stack)
                active += module.r[adapter] * (module.in_features + module.out_features)
                if router is not None:
                    active += depth * (router.in_features + 1)
        return {"total": total, "active_per_token": active}
