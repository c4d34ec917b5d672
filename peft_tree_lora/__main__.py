"""`python -m peft_tree_lora ...` is `tree-lora ...`."""

import sys

from .app.cli import main

sys.exit(main())
