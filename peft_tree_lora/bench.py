"""`tree-lora bench`: TreeLoRA against PEFT LoRA (and X-LoRA), side by side in one process.

Every variant shares one base model's weights (random, with SmolLM2-135M's shapes), so the adapters are all that
differ. Timings are interleaved: each round runs every variant once, in a fresh random order, and every figure is
reported as a ratio to PEFT LoRA r=8 *of the same round*; the median, min and max of those ratios over the rounds are
what the table shows. Machine drift and other processes' load then hit numerator and denominator alike.

Peak memory is measured in one subprocess per configuration: the kernel's resident-set high-water mark (`VmHWM`)
is reset through `/proc/self/clear_refs` just before a training step and read just after it, so the figure is the
largest resident memory the step needed (weights, activations, gradients, optimiser state), not the history of the
process. PyTorch's CPU allocator returns freed blocks to the system, so RSS tracks tensor memory closely.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

SMOLLM2_SHAPES = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
)
TINY_SHAPES = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)
REFERENCE = "LoRA r=8"


# --- models -----------------------------------------------------------------------------------------------------


def build_base(shapes: dict, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**shapes, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def share_base(base: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of `base` whose parameters and buffers are `base`'s own tensors (no weight memory)."""
    memo = {id(t): t for t in list(base.parameters()) + list(base.buffers())}
    return copy.deepcopy(base, memo)


def lora_variant(base, r: int, targets):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(r)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(share_base(base), config)


def tree_variant(base, depth: int, routing: str, targets, donor=None):
    """TreeLoRA r=8; with `donor` (a TreeLoRA of the same depth), the leaves are `donor`'s tensors, which saves the
    memory of a second copy of a deep tree's leaves (the timing does not depend on their values)."""
    from peft import get_peft_model

    from .tuner.config import TreeLoraConfig
    from .tuner.layer import TreeLoraLinear

    torch.manual_seed(100 + depth)
    config = TreeLoraConfig(
        depth=depth,
        r=8,
        lora_alpha=16,
        routing=routing,
        target_modules=targets,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(share_base(base), config, low_cpu_mem_usage=donor is not None)
    if donor is not None:
        donors = {name: m for name, m in donor.named_modules() if isinstance(m, TreeLoraLinear)}
        for name, module in model.named_modules():
            if isinstance(module, TreeLoraLinear):
                module.treelora_A["default"] = donors[name].treelora_A["default"]
                module.treelora_B["default"] = donors[name].treelora_B["default"]
        for module in model.modules():  # routers left on the meta device by low_cpu_mem_usage
            for param_name, param in list(module.named_parameters(recurse=False)):
                if param.is_meta:
                    value = torch.randn(param.shape) / param.shape[-1] ** 0.5
                    setattr(module, param_name, torch.nn.Parameter(value, requires_grad=param.requires_grad))
    return model


def xlora_variant(base, num_experts: int, targets, workdir: Path):
    """PEFT X-LoRA over `num_experts` LoRA r=8 experts saved to `workdir` (X-LoRA only loads experts from disk)."""
    from peft import LoraConfig, XLoraConfig, get_peft_model

    shapes = base.config
    paths = {}
    for k in range(num_experts):
        torch.manual_seed(1000 + k)
        expert = get_peft_model(
            share_base(base),
            LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM"),
        )
        path = workdir / f"expert_{k}"
        expert.save_pretrained(path)
        paths[str(k)] = str(path)  # X-LoRA loads expert i under the name str(i)
        del expert
    model = share_base(base)
    model.config.use_cache = False  # X-LoRA refuses a model that caches
    config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=shapes.hidden_size, adapters=paths, xlora_depth=1)
    return get_peft_model(model, config)


# --- measurements -----------------------------------------------------------------------------------------------


@dataclass
class Series:
    """Seconds per run of one variant, and its ratio to the reference in the same round."""

    section: str
    name: str
    seconds: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    unit: str = "s"  # or "tok/s" (higher is better) or "MB"


