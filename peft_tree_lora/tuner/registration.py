"""Makes TreeLoRA a PEFT method: adds `TREELORA` to `PeftType` and registers the config and tuner with PEFT.

PEFT has no plugin entry points and `register_peft_method` only accepts names already in the `PeftType` enum, so the
enum gains a member at import time (`aenum.extend_enum`; stdlib enums cannot be subclassed). Nothing else in PEFT or
transformers is changed. Calling `register()` again is harmless.
"""

from __future__ import annotations

from aenum import extend_enum
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import PeftType, register_peft_method

METHOD_NAME = "treelora"
PREFIX = "treelora_"


def _extend_peft_type() -> None:
    if METHOD_NAME.upper() not in PeftType.__members__:
        extend_enum(PeftType, METHOD_NAME.upper(), METHOD_NAME.upper())


def register() -> None:
    """Register TreeLoRA with PEFT (done by `import peft_tree_lora`)."""
    _extend_peft_type()
    if PeftType.TREELORA in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    from .config import TreeLoraConfig
    from .model import TreeLoraModel

    register_peft_method(name=METHOD_NAME, config_cls=TreeLoraConfig, model_cls=TreeLoraModel, prefix=PREFIX)


_extend_peft_type()
