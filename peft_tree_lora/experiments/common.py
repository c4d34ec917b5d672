"""What both studies share: a byte tokenizer for from-scratch models, tiny Llama configs, adapter configs of the
compared arms, the versions line of a report, and the JSON files a study leaves behind for the results page."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftConfig
from transformers import LlamaConfig, LlamaForCausalLM

from ..tuner.config import TreeLoraConfig

DOCS_DIR = Path("docs")


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 and one end-of-sequence id, 256.

    A from-scratch model needs no learned vocabulary: bytes keep the embedding table tiny (257 rows), so almost all
    of a 1 M-parameter model sits in the transformer blocks, which is where the adapters attach. It has the call
    signature `data.tokenize_blocks` expects from a Hugging Face tokenizer."""

    eos_token_id = 256
    vocab_size = 257

    def __call__(self, texts: Sequence[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        return {"input_ids": [list(text.encode("utf-8")) for text in texts]}

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def tiny_llama(
    vocab_size: int, hidden: int, layers: int, heads: int, intermediate: int, max_positions: int, seed: int
) -> LlamaForCausalLM:
    """A randomly initialised Llama with tied embeddings, seeded so that every study run starts from the same
    weights."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return LlamaForCausalLM(config)


@dataclass(frozen=True)
class Arm:
    """One compared way of going on training: `kind` is "full", "lora" or "tree". `options` are further
    TreeLoraConfig arguments of a tree arm, as (name, value) pairs; they override `routing` (None: the config's
    default)."""

    key: str
    label: str
    kind: str
    rank: int = 0
    depth: int = 0
    routing: str | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def adapter_config(self, alpha_per_rank: float = 2.0) -> PeftConfig | None:
        """The PEFT config of this arm; every adapter uses lora_alpha = alpha_per_rank * its rank, so that all of
        them scale their update by the same factor and differ only in shape."""
        if self.kind == "full":
            return None
        if self.kind == "lora":
            return LoraConfig(
                r=self.rank, lora_alpha=alpha_per_rank * self.rank, target_modules="all-linear", task_type="CAUSAL_LM"
            )
        settings = {**({"routing": self.routing} if self.routing else {}), **dict(self.options)}
        return TreeLoraConfig(
            depth=self.depth,
            r=self.rank,
            lora_alpha=alpha_per_rank * self.rank,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
            **settings,
        )


def adapter_arms(rank: int, depth: int, include_full: bool) -> list[Arm]:
    """The arms of the issue: (a) full training, (b) LoRA r, (c) tree d x r with the config's routing (block), and
    the same with token and with sequence routing, (d) LoRA r * 2**d (as many adapter parameters as the leaves)."""
    wide, default_routing = rank * 2**depth, TreeLoraConfig.routing
    arms = [Arm("full", "full training (base alone)", "full")] if include_full else []
    arms += [
        Arm(f"lora{rank}", f"LoRA r={rank}", "lora", rank=rank),
        Arm("tree", f"TreeLoRA d={depth} r={rank}, {default_routing} routing (the default)", "tree", rank, depth),
        Arm("tree_token", f"TreeLoRA d={depth} r={rank}, token routing", "tree", rank, depth, "token"),
        Arm("tree_sequence", f"TreeLoRA d={depth} r={rank}, sequence routing", "tree", rank, depth, "sequence"),
        Arm(f"lora{wide}", f"LoRA r={wide}", "lora", rank=wide),
    ]
    return arms


def versions() -> dict[str, str]:
    """The software a result came from, for the results page."""
    import accelerate
    import peft
    import transformers

    from .. import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "peft-tree-lora": __version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads",
    }


def command_line() -> str:
    """The command as the user typed it (program name shortened to `tree-lora` when run as the entry point)."""
    script = Path(sys.argv[0])
    program = script.name
    if program == "__main__.py" and "peft_tree_lora" in script.parent.parts:
        program = "python -m " + ".".join(script.parent.parts[script.parent.parts.index("peft_tree_lora") :])
    return " ".join([program, *sys.argv[1:]])


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".partial")
    temporary.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(temporary, path)


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def summarise_runs(
    runs: list[dict[str, Any]], arm_keys: list[str], metrics: Sequence[str]
) -> dict[str, dict[str, dict[str, float]]]:
    """Per arm and metric: mean, std (sample; 0 for one seed), min, max and n over the seeds that have it."""
    import statistics

    summary: dict[str, dict[str, dict[str, float]]] = {}
    for key in arm_keys:
        summary[key] = {}
        for metric in metrics:
            values = [r[metric] for r in runs if r["arm"] == key and r.get(metric) is not None]
            if values:
                summary[key][metric] = {
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "min": min(values),
                    "max": max(values),
                    "n": len(values),
                }
    return summary
