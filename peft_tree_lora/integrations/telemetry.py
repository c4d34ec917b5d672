"""Routing telemetry for training: a `TrainerCallback` for the Hugging Face `Trainer` (and trl's trainers built on
it) and a plain function for custom loops.

A tree collapses quietly: the loss keeps falling while most tokens end up in a few leaves and the other leaves stop
learning. The numbers that show it are per call, and computing them costs time, so they are opt-in: a
`RoutingTelemetry` is a recorder (`TreeLoraModel.recording`) that adds up the routes of every training call between
two logging steps, and the callback puts the totals into the Trainer's own log record.

Logged keys (all floats):

- `task_loss`: the model's loss without the router losses (mean over the window's label tokens).
- `aux_loss`: the weighted router losses that were added to the loss (summed over trees); `aux_hardening` (mean
  router entropy, bits) and `aux_load_balance` (KL of mean soft leaf usage from uniform), averaged over trees,
  unweighted.
- `leaf_usage_entropy`: entropy of the hard leaf choices counted over the window, divided by `log(2**depth)`, averaged
  over trees: 1 when every leaf gets the same traffic, 0 when one leaf gets all of it.
- `dead_leaf_share`: share of leaves (over all trees) that no token or sequence chose in the window.
- `router_confidence`: mean `|p - 0.5|` over routers and inputs: 0 undecided, 0.5 fully hard.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback

from ..tuner.call import RoutingCall
from ..tuner.errors import TreeLoraUsageError
from ..tuner.layer import TreeLoraLayer
from ..tuner.model import TreeLoraModel
from ..tuner.routing import hardening_loss, load_balance_loss, num_leaves, path_probs
from ..tuner.sequence_router import TreeLoraSequenceRouter

TELEMETRY_KEYS = (
    "task_loss",
    "aux_loss",
    "aux_hardening",
    "aux_load_balance",
    "leaf_usage_entropy",
    "dead_leaf_share",
    "router_confidence",
)

# scalar sums kept per window, in this order, each with its denominator (calls, or label tokens for the loss)
_SUMS = ("task_loss", "aux_loss", "aux_hardening", "aux_load_balance", "router_confidence")


def find_tree_tuner(model: nn.Module) -> TreeLoraModel:
    """The TreeLoRA tuner inside `model` (a PeftModel, the tuner itself, or a DDP/accelerate wrapper of either)."""
    for module in model.modules():
        if isinstance(module, TreeLoraModel):
            return module
    raise TreeLoraUsageError(
        f"{type(model).__name__} has no TreeLoRA adapter; routing telemetry needs a model made with "
        "get_peft_model(base, TreeLoraConfig(...)) (or a Trainer/SFTTrainer given peft_config=TreeLoraConfig(...))."
    )


class RoutingTelemetry:
    """A route recorder that adds up the training calls of a window (see the module docstring for the keys).

    Leaf counts are summed per tree over the window, so the entropy and the dead-leaf share describe the whole window
    rather than the last batch; loss and router terms are means over the training calls of the window. Calls in
    evaluation mode are not counted.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.leaf_counts: dict[tuple[str, str], torch.Tensor] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self.leaf_counts)

    def end_call(self, call: RoutingCall, outputs: Any, kwargs: dict[str, Any]) -> None:
        """Add one finished call: its routes, its router losses and (from `outputs.loss`) its task loss.

        With `labels`, `task_loss` is a mean over label tokens: the Trainer divides each micro-batch's summed loss by
        `num_items_in_batch`, the label tokens of the whole step on every process, so the loss is scaled back to this
        batch's own tokens before averaging."""
        trained = [r for r in call.records or () if r.logits is not None]
        if not call.training or not trained:
            return
        hardening, balance, confidence = [], [], []
        for record in trained:
            key = (record.module_name, record.adapter)
            logits = record.logits.float().reshape(-1, record.logits.shape[-1])
            depth = int(math.log2(logits.shape[-1] + 1))
            counts = torch.bincount(record.leaf.reshape(-1), minlength=num_leaves(depth))
            previous = self.leaf_counts.get(key)
            self.leaf_counts[key] = counts.clone() if previous is None else previous + counts
            hardening.append(hardening_loss(logits))
            balance.append(load_balance_loss(path_probs(torch.sigmoid(logits), depth)))
            confidence.append((torch.sigmoid(logits) - 0.5).abs().mean())
        aux = call.aux_total()
        aux = torch.zeros(()) if aux is None else aux.float()
        self._add("aux_loss", aux)
        self._add("aux_hardening", torch.stack(hardening).mean())
        self._add("aux_load_balance", torch.stack(balance).mean())
        self._add("router_confidence", torch.stack(confidence).mean())
        loss = getattr(outputs, "loss", None)
        if loss is None:
            return
        labels = kwargs.get("labels")
        task_loss = loss.detach().float().reshape(())
        if torch.is_tensor(labels):
            task_loss = task_loss - aux.to(task_loss)
            tokens = (labels[..., 1:] != -100).sum().to(task_loss)
            items = kwargs.get("num_items_in_batch")
            summed = task_loss * (torch.as_tensor(items).to(task_loss) if items is not None else tokens)
            self._add("task_loss", summed, weight=tokens)
        else:
            self._add("task_loss", task_loss)

    def _add(self, name: str, value: torch.Tensor, weight: torch.Tensor | float = 1.0) -> None:
        """Add `value` to the running sum of `name` and `weight` to its denominator."""
        value = value.detach().float().reshape(())
        weight = torch.as_tensor(weight, dtype=torch.float32, device=value.device).reshape(())
        self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.weights[name] = self.weights[name] + weight if name in self.weights else weight

    def summary(self, across_processes: bool = False) -> dict[str, float]:
        """The window's figures as floats; with `across_processes`, summed over every rank of the default process
        group first (a collective call: every rank must make it)."""
        if across_processes and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return self._reduced()._local_summary()
        return self._local_summary()

    def _local_summary(self) -> dict[str, float]:
        if not self.leaf_counts:
            return {}
        result = {name: float(self.sums[name] / self.weights[name]) for name in _SUMS if name in self.sums}
        entropies, dead, leaves = [], 0, 0
        for counts in self.leaf_counts.values():
            counts = counts.double()
            num_leaves = counts.numel()
            dead += int((counts == 0).sum())
            leaves += num_leaves
            share = counts / counts.sum().clamp_min(1)
            entropy = -(share * share.clamp_min(1e-300).log()).sum()
            entropies.append(float(entropy) / math.log(num_leaves) if num_leaves > 1 else 1.0)
        result["leaf_usage_entropy"] = sum(entropies) / len(entropies)
        result["dead_leaf_share"] = dead / leaves
        return {key: result[key] for key in TELEMETRY_KEYS if key in result}

    def _reduced(self) -> RoutingTelemetry:
        """A copy whose sums and counts are totals over all ranks. Ranks whose windows differ in shape (another set of
        trees, or an empty window) keep their local figures rather than exchange mismatched tensors."""
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        keys = sorted(self.leaf_counts)
        parts = [self.leaf_counts[k].to(device, torch.float64).reshape(-1) for k in keys]
        for name in _SUMS:
            parts.append(self.sums.get(name, torch.zeros(())).to(device, torch.float64).reshape(1))
            parts.append(self.weights.get(name, torch.zeros(())).to(device, torch.float64).reshape(1))
        flat = torch.cat(parts)
        shape = torch.tensor([flat.numel(), -flat.numel()], dtype=torch.float64, device=device)
        dist.all_reduce(shape, op=dist.ReduceOp.MAX)
        if shape[0] != -shape[1] or not self.leaf_counts:
            return self
        dist.all_reduce(flat)
        reduced = RoutingTelemetry()
        offset = 0
        for key in keys:
            n = self.leaf_counts[key].numel()
            reduced.leaf_counts[key] = flat[offset : offset + n].cpu()
            offset += n
        for name in _SUMS:
            total, weight = flat[offset].cpu(), flat[offset + 1].cpu()
            offset += 2
            if weight > 0:
                reduced.sums[name], reduced.weights[name] = total, weight
        return reduced


