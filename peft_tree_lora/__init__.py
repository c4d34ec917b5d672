"""peft-tree-lora: a PEFT adapter with a binary tree of LoRA leaves and sigmoid routers.

`import peft_tree_lora` registers the `TREELORA` method with PEFT; after that `get_peft_model`,
`PeftModel.from_pretrained` and `AutoPeftModel*` handle TreeLoRA adapters like any other PEFT adapter.
"""

from .registration import register

register()

from .config import MAX_DEPTH, TreeLoraConfig  # noqa: E402
from .layer import TreeLoraLayer, TreeLoraLinear, TreeLoraSequenceRouter  # noqa: E402
from .model import TreeLoraModel  # noqa: E402
from .trainer import RoutingTelemetryCallback, routing_telemetry  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "MAX_DEPTH",
    "RoutingTelemetryCallback",
    "TreeLoraConfig",
    "TreeLoraLayer",
    "TreeLoraLinear",
    "TreeLoraModel",
    "TreeLoraSequenceRouter",
    "__version__",
    "register",
    "routing_telemetry",
]
