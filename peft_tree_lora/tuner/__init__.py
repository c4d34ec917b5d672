"""The core tuner: config, routers, routing maths, leaf kernels, layers and the PEFT tuner. It imports nothing from
the rest of the package (integrations, command line, experiments build on it).

Importing it registers the `TREELORA` method with PEFT (`registration.register`, harmless to repeat): every path that
makes TreeLoRA usable (`import peft_tree_lora`, its names, the start-up hook that runs after `import peft`) comes
through here.
"""

from .config import MAX_DEPTH, TreeLoraConfig
from .layer import TreeLoraLayer, TreeLoraLinear
from .model import TreeLoraModel
from .registration import register
from .router import TreeRouter
from .sequence_router import TreeLoraSequenceRouter

register()

__all__ = [
    "MAX_DEPTH",
    "TreeLoraConfig",
    "TreeLoraLayer",
    "TreeLoraLinear",
    "TreeLoraModel",
    "TreeLoraSequenceRouter",
    "TreeRouter",
    "register",
]
