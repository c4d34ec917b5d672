"""The TreeLoRA model card: what a saved adapter holds (read from its files), the card section that says so, and
`save_pretrained`, which saves as PEFT does and then adds that section to PEFT's card."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub.constants import REPOCARD_NAME
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME

from ...tuner.model import MODEL_TAGS
from ...tuner.routing import num_leaves, num_nodes
from ..files import PEFT_PREFIX, is_hub_id, tree_adapter_config

if TYPE_CHECKING:
    from peft import PeftModel

CARD_TAGS = ("peft", *MODEL_TAGS)
_SECTION = re.compile(r"<!-- BEGIN peft-tree-lora(?P<key>[^>]*?) -->.*?<!-- END peft-tree-lora(?P=key) -->", re.DOTALL)
ROUTING_TEXT = {
    "block": "block: one router per transformer block, on its first adapted layer, routes every token for every "
    "adapted layer of the block",
    "token": "token: every adapted layer routes every token by its own input",
    "sequence": "sequence: one leaf per sequence, chosen from the mean of its input token embeddings and shared by "
    "every adapted layer (kept for the whole generation)",
}
ROUTER_NOTE = {"token": ", plus the routers on its path", "block": ", plus its block's routers on the path"}


# --- what a saved adapter holds ------------------------------------------------------------------------------


@dataclass
class AdapterSummary:
    """The shape and size of one saved TreeLoRA adapter, read from its config and its weights' header."""

    depth: int
    num_leaves: int
    r: int
    lora_alpha: float
    routing: str
    inference_routing: str
    configured_targets: str | None
    target_names: list[str]  # distinct last name components of the adapted layers, e.g. ["q_proj", "v_proj"]
    num_layers: int
    total_parameters: int  # every leaf and router
    active_per_token: int  # one leaf per layer, plus the depth routers on its path for token routing
    modules_to_save: list[str]
    other_parameters: int  # modules trained in full (modules_to_save)
    base_model: str | None
    task_type: str | None
    leaf_layout: str = "leaf"  # "path": every node of a path carries part of the rank r


def summarize_adapter(directory: str | os.PathLike) -> AdapterSummary:
    """Describe the TreeLoRA adapter saved in `directory` without loading its weights (only the shapes in the
    safetensors header are read). The counts equal `model.base_model.parameter_counts()` of the saved model."""
    from safetensors import safe_open

    directory = Path(directory)
    config = tree_adapter_config(directory)
    shapes: dict[str, list[int]] = {}
    with safe_open(str(directory / SAFETENSORS_WEIGHTS_NAME), framework="pt") as weights:
        for key in weights.keys():
            shapes[key] = list(weights.get_slice(key).get_shape())
    depth = int(config["depth"])
    total = active = other = 0
    layers = []
    for key, shape in shapes.items():
        numel = math.prod(shape)
        if ".treelora_" not in key:
            other += numel
            continue
        total += numel
        if key.endswith(".treelora_A"):
            module = key.removesuffix(".treelora_A")
            _, rank, in_features = shape
            out_features = shapes[module + ".treelora_B"][1]
            active += rank * (in_features + out_features)
            if f"{module}.treelora_node_A" in shapes:  # leaf_layout="path": a token also applies its depth nodes
                active += depth * shapes[f"{module}.treelora_node_A"][1] * (in_features + out_features)
            if f"{module}.treelora_router.weight" in shapes:
                active += depth * (in_features + 1)
            layers.append(module.removeprefix(PEFT_PREFIX))
    targets = config.get("target_modules")
    configured = targets if isinstance(targets, str) else None  # a regex or "all-linear"; a list says no more
    return AdapterSummary(
        depth=depth,
        num_leaves=num_leaves(depth),
        r=int(config["r"]),
        lora_alpha=config["lora_alpha"],
        routing=config.get("routing", "token"),
        inference_routing=config.get("inference_routing", "hard"),
        configured_targets=configured,
        target_names=sorted({name.rsplit(".", 1)[-1] for name in layers}),
        num_layers=len(layers),
        total_parameters=total,
        active_per_token=active,
        modules_to_save=sorted(config.get("modules_to_save") or []),
        other_parameters=other,
        base_model=config.get("base_model_name_or_path") or None,
        task_type=config.get("task_type"),
        leaf_layout=config.get("leaf_layout", "leaf"),
    )


