"""Export the leaves of a sequence-routed TreeLoRA as plain PEFT LoRA adapters, for multi-LoRA servers.

With `routing="sequence"` one leaf serves a whole sequence in every adapted layer, so leaf `k` *is* a LoRA: its
`A[k]`, `B[k]` on every layer (with `leaf_layout="path"`, the factors of the path's node LoRAs concatenated, a LoRA of
rank `r`), with the tree's `lora_alpha / r` scaling. vLLM, S-LoRA, LoRAX and plain PEFT load
such a directory as they load any LoRA (`peft_type: LORA`, keys ending in `lora_A.weight` / `lora_B.weight`, no
bias, no `modules_to_save`). The router goes beside the leaves as a small safetensors file and a JSON that says how
to compute the route from the prompt's token embeddings, so a serving stack can pick the LoRA per request.

With token routing every layer chooses its own leaf for every token: no single LoRA equals that (depth > 0), and
export refuses it.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME

from ..tuner.errors import TreeLoraUsageError
from ..tuner.path_leaves import path_factors
from ..tuner.router import TreeRouter
from ..tuner.routing import num_leaves
from ..tuner.sequence_router import pooled_prefix
from .files import PEFT_PREFIX, PEFT_TYPE, staged_directory, tree_adapter_config

if TYPE_CHECKING:
    from peft import PeftModel

ROUTER_WEIGHTS = "router.safetensors"
ROUTER_SPEC = "router.json"
ROUTER_FORMAT = "peft-tree-lora-router"


@dataclass
class TreeWeights:
    """One TreeLoRA adapter as tensors: what both a live model and a saved directory can provide."""

    config: dict[str, Any]
    state: dict[str, torch.Tensor]  # keys as in adapter_model.safetensors (no adapter name)
    conv1d_modules: set[str] | None  # module paths of GPT-2 style Conv1D layers; None when unknown (from a file)
    source: str

    @property
    def depth(self) -> int:
        return int(self.config["depth"])

    @property
    def num_leaves(self) -> int:
        return num_leaves(self.depth)

    def modules(self) -> list[str]:
        """Module paths (relative to the base model) that carry leaves."""
        return sorted(
            k.removeprefix(PEFT_PREFIX).removesuffix(".treelora_A") for k in self.state if k.endswith(".treelora_A")
        )

    def sequence_router(self) -> tuple[str, torch.Tensor, torch.Tensor] | None:
        """(embedding module path, weight (2**d - 1, hidden), bias) of the sequence router, if there is one."""
        for key, weight in self.state.items():
            module = key.removesuffix(".treelora_router.weight")
            if module != key and f"{module}.treelora_A" not in self.state:  # a router without leaves: the sequence one
                return module.removeprefix(PEFT_PREFIX), weight, self.state[f"{module}.treelora_router.bias"]
        return None


def read_tree(adapter: PeftModel | str | os.PathLike, adapter_name: str | None = None) -> TreeWeights:
    """The TreeLoRA adapter of a `PeftModel` (its active adapter unless `adapter_name` is given) or of a directory
    written by `save_pretrained`."""
    from peft import PeftModel

    if isinstance(adapter, PeftModel):
        return _read_model(adapter, adapter_name)
    if isinstance(adapter, (str, os.PathLike)):
        return _read_directory(Path(adapter))
    raise TreeLoraUsageError(
        "export needs a PeftModel with a TreeLoRA adapter or the directory it was saved to; got "
        f"{type(adapter).__name__}."
    )


def _read_model(model: PeftModel, adapter_name: str | None) -> TreeWeights:
    from peft.utils import get_peft_model_state_dict
    from transformers.pytorch_utils import Conv1D

    from ..tuner.layer import TreeLoraLinear
    from ..tuner.model import TreeLoraModel

    if not isinstance(model.base_model, TreeLoraModel):
        raise TreeLoraUsageError(
            f"export needs a TreeLoRA adapter; this model holds {type(model.base_model).__name__}."
        )
    name = adapter_name or model.active_adapter
    if name not in model.peft_config:
        raise TreeLoraUsageError(f"No adapter named {name!r}; the model has {sorted(model.peft_config)}.")
    config = model.peft_config[name].to_dict()
    config["peft_type"] = PEFT_TYPE
    config["target_modules"] = _jsonable(config.get("target_modules"))
    state = {k: v.detach().to("cpu").clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
    conv1d = set()
    for module_name, module in model.base_model.model.named_modules():
        if isinstance(module, TreeLoraLinear) and isinstance(module.get_base_layer(), Conv1D):
            conv1d.add(module_name)
    return TreeWeights(config, state, conv1d, f"adapter {name!r} of the model")


def _read_directory(directory: Path) -> TreeWeights:
    from safetensors.torch import load_file

    config = tree_adapter_config(directory, remedy="Export reads TreeLoRA adapters only.")
    weights_file = directory / SAFETENSORS_WEIGHTS_NAME
    if not weights_file.is_file():
        raise TreeLoraUsageError(
            f"{str(directory)!r} has no {SAFETENSORS_WEIGHTS_NAME}: export reads safetensors weights only (save with "
            "safe_serialization=True, the default)."
        )
    try:
        tensors = load_file(str(weights_file))
    except Exception as error:  # safetensors raises its own error types for every kind of damage
        raise TreeLoraUsageError(
            f"{str(weights_file)!r} is not a readable safetensors file ({one_line(str(error))}); re-save the adapter."
        ) from None
    return TreeWeights(config, tensors, None, repr(str(directory)))


def one_line(message: str) -> str:
    return " ".join(part.strip() for part in message.strip().splitlines() if part.strip())


def _jsonable(value: Any) -> Any:
    return sorted(value) if isinstance(value, set) else value


# --- checks ---------------------------------------------------------------------------------------------------


def check_exportable(tree: TreeWeights) -> None:
    """Refuse what no plain LoRA can reproduce, saying why and what to use instead."""
    routing = tree.config.get("routing", "token")
    if routing in ("token", "block") and tree.depth > 0:
        picks = "every layer" if routing == "token" else "every block"
        raise TreeLoraUsageError(
            f"Cannot export {tree.source} as LoRA: it routes by token (routing={routing!r}, depth {tree.depth}), so "
            f"{picks} picks its own leaf for every token and no single LoRA reproduces it. Train with "
            "routing='sequence' (one leaf per sequence, shared by every layer) to get leaves a multi-LoRA server can "
            "serve, or serve this adapter with transformers + peft-tree-lora (PeftModel.from_pretrained after "
            "`import peft_tree_lora`)."
        )
    if tree.config.get("modules_to_save"):
        raise TreeLoraUsageError(
            f"Cannot export {tree.source} as LoRA: it also trains {sorted(tree.config['modules_to_save'])} in full "
            "(modules_to_save), which LoRA servers do not load, so the exported leaves would not reproduce it. "
            "Train without modules_to_save to export."
        )


def check_leaf(tree: TreeWeights, leaf: Any) -> int:
    if isinstance(leaf, bool) or not isinstance(leaf, int) or not 0 <= leaf < tree.num_leaves:
        raise TreeLoraUsageError(
            f"Leaf {leaf!r} is out of range: {tree.source} has {tree.num_leaves} leaves (depth {tree.depth}), "
            f"numbered 0 to {tree.num_leaves - 1}."
        )
    return leaf


# --- writing --------------------------------------------------------------------------------------------------


def leaf_lora(tree: TreeWeights, leaf: int) -> tuple[Any, dict[str, torch.Tensor]]:
    """(LoraConfig, state dict) of leaf `leaf`: a standard PEFT LoRA whose outputs equal the tree's for a sequence
    routed to that leaf."""
    from peft import LoraConfig

    modules = tree.modules()
    state = {}
    for module in modules:
        key = PEFT_PREFIX + module
        lora_A, lora_B = path_factors(  # with leaf_layout="path", the sum of the path's node LoRAs: rank r
            tree.state[f"{key}.treelora_A"],
            tree.state[f"{key}.treelora_B"],
            tree.state.get(f"{key}.treelora_node_A"),
            tree.state.get(f"{key}.treelora_node_B"),
            torch.tensor([leaf]),
        )
        state[f"{key}.lora_A.weight"] = lora_A[0].contiguous()
        state[f"{key}.lora_B.weight"] = lora_B[0].contiguous()
    config = LoraConfig(
        r=int(tree.config["r"]),
        lora_alpha=tree.config["lora_alpha"],
        lora_dropout=float(tree.config.get("lora_dropout") or 0.0),
        target_modules=modules,  # full paths: exactly the layers the tree adapts, whatever the base model
        bias="none",
        fan_in_fan_out=bool(tree.conv1d_modules),
        task_type=tree.config.get("task_type"),
        base_model_name_or_path=tree.config.get("base_model_name_or_path"),
        inference_mode=True,
    )
    return config, state


def export_leaf(
    adapter: PeftModel | str | os.PathLike, leaf: int, out_dir: str | os.PathLike, *, adapter_name: str | None = None
) -> Path:
    """Write leaf `leaf` of a sequence-routed TreeLoRA (a `PeftModel` or a saved directory) to `out_dir` as a
    standard PEFT LoRA directory. `out_dir` must not exist or be empty."""
    tree = read_tree(adapter, adapter_name)
    check_exportable(tree)
    check_leaf(tree, leaf)
    _refuse_non_empty(out_dir)
    with staged_directory(out_dir) as staging:
        _write_leaf(tree, leaf, staging)
    return Path(out_dir)


def export_leaves(
    adapter: PeftModel | str | os.PathLike, out_dir: str | os.PathLike, *, adapter_name: str | None = None
) -> Path:
    """Write every leaf as `out_dir/leaf_<k>/` (standard LoRA directories) and the router as
    `out_dir/router.safetensors` with `out_dir/router.json`, the recipe for choosing a leaf per request."""
    tree = read_tree(adapter, adapter_name)
    check_exportable(tree)
    _refuse_non_empty(out_dir)
    with staged_directory(out_dir) as staging:
        leaves = [f"leaf_{k}" for k in range(tree.num_leaves)]
        for k, name in enumerate(leaves):
            _write_leaf(tree, k, staging / name)
        _write_router(tree, staging, leaves)
    return Path(out_dir)


def _write_leaf(tree: TreeWeights, leaf: int, directory: Path) -> None:
    from safetensors.torch import save_file

    config, state = leaf_lora(tree, leaf)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    save_file(state, str(directory / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})


def _write_router(tree: TreeWeights, directory: Path, leaves: list[str]) -> None:
    from safetensors.torch import save_file

    router = tree.sequence_router()
    spec: dict[str, Any] = {
        "format": ROUTER_FORMAT,
        "format_version": 1,
        "depth": tree.depth,
        "num_leaves": tree.num_leaves,
        "leaves": leaves,
        "base_model_name_or_path": tree.config.get("base_model_name_or_path"),
        "weights": None,
        "input_norm": bool(tree.config.get("router_input_norm", False)),
        "route_tokens": tree.config.get("sequence_route_tokens"),
        "route": {
            "input": "the output of the base model's input embedding module (model.get_input_embeddings()) for the "
            "prompt's token ids: (tokens, hidden_size)",
            "pooling": "mean over the positions where attention_mask is 1 (every position when there is no mask), "
            "keeping only the first route_tokens such positions when route_tokens is not null",
            "normalisation": "when input_norm is true, divide the pooled vector by its root mean square "
            "(sqrt(mean(pooled**2) + 1e-6)) before the decisions",
            "nodes": "heap order: the root is node 0; node n has its left child at 2n+1 and its right child at 2n+2",
            "decision": "logit[n] = weight[n] . pooled + bias[n], computed in the router's dtype; go right when "
            "logit[n] >= 0, left otherwise; start at the root and take depth decisions",
            "leaf": "the path read from the root as a binary number, right = 1 (equivalently, the final node index "
            "minus num_leaves - 1); serve leaves[leaf]",
            "generation": "choose the leaf once from the prompt and keep it for every generated token",
        },
    }
    if tree.depth == 0:
        spec["route"] = {"leaf": "always 0: the tree has one leaf"}
    else:
        module, weight, bias = router
        save_file(
            {"weight": weight.contiguous(), "bias": bias.contiguous()},
            str(directory / ROUTER_WEIGHTS),
            metadata={"format": "pt"},
        )
        spec.update(
            weights=ROUTER_WEIGHTS,
            hidden_size=int(weight.shape[1]),
            embedding_module=module,
            dtype=str(weight.dtype).removeprefix("torch."),
        )
    (directory / ROUTER_SPEC).write_text(json.dumps(spec, indent=2) + "\n")


def _refuse_non_empty(out_dir: str | os.PathLike) -> None:
    """Export writes into a new or empty directory only (built next to it and moved into place at the end, so a
    failed export leaves nothing behind)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        kind = "directory" if out_dir.is_dir() else "file"
        raise TreeLoraUsageError(
            f"{str(out_dir)!r} already exists and is a non-empty {kind}; export writes into a new or empty "
            "directory only, so nothing there is overwritten."
        )


