"""Loading a TreeLoRA adapter from the Hub or a local folder, refusing with a clear error anything that is not one
(no repo, no such revision, no adapter, or an adapter of another PEFT type)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft.utils.constants import CONFIG_NAME

from ...tuner.errors import TreeLoraUsageError
from ..files import read_tree_config, require_hub_id, tree_adapter_config

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

    from ...tuner.config import TreeLoraConfig


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

    from ...tuner.config import TreeLoraConfig

    where = repr(repo_or_path) + (f" (subfolder {subfolder!r})" if subfolder else "")
    remedy = "Load it with PEFT directly (PeftModel.from_pretrained)."
    local = Path(repo_or_path, subfolder or "")
    if local.is_dir():
        tree_adapter_config(local, where, remedy)
        return TreeLoraConfig.from_pretrained(str(local))
    require_hub_id(repo_or_path)
    at = f" at revision {revision!r}" if revision else ""
    try:
        config_file = hf_hub_download(repo_or_path, CONFIG_NAME, subfolder=subfolder, revision=revision, token=token)
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
    read_tree_config(config_file, where, remedy)
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
