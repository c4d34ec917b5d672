"""TreeLoRA on the Hugging Face Hub: the model card, pushing with it, and loading with clear errors.

PEFT writes `README.md` in `PeftModel.save_pretrained` (library tag, base model, PEFT version). `save_pretrained`
here saves the same way and then adds what a reader of a tree adapter needs (its shape, its parameter counts, how
to install and load it) to that card, read from the files actually saved; the command line, the runner and
`push_to_hub` save through it. Nothing in PEFT or transformers is patched, and saving a config alone writes no card.

`model.push_to_hub(...)` is transformers' `PushToHubMixin.push_to_hub`: it uploads the adapter exactly as for a
LoRA, but replaces the card that `save_pretrained` wrote with the repo's existing card or transformers' generic
template (for a LoRA too). `push_to_hub(model, repo_id)` below is the path that carries the TreeLoRA card: it
checks the token and the repo id first, keeps and updates an existing card, and supports `revision=` and
`subfolder=`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..tuner.errors import TreeLoraUsageError

if TYPE_CHECKING:
    import torch
    from huggingface_hub import CommitInfo
    from peft import PeftModel

    from ..tuner.config import TreeLoraConfig

CARD_TAGS = ("peft", "tree-lora", "peft-tree-lora")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
PEFT_PREFIX = "base_model.model."
_SECTION = re.compile(r"<!-- BEGIN peft-tree-lora(?P<key>[^>]*?) -->.*?<!-- END peft-tree-lora(?P=key) -->", re.DOTALL)
ROUTING_TEXT = {
    "token": "token: every adapted layer routes every token by its own input",
    "sequence": "sequence: one leaf per sequence, chosen from the mean of its input token embeddings and shared by "
    "every adapted layer (kept for the whole generation)",
}


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


def summarize_adapter(directory: str | os.PathLike) -> AdapterSummary:
    """Describe the TreeLoRA adapter saved in `directory` without loading its weights (only the shapes in the
    safetensors header are read). The counts equal `model.base_model.parameter_counts()` of the saved model."""
    from safetensors import safe_open

    directory = Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    shapes: dict[str, list[int]] = {}
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as weights:
        for key in weights.keys():
            shapes[key] = list(weights.get_slice(key).get_shape())
    depth = int(config["depth"])
    total = active = other = 0
    layers = []
    for key, shape in shapes.items():
        numel = _numel(shape)
        if ".treelora_" not in key:
            other += numel
            continue
        total += numel
        if key.endswith(".treelora_A"):
            module = key.removesuffix(".treelora_A")
            num_leaves, rank, in_features = shape
            out_features = shapes[module + ".treelora_B"][1]
            active += rank * (in_features + out_features)
            if f"{module}.treelora_router.weight" in shapes:
                active += depth * (in_features + 1)
            layers.append(module.removeprefix(PEFT_PREFIX))
    targets = config.get("target_modules")
    configured = targets if isinstance(targets, str) else None  # a regex or "all-linear"; a list says no more
    return AdapterSummary(
        depth=depth,
        num_leaves=2**depth,
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
    )


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


# --- the model card -------------------------------------------------------------------------------------------


def is_hub_model_id(name: str | None) -> bool:
    """Whether `name` can be a model id on the Hub rather than a local path (the Hub refuses a card whose
    `base_model` is a path)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or name.startswith((".", "/", "~")) or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


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
    router_note = ", plus the routers on its path" if summary.routing == "token" and summary.depth else ""
    if summary.depth == 0:
        shape = "depth 0: a single LoRA on every adapted layer"
    else:
        routers = "1 router" if summary.depth == 1 else f"{summary.num_leaves - 1} routers"
        shape = f"depth {summary.depth}: {summary.num_leaves} LoRA leaves and {routers}"
    base = f"`{summary.base_model}`" if summary.base_model else "not recorded"
    rows = [
        ("base model", base),
        ("tree", shape),
        ("rank per leaf", f"{summary.r} (lora_alpha {summary.lora_alpha:g})"),
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
    return (
        f"<!-- BEGIN peft-tree-lora{' ' + key if key else ''} -->\n"
        f"## {title}\n\n"
        "A [peft-tree-lora](https://pypi.org/project/peft-tree-lora/) adapter: on every adapted layer a binary tree "
        "of LoRA leaves with a sigmoid router at each inner node. Training mixes the leaves; inference applies one "
        "leaf per token or per sequence.\n\n"
        "```bash\npip install peft-tree-lora\n```\n\n"
        "```python\nimport peft_tree_lora  # registers TreeLoRA with PEFT; without it PEFT cannot read this adapter\n"
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
    if is_hub_model_id(summary.base_model):
        tags.add(f"base_model:adapter:{summary.base_model}")
        data["base_model"] = summary.base_model
    elif not is_hub_model_id(data.get("base_model")):
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
    return tag.startswith("base_model:adapter:") and not is_hub_model_id(tag.removeprefix("base_model:adapter:"))


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
    if not (save_directory / WEIGHTS_NAME).is_file():
        return
    for card_path, key in ((save_directory / CARD_NAME, ""), (save_directory.parent / CARD_NAME, save_directory.name)):
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


# --- pushing --------------------------------------------------------------------------------------------------


def push_to_hub(
    model: PeftModel,
    repo_id: str,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
) -> CommitInfo:
    """Upload a TreeLoRA `model` (a `PeftModel`) to `repo_id` with its model card.

    Uploads what `model.save_pretrained` writes (the card included) to the branch `revision` (created from `main`
    if it does not exist) under `subfolder`. A card already in the repo at that place is kept and updated.
    Checks the model, the token and the repo id before anything is sent.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    _require_tree_model(model)
    token = _require_token(token)
    _require_repo_id(repo_id)
    path_in_repo = _clean_subfolder(subfolder)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    card_in_repo = f"{path_in_repo}/{CARD_NAME}" if path_in_repo else CARD_NAME
    with tempfile.TemporaryDirectory(prefix="tree-lora-push-") as work_dir:
        existing_tags: list[str] = []
        try:
            card_file = api.hf_hub_download(repo_id, card_in_repo, revision=revision, local_dir=work_dir)
            existing_tags = _card_tags(card_file)
        except (EntryNotFoundError, RevisionNotFoundError, RepositoryNotFoundError):
            pass
        _drop_download_metadata(work_dir)
        folder = Path(work_dir, path_in_repo) if path_in_repo else Path(work_dir)
        model.save_pretrained(str(folder))
        load_kwargs = {name: value for name, value in (("subfolder", path_in_repo), ("revision", revision)) if value}
        for name in model.peft_config:  # PEFT saves "default" in the folder itself, other adapters in sub-folders
            adapter_dir, key = (folder, "") if name == "default" else (folder / name, name)
            if not (adapter_dir / WEIGHTS_NAME).is_file():
                continue
            kwargs = (
                {**load_kwargs, "subfolder": f"{path_in_repo}/{name}" if path_in_repo else name}
                if key
                else load_kwargs
            )
            update_model_card(
                folder / CARD_NAME,
                adapter_dir,
                load_from=repo_id,
                load_kwargs=kwargs,
                key=key,
                extra_tags=existing_tags,
            )
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            path_in_repo=path_in_repo or None,
            revision=revision,
            commit_message=commit_message or "Upload TreeLoRA adapter",
            commit_description=commit_description,
            create_pr=create_pr,
        )


def _require_tree_model(model: Any) -> None:
    from peft import PeftModel

    from ..tuner.model import TreeLoraModel

    if not isinstance(model, PeftModel) or not isinstance(model.base_model, TreeLoraModel):
        raise TreeLoraUsageError(
            f"push_to_hub needs a PeftModel holding a TreeLoRA adapter (from get_peft_model or "
            f"PeftModel.from_pretrained); got {type(model).__name__}."
        )


def _require_token(token: str | None) -> str:
    from huggingface_hub import get_token

    token = token if isinstance(token, str) and token else get_token()
    if not token:
        raise TreeLoraUsageError(
            "Pushing to the Hub needs a token with write access, and none was found: run `hf auth login`, set the "
            "HF_TOKEN environment variable, or pass token=..."
        )
    return token


def _require_repo_id(repo_id: Any) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    reason = None
    if not isinstance(repo_id, str) or not repo_id:
        reason = "it is empty" if repo_id == "" else f"it is a {type(repo_id).__name__}, not a string"
    else:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as error:
            reason = str(error).split(":")[0].rstrip(".").lower()
    if reason:
        raise TreeLoraUsageError(
            f"{repo_id!r} is not a valid Hub repo id ({reason}). Use 'owner/name' or 'name': letters, digits, '-', "
            "'_' and '.', no '--' or '..', not ending in '.git', at most 96 characters."
        )


def _clean_subfolder(subfolder: str | None) -> str:
    if subfolder is None:
        return ""
    cleaned = subfolder.strip("/")
    if not cleaned or any(part in ("", ".", "..") for part in cleaned.split("/")) or "\\" in cleaned:
        raise TreeLoraUsageError(
            f"subfolder must be a relative path inside the repo such as 'adapters/v1'; got {subfolder!r}."
        )
    return cleaned


def _card_tags(card_file: str) -> list[str]:
    from huggingface_hub import ModelCard

    try:
        return list(ModelCard.load(card_file).data.get("tags") or [])
    except Exception:  # a card with broken metadata still gets updated; its tags cannot be kept
        return []


def _drop_download_metadata(work_dir: str) -> None:
    """`hf_hub_download(local_dir=...)` leaves a `.cache` folder that must not be uploaded."""
    import shutil

    shutil.rmtree(Path(work_dir, ".cache"), ignore_errors=True)


# --- loading --------------------------------------------------------------------------------------------------


def load_tree_config(
    repo_or_path: str,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | None = None,
) -> TreeLoraConfig:
    """The TreeLoRA config in a local directory or a Hub repo, or a `TreeLoraUsageError` that says what is there
    instead (no repo, no such revision, no adapter, or an adapter of another PEFT type)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    from ..tuner.config import TreeLoraConfig

    where = repr(repo_or_path) + (f" (subfolder {subfolder!r})" if subfolder else "")
    local = Path(repo_or_path, subfolder or "")
    if local.is_dir():
        config_file = local / CONFIG_NAME
        if not config_file.is_file():
            raise TreeLoraUsageError(f"{where} has no {CONFIG_NAME}, so it holds no PEFT adapter.")
    else:
        _require_repo_id(repo_or_path)
        at = f" at revision {revision!r}" if revision else ""
        try:
            config_file = hf_hub_download(
                repo_or_path, CONFIG_NAME, subfolder=subfolder, revision=revision, token=token
            )
        except RevisionNotFoundError:
            raise TreeLoraUsageError(f"The Hub repo {repo_or_path!r} has no revision {revision!r}.") from None
        except RepositoryNotFoundError:
            raise TreeLoraUsageError(
                f"No Hub repo {repo_or_path!r} (or it is private and the token cannot read it), and no local "
                "directory of that name."
            ) from None
        except EntryNotFoundError:
            raise TreeLoraUsageError(
                f"The Hub repo {where}{at} has no {CONFIG_NAME}, so it holds no PEFT adapter."
            ) from None
    try:
        raw = json.loads(Path(config_file).read_text())
    except json.JSONDecodeError as error:
        raise TreeLoraUsageError(f"The {CONFIG_NAME} of {where} is not valid JSON ({error}).") from None
    peft_type = raw.get("peft_type") if isinstance(raw, dict) else None
    if peft_type != "TREELORA":
        raise TreeLoraUsageError(
            f"{where} holds a {peft_type or 'non-PEFT'} adapter, not a TreeLoRA one (its {CONFIG_NAME} says "
            f"peft_type={peft_type!r}). Load it with PEFT directly (PeftModel.from_pretrained)."
        )
    return TreeLoraConfig.from_pretrained(str(Path(config_file).parent))


def from_pretrained(
    repo_or_path: str,
    base_model: torch.nn.Module | None = None,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | None = None,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> PeftModel:
    """Load a TreeLoRA adapter from a Hub repo or a local directory, refusing anything that is not one.

    With `base_model`, this is `PeftModel.from_pretrained(base_model, ...)`; without it, the base model named in
    the adapter's config is loaded as `AutoPeftModelForCausalLM` (or `AutoPeftModel` for other task types) does.
    """
    from peft import AutoPeftModel, AutoPeftModelForCausalLM, PeftModel

    config = load_tree_config(repo_or_path, revision=revision, subfolder=subfolder, token=token)
    kwargs: dict[str, Any] = {"revision": revision, "token": token, "is_trainable": is_trainable}
    if subfolder:
        kwargs["subfolder"] = subfolder
    if base_model is not None:
        return PeftModel.from_pretrained(base_model, repo_or_path, adapter_name=adapter_name, **kwargs)
    if not config.base_model_name_or_path:
        raise TreeLoraUsageError(
            f"The adapter in {repo_or_path!r} does not name its base model (base_model_name_or_path is empty): pass "
            "base_model=..."
        )
    auto = AutoPeftModelForCausalLM if config.task_type == "CAUSAL_LM" else AutoPeftModel
    return auto.from_pretrained(repo_or_path, adapter_name=adapter_name, **kwargs)
