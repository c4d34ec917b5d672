"""peft-tree-lora: a PEFT adapter with a binary tree of LoRA leaves and sigmoid routers.

`import peft_tree_lora` registers the `TREELORA` method with PEFT; after that `get_peft_model`,
`PeftModel.from_pretrained` and `AutoPeftModel*` handle TreeLoRA adapters like any other PEFT adapter.
"""

from .tuner.registration import register

register()

from .integrations.telemetry import RoutingTelemetryCallback, routing_telemetry  # noqa: E402
from .tuner import (  # noqa: E402
    MAX_DEPTH,
    TreeLoraConfig,
    TreeLoraLayer,
    TreeLoraLinear,
    TreeLoraModel,
    TreeLoraSequenceRouter,
    TreeRouter,
)

__version__ = "0.2.0"

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