# --- the model card -------------------------------------------------------------------------------------------

NOT_ON_PYPI = "peft-tree-lora is not on PyPI: install it from its source repository"


def source_url() -> str | None:
    """The project's repository as its installed metadata names it (setup.cfg `url` or a `Source` project URL), if
    it names one: the card's install line points there."""
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        meta = metadata("peft-tree-lora")
    except PackageNotFoundError:
        return None
    urls = [meta.get("Home-page") or "", *(entry.split(",", 1)[-1] for entry in meta.get_all("Project-URL") or [])]
    return next((url.strip() for url in urls if url.strip().startswith(("https://", "http://"))), None)


def install_lines(url: str | None = None) -> str:
    """The shell lines that install peft-tree-lora, for a reader of the card."""
    if url:
        return f'# {NOT_ON_PYPI}\npip install "peft-tree-lora @ git+{url}"'
    return f"# {NOT_ON_PYPI} (a clone of it, or its git URL)\npip install /path/to/peft-tree-lora"


def card_section(summary: AdapterSummary, load_from: str, key: str = "", load_kwargs: dict | None = None) -> str:
    """The TreeLoRA part of a model card, between markers so that a later save replaces it in place."""
    kwargs = "".join(f", {name}={json.dumps(value)}" for name, value in (load_kwargs or {}).items())
    if summary.task_type == "CAUSAL_LM":
        load = (
            "from peft import AutoPeftModelForCausalLM\n\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{load_from}"{kwargs})'
        )
    else:
        load = f'from peft import PeftModel\n\nmodel = PeftModel.from_pretrained(base_model, "{load_from}"{kwargs})'
    router_note = ROUTER_NOTE.get(summary.routing, "") if summary.depth else ""
    if summary.depth == 0:
        shape = "depth 0: a single LoRA on every adapted layer"
    else:
        routers = "1 router" if summary.depth == 1 else f"{num_nodes(summary.depth)} routers"
        shape = f"depth {summary.depth}: {summary.num_leaves} LoRA leaves and {routers}"
    base = f"`{summary.base_model}`" if summary.base_model else "not recorded"
    rows = [
        ("base model", base),
        ("tree", shape),
        (
            ("rank per path", f"{summary.r}, split over the path's nodes (lora_alpha {summary.lora_alpha:g})")
            if summary.leaf_layout == "path" and summary.depth
            else ("rank per leaf", f"{summary.r} (lora_alpha {summary.lora_alpha:g})")
        ),
        ("routing", ROUTING_TEXT.get(summary.routing, summary.routing)),
        ("inference routing", summary.inference_routing),
        (
            "targeted modules",
            f"{', '.join(f'`{n}`' for n in summary.target_names)} ({summary.num_layers} layers"
            + (f"; configured as `{summary.configured_targets}`)" if summary.configured_targets else ")"),
        ),
        ("trainable parameters", f"{summary.total_parameters:,} (every leaf and router)"),
        ("active per token", f"{summary.active_per_token:,} (one leaf per adapted layer{router_note})"),
    ]
    if summary.modules_to_save:
        rows.append(
            (
                "trained in full",
                f"{', '.join(f'`{m}`' for m in summary.modules_to_save)} ({summary.other_parameters:,} parameters)",
            )
        )
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    title = "TreeLoRA adapter" + (f" `{key}`" if key else "")
    url = source_url()
    name = f"[peft-tree-lora]({url})" if url else "peft-tree-lora"
    return (
        f"<!-- BEGIN peft-tree-lora{' ' + key if key else ''} -->\n"
        f"## {title}\n\n"
        f"A {name} adapter: on every adapted layer a binary tree "
        "of LoRA leaves with a sigmoid router at each inner node. Training mixes the leaves; inference applies one "
        "leaf per token or per sequence.\n\n"
        f"```bash\n{install_lines(url)}\n```\n\n"
        "```python\nimport peft_tree_lora  # registers TreeLoRA with PEFT (once installed, `import peft` does too)\n"
        f"{load}\n```\n\n"
        "| | |\n| --- | --- |\n"
        f"{table}\n"
        f"<!-- END peft-tree-lora{' ' + key if key else ''} -->"
    )


