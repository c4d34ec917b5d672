"""TreeLoRA against PEFT LoRA, side by side: `python benchmarks/bench_tree_lora.py [--quick]`.

The same benchmark as `tree-lora bench` (from a source checkout); it lives in `benchmarks/tree_lora_bench/`. Writes
`benchmarks/results.md` and `benchmarks/bench_depth.png`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.tree_lora_bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
