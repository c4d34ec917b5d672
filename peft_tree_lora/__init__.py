"""peft-tree-lora: a PEFT adapter with a binary tree of LoRA leaves and sigmoid routers.

`import peft_tree_lora` registers the `TREELORA` method with PEFT; after that `get_peft_model`,
`PeftModel.from_pretrained` and `AutoPeftModel*` handle TreeLoRA adapters like any other PEFT adapter. Installed with
pip, the package registers itself whenever PEFT is imported, without this import (see `_peft_tree_lora_autoload`).

This module is light: it imports PEFT and torch only when they are needed. If PEFT is already imported, TreeLoRA is
registered now; otherwise right after `import peft`. The names below (`TreeLoraConfig`, ...) are imported on first
use (PEP 562), which also registers. So `tree-lora --help` never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import _peft_tree_lora_autoload

__version__ = "0.3.0"

_LAZY = {
    "MAX_DEPTH": ".tuner",
    "TreeLoraConfig": ".tuner",
    "TreeLoraLayer": ".tuner",
    "TreeLoraLinear": ".tuner",
    "TreeLoraModel": ".tuner",
    "TreeLoraSequenceRouter": ".tuner",
    "TreeRouter": ".tuner",
    "register": ".tuner",
    "RoutingTelemetryCallback": ".integrations.telemetry",
    "routing_telemetry": ".integrations.telemetry",
}

_SUBPACKAGES = ("app", "errors", "experiments", "integrations", "tuner")

__all__ = [
    "MAX_DEPTH",
    "RoutingTelemetryCallback",
    "TreeLoraConfig",
    "TreeLoraLayer",
    "TreeLoraLinear",
    "TreeLoraModel",
    "TreeLoraSequenceRouter",
    "TreeRouter",
    "__version__",
    "register",
    "routing_telemetry",
]

if TYPE_CHECKING:
    from .integrations.telemetry import RoutingTelemetryCallback, routing_telemetry
    from .tuner import (
        MAX_DEPTH,
        TreeLoraConfig,
        TreeLoraLayer,
        TreeLoraLinear,
        TreeLoraModel,
        TreeLoraSequenceRouter,
        TreeRouter,
        register,
    )


def __getattr__(name: str):
    if name in _SUBPACKAGES:  # `peft_tree_lora.integrations.hub...` after a bare `import peft_tree_lora`
        return importlib.import_module(f".{name}", __name__)
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBPACKAGES})


_peft_tree_lora_autoload.import_plugin_after_peft()
