"""`python -m peft_tree_lora ...` is `tree-lora ...`."""

import sys

from .cli import main

sys.exit(main())