def interleaved(
    section: str, tasks: dict[str, Callable[[], float]], rounds: int, warmup: int, rng: random.Random, log
) -> dict[str, Series]:
    """Run every task once per round in a shuffled order; each task returns its own measured seconds."""
    series = {name: Series(section, name) for name in tasks}
    for _ in range(warmup):
        for task in tasks.values():
            task()
    for round_index in range(rounds):
        order = list(tasks)
        rng.shuffle(order)
        measured = {name: tasks[name]() for name in order}
        for name, seconds in measured.items():
            series[name].seconds.append(seconds)
            series[name].ratios.append(seconds / measured[REFERENCE])
        log(
            f"  {section} round {round_index + 1}/{rounds}: " + ", ".join(f"{n} {s:.3f}s" for n, s in measured.items())
        )
    return series


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    def run_once() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run_once


def eval_forward(model, input_ids):
    def call():
        with torch.inference_mode():
            model(input_ids=input_ids)

    return call


def training_step(model, input_ids):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def call():
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return call


def generation(model, prompt, new_tokens: int):
    def call():
        with torch.inference_mode():
            model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )

    return call


# --- peak memory, one subprocess per configuration ----------------------------------------------------------------


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+)", text, re.MULTILINE).group(1))


def memory_probe(spec: dict) -> dict:
    """Build one configuration and measure its training steps; runs inside the subprocess."""
    torch.set_num_threads(spec["threads"])
    base = build_base(spec["shapes"])
    kind, value = spec["kind"], spec["value"]
    model = (
        lora_variant(base, value, spec["targets"])
        if kind == "lora"
        else tree_variant(base, value, kind, spec["targets"])
    )
    del base
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, spec["shapes"]["vocab_size"], (spec["batch"], spec["seq_len"]), generator=generator)
    step = training_step(model, input_ids)
    steps = []
    for _ in range(2):  # the first step also creates the optimiser state; the second is the steady state
        gc.collect()
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        step()
        steps.append({"before_mb": before / 1024, "peak_mb": _status_kib("VmHWM") / 1024})
    return {"steps": steps}


def _memory_probe_main() -> None:
    print("MEMORY-PROBE " + json.dumps(memory_probe(json.loads(sys.argv[1]))))


def measure_memory(spec: dict, timeout: float) -> dict:
    code = "from peft_tree_lora.bench import _memory_probe_main; _memory_probe_main()"
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, timeout=timeout
    )
    for line in done.stdout.splitlines():
        if line.startswith("MEMORY-PROBE "):
            return json.loads(line.removeprefix("MEMORY-PROBE "))
    raise RuntimeError(f"memory probe failed ({done.returncode}): {done.stderr.strip()[-2000:]}")


def memory_supported() -> bool:
    return Path("/proc/self/clear_refs").exists() and Path("/proc/self/status").exists()


# --- report -----------------------------------------------------------------------------------------------------


def machine_info(threads: int) -> dict[str, str]:
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE).group(1)
    except (OSError, AttributeError):
        pass
    return {
        "machine": f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}",
        "torch threads": str(threads),
        "versions": f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def summarise(s: Series) -> tuple[str, str]:
    if s.unit == "tok/s":
        value = f"{statistics.median(s.seconds):.1f} tok/s"
    elif s.unit == "MB":
        value = f"{statistics.median(s.seconds):.0f} MB"
    else:
        value = f"{statistics.median(s.seconds):.3f} s"
    if not s.ratios:
        return value, "-"
    return value, f"{statistics.median(s.ratios):.3f} ({min(s.ratios):.3f} - {max(s.ratios):.3f})"


def table(results: list[Series]) -> str:
    lines = [
        "| measurement | variant | median | ratio to LoRA r=8, median (min - max) |",
        "| --- | --- | --- | --- |",
    ]
    for s in results:
        value, ratio = summarise(s)
        lines.append(f"| {s.section} | {s.name} | {value} | {ratio} |")
    return "\n".join(lines)


def median_ratio(results: list[Series], section: str, name: str) -> float | None:
    for s in results:
        if s.section == section and s.name == name and s.ratios:
            return statistics.median(s.ratios)
    return None