def check_distributed_checkpointing(args: Any, model: nn.Module) -> None:
    """Refuse the DDP settings that fail on the first backward pass under reentrant checkpointing, saying what to set.

    Reentrant checkpointing runs one backward pass per checkpointed layer. DDP's search for unused parameters then
    sees parameters become ready in several passes, and the sequence router, which every layer uses, gets a gradient
    once per layer; both end in "marked ready twice" deep inside the first step. Non-reentrant checkpointing (the
    transformers default) needs neither setting.
    """
    if getattr(args, "world_size", 1) <= 1 or getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
        return
    if not _uses_reentrant_checkpointing(model):
        return
    fixes = []
    if args.ddp_find_unused_parameters is not False:
        fixes.append(
            "ddp_find_unused_parameters=False (soft routing uses every leaf and router in every step; the Trainer "
            "turns the search on for PEFT models by default)"
        )
    if _has_sequence_router(model) and not args.ddp_static_graph:
        fixes.append("ddp_static_graph=True (every layer reuses the sequence router)")
    if fixes:
        raise TreeLoraUsageError(
            "DDP with reentrant gradient checkpointing needs " + " and ".join(fixes) + " in TrainingArguments; "
            "or use non-reentrant checkpointing (activation_checkpointing_kwargs={'use_reentrant': False})."
        )


