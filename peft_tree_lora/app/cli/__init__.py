"""`tree-lora`: train, compare, inspect and generate with TreeLoRA adapters from the command line.

Every problem with the user's input ends in one line on stderr and exit status 2, before anything is written.

Each sub-command is a module offering `configure_parser(parser)` and `run(args) -> int`: ours are listed in
`COMMANDS`, those owned by other parts of the project (`bench`, `export`, `experiment`) in `PLUGINS`. Only the
module of the sub-command being run is imported (`tree-lora --help` imports none of them), and an import error in
it is shown, not hidden.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from ...errors import TreeLoraUsageError  # from the package root: `tree-lora --help` imports no PEFT or torch

COMMANDS = {
    "train": ("peft_tree_lora.app.cli.train", "train a TreeLoRA adapter and save it"),
    "compare": (
        "peft_tree_lora.app.cli.compare",
        "LoRA r, TreeLoRA depth d rank r, LoRA r*2**d on the same data, steps and seed; writes report.md",
    ),
    "inspect": ("peft_tree_lora.app.cli.inspect", "shape, parameter counts and routing of a TreeLoRA adapter"),
    "generate": ("peft_tree_lora.app.cli.generate", "generate text from a base model with a TreeLoRA adapter"),
    "facts": (
        "peft_tree_lora.app.facts_job",
        "the main job: synthetic facts; held-out recall of LoRA r, the tree, the compute-matched and wide LoRA",
    ),
}
PLUGINS = {
    "bench": ("peft_tree_lora.app.cli.bench", "measure speed and memory of TreeLoRA against LoRA"),
    "export": (
        "peft_tree_lora.integrations.export",
        "export the leaves of a sequence-routed tree as plain LoRA adapters",
    ),
    "experiment": ("peft_tree_lora.experiments", "run the studies behind the README's results"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument raises instead of printing usage: `main` prints one line and returns 2.

    A sub-command that cannot run here sets `unavailable` to say why; its arguments are then not parsed at all."""

    unavailable: str | None = None

    def error(self, message: str):
        raise TreeLoraUsageError(f"{message} (see: {self.prog} --help)")

    def parse_known_args(self, args=None, namespace=None):
        if self.unavailable:
            raise TreeLoraUsageError(self.unavailable)
        return super().parse_known_args(args, namespace)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `tree-lora` parser. Every sub-command is listed; with `command`, only that one's module is imported and
    its options added (the others are never parsed), without it every sub-command is configured."""
    parser = _Parser(
        prog="tree-lora",
        description="TreeLoRA: a binary tree of LoRA leaves with sigmoid routers, as a PEFT plug-in. "
        "With no --model/--data the embedded SmolLM2-135M-Instruct and the embedded corpus are used.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    for name, (module_name, help_text) in {**COMMANDS, **PLUGINS}.items():
        sub = commands.add_parser(name, help=help_text)
        if command is None or command == name:
            module = _import_command(module_name)
            module.configure_parser(sub)
            sub.set_defaults(handler=module.run)
    return parser


def _import_command(module_name: str):
    """A sub-command's module; an import error in it is a bug to show, not a command to hide."""
    module = importlib.import_module(module_name)
    if not (callable(getattr(module, "configure_parser", None)) and callable(getattr(module, "run", None))):
        raise TypeError(f"{module_name} is listed as a tree-lora sub-command but has no configure_parser and run")
    return module


def _command_name(arguments: list[str]) -> str | None:
    """The sub-command named on the command line: the first argument that is not an option (`tree-lora` itself
    takes none but --help)."""
    return next((argument for argument in arguments if not argument.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        args = build_parser(_command_name(arguments) or "").parse_args(arguments)
        args.argv = arguments
        return int(args.handler(args) or 0)
    except TreeLoraUsageError as error:
        print(f"tree-lora: error: {one_line(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tree-lora: interrupted", file=sys.stderr)
        return 130


def one_line(message: str) -> str:
    return " ".join(part.strip() for part in message.strip().splitlines() if part.strip())
