"""`python -m benchmarks.tree_lora_bench [--quick]` is `tree-lora bench [--quick]`."""

import sys

from .cli import main

sys.exit(main())
