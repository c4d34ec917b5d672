"""The per-adapter strategies of a TreeLoRA layer, kept out of its forward the way LoRA keeps DoRA in `lora_variant`.

- A routing scope says where a layer's route comes from: its own routers (`token`), the routers of its block's first
  module (`block`), or the route picked once per sequence at the input embeddings (`sequence`).
- A training routing says how the leaves are applied in training and how the trained tree is served:
  `hard` trains the function that is served (one leaf per row, the routers learning through the soft path
  probabilities), `switch` serves and trains the chosen leaf scaled by its path probability, `soft` trains the mix
  of every leaf (and is served one leaf: the mismatch it is kept to measure).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .call import BlockRoute, RoutingCall
from .leaves import apply_leaf_per_row, apply_leaf_per_sequence, mix_leaves, with_mix_gradient
from .routing import path_prob_of_leaf, path_probs

if TYPE_CHECKING:
    from .layer import TreeLoraLinear


@dataclass
class Route:
    """Where the rows of one layer input go: the hard `leaf` of each row (a token, or a whole sequence when
    `per_sequence`), and the router `logits` of every node when the training routing needs them."""

    leaf: torch.Tensor
    logits: torch.Tensor | None
    depth: int
    per_sequence: bool = False

    def leaf_weights(self) -> torch.Tensor:
        return path_probs(torch.sigmoid(self.logits), self.depth)

    def chosen_prob(self) -> torch.Tensor:
        return path_prob_of_leaf(self.logits, self.leaf, self.depth)


@dataclass
class Leaves:
    """One adapter's stacked leaves: A `(L, r, in)`, B `(L, out, r)`, and the LoRA scaling."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float

    def served(self, x: torch.Tensor, route: Route, row_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Each row's own leaf, optionally weighted per row; `x` is `(rows, in)`, or `(batch, tokens, in)` for a
        per-sequence route (whose `row_weight` is then one per sequence)."""
        apply = apply_leaf_per_sequence if route.per_sequence else apply_leaf_per_row
        return apply(x, self.lora_A, self.lora_B, route.leaf, self.scaling, row_weight)

    def mixed(self, x: torch.Tensor, weights: torch.Tensor, per_sequence: bool) -> torch.Tensor:
        return mix_leaves(x, self.lora_A, self.lora_B, weights.unsqueeze(1) if per_sequence else weights, self.scaling)

    def with_mix_gradient(self, served: torch.Tensor, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return with_mix_gradient(served, weights, x, self.lora_A, self.lora_B, self.scaling)


# --- training routings ---------------------------------------------------------------------------------------------


class SoftMixing:
    """Training mixes every leaf by its path probability; serving applies the one leaf the routers point to."""

    name = "soft"

    def needs_logits(self, training: bool, soft_eval: bool) -> bool:
        return training or soft_eval

    def delta(self, leaves: Leaves, x: torch.Tensor, route: Route, training: bool, soft_eval: bool) -> torch.Tensor:
        if training or soft_eval:
            return leaves.mixed(x, route.leaf_weights(), route.per_sequence)
        return leaves.served(x, route)


class StraightThrough:
    """The forward pass is the served function in training too: each row gets its own leaf, and only that leaf
    learns from it. The routers learn through a straight-through estimate: the soft mix of every leaf (leaves and
    input detached) is added and subtracted again, so its value is zero while its gradient reaches the path
    probabilities."""

    name = "hard"

    def needs_logits(self, training: bool, soft_eval: bool) -> bool:
        return training or soft_eval

    def delta(self, leaves: Leaves, x: torch.Tensor, route: Route, training: bool, soft_eval: bool) -> torch.Tensor:
        if soft_eval and not training:
            return leaves.mixed(x, route.leaf_weights(), route.per_sequence)
        output = leaves.served(x, route)
        if training and route.logits is not None and route.logits.requires_grad:
            output = leaves.with_mix_gradient(output, x, route.leaf_weights())
        return output


class SwitchScaled:
    """The chosen leaf scaled by its path probability, in training and in serving (Switch Transformer's top-1 gate):
    one leaf per row in both, so training costs O(depth) router reads and one leaf, not every leaf."""

    name = "switch"

    def needs_logits(self, training: bool, soft_eval: bool) -> bool:
        return True

    def delta(self, leaves: Leaves, x: torch.Tensor, route: Route, training: bool, soft_eval: bool) -> torch.Tensor:
        if soft_eval and not training:
            return leaves.mixed(x, route.leaf_weights(), route.per_sequence)
        return leaves.served(x, route, route.chosen_prob())


TRAINING_ROUTINGS = {mode.name: mode() for mode in (StraightThrough, SwitchScaled, SoftMixing)}


# --- routing scopes ------------------------------------------------------------------------------------------------


class TokenScope:
    """Every token is routed by this module's own routers, from this module's input."""

    name = "token"

    def route(
        self, layer: TreeLoraLinear, adapter: str, x: torch.Tensor, call: RoutingCall | None, with_logits: bool
    ) -> tuple[Route, torch.Tensor | None]:
        router = layer.treelora_router[adapter]
        leaf, logits = router.leaf_and_logits(x.reshape(-1, x.shape[-1]), with_logits)
        aux = layer.router_losses[adapter](logits, leaf) if layer.training and logits is not None else None
        if call is not None:
            call.record(layer.module_name, adapter, leaf.view(x.shape[:-1]), logits)
        return Route(leaf, logits, router.depth), aux

    def input_rows(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])


class BlockScope(TokenScope):
    """The block's first target module routes each token from its input and publishes the route for the call; the
    other target modules of the block apply the same leaf index, so a leaf means one expert across the block."""

    name = "block"

    def route(
        self, layer: TreeLoraLinear, adapter: str, x: torch.Tensor, call: RoutingCall | None, with_logits: bool
    ) -> tuple[Route, torch.Tensor | None]:
        key = (layer.block_name[adapter], adapter)
        if adapter in layer.treelora_router:
            route, aux = super().route(layer, adapter, x, call, with_logits)
            if call is not None:
                call.blocks[key] = BlockRoute(route.leaf, route.logits)
            return route, aux
        published = call.blocks.get(key) if call is not None else None
        rows = x.numel() // x.shape[-1]
        if published is None or published.leaf.shape[0] != rows:
            raise RuntimeError(
                f"TreeLoRA adapter '{adapter}' routes by block: {layer.module_name} applies the route of block "
                f"'{key[0]}', which its first target module picks in the same model call, and no route for these "
                f"{rows} rows was picked. Call the model itself, not one of its inner modules."
            )
        logits = None if published.logits is None else published.logits.to(x.device)
        if call is not None:
            call.record(layer.module_name, adapter, published.leaf.view(x.shape[:-1]), None)
        return Route(published.leaf.to(x.device), logits, layer.depth[adapter]), None


class SequenceScope:
    """One leaf per sequence, picked at the input embeddings for the whole call (see `TreeLoraSequenceRouter`)."""

    name = "sequence"

    def route(
        self, layer: TreeLoraLinear, adapter: str, x: torch.Tensor, call: RoutingCall | None, with_logits: bool
    ) -> tuple[Route, torch.Tensor | None]:
        published = call.sequence.get(adapter) if call is not None else None
        if published is None:
            raise RuntimeError(
                f"TreeLoRA adapter '{adapter}' routes by sequence, but no route was picked in this call of "
                f"{layer.module_name}. Call the model itself (with input_ids or inputs_embeds), not one of its inner "
                "modules."
            )
        batch = published.leaf.shape[0]
        if x.dim() < 2 or x.shape[0] != batch:
            raise RuntimeError(
                f"Sequence-routed layer {layer.module_name} got input of shape {tuple(x.shape)}, but this call routed "
                f"{batch} sequences: the first dimension must be the batch."
            )
        logits = None
        if with_logits:
            # recomputed in each layer from the constant router input, so that gradient checkpointing can replay it
            router = published.router
            logits = router(published.router_input.to(router.weight.device)).to(x.device)
        return Route(published.leaf.to(x.device), logits, layer.depth[adapter], per_sequence=True), None

    def input_rows(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        return x.reshape(x.shape[0], -1, x.shape[-1])


ROUTING_SCOPES = {scope.name: scope() for scope in (TokenScope, SequenceScope, BlockScope)}
