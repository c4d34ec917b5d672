"""The models compared: one random base model with SmolLM2-135M's (or tiny) shapes, shared by every variant, and
PEFT LoRA, TreeLoRA and PEFT X-LoRA on top of it."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

SMOLLM2_SHAPES = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
)
TINY_SHAPES = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def build_base(shapes: dict, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**shapes, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def share_base(base: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of `base` whose parameters and buffers are `base`'s own tensors (no weight memory)."""
    memo = {id(t): t for t in list(base.parameters()) + list(base.buffers())}
    return copy.deepcopy(base, memo)


def lora_variant(base, r: int, targets):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(r)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(share_base(base), config)


def tree_variant(base, depth: int, routing: str, targets, donor=None, training_routing: str = "hard"):
    """TreeLoRA r=8 (trained with `training_routing`); with `donor` (a TreeLoRA of the same depth), the leaves are
    `donor`'s tensors, which saves the memory of a second copy of a deep tree's leaves (the timing does not depend
    on their values)."""
    from peft import get_peft_model

    from peft_tree_lora.tuner.config import TreeLoraConfig
    from peft_tree_lora.tuner.layer import TreeLoraLinear

    torch.manual_seed(100 + depth)
    config = TreeLoraConfig(
        depth=depth,
        r=8,
        lora_alpha=16,
        routing=routing,
        training_routing=training_routing,
        target_modules=targets,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(share_base(base), config, low_cpu_mem_usage=donor is not None)
    if donor is not None:
        donors = {name: m for name, m in donor.named_modules() if isinstance(m, TreeLoraLinear)}
        for name, module in model.named_modules():
            if isinstance(module, TreeLoraLinear):
                module.treelora_A["default"] = donors[name].treelora_A["default"]
                module.treelora_B["default"] = donors[name].treelora_B["default"]
        for module in model.modules():  # routers left on the meta device by low_cpu_mem_usage
            for param_name, param in list(module.named_parameters(recurse=False)):
                if param.is_meta:
                    value = torch.randn(param.shape) / param.shape[-1] ** 0.5
                    setattr(module, param_name, torch.nn.Parameter(value, requires_grad=param.requires_grad))
    return model


def xlora_variant(base, num_experts: int, targets, workdir: Path):
    """PEFT X-LoRA over `num_experts` LoRA r=8 experts saved to `workdir` (X-LoRA only loads experts from disk)."""
    from peft import LoraConfig, XLoraConfig, get_peft_model

    shapes = base.config
    paths = {}
    for k in range(num_experts):
        torch.manual_seed(1000 + k)
        expert = get_peft_model(
            share_base(base),
            LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM"),
        )
        path = workdir / f"expert_{k}"
        expert.save_pretrained(path)
        paths[str(k)] = str(path)  # X-LoRA loads expert i under the name str(i)
        del expert
    model = share_base(base)
    model.config.use_cache = False  # X-LoRA refuses a model that caches
    config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=shapes.hidden_size, adapters=paths, xlora_depth=1)
    return get_peft_model(model, config)