def update_model_card(
    card_path: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    *,
    load_from: str | None = None,
    load_kwargs: dict | None = None,
    key: str = "",
    extra_tags: tuple[str, ...] | list[str] = (),
) -> None:
    """Add or refresh the TreeLoRA section and tags of the card at `card_path` for the adapter in `adapter_dir`.

    An existing card keeps its text and metadata; only the section between the peft-tree-lora markers is
    replaced. `base_model` metadata and `base_model:adapter:` tags that are not Hub model ids (local paths, or
    empty when the base was built from a config) are dropped, as the Hub refuses them.
    """
    from huggingface_hub import ModelCard, ModelCardData

    card_path = Path(card_path)
    summary = summarize_adapter(adapter_dir)
    card = ModelCard.load(card_path) if card_path.exists() else ModelCard.from_template(ModelCardData())
    data = card.data
    if not data.get("library_name"):
        data["library_name"] = "peft"
    tags = {tag for tag in (data.get("tags") or []) if not _is_path_base_tag(tag)}
    tags.update(CARD_TAGS, extra_tags)
    if is_hub_id(summary.base_model):
        tags.add(f"base_model:adapter:{summary.base_model}")
        data["base_model"] = summary.base_model
    elif not is_hub_id(data.get("base_model")):
        data.pop("base_model", None)
    data["tags"] = sorted(tags)
    if summary.task_type == "CAUSAL_LM" and not data.get("pipeline_tag"):
        data["pipeline_tag"] = "text-generation"
    section = card_section(summary, load_from or str(adapter_dir), key, load_kwargs)
    text, replaced = card.text, False
    for match in _SECTION.finditer(text):
        if match["key"].strip() == key:
            text = text[: match.start()] + section + text[match.end() :]
            replaced = True
            break
    if not replaced:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    card.text = text
    card.save(card_path)


def _is_path_base_tag(tag: str) -> bool:
    return tag.startswith("base_model:adapter:") and not is_hub_id(tag.removeprefix("base_model:adapter:"))


def save_pretrained(model: PeftModel, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """`model.save_pretrained(save_directory, **kwargs)`, then the TreeLoRA section of each saved adapter in the
    card PEFT wrote (PEFT saves "default" in the folder itself and other adapters in sub-folders named after them)."""
    model.save_pretrained(str(save_directory), **kwargs)
    for name in model.peft_config:
        update_saved_card(Path(save_directory) if name == "default" else Path(save_directory) / name)


def update_saved_card(save_directory: str | os.PathLike) -> None:
    """Add the TreeLoRA section for the adapter PEFT has just saved in `save_directory` to PEFT's card.

    Only a card PEFT claims (`library_name: peft`) is touched: the one in `save_directory`, or, for an adapter
    PEFT saves in a sub-directory named after it, the one in the parent directory. A folder without adapter
    weights changes no card.
    """
    save_directory = Path(save_directory)
    if not (save_directory / SAFETENSORS_WEIGHTS_NAME).is_file():
        return
    for card_path, key in (
        (save_directory / REPOCARD_NAME, ""),
        (save_directory.parent / REPOCARD_NAME, save_directory.name),
    ):
        if card_path.is_file() and _is_peft_card(card_path):
            load_kwargs = {"subfolder": key} if key else None
            update_model_card(
                card_path, save_directory, load_from=str(card_path.parent), load_kwargs=load_kwargs, key=key
            )
            return


def _is_peft_card(card_path: Path) -> bool:
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(card_path).data.get("library_name") == "peft"
    except Exception:  # a README without valid metadata is not a card PEFT wrote
        return False
