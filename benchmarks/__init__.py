"""Benchmarks of peft-tree-lora. They live in the source checkout only: this package is not installed with
`peft_tree_lora` (see `[options.packages.find]` in setup.cfg)."""
