"""`TreeLoraUsageError`, defined in `peft_tree_lora.errors` (a module that imports nothing, so that the command line
can catch it without importing PEFT and torch) and named here too, where the tuner and its callers import it."""

from ..errors import TreeLoraUsageError

__all__ = ["TreeLoraUsageError"]
