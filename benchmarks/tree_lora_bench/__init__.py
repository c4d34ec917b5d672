"""`tree-lora bench`: TreeLoRA against PEFT LoRA (and X-LoRA), side by side in one process.

Every variant shares one base model's weights (random, with SmolLM2-135M's shapes), so the adapters are all that
differ. Timings are interleaved: each round runs every variant once, in a fresh random order, and every figure is
reported as a ratio to PEFT LoRA r=8 *of the same round*; the median, min and max of those ratios over the rounds are
what the table shows. Machine drift and other processes' load then hit numerator and denominator alike.

Peak memory is measured in one subprocess per configuration: the kernel's resident-set high-water mark (`VmHWM`)
is reset through `/proc/self/clear_refs` just before a training step and read just after it, so the figure is the
largest resident memory the step needed (weights, activations, gradients, optimiser state), not the history of the
process. PyTorch's CPU allocator returns freed blocks to the system, so RSS tracks tensor memory closely.

Modules: `cli` (the options and the run; importing it imports no torch), `variants` (the models compared), `measure`
(interleaved timing), `memory` (the peak-memory subprocesses), `report` (tables, targets, plot, results page).
Run it as `tree-lora bench` from a source checkout, `python -m benchmarks.tree_lora_bench` or
`python benchmarks/bench_tree_lora.py`.
"""

from .cli import configure_parser, main, run

__all__ = ["configure_parser", "main", "run"]
