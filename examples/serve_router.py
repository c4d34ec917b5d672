"""Serve the leaves of a TreeLoRA with plain PEFT: pick the leaf per prompt from the exported router, generate.

This is what a multi-LoRA server (vLLM, S-LoRA, LoRAX) does with `tree-lora export ADAPTER OUT`: every leaf is
registered as an ordinary LoRA, and each request is sent to the leaf that `OUT/router.json` prescribes for its
prompt. Nothing here imports peft-tree-lora: the router is a few lines of torch on the base model's input
embeddings, and the leaves are loaded by PEFT as LoRA adapters. PEFT is imported only by `LeafServer`, so the
routing half (`load_router`, `pick_leaf`) runs where PEFT is not installed, e.g. beside vLLM.

    tree-lora export my-adapter exported/
    python examples/serve_router.py exported/ --base BASE_MODEL --prompt "To be, or not to be" --prompt "def f(x):"

Prints one JSON line per prompt: the leaf it was routed to and the generated text.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def load_router(export_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """The routing recipe (`router.json`) and the router weights (`router.safetensors`; none for depth 0)."""
    export_dir = Path(export_dir)
    spec = json.loads((export_dir / "router.json").read_text())
    weights = load_file(str(export_dir / spec["weights"])) if spec.get("weights") else None
    return spec, weights


@torch.no_grad()
def pick_leaf(
    spec: dict, router: dict[str, torch.Tensor] | None, embeds: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Follow `router.json`: pool the prompt's token embeddings (`batch, tokens, hidden`) over its non-padding
    positions (the first `route_tokens` of them when set), divide by the root mean square when `input_norm` is true,
    then descend the tree in heap order, going right where the node's logit is >= 0."""
    if spec["depth"] == 0:
        return torch.zeros(embeds.shape[0], dtype=torch.long)
    if attention_mask is None:
        attention_mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    mask = attention_mask.bool()
    if spec.get("route_tokens") is not None:
        mask = mask & (mask.cumsum(1) <= spec["route_tokens"])
    weights = mask.to(embeds.dtype).unsqueeze(-1)
    pooled = ((embeds * weights).sum(1) / weights.sum(1).clamp_min(1.0)).to(router["weight"].dtype)
    if spec.get("input_norm"):
        pooled = pooled * torch.rsqrt(pooled.pow(2).mean(-1, keepdim=True) + 1e-6)
    logits = pooled @ router["weight"].T + router["bias"]
    node = torch.zeros(embeds.shape[0], dtype=torch.long)
    for _ in range(spec["depth"]):
        go_right = logits.gather(1, node[:, None])[:, 0] >= 0
        node = 2 * node + 1 + go_right.long()
    return node - (spec["num_leaves"] - 1)


class LeafServer:
    """One base model, the exported leaves loaded on demand as named LoRA adapters, one leaf per request."""

    def __init__(self, export_dir: str | Path, base: str) -> None:
        from peft import PeftModel  # here, not at the top: the router needs no PEFT

        self.export_dir = Path(export_dir)
        self.spec, self.router = load_router(self.export_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        base_model = AutoModelForCausalLM.from_pretrained(base).eval()
        self.embeddings = base_model.get_input_embeddings()
        first = self.spec["leaves"][0]
        self.model = PeftModel.from_pretrained(base_model, str(self.export_dir / first), adapter_name=first).eval()

    def generate(self, prompt: str, max_new_tokens: int = 20) -> dict:
        inputs = self.tokenizer(prompt, return_tensors="pt")
        leaf = int(
            pick_leaf(self.spec, self.router, self.embeddings(inputs["input_ids"]), inputs["attention_mask"])[0]
        )
        name = self.spec["leaves"][leaf]
        if name not in self.model.peft_config:
            self.model.load_adapter(str(self.export_dir / name), adapter_name=name)
        self.model.set_adapter(name)
        with torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        return {
            "prompt": prompt,
            "leaf": leaf,
            "token_ids": new_tokens.tolist(),
            "completion": self.tokenizer.decode(new_tokens, skip_special_tokens=True),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description="Route prompts to the exported TreeLoRA leaves and generate.")
    parser.add_argument("export_dir", help="directory written by `tree-lora export ADAPTER OUT`")
    parser.add_argument(
        "--base", required=True, help="the base model (Hub id or directory) the adapter was trained on"
    )
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several requests")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    args = parser.parse_args()
    server = LeafServer(args.export_dir, args.base)
    for prompt in args.prompt:
        print(json.dumps(server.generate(prompt, args.max_new_tokens)), flush=True)


if __name__ == "__main__":
    main()
