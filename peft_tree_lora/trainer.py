"""Routing telemetry for training: a `TrainerCallback` for the Hugging Face `Trainer` (and trl's trainers built on
it) and a plain function for custom loops.

A tree collapses quietly: the loss keeps falling while most tokens end up in a few leaves and the other leaves stop
learning. The numbers that show it are per forward pass (`RoutingContext.records`), so the callback adds them up over
every training forward pass between two logging steps and puts the totals into the Trainer's own log record, which
`log_history`, the progress bar and the `report_to` backends all read.

Logged keys (all floats):

- `task_loss`: the model's loss without the router losses (mean over the window's label tokens).
- `aux_loss`: the weighted router losses that were added to the loss; `aux_hardening` (mean router entropy, bits)
  and `aux_load_balance` (KL of mean soft leaf usage from uniform), both averaged over trees, unweighted.
- `leaf_usage_entropy`: entropy of the hard leaf choices counted over the window, divided by `log(2**depth)`, averaged
  over trees: 1 when every leaf gets the same traffic, 0 when one leaf gets all of it.
- `dead_leaf_share`: share of leaves (over all trees) that no token or sequence chose in the window.
- `router_confidence`: mean `|p - 0.5|` over routers and inputs: 0 undecided, 0.5 fully hard.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

from .context import RouteRecord, RoutingContext
from .errors import TreeLoraUsageError
from .layer import TreeLoraLayer
from .model import TreeLoraModel

TELEMETRY_KEYS = (
    "task_loss",
    "aux_loss",
    "aux_hardening",
    "aux_load_balance",
    "leaf_usage_entropy",
    "dead_leaf_share",
    "router_confidence",
)

# scalar sums kept per window, in this order, each with its denominator (forward passes, or label tokens for the loss)
_SUMS = ("task_loss", "aux_loss", "aux_hardening", "aux_load_balance", "router_confidence")


def find_routing_context(model: nn.Module) -> RoutingContext:
    """The routing context of a model holding TreeLoRA layers (a PeftModel, its tuner, or a DDP/accelerate wrapper)."""
    for module in model.modules():
        if isinstance(module, TreeLoraLayer):
            return module.routing_context
    raise TreeLoraUsageError(
        f"{type(model).__name__} has no TreeLoRA layers; routing telemetry needs a model made with "
        "get_peft_model(base, TreeLoraConfig(...)) (or a Trainer/SFTTrainer given peft_config=TreeLoraConfig(...))."
    )


class RoutingTelemetry:
    """Adds up the routing records of many forward passes and summarises them (see the module docstring for keys).

    Leaf counts are summed per tree over the window, so the entropy and the dead-leaf share describe the whole window
    rather than the last batch; loss and router terms are means over the forward passes of the window.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.leaf_counts: dict[tuple[str, str], torch.Tensor] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self.leaf_counts)

    def add(
        self,
        context: RoutingContext,
        loss: torch.Tensor | None = None,
        loss_includes_aux: bool = True,
        labels: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> None:
        """Add the records of the forward pass that just ran.

        `loss` is the loss it returned; when it includes the router losses (training mode with labels) they are taken
        out to give `task_loss`. With `labels`, `task_loss` is a mean over label tokens: the Trainer divides each
        micro-batch's summed loss by `num_items_in_batch`, the label tokens of the whole step on every process, so
        the loss is scaled back to this batch's own tokens before averaging.
        """
        soft_records = [r for r in context.records.values() if r.hardening is not None]
        if not soft_records:
            return
        for record in soft_records:
            key = (record.module_name, record.adapter)
            counts = record.leaf_counts.detach()
            previous = self.leaf_counts.get(key)
            self.leaf_counts[key] = counts.clone() if previous is None else previous + counts
        aux = context.auxiliary_losses()
        self._add("aux_loss", aux["total"])
        self._add("aux_hardening", aux["hardening"])
        self._add("aux_load_balance", aux["load_balance"])
        self._add("router_confidence", torch.stack([_confidence(r) for r in soft_records]).mean())
        if loss is None:
            return
        task_loss = loss.detach().float().reshape(())
        if loss_includes_aux:
            task_loss = task_loss - aux["total"].to(task_loss)
        if labels is None:
            self._add("task_loss", task_loss)
            return
        tokens = (labels[..., 1:] != -100).sum().to(task_loss)
        if num_items_in_batch is not None:
            summed = task_loss * torch.as_tensor(num_items_in_batch).to(task_loss)
        else:
            summed = task_loss * tokens
        self._add("task_loss", summed, weight=tokens)

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
    if find_routing_context(model).sequence_router is not None and not args.ddp_static_graph:
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


def _confidence(record: RouteRecord) -> torch.Tensor:
    return record.confidence.detach().float().reshape(())


def routing_telemetry(model: nn.Module, loss: torch.Tensor | None = None) -> dict[str, float]:
    """Telemetry of the last forward pass of `model`, for custom training loops.

    Pass `loss=outputs.loss` to get `task_loss` too (the router losses the model added in training are taken out).
    Returns `{}` before the first training (soft) forward pass. To follow a window of several steps, use
    `RoutingTelemetry`: call `add(find_routing_context(model), outputs.loss)` after each forward pass and
    `summary()` when you log.
    """
    telemetry = RoutingTelemetry()
    telemetry.add(find_routing_context(model), loss, loss_includes_aux=model.training)
    return telemetry.summary()


class RoutingTelemetryCallback(TrainerCallback):
    """Adds routing telemetry (`TELEMETRY_KEYS`) to every training log record of a `Trainer` or trl trainer.

    Usage: `Trainer(..., callbacks=[RoutingTelemetryCallback()])` or `trainer.add_callback(...)`. Each logging step
    gets the figures of every training forward pass since the previous logging step, summed over all processes in
    distributed training.

    Why it reorders itself: the Trainer appends a log record to `state.log_history` before it calls any callback's
    `on_log`, and it calls callbacks in list order, with the `report_to` integrations ahead of user callbacks. Added
    at the end, the figures would reach the progress bar but neither the reporters nor `log_history`. So when training
    begins the callback moves itself to run right after `DefaultFlowCallback`, and it also completes the record already
    in `log_history`.
    """

    def __init__(self) -> None:
        self.telemetry = RoutingTelemetry()
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs: Any) -> None:
        self._run_ahead_of_reporters()
        if model is None:
            return
        check_distributed_checkpointing(args, model)
        tuner = next((m for m in model.modules() if isinstance(m, TreeLoraModel)), None)
        if tuner is None:
            find_routing_context(model)  # raises the usage error when there is no TreeLoRA at all
            warnings.warn(
                "RoutingTelemetryCallback needs the model wrapped by PEFT (get_peft_model or "
                "PeftModel.from_pretrained); this model holds TreeLoRA layers without a PeftModel around them, so no "
                "telemetry is logged.",
                stacklevel=2,
            )
            return
        self._remove_hook()
        self.telemetry.reset()
        self._hook = tuner.register_forward_hook(self._after_forward, with_kwargs=True)

    def _after_forward(self, module: TreeLoraModel, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if not module.training:
            return
        labels = kwargs.get("labels")
        self.telemetry.add(
            module.routing_context,
            loss=getattr(output, "loss", None),
            loss_includes_aux=labels is not None,
            labels=labels if torch.is_tensor(labels) else None,
            num_items_in_batch=kwargs.get("num_items_in_batch"),
        )

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
        self._remove_hook()

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _run_ahead_of_reporters(self) -> None:
        """Move this callback right after `DefaultFlowCallback` in the handler that is calling it.

        The handler is the `self` of the frame that called this event (`CallbackHandler.call_event`). A new list is
        assigned rather than the old one edited, so the loop that is running now is not disturbed.
        """
        frame = inspect.currentframe()
        handler = None
        try:
            caller = frame.f_back if frame is not None else None
            for _ in range(4):  # on_train_begin <- call_event <- CallbackHandler.on_train_begin
                if caller is None:
                    break
                candidate = caller.f_locals.get("self")
                if isinstance(candidate, CallbackHandler):
                    handler = candidate
                    break
                caller = caller.f_back
        finally:
            del frame
        if handler is None or not any(c is self for c in handler.callbacks):
            return
        others = [c for c in handler.callbacks if c is not self]
        position = next((i + 1 for i, c in enumerate(others) if isinstance(c, DefaultFlowCallback)), 0)
        handler.callbacks = others[:position] + [self] + others[position:]
