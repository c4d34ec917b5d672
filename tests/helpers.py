"""Small builders shared by the core tests."""

from __future__ import annotations

import torch
from peft import PeftModel, get_peft_model

from peft_tree_lora import TreeLoraConfig, TreeLoraLinear, TreeLoraSequenceRouter


def tree_model(base: torch.nn.Module, **config) -> PeftModel:
    settings = dict(target_modules="all-linear", task_type="CAUSAL_LM", r=4, lora_alpha=8)
    settings.update(config)
    return get_peft_model(base, TreeLoraConfig(**settings))


def trained_looking(model: PeftModel, seed: int = 0, router_scale: float = 1.0) -> PeftModel:
    """Give every leaf a non-zero B (as training would) so the adapter changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TreeLoraLinear):
                for lora_B in module.treelora_B.values():
                    lora_B.copy_(torch.randn(lora_B.shape, generator=generator) * 0.5)
            if isinstance(module, (TreeLoraLinear, TreeLoraSequenceRouter)):
                for router in module.treelora_router.values():
                    router.weight.mul_(router_scale)
                    router.bias.copy_(torch.randn(router.bias.shape, generator=generator) * 0.1 * router_scale)
    return model


def logits(model: torch.nn.Module, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits
