"""The options of `tree-lora bench` and the run itself. Importing this module imports no torch: `tree-lora bench
--help` stays quick."""

from __future__ import annotations

import argparse
import gc
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

SECTIONS = ("forward", "train", "generate", "memory", "compile")


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = (
        "Benchmark TreeLoRA against PEFT LoRA r=8 (and X-LoRA) in one process, interleaved, on a model with "
        "SmolLM2-135M's shapes; every figure is a ratio to LoRA r=8 measured in the same run."
    )
    parser.add_argument(
        "--quick", action="store_true", help="Short run: 2 rounds, depths 1,4,8, 16 new tokens, no X-LoRA, no memory."
    )
    parser.add_argument("--rounds", type=int, default=None, help="Interleaved rounds per section (default 3).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the number of CPUs).")
    parser.add_argument("--batch", type=int, default=8, help="Sequences per forward pass (default 8).")
    parser.add_argument("--seq-len", type=int, default=128, help="Tokens per sequence (default 128).")
    parser.add_argument("--depths", default=None, help="Comma-separated tree depths (default 0,1,2,4,6,8).")
    parser.add_argument("--new-tokens", type=int, default=None, help="Tokens generated per sequence (default 64).")
    parser.add_argument(
        "--targets", default="all-linear", help="Target modules for every adapter (default all-linear)."
    )
    parser.add_argument(
        "--sections",
        default="forward,train,generate,memory",  # compile: on request (minutes of compiling)
        help="Comma-separated subset of forward,train,generate,memory,compile (default: all but compile).",
    )
    parser.add_argument(
        "--layers", type=int, default=None, help="Hidden layers of the model (default: SmolLM2-135M's 30)."
    )
    parser.add_argument("--no-xlora", action="store_true", help="Skip PEFT X-LoRA.")
    parser.add_argument("--tiny", action="store_true", help="A tiny model instead of SmolLM2's shapes (smoke test).")
    parser.add_argument("--out-dir", default="benchmarks", help="Where results.md and bench_depth.png go.")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def run(args: argparse.Namespace) -> int:
    import torch

    from peft_tree_lora.tuner.config import MAX_DEPTH
    from peft_tree_lora.tuner.errors import TreeLoraUsageError

    from .measure import REFERENCE, Series, eval_forward, generation, interleaved, timed, training_step
    from .memory import memory_section, memory_supported
    from .report import machine_info, plot, results_page, table, targets_table
    from .variants import SMOLLM2_SHAPES, TINY_SHAPES, build_base, lora_variant, tree_variant, xlora_variant

    threads = args.threads or os.cpu_count() or 1
    rounds = args.rounds or (2 if args.quick else 3)
    depths_text = args.depths or ("1,4,8" if args.quick else "0,1,2,4,6,8")
    try:
        depths = sorted({int(d) for d in depths_text.split(",")})
    except ValueError:
        raise TreeLoraUsageError(f"--depths must be comma-separated integers; got {depths_text!r}.") from None
    if any(not 0 <= d <= MAX_DEPTH for d in depths):
        raise TreeLoraUsageError(f"--depths must lie in 0..{MAX_DEPTH}; got {depths_text!r}.")
    sections = {s.strip() for s in args.sections.split(",")}
    if sections - set(SECTIONS):
        raise TreeLoraUsageError(
            f"unknown --sections {sorted(sections - set(SECTIONS))}; allowed: {', '.join(SECTIONS)}."
        )
    if min(rounds, args.batch, args.seq_len) < 1 or threads < 1:
        raise TreeLoraUsageError("--rounds, --batch, --seq-len and --threads must be at least 1.")
    if args.quick:
        sections.discard("memory")
    torch.set_num_threads(threads)
    shapes = dict(TINY_SHAPES if args.tiny else SMOLLM2_SHAPES)
    if args.layers is not None:
        if args.layers < 1:
            raise TreeLoraUsageError(f"--layers must be at least 1; got {args.layers}.")
        shapes["num_hidden_layers"] = args.layers
    new_tokens = args.new_tokens or (4 if args.tiny else 16 if args.quick else 64)
    targets = args.targets
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    started = time.time()
    info = machine_info(threads)

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f}s] {message}", flush=True)

    log(f"{info['machine']}; {threads} torch threads; {info['versions']}")
    base = build_base(shapes, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(3, shapes["vocab_size"], (args.batch, args.seq_len), generator=generator)
    results: list[Series] = []
    notes: list[str] = []

    if "forward" in sections:
        log("evaluation forward: building variants")
        models = {"base model": base, REFERENCE: lora_variant(base, 8, targets)}
        with tempfile.TemporaryDirectory() as xlora_dir:
            if not (args.no_xlora or args.quick):
                try:
                    models["X-LoRA 16 experts r=8"] = xlora_variant(base, 16, targets, Path(xlora_dir))
                except Exception as error:  # say why, and benchmark the rest
                    notes.append(f"PEFT X-LoRA could not be set up: {type(error).__name__}: {error}")
                    log(notes[-1])
            for depth in depths:
                token = tree_variant(base, depth, "token", targets)
                models[f"TreeLoRA d={depth} token"] = token
                models[f"TreeLoRA d={depth} block"] = tree_variant(base, depth, "block", targets, donor=token)
                models[f"TreeLoRA d={depth} sequence"] = tree_variant(base, depth, "sequence", targets, donor=token)
            tasks = {name: timed(eval_forward(model.eval(), input_ids)) for name, model in models.items()}
            results += interleaved("eval forward", tasks, rounds, 1, rng, log).values()
        del models, tasks
        gc.collect()

    if "train" in sections:
        log("training step: building variants")
        models = {REFERENCE: lora_variant(base, 8, targets)}
        for mode in ("hard", "switch", "soft"):  # each training routing, against LoRA r and LoRA r * 2**d
            models[f"TreeLoRA d=4 token, {mode} training"] = tree_variant(base, 4, "token", targets, None, mode)
        for mode in ("hard", "switch"):
            models[f"TreeLoRA d=4 block, {mode} training"] = tree_variant(base, 4, "block", targets, None, mode)
        models["LoRA r=128"] = lora_variant(base, 128, targets)
        tasks = {name: timed(training_step(model, input_ids)) for name, model in models.items()}
        results += interleaved("training step", tasks, rounds, 1, rng, log).values()
        del models, tasks
        gc.collect()

    if "generate" in sections:
        log("generate: building variants")
        prompt = input_ids[:4, :32]
        models = {
            REFERENCE: lora_variant(base, 8, targets),
            "TreeLoRA d=4 token": tree_variant(base, 4, "token", targets),
            "TreeLoRA d=4 block": tree_variant(base, 4, "block", targets),
            "TreeLoRA d=4 sequence": tree_variant(base, 4, "sequence", targets),
        }
        for model in models.values():  # warm-up: a short generation, not a full one
            generation(model.eval(), prompt, 2)()
        tasks = {name: timed(generation(model, prompt, new_tokens)) for name, model in models.items()}
        series = interleaved("generate", tasks, rounds, 0, rng, log)
        for s in series.values():  # report throughput, and the ratio of throughputs (higher is better)
            s.unit = "tok/s"
            s.seconds = [prompt.shape[0] * new_tokens / t for t in s.seconds]
            s.ratios = [1 / r for r in s.ratios]
        results += series.values()
        del models, tasks
        gc.collect()

    if "compile" in sections:
        from .compiled import compile_section

        log("torch.compile: building variants")
        models = {
            REFERENCE: lora_variant(base, 8, targets),
            "TreeLoRA d=4 token": tree_variant(base, 4, "token", targets),
            "TreeLoRA d=4 block": tree_variant(base, 4, "block", targets),
            "TreeLoRA d=4 sequence": tree_variant(base, 4, "sequence", targets),
        }
        compiled_results, compiled_notes = compile_section(models, input_ids, rounds, rng, log)
        results += compiled_results
        notes += compiled_notes
        del models
        gc.collect()

    if "memory" in sections:
        if memory_supported():
            results += memory_section(shapes, targets, args.batch, args.seq_len, threads, log)
        else:
            notes.append("peak memory not measured: this system has no /proc/self/clear_refs")

    info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["wall time"] = f"{time.time() - started:.0f} s"
    # `tree-lora bench ...` passes its own arguments; run as a script or with -m, the command line is sys.argv
    command = (
        "tree-lora " + shlex.join(args.argv)
        if hasattr(args, "argv")
        else shlex.join(["tree-lora bench", *sys.argv[1:]])
    )
    body = table(results)
    verdicts = targets_table(results)
    print("\n" + body + "\n\n" + verdicts + "\n")
    for note in notes:
        print("note: " + note)
    plot_name = None
    if "forward" in sections:
        plot_name = "bench_depth.png"
        plot(results, depths, out_dir / plot_name)
    setup = (
        f"Batch {args.batch} x {args.seq_len} tokens, {'tiny' if args.tiny else 'SmolLM2-135M'} shapes "
        f"({shapes['num_hidden_layers']} layers), random "
        f"weights, fp32, target modules `{targets}`, {rounds} interleaved rounds per section after one warm-up; "
        f"generate: batch 4, 32-token prompt, {new_tokens} new tokens, greedy, KV cache."
    )
    page = results_page(command, setup, info, notes, verdicts, body, plot_name)
    (out_dir / "results.md").write_text(page)
    log(f"wrote {out_dir / 'results.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = configure_parser(argparse.ArgumentParser(prog="tree-lora bench"))
    return run(parser.parse_args(argv))