def targets_table(results: list[Series]) -> str:
    """The issue's targets against this run's medians."""
    fwd = "eval forward"
    rows = []

    def add(what: str, value: float | None, limit: str, ok: bool | None) -> None:
        shown = "not measured" if value is None else f"{value:.3f}"
        verdict = "-" if ok is None else ("met" if ok else "missed")
        rows.append(f"| {what} | {shown} | {limit} | {verdict} |")

    token4 = median_ratio(results, fwd, "TreeLoRA d=4 token")
    seq4 = median_ratio(results, fwd, "TreeLoRA d=4 sequence")
    add("eval forward, token routing d=4 / LoRA r=8", token4, "<= 1.10", None if token4 is None else token4 <= 1.10)
    add("eval forward, sequence routing d=4 / LoRA r=8", seq4, "<= 1.05", None if seq4 is None else seq4 <= 1.05)
    for routing in ("token", "sequence"):
        d8 = median_ratio(results, fwd, f"TreeLoRA d=8 {routing}")
        d1 = median_ratio(results, fwd, f"TreeLoRA d=1 {routing}")
        value = None if d8 is None or d1 is None else d8 / d1
        add(f"eval forward, {routing} routing d=8 / d=1", value, "<= 1.15", None if value is None else value <= 1.15)
    train4 = median_ratio(results, "training step", "TreeLoRA d=4 token")
    train128 = median_ratio(results, "training step", "LoRA r=128")
    add("training step d=4 / LoRA r=8", train4, "<= 1.5", None if train4 is None else train4 <= 1.5)
    value = None if train4 is None or train128 is None else train4 / train128
    add("training step d=4 / LoRA r=128", value, "< 1.0", None if value is None else value < 1.0)
    for routing in ("token", "sequence"):
        gen = median_ratio(results, "generate", f"TreeLoRA d=4 {routing}")
        add(f"generate tokens/s, {routing} routing d=4 / LoRA r=8", gen, ">= 0.9", None if gen is None else gen >= 0.9)
    mem = median_ratio(results, "peak memory, training step", "TreeLoRA d=4 token")
    add("peak training-step memory d=4 / LoRA r=8", mem, "<= 1.3", None if mem is None else mem <= 1.3)
    head = "| target | this run | target | verdict |\n| --- | --- | --- | --- |\n"
    return head + "\n".join(rows)


def plot(results: list[Series], depths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for routing, marker in (("token", "o"), ("sequence", "s")):
        xs, ys, lo, hi = [], [], [], []
        for depth in depths:
            for s in results:
                if s.section == "eval forward" and s.name == f"TreeLoRA d={depth} {routing}":
                    xs.append(depth)
                    ys.append(statistics.median(s.ratios))
                    lo.append(ys[-1] - min(s.ratios))
                    hi.append(max(s.ratios) - ys[-1])
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], marker=marker, capsize=3, label=f"TreeLoRA r=8, {routing} routing")
    ax.axhline(1.0, color="black", lw=1, label="PEFT LoRA r=8")
    for name, style in (("base model", ":"), ("X-LoRA", "--")):
        for s in results:
            if s.section == "eval forward" and s.name.startswith(name):
                ax.axhline(statistics.median(s.ratios), color="grey", ls=style, lw=1, label=s.name)
    ax.set_xlabel("tree depth (2**depth leaves per target module)")
    ax.set_ylabel("evaluation forward time / PEFT LoRA r=8")
    ax.set_title("Hard-routed evaluation forward, same run (median, min-max)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the command ------------------------------------------------------------------------------------------------


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
        default="forward,train,generate,memory",
        help="Comma-separated subset of forward,train,generate,memory (default: all).",
    )
    parser.add_argument("--no-xlora", action="store_true", help="Skip PEFT X-LoRA.")
    parser.add_argument("--tiny", action="store_true", help="A tiny model instead of SmolLM2's shapes (smoke test).")
    parser.add_argument("--out-dir", default="benchmarks", help="Where results.md and bench_depth.png go.")
    parser.add_argument("--seed", type=int, default=0)
    return parser


SECTIONS = ("forward", "train", "generate", "memory")