# --- routing as a server would do it --------------------------------------------------------------------------


def route_from_embeddings(
    spec: dict[str, Any],
    router: dict[str, torch.Tensor] | None,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The leaf (`batch,` int64) that `router.json` prescribes for token embeddings `embeds` (`batch, tokens,
    hidden`), computed by the tuner's own router, for checking an export against the recipe."""
    if spec["depth"] == 0:
        return torch.zeros(embeds.shape[0], dtype=torch.long)
    tree_router = TreeRouter(router["weight"].shape[1], spec["depth"], input_norm=spec.get("input_norm", False))
    tree_router.load_state_dict({"weight": router["weight"], "bias": router["bias"]})
    mask = None if attention_mask is None else attention_mask.bool()
    return tree_router.leaf(pooled_prefix(embeds, mask, spec.get("route_tokens")))


# --- command line (registered by peft_tree_lora.app.cli as `tree-lora export`) ------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Export a sequence-routed TreeLoRA adapter as plain PEFT LoRA directories for multi-LoRA servers (vLLM, "
        "S-LoRA, LoRAX, PEFT): every leaf as OUT/leaf_<k>/ plus the router (OUT/router.safetensors, "
        "OUT/router.json), or one leaf as OUT with --leaf."
    )
    parser.add_argument("adapter", metavar="ADAPTER", help="directory of a saved TreeLoRA adapter")
    parser.add_argument("out", metavar="OUT", help="new (or empty) directory to write")
    parser.add_argument("--leaf", type=int, default=None, metavar="K", help="export only leaf K, as OUT itself")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except TreeLoraUsageError:
        raise
    except (KeyError, ValueError, OSError) as error:  # what a damaged adapter raises; a one-line error, status 2
        reason = f"{type(error).__name__}: {one_line(str(error))}"
        raise TreeLoraUsageError(f"cannot export {args.adapter!r}: {reason}") from None


def _run(args: argparse.Namespace) -> int:
    if args.leaf is not None:
        path = export_leaf(args.adapter, args.leaf, args.out)
        print(f"wrote leaf {args.leaf} of {args.adapter} as a PEFT LoRA adapter: {path}")
        return 0
    path = export_leaves(args.adapter, args.out)
    spec = json.loads((path / ROUTER_SPEC).read_text())
    last = spec["num_leaves"] - 1
    print(f"wrote {last + 1} PEFT LoRA adapters (leaf_0 .. leaf_{last}) and the router to {path}")
    return 0
