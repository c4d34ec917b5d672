"""The routing state of one model call.

A forward pass must depend only on its inputs and the weights, so nothing that one call decides may outlive it. What a
call decides once and several layers read (the sequence route picked at the input embeddings, the route a block's
first module picks for the rest of its block, the auxiliary losses, an opt-in recorder) lives in a `RoutingCall`
held by a context variable for the length of that call. Context variables are per thread: calls made at the same
time in different threads never see each other's routes.

Who opens a call (see `TreeLoraModel`): its `forward`; a pre-hook on the adapted model for direct calls of it;
`_enable_peft_forward_hooks`, which `PeftModel.generate` enters, for a whole `generate` call, so that a prompt's
sequence route holds for the tokens of that call and no other. Gradient checkpointing recomputes a layer in the
backward pass, after the call has ended: `reenter_call_on_recompute` makes the recomputation run inside the call that
ran the forward.

`torch.compile` cannot trace a context variable. While it traces, the call is held in a plain slot instead, which it
can: the layers' reads of the call then become edges inside the compiled graph, so a compiled call reads no state
at run time either.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

_CURRENT: contextvars.ContextVar[RoutingCall | None] = contextvars.ContextVar("treelora_routing_call", default=None)


class _TracedSlot:
    """Where the current call is kept while `torch.compile` traces (see the module docstring)."""

    call: RoutingCall | None = None


_TRACED = _TracedSlot()


@dataclass
class _TracedToken:
    previous: RoutingCall | None


@dataclass
class RouteRecord:
    """What one tree decided in one call, detached: for telemetry and `leaf_routes`, never for the result."""

    module_name: str
    adapter: str
    leaf: torch.Tensor  # hard leaf per row (token, or sequence)
    logits: torch.Tensor | None  # router logits of every node, when the call computed them


class RouteRecorder(Protocol):
    """Receives every call that ends while it is installed (`TreeLoraModel.recording`), with its `records`."""

    def end_call(self, call: RoutingCall, outputs: Any, kwargs: dict[str, Any]) -> None: ...


@dataclass
class SequenceRoute:
    """One adapter's route for every sequence of the call: the router input it was picked from (constant, so a layer
    can recompute the differentiable logits, also under checkpointing) and the hard leaf of each sequence."""

    router: torch.nn.Module
    router_input: torch.Tensor  # (batch, hidden), detached
    leaf: torch.Tensor  # (batch,)


@dataclass
class BlockRoute:
    """The route a block's first module picked for the tokens of the block."""

    leaf: torch.Tensor  # (rows,)
    logits: torch.Tensor | None  # (rows, nodes), with its graph in training


@dataclass
class RoutingCall:
    """Everything a call decides once and shares among its layers."""

    training: bool = False
    hold_sequence_route: bool = False  # generate: the prompt's sequence route serves every step of the call
    shared: bool = False  # opened by `TreeLoraModel.holding_routes`: the model calls inside it all join it
    routing_mask: torch.Tensor | None = None  # (batch, seq) bool: the positions a sequence route may pool over
    sequence: dict[str, SequenceRoute] = field(default_factory=dict)
    blocks: dict[tuple[str, str], BlockRoute] = field(default_factory=dict)
    aux_losses: list[torch.Tensor] = field(default_factory=list)  # weighted, detached: what training added
    recorder: RouteRecorder | None = None
    records: list[RouteRecord] | None = None  # kept only when the call records its routes
    hook_token: Any = field(default=None, repr=False)  # set when a model pre-hook opened it

    def record(self, module_name: str, adapter: str, leaf: torch.Tensor, logits: torch.Tensor | None) -> None:
        if self.records is not None:
            detached = None if logits is None else logits.detach()
            self.records.append(RouteRecord(module_name, adapter, leaf.detach(), detached))

    def end(self, outputs: Any = None, kwargs: dict[str, Any] | None = None) -> None:
        """Hand the finished call to the recorder, if one was installed when it began."""
        if self.recorder is not None:
            self.recorder.end_call(self, outputs, kwargs or {})

    def aux_total(self) -> torch.Tensor | None:
        return torch.stack(self.aux_losses).sum() if self.aux_losses else None


def current_call() -> RoutingCall | None:
    if torch.compiler.is_compiling():
        return _TRACED.call
    return _CURRENT.get()


def open_call(call: RoutingCall) -> contextvars.Token | _TracedToken:
    """Make `call` current until `close_call` (for hooks, which cannot hold a `with` block open)."""
    if torch.compiler.is_compiling():
        token = _TracedToken(_TRACED.call)
        _TRACED.call = call
        return token
    return _CURRENT.set(call)


def close_call(token: contextvars.Token | _TracedToken) -> None:
    if isinstance(token, _TracedToken):
        _TRACED.call = token.previous
    else:
        _CURRENT.reset(token)


@contextmanager
def entered(call: RoutingCall) -> Iterator[RoutingCall]:
    """Make `call` the current call of this thread until the block ends."""
    token = open_call(call)
    try:
        yield call
    finally:
        close_call(token)


def reenter_call_on_recompute(checkpoint_function: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a layer's `_gradient_checkpointing_func` so that the function it checkpoints runs inside the routing call
    that was current when the layer ran forward, in the forward pass and again when backward recomputes it."""
    if getattr(checkpoint_function, "reenters_routing_call", False):
        return checkpoint_function

    def checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        call = current_call()
        if call is None:
            return checkpoint_function(function, *args, **kwargs)

        def in_call(*inner_args: Any, **inner_kwargs: Any) -> Any:
            with entered(call):
                return function(*inner_args, **inner_kwargs)

        return checkpoint_function(in_call, *args, **kwargs)

    checkpoint.reenters_routing_call = True
    checkpoint.keywords = getattr(checkpoint_function, "keywords", {})  # e.g. use_reentrant, read by the DDP check
    checkpoint.wrapped = checkpoint_function
    return checkpoint


def routing_mask(
    attention_mask: torch.Tensor | None, input_ids: torch.Tensor | None, pad_token_id: int | None
) -> torch.Tensor | None:
    """Which positions a sequence route pools over: the attention mask when the caller gave a 2-D one; without it,
    every position that does not hold the model's pad token (callers such as lm-evaluation-harness pad without a
    mask); None (every position) when neither is known."""
    if torch.is_tensor(attention_mask) and attention_mask.dim() == 2:
        return attention_mask.bool()
    if torch.is_tensor(input_ids) and input_ids.dim() == 2 and isinstance(pad_token_id, int):
        return input_ids != pad_token_id
    return None
