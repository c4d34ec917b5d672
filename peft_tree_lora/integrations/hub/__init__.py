"""TreeLoRA on the Hugging Face Hub: the model card, pushing with it, and loading with clear errors.

PEFT writes `README.md` in `PeftModel.save_pretrained` (library tag, base model, PEFT version). `save_pretrained`
here saves the same way and then adds what a reader of a tree adapter needs (its shape, its parameter counts, how
to install and load it) to that card, read from the files actually saved; the command line, the runner and
`push_to_hub` save through it. Nothing in PEFT or transformers is patched, and saving a config alone writes no card.

`model.push_to_hub(...)` is transformers' `PushToHubMixin.push_to_hub`: it uploads the adapter exactly as for a
LoRA, but replaces the card that `save_pretrained` wrote with the repo's existing card or transformers' generic
template (for a LoRA too). `push_to_hub(model, repo_id)` here is the path that carries the TreeLoRA card: it
checks the token and the repo id first, keeps and updates an existing card, and supports `revision=` and
`subfolder=`.

Modules: `card` (the summary of a saved adapter, the card section, `save_pretrained`), `push` (`push_to_hub`),
`load` (`load_tree_config`, `from_pretrained`).
"""

from .card import (
    AdapterSummary,
    card_section,
    save_pretrained,
    summarize_adapter,
    update_model_card,
    update_saved_card,
)
from .load import from_pretrained, load_tree_config
from .push import push_to_hub

__all__ = [
    "AdapterSummary",
    "card_section",
    "from_pretrained",
    "load_tree_config",
    "push_to_hub",
    "save_pretrained",
    "summarize_adapter",
    "update_model_card",
    "update_saved_card",
]
