"""Growing a tree by one level (upcycling): every leaf becomes two copies of itself under a new router.

Train a LoRA (a depth-0 tree), grow, train on, grow again: each split starts from what the leaf has learnt instead
of from scratch, the way sparse upcycling turns a dense layer into experts. With exact copies (`noise_std=0`) the
grown tree computes the same function as before whatever its new routers decide; the copies then diverge because
each learns only from the tokens its new router sends it, and the router learns from that difference (the
straight-through estimate of the hard path). Leaf `k` of depth `d` becomes leaves `2k` (left) and `2k + 1` (right)
of depth `d + 1`, and the new routers are the last `2**d` nodes in heap order, so every existing router keeps its
index and its meaning.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import MAX_DEPTH
from .layer import TreeLoraLayer, TreeLoraLinear
from .router import TreeRouter
from .routing import RouterLosses, num_nodes

if TYPE_CHECKING:
    from .config import TreeLoraConfig
    from .model import TreeLoraModel


def grow_tree(model: TreeLoraModel, adapter: str, noise_std: float = 0.0, seed: int | None = None) -> None:
    """Deepen adapter `adapter` of `model` by one level on every layer (see the module docstring).

    `noise_std` adds Gaussian noise of that standard deviation, relative to each leaf factor's RMS, to both copies
    (0 keeps the function exactly). `seed` seeds the new routers and the noise. The leaves and routers are new
    parameters: build the optimizer (or the Trainer) after growing."""
    config: TreeLoraConfig = model.peft_config[adapter]
    _check_growable(model, adapter, config, noise_std)
    seed = seed if seed is not None else int(torch.randint(2**62, ()))  # from torch's RNG, as other inits draw
    generator = torch.Generator().manual_seed(seed)
    for layer in _layers(model, adapter):
        if isinstance(layer, TreeLoraLinear):
            for stack in (layer.treelora_A, layer.treelora_B):
                stack[adapter] = _split_leaves(stack[adapter], noise_std, generator)
        if adapter in layer.treelora_router:
            layer.treelora_router[adapter] = _deeper_router(layer.treelora_router[adapter], config, generator)
    config.depth += 1
    if config.depth == 1:  # a depth-0 tree (a LoRA) has no routers yet: make them as a depth-1 adapter has them
        _first_routers(model, adapter, config, seed)
    for layer in _layers(model, adapter):
        layer.depth[adapter] = config.depth
        old = layer.router_losses[adapter]
        layer.router_losses[adapter] = RouterLosses(
            config.depth, old.hardening_weight, old.balance_weight, old.balance
        )


def _layers(model: TreeLoraModel, adapter: str) -> list[TreeLoraLayer]:
    return list(model._tree_layers(adapter))  # a list: the loops below replace modules inside the layers


def _first_routers(model: TreeLoraModel, adapter: str, config: TreeLoraConfig, seed: int) -> None:
    """The routers of a depth-1 tree, where the adapter's config puts them (drawn from `seed`)."""
    from .model import _assign_blocks  # the tuner module imports this one

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if config.routing == "sequence":
            model._attach_sequence_router(model.model, adapter, config)
            return
        for layer in _layers(model, adapter):
            if isinstance(layer, TreeLoraLinear):
                layer.treelora_router[adapter] = layer.new_router(layer.in_features, config)
                layer._move_adapter_to_device_of_base_layer(adapter)
                layer.treelora_router[adapter].requires_grad_(layer.treelora_A[adapter].requires_grad)
        if config.routing == "block":
            _assign_blocks(model.model, adapter)


def _check_growable(model: TreeLoraModel, adapter: str, config: TreeLoraConfig, noise_std: float) -> None:
    if config.depth >= MAX_DEPTH:
        raise ValueError(f"TreeLoRA adapter '{adapter}' has depth {config.depth}, the largest allowed ({MAX_DEPTH}).")
    if config.leaf_layout != "leaf":
        raise ValueError(
            f"grow_tree splits leaves; adapter '{adapter}' has leaf_layout={config.leaf_layout!r}, whose inner nodes "
            "hold LoRAs of their own. Grow a leaf_layout='leaf' tree."
        )
    if isinstance(noise_std, bool) or not isinstance(noise_std, int | float) or not 0 <= noise_std < math.inf:
        raise ValueError(f"noise_std must be a finite number >= 0; got {noise_std!r}.")
    layers = _layers(model, adapter)
    if any(adapter in layer.merged_adapters for layer in layers):
        raise ValueError(f"TreeLoRA adapter '{adapter}' is merged into the base weights; unmerge it before growing.")
    if any(adapter in layer.pinned_leaf for layer in layers):
        raise ValueError(f"TreeLoRA adapter '{adapter}' has a pinned leaf; unpin it (unpin_leaf()) before growing.")


def _split_leaves(stack: nn.Parameter, noise_std: float, generator: torch.Generator) -> nn.Parameter:
    """`(L, ...)` leaf factors as `(2L, ...)`: each leaf twice in a row, optionally with relative noise."""
    with torch.no_grad():
        grown = stack.detach().repeat_interleave(2, dim=0)
        if noise_std:
            rms = grown.float().pow(2).mean(dim=tuple(range(1, grown.dim())), keepdim=True).sqrt()
            noise = torch.randn(grown.shape, generator=generator).to(grown.device)
            grown = (grown.float() + noise_std * rms * noise).to(stack.dtype)
    return nn.Parameter(grown.contiguous(), requires_grad=stack.requires_grad)


def _deeper_router(router: TreeRouter, config: TreeLoraConfig, generator: torch.Generator) -> TreeRouter:
    """`router` with one more level of nodes, initialised as TreeRouter initialises routers; the others unchanged."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (), generator=generator)))
        deeper = TreeRouter(
            router.in_features, router.depth + 1, router.input_norm, config.router_init, config.router_init_scale
        )
    nodes = num_nodes(router.depth)
    with torch.no_grad():
        deeper.weight[:nodes] = router.weight.detach().cpu()
        deeper.bias[:nodes] = router.bias.detach().cpu()
    deeper = deeper.to(device=router.weight.device, dtype=router.weight.dtype)
    deeper.requires_grad_(router.weight.requires_grad)
    return deeper
