import sys

import peft_tree_lora  # noqa: F401  (registers TreeLoRA with PEFT)

from . import main

sys.exit(main())
