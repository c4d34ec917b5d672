"""Train a TreeLoRA with data-parallel processes through the Hugging Face Trainer (DDP), then check that every rank
holds the same adapter weights.

CPU (gloo), two processes on one machine:

    torchrun --nproc_per_node 2 examples/train_ddp.py --output-dir runs/ddp
    accelerate launch --multi_gpu --num_processes 2 examples/train_ddp.py --output-dir runs/ddp

On GPUs the same commands use NCCL (one process per GPU). The model is a small Llama built from a config (no
download) and the data two synthetic "languages" (even tokens counting up, odd tokens counting down), so the run
says something about the machinery, not about language modelling.

Per routing mode it writes `<output-dir>/<routing>/rank<r>/` (each rank's adapter, safetensors) and
`<output-dir>/<routing>/log_history.json` (rank 0), and prints one line per mode with the largest difference between
the ranks' adapter weights.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from peft_tree_lora import RoutingTelemetryCallback, TreeLoraConfig

VOCAB = 64


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--routing", nargs="+", default=["token", "sequence"], choices=["token", "sequence"])
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--logging-steps", type=int, default=2)
    parser.add_argument(
        "--gradient-checkpointing", choices=["off", "reentrant", "non-reentrant"], default="non-reentrant"
    )
    parser.add_argument(
        "--find-unused-parameters",
        choices=["false", "true", "trainer-default"],
        default="false",
        help="DDP's find_unused_parameters; 'trainer-default' leaves it to the Trainer (True for PEFT models)",
    )
    parser.add_argument("--ddp-timeout", type=int, default=120, help="seconds a collective waits for a peer")
    parser.add_argument(
        "--crash-rank", type=int, default=None, help="fault drill: this rank fails after --crash-after-step"
    )
    parser.add_argument("--crash-after-step", type=int, default=2)
    parser.add_argument(
        "--crash-mode", choices=["exit", "hang"], default="exit", help="fail by exiting abruptly, or by hanging"
    )
    return parser.parse_args()


def synthetic_dataset(rows: int, length: int = 16) -> Dataset:
    up = [[(2 * (start + i)) % VOCAB for i in range(length)] for start in range(rows // 2)]
    down = [[(VOCAB - 1 - 2 * (start + i)) % VOCAB for i in range(length)] for start in range(rows - rows // 2)]
    ids = up + down
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)  # every rank builds the same base model and adapter
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


class CrashDrill(TrainerCallback):
    """Makes one rank fail mid-training: exit abruptly (a killed worker) or hang (a stuck one)."""

    def __init__(self, rank: int, after_step: int, mode: str) -> None:
        self.rank, self.after_step, self.mode = rank, after_step, mode

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if args.process_index != self.rank or state.global_step != self.after_step:
            return
        print(f"[rank {self.rank}] crash drill: {self.mode} after step {state.global_step}", flush=True)
        if self.mode == "exit":
            os._exit(3)
        time.sleep(10 * args.ddp_timeout)  # outlives the peers' timeout; they must give up, not wait forever
        os._exit(4)


def max_difference_across_ranks(model: torch.nn.Module) -> float:
    """Largest |difference| between this rank's trainable weights and rank 0's (0.0 on a single process)."""
    flat = torch.cat(
        [p.detach().reshape(-1).float().cpu() for _, p in sorted(model.named_parameters()) if p.requires_grad]
    )
    if not (dist.is_available() and dist.is_initialized()):
        return 0.0
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flat = flat.to(device)
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    difference = (flat - reference).abs().max()
    dist.all_reduce(difference, op=dist.ReduceOp.MAX)
    return float(difference)


def train_one(routing: str, options: argparse.Namespace) -> None:
    config = TreeLoraConfig(
        depth=options.depth, r=4, lora_alpha=8, target_modules="all-linear", routing=routing, task_type="CAUSAL_LM"
    )
    model = get_peft_model(tiny_llama(), config)
    out = options.output_dir / routing
    checkpointing = options.gradient_checkpointing != "off"
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=options.batch_size,
        max_steps=options.steps,
        logging_steps=options.logging_steps,
        learning_rate=5e-3,
        seed=0,
        use_cpu=not torch.cuda.is_available(),
        # Soft routing uses every leaf and router in every step, so no parameter is ever unused; searching for unused
        # ones would cost a graph walk per step and, with reentrant checkpointing, fail as "marked ready twice".
        ddp_find_unused_parameters={"false": False, "true": True}.get(options.find_unused_parameters),
        # Sequence routing reuses the sequence router in every layer. Reentrant checkpointing runs one backward pass
        # per layer, so DDP would see the router's gradient arrive once per layer ("marked ready twice"); a static
        # graph lets DDP expect that. The other settings do not need it.
        ddp_static_graph=routing == "sequence" and options.gradient_checkpointing == "reentrant",
        ddp_timeout=options.ddp_timeout,
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": options.gradient_checkpointing == "reentrant"},
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    callbacks = [RoutingTelemetryCallback()]
    if options.crash_rank is not None:
        callbacks.append(CrashDrill(options.crash_rank, options.crash_after_step, options.crash_mode))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=synthetic_dataset(4 * options.batch_size * max(args.world_size, 1)),
        callbacks=callbacks,
    )
    trainer.train()

    difference = max_difference_across_ranks(model)
    rank = args.process_index
    model.save_pretrained(out / f"rank{rank}", is_main_process=True)
    if args.process_index == 0:
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        print(
            f"routing={routing}: {args.world_size} processes, parallel mode {args.parallel_mode.value}, "
            f"backend {dist.get_backend() if dist.is_initialized() else 'none'}, "
            f"max |adapter weight difference| across ranks = {difference:.3g}",
            flush=True,
        )


def init_cpu_process_group(timeout_s: int) -> None:
    """Start the gloo process group with our timeout when launched on several CPU processes.

    transformers 5.24 hands `ddp_timeout` to accelerate only when it does not run on CPU (with `use_cpu=True` the
    group gets gloo's default of 30 minutes), so a stuck peer would hold the others for half an hour. accelerate
    adopts a process group that already exists, so starting it here with the timeout is enough.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))


def main() -> None:
    options = parse_args()
    init_cpu_process_group(options.ddp_timeout)
    for routing in options.routing:
        train_one(routing, options)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        # gloo sometimes aborts a rank while tearing down at interpreter exit after a clean run; leaving explicitly
        # after destroying the group avoids it (see NOTES.md section 6)
        dist.destroy_process_group()
        os._exit(0)


if __name__ == "__main__":
    main()
