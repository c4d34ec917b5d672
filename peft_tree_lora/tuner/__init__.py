"""The core tuner: config, routers, routing maths, leaf kernels, layers and the PEFT tuner. It imports nothing from
the rest of the package (integrations, command line, experiments build on it)."""

from .config import MAX_DEPTH, TreeLoraConfig
from .layer import TreeLoraLayer, TreeLoraLinear
from .model import TreeLoraModel
from .router import TreeRouter
from .sequence_router import TreeLoraSequenceRouter

__all__ = [
    "MAX_DEPTH",
    "TreeLoraConfig",
    "TreeLoraLayer",
    "TreeLoraLinear",
    "TreeLoraModel",
    "TreeLoraSequenceRouter",
    "TreeRouter",
]
