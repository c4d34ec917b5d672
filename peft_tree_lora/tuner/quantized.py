"""Merging a leaf into a bitsandbytes-quantised base layer: dequantise, add, requantise.

`Linear4bit` (a `Params4bit` weight) and `Linear8bitLt` (an `Int8Params` weight held as int8) cannot take `weight +=
delta`: their weights are packed integers. A merge dequantises the weight to float32, adds the leaf's update and
quantises the sum again with the layer's own settings (block size, 4-bit type, nested statistics, storage type), so
the merged weight carries one more rounding of the same size as the base's own quantisation error.

Unmerging does not subtract and requantise (which would round a second time, so that every merge / unmerge cycle
moved the base further away): the merge keeps the quantised weight it replaced, and unmerging puts that very weight
back. The base is then bit-for-bit what it was, at the cost of holding the adapted layers' quantised weights twice
while merged (`merge_and_unload` drops the kept copies with the TreeLoRA layers).

bitsandbytes is imported only when a quantised layer is merged; without it nothing here runs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

SUPPORTED = "float weights, bitsandbytes Linear4bit (Params4bit) and Linear8bitLt (int8 Int8Params)"


def quantization(base: nn.Module) -> str | None:
    """`"4bit"`, `"8bit"` for a bitsandbytes-quantised base layer, `None` for a float one (merged by plain addition).

    Raises a ValueError for any other weight that is not floating point, before anything is merged."""
    weight = getattr(base, "weight", None)
    kind = type(weight).__name__
    if kind == "Params4bit":
        return "4bit"
    if kind == "Int8Params" and weight.dtype == torch.int8:
        return "8bit"
    if weight is not None and not weight.dtype.is_floating_point:
        raise ValueError(
            f"TreeLoRA cannot merge into {type(base).__name__} (its weight is a {kind} of {weight.dtype}); merging "
            f"supports {SUPPORTED}. Use the adapter unmerged, or merge into a float copy of the base model."
        )
    return None


def dequantized_weight(base: nn.Module) -> torch.Tensor:
    """The float32 `(out, in)` weight that a bitsandbytes layer computes with, the layer left untouched."""
    import bitsandbytes as bnb

    weight = base.weight
    if quantization(base) == "4bit":
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes' CPU kernels repack a 4-bit weight on its first no-grad evaluation (AVX512-BF16 CPUs);
            # unpack a copy to the standard layout, which dequantize_4bit reads
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
        return bnb.functional.dequantize_4bit(data, state).float()
    return bnb.functional.int8_vectorwise_dequant(weight.data, _int8_scales(base).float()).float()


def broken_merge_error(adapter: str, where: str = "") -> ValueError:
    """The error of a `safe_merge` that meets a non-finite weight, in PEFT LoRA's words (plus where, if known)."""
    return ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken{where}")


def merge_quantized(stash: dict[str, Any], base: nn.Module, adapter: str, delta: torch.Tensor, safe: bool) -> None:
    """Replace the base weight by the quantisation of (dequantised weight + `delta`), keeping the replaced weight in
    `stash[adapter]` for `unmerge_quantized`. With `safe`, a non-finite sum raises and nothing changes."""
    merged = dequantized_weight(base) + delta.detach().float().to(base.weight.device)
    if safe and not torch.isfinite(merged).all():
        raise broken_merge_error(adapter)
    kept = _current(base)
    if quantization(base) == "4bit":
        _install_4bit(base, _quantize_4bit(base, merged))
    else:
        import bitsandbytes as bnb

        fresh = bnb.nn.Int8Params(merged.cpu(), requires_grad=False, has_fp16_weights=False)
        fresh = fresh.to(base.weight.device)  # moving a float Int8Params to a device quantises it
        _install_8bit(base, fresh, fresh.SCB)
    stash[adapter] = kept


def unmerge_quantized(stash: dict[str, Any], base: nn.Module, adapter: str) -> None:
    """Put back the quantised weight that merging `adapter` replaced."""
    kind, weight, scales = stash.pop(adapter)
    if kind == "4bit":
        _install_4bit(base, weight)
    else:
        _install_8bit(base, weight, scales)


def _current(base: nn.Module) -> tuple[str, nn.Parameter, torch.Tensor | None]:
    kind = quantization(base)
    return kind, base.weight, _int8_scales(base) if kind == "8bit" else None


def _int8_scales(base: nn.Module) -> torch.Tensor:
    """The row scales of an int8 weight: on the weight until the layer's first forward moves them to its state."""
    scales = base.weight.SCB if base.weight.SCB is not None else base.state.SCB
    if scales is None:
        raise ValueError(f"The int8 weight of {type(base).__name__} has no scales (SCB); it cannot be dequantised.")
    return scales


def _quantize_4bit(base: nn.Module, weight: torch.Tensor) -> nn.Parameter:
    import bitsandbytes as bnb

    old = base.weight
    state = old.quant_state
    packed = getattr(state, "packing_format_for_cpu", False)  # the packed state says bfloat16, whatever it was
    fresh = bnb.nn.Params4bit(
        weight.to(state.original_dtype if packed else state.dtype).cpu(),
        requires_grad=False,
        blocksize=old.blocksize,
        compress_statistics=old.compress_statistics,
        quant_type=old.quant_type,
        quant_storage=old.quant_storage,
        module=base,
    )
    return fresh.to(old.device)  # moving an unquantised Params4bit to a device quantises it


def _install_4bit(base: nn.Module, weight: nn.Parameter) -> None:
    base.weight = weight
    if hasattr(base, "quant_state"):  # Linear4bit restores a lost weight.quant_state from its own copy
        base.quant_state = weight.quant_state


def _install_8bit(base: nn.Module, weight: nn.Parameter, scales: torch.Tensor) -> None:
    """Make `weight` (int8, row scales `scales`) the layer's weight: the state is cleared and the weight carries its
    codes and scales, which Linear8bitLt's next forward moves into its state."""
    base.weight = weight
    weight.CB, weight.SCB = weight.data, scales
    base.state.reset_grads()
