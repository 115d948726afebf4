"""LoRA dropout on a CPU that draws about ``p`` random numbers per element instead of one.

PEFT applies dropout to the input of every LoRA layer, and torch's dropout on a CPU draws
one Bernoulli number per element (``bernoulli_``, some 5 ns each here): on a small model
that costs more than the layer's own projection (an input of 1,400 x 128: ~1 ms forward and
backward against ~0.2 ms for the 128 x 128 matmul), a fifth of a demo training step.

Which elements a dropout zeroes is a Bernoulli(p) process over the flattened input, and the
gaps between successive drops of such a process are independent Geometric(p) numbers.
Drawing the gaps (``geometric_``) and summing them gives the dropped positions with the
very same distribution from ``p * n`` draws instead of ``n``; kept elements are scaled by
``1 / (1 - p)`` as always. The backward keeps the positions (8 bytes per dropped element,
not a mask per element). Randomness comes from torch's default generator, so a seeded run
repeats itself and activation checkpointing replays the same drops.

On other devices (CUDA's dropout is already one fused pass) and for ``p > 1/2`` the layer is
torch's own dropout.
"""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger(__name__)

MAX_GAP_P = 0.5  # above it, gaps save little over one draw per element


def dropped_positions(n: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The sorted flat indices in ``range(n)`` that a Bernoulli(``p``) process drops (int64)."""
    if n <= 0 or p <= 0:
        return torch.empty(0, dtype=torch.long)
    expected = n * p
    chunk = int(expected + 6 * math.sqrt(expected) + 16)  # one draw covers n but for 1 in ~10^9
    parts: list[torch.Tensor] = []
    last = -1  # the index of the last drop drawn so far
    while last < n:
        positions = torch.empty(chunk, dtype=torch.long).geometric_(p, generator=generator)
        positions = positions.cumsum_(0).add_(last)
        parts.append(positions)
        last = int(positions[-1])
    positions = parts[0] if len(parts) == 1 else torch.cat(parts)
    return positions[: int(torch.searchsorted(positions, n))]


def _zeroed_and_scaled(tensor: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
    out = tensor.mul(scale).contiguous()
    out.view(-1).index_fill_(0, positions, 0)
    return out


class _GapDropoutFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs: torch.Tensor, p: float) -> torch.Tensor:
        positions = dropped_positions(inputs.numel(), p)
        ctx.save_for_backward(positions)
        ctx.scale = 1.0 / (1.0 - p)
        return _zeroed_and_scaled(inputs, positions, ctx.scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (positions,) = ctx.saved_tensors
        return _zeroed_and_scaled(grad, positions, ctx.scale), None


class GapDropout(torch.nn.Dropout):
    """:class:`torch.nn.Dropout` whose CPU training pass draws the gaps between drops."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if (
            not self.training
            or self.inplace
            or not 0 < self.p <= MAX_GAP_P
            or inputs.device.type != "cpu"
            or not inputs.is_floating_point()
        ):
            return super().forward(inputs)
        return _GapDropoutFunction.apply(inputs, self.p)


def use_gap_dropout(model: torch.nn.Module) -> int:
    """Give every LoRA layer of ``model`` a :class:`GapDropout` of the same ``p`` in place of
    its :class:`torch.nn.Dropout` (PEFT's ``lora_dropout``); returns how many were replaced."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                dropouts[name] = GapDropout(dropout.p)
                replaced += 1
    if replaced:
        logger.debug("LoRA dropout: %d layers draw the gaps between drops on a CPU", replaced)
    return replaced