def _uses_reentrant_checkpointing(model: nn.Module) -> bool:
    for module in model.modules():
        function = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) and function is not None:
            return bool(getattr(function, "keywords", {}).get("use_reentrant", False))
    return False


def _has_sequence_router(model: nn.Module) -> bool:
    return any(isinstance(m, TreeLoraSequenceRouter) for m in model.modules())


@contextmanager
def routing_telemetry(model: nn.Module) -> Iterator[RoutingTelemetry]:
    """Collect routing telemetry over the training calls made inside the block, for custom training loops:

    with routing_telemetry(model) as telemetry:
        for batch in batches:
            model(**batch).loss.backward(); ...
    print(telemetry.summary())
    """
    with find_tree_tuner(model).recording(RoutingTelemetry()) as telemetry:
        yield telemetry


class RoutingTelemetryCallback(TrainerCallback):
    """Adds routing telemetry (`TELEMETRY_KEYS`) to every training log record of a `Trainer` or trl trainer.

    Usage: `Trainer(..., callbacks=[RoutingTelemetryCallback()])`, or `RoutingTelemetryCallback.install(trainer)`.
    Each logging step gets the figures of every training call since the previous logging step, summed over all
    processes in distributed training.

    The Trainer calls its callbacks in list order, with the `report_to` integrations ahead of the callbacks given to
    it, and copies each log record into `state.log_history` before any callback runs. The callback completes that
    copy too, and the progress bar (added last) shows the figures; for the `report_to` backends to receive them, let
    `install(trainer)` put the callback ahead of them.
    """

    def __init__(self) -> None:
        self.telemetry = RoutingTelemetry()
        self._tuner: TreeLoraModel | None = None

    @classmethod
    def install(cls, trainer: Any) -> RoutingTelemetryCallback:
        """Add a new callback to `trainer`, right after its `DefaultFlowCallback` (ahead of the reporters)."""
        callback = cls()
        callbacks = trainer.callback_handler.callbacks
        position = next((i + 1 for i, c in enumerate(callbacks) if isinstance(c, DefaultFlowCallback)), 0)
        callbacks.insert(position, callback)
        return callback

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is None:
            return
        check_distributed_checkpointing(args, model)
        try:
            tuner = find_tree_tuner(model)
        except TreeLoraUsageError:
            if not any(isinstance(m, TreeLoraLayer) for m in model.modules()):
                raise
            warnings.warn(
                "RoutingTelemetryCallback needs the model wrapped by PEFT (get_peft_model or "
                "PeftModel.from_pretrained); this model holds TreeLoRA layers without a PeftModel around them, so no "
                "telemetry is logged.",
                stacklevel=2,
            )
            return
        self.telemetry.reset()
        self._tuner = tuner
        tuner.start_recording(self.telemetry)

    def on_log(self, args, state, control, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs:  # evaluation and end-of-training summaries
            return
        figures = self.telemetry.summary(across_processes=True)
        self.telemetry.reset()
        if not figures:
            return
        logs.update(figures)
        last = state.log_history[-1] if state.log_history else None
        if isinstance(last, dict) and last.get("step") == state.global_step and "loss" in last:
            last.update(figures)

    def on_train_end(self, args, state, control, **kwargs: Any) -> None:
        if self._tuner is not None:
            self._tuner.stop_recording()
            self._tuner = None