def run(args: argparse.Namespace) -> int:
    from .tuner.errors import TreeLoraUsageError

    threads = args.threads or os.cpu_count() or 1
    rounds = args.rounds or (2 if args.quick else 3)
    depths_text = args.depths or ("1,4,8" if args.quick else "0,1,2,4,6,8")
    try:
        depths = sorted({int(d) for d in depths_text.split(",")})
    except ValueError:
        raise TreeLoraUsageError(f"--depths must be comma-separated integers; got {depths_text!r}.") from None
    if any(not 0 <= d <= 10 for d in depths):
        raise TreeLoraUsageError(f"--depths must lie in 0..10; got {depths_text!r}.")
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
    shapes = TINY_SHAPES if args.tiny else SMOLLM2_SHAPES
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
                models[f"TreeLoRA d={depth} sequence"] = tree_variant(base, depth, "sequence", targets, donor=token)
            tasks = {name: timed(eval_forward(model.eval(), input_ids)) for name, model in models.items()}
            results += interleaved("eval forward", tasks, rounds, 1, rng, log).values()
        del models, tasks
        gc.collect()

    if "train" in sections:
        log("training step: building variants")
        models = {
            REFERENCE: lora_variant(base, 8, targets),
            "TreeLoRA d=4 token": tree_variant(base, 4, "token", targets),
            "LoRA r=128": lora_variant(base, 128, targets),
        }
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

    if "memory" in sections:
        if memory_supported():
            results += memory_section(shapes, targets, args.batch, args.seq_len, threads, log)
        else:
            notes.append("peak memory not measured: this system has no /proc/self/clear_refs")

    info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["wall time"] = f"{time.time() - started:.0f} s"
    command = "tree-lora bench " + " ".join(sys.argv[1:]) if sys.argv[1:] else "tree-lora bench"
    body = table(results)
    verdicts = targets_table(results)
    print("\n" + body + "\n\n" + verdicts + "\n")
    for note in notes:
        print("note: " + note)
    plot_path = out_dir / "bench_depth.png"
    if "forward" in sections:
        plot(results, depths, plot_path)
    report = [
        "# TreeLoRA benchmark results",
        "",
        f"Written by `{command}` (`peft_tree_lora/bench.py`). Batch {args.batch} x {args.seq_len} tokens, "
        f"{'tiny' if args.tiny else 'SmolLM2-135M'} shapes, random weights, fp32, target modules `{targets}`, "
        f"{rounds} interleaved rounds per section after one warm-up; generate: batch 4, 32-token prompt, "
        f"{new_tokens} new tokens, greedy, KV cache.",
        "",
        *[f"- {key}: {value}" for key, value in info.items()],
        *[f"- note: {note}" for note in notes],
        "",
        "## Targets",
        "",
        verdicts,
        "",
        "## All figures",
        "",
        "Times are medians over rounds; each ratio is taken against LoRA r=8 of the same round, then summarised as "
        "median (min - max). Generate: throughput and throughput ratio (higher is better). Memory: one subprocess "
        "per configuration, peak resident memory of a training step (see the module docstring).",
        "",
        body,
        "",
    ]
    if "forward" in sections:
        report += [f"![evaluation forward time against depth]({plot_path.name})", ""]
    (out_dir / "results.md").write_text("\n".join(report))
    log(f"wrote {out_dir / 'results.md'}")
    return 0


def memory_section(shapes: dict, targets, batch: int, seq_len: int, threads: int, log) -> list[Series]:
    configs = {REFERENCE: ("lora", 8), "TreeLoRA d=4 token": ("token", 4), "LoRA r=128": ("lora", 128)}
    probes = {}
    for name, (kind, value) in configs.items():
        log(f"peak memory: {name} (own subprocess)")
        spec = dict(
            kind=kind, value=value, shapes=shapes, targets=targets, batch=batch, seq_len=seq_len, threads=threads
        )
        probes[name] = measure_memory(spec, timeout=1800)
    results = []
    sections = (
        ("peak memory, training step", 1, "peak_mb"),  # the steady state: the optimiser state exists already
        ("peak memory, first training step", 0, "peak_mb"),  # it also allocates the optimiser state
        ("memory added by a training step", 1, "added_mb"),
    )
    for section, step_index, key in sections:
        reference = _memory_figure(probes[REFERENCE]["steps"][step_index], key)
        for name, probe in probes.items():
            figure = _memory_figure(probe["steps"][step_index], key)
            results.append(Series(section, name, [figure], [figure / reference], unit="MB"))
    return results


def _memory_figure(step: dict, key: str) -> float:
    return step["peak_mb"] - step["before_mb"] if key == "added_mb" else step["peak_mb"]


def main(argv: list[str] | None = None) -> int:
    parser = configure_parser(argparse.ArgumentParser(prog="tree-lora bench"))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
