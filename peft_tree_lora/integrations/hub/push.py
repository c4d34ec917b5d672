"""`push_to_hub(model, repo_id)`: upload a TreeLoRA adapter with its model card, keeping and updating a card the
repo already has; checks the model, the token and the repo id before anything is sent."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub.constants import REPOCARD_NAME
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME

from ...tuner.errors import TreeLoraUsageError
from ..files import require_hub_id
from .card import update_model_card

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo
    from peft import PeftModel


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
    require_hub_id(repo_id)
    path_in_repo = _clean_subfolder(subfolder)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    card_in_repo = f"{path_in_repo}/{REPOCARD_NAME}" if path_in_repo else REPOCARD_NAME
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
            if not (adapter_dir / SAFETENSORS_WEIGHTS_NAME).is_file():
                continue
            kwargs = (
                {**load_kwargs, "subfolder": f"{path_in_repo}/{name}" if path_in_repo else name}
                if key
                else load_kwargs
            )
            update_model_card(
                folder / REPOCARD_NAME,
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

    from ...tuner.model import TreeLoraModel

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
