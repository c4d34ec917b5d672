"""`tree-lora experiment saturation | facts | capacity`: the reproducible studies behind docs/RESULTS.md.

All train through `peft_tree_lora.app.runner.run_training` (the HF Trainer), write a JSON file and a PNG plot into the
output folder (default `docs/`), and then rewrite `RESULTS.md` there from every study result present."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import time
import typing
from pathlib import Path

from ..tuner.errors import TreeLoraUsageError
from .common import DOCS_DIR

STUDIES = ("saturation", "facts", "capacity")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the `saturation`, `facts` and `capacity` sub-commands, one option per study setting (defaults as in the
    study)."""
    from .capacity import CapacitySettings
    from .facts import FactsSettings
    from .saturation import SaturationSettings

    studies = parser.add_subparsers(dest="study", metavar="{saturation,facts,capacity}", required=True)
    described = {
        "saturation": (
            SaturationSettings,
            "pretrain a tiny Llama until held-out loss plateaus, then continue several ways (full training, LoRA r, "
            "the compute-matched LoRA, LoRA r*2**d, TreeLoRA token and sequence routing) for the same tokens",
        ),
        "facts": (
            FactsSettings,
            "teach adapters N synthetic people's facts and measure held-out-paraphrase recall and bits per parameter",
        ),
        "capacity": (
            CapacitySettings,
            "at one N, compare tree variants with LoRA r, the compute-matched LoRA, LoRA r*2**d and a frozen-router "
            "control over several seeds: held-out recall, bits per active parameter, hard-vs-soft gap, a verdict",
        ),
    }
    for name, (settings_class, help_text) in described.items():
        sub = studies.add_parser(name, help=help_text, description=help_text)
        _add_settings_options(sub, settings_class)
        sub.add_argument("--out", type=Path, default=DOCS_DIR, help="folder for the JSON, plot and RESULTS.md")
        sub.add_argument(
            "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice, all cores)"
        )
        sub.add_argument("--no-page", action="store_true", help="do not rewrite RESULTS.md in the output folder")
        sub.add_argument("--quiet", action="store_true", help="no progress bars or messages")
        if name == "facts":
            sub.add_argument(
                "--append", action="store_true", help="add these seeds' runs to the facts.json already in --out"
            )


def run(args: argparse.Namespace) -> int:
    """Run the study named by `args.study`; returns the exit status."""
    import torch

    from ..app.report import require_matplotlib
    from .capacity import CapacitySettings, run_capacity
    from .facts import FactsSettings, run_facts
    from .results_page import write_results_page
    from .saturation import SaturationSettings, run_saturation

    if args.study not in STUDIES:
        raise TreeLoraUsageError(f"unknown study {args.study!r}; choose one of {', '.join(STUDIES)}.")
    require_matplotlib(f"tree-lora experiment {args.study}")
    if args.threads is not None:
        if args.threads < 1:
            raise TreeLoraUsageError(f"--threads must be >= 1; got {args.threads}.")
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise TreeLoraUsageError(f"--out {str(out)!r} is a file; give a folder.")
    # Every Trainer run starts with a full garbage collection (accelerate's free_memory); with the ~400 k objects the
    # imports leave behind, each takes 1-2 s of "training time". Freezing them makes those collections cheap.
    gc.collect()
    gc.freeze()
    started = time.perf_counter()
    if args.study == "saturation":
        settings = _settings_from_args(SaturationSettings, args)
        data = run_saturation(settings, out, show_progress=not args.quiet)
        summary = f"pretraining: {data['pretrain']['stop_reason']}"
    elif args.study == "facts":
        settings = _settings_from_args(FactsSettings, args)
        data = run_facts(settings, out, show_progress=not args.quiet, append=args.append)
        summary = f"{len(data['runs'])} adapter runs"
    else:
        settings = _settings_from_args(CapacitySettings, args)
        data = run_capacity(settings, out, show_progress=not args.quiet)
        summary = f"{len(data['runs'])} adapter runs"
        print(f"verdict: {data['verdict']['text']}")
    if not args.no_page:
        page = write_results_page(out)
        print(f"wrote {page}")
    print(f"{args.study}: {summary}; {time.perf_counter() - started:.0f} s; results in {out}")
    return 0


def _add_settings_options(parser: argparse.ArgumentParser, settings_class: type) -> None:
    hints = typing.get_type_hints(settings_class)
    defaults = settings_class()
    for spec in dataclasses.fields(settings_class):
        option = "--" + spec.name.replace("_", "-")
        default = getattr(defaults, spec.name)
        hint = hints[spec.name]
        if hint is bool:
            parser.add_argument(
                option, action=argparse.BooleanOptionalAction, default=None, help=f"default: {default}"
            )
        elif typing.get_origin(hint) is list:
            (item,) = typing.get_args(hint)
            parser.add_argument(
                option,
                type=item,
                nargs="+",
                default=None,
                choices=spec.metadata.get("choices"),
                metavar=spec.name.upper() if spec.metadata.get("choices") else None,
                help=spec.metadata.get("help", "") + f"default: {' '.join(map(str, default))}",
            )
        else:
            parser.add_argument(option, type=hint, default=None, help=f"default: {default}")


def _settings_from_args(settings_class: type, args: argparse.Namespace):
    given = {
        spec.name: getattr(args, spec.name)
        for spec in dataclasses.fields(settings_class)
        if getattr(args, spec.name, None) is not None
    }
    return settings_class(**given)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m peft_tree_lora.experiments`), the same options as `tree-lora experiment`."""
    parser = argparse.ArgumentParser(prog="tree-lora experiment", description=__doc__.splitlines()[0])
    configure_parser(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except TreeLoraUsageError as error:
        parser.exit(2, f"tree-lora experiment: error: {error}\n")
