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


class _Prefix(str):
    """The prefix of TreeLoRA's weight names, as PEFT keeps it. `PeftModel.add_adapter` and `get_peft_model` first
    test `adapter_name in prefix`, which for a name that is no string (`add_adapter(None, config)`) is a bare
    "'in <string>' requires string as left operand"; this prefix answers with what a name must be instead."""

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, str):
            raise TypeError(
                "TreeLoRA adapter names must be strings that start with a letter or '_' and hold only letters, "
                f"digits, '_' and '-' (e.g. 'default'); got {item!r}."
            )
        return super().__contains__(item)

    def __reduce__(self):
        return (str, (str(self),))


PREFIX = _Prefix("treelora_")


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
