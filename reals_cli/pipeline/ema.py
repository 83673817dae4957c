"""Exponential moving average of a model's weights, kept in fp32."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_copy(model: nn.Module) -> nn.Module:
    ema = copy.deepcopy(model).float().eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int | None = None) -> None:
    """ema <- decay * ema + (1 - decay) * model.

    With `step` (updates done so far), LDM's warm-up caps the decay at (1 + step) / (10 + step),
    so that a short run's EMA is not mostly its random initialisation; DiT uses no warm-up.
    """
    if step is not None:
        decay = min(decay, (1 + step) / (10 + step))
    ema_params = dict(ema.named_parameters())
    live = dict(model.named_parameters())
    # One multi-tensor kernel for all parameters, where a loop would launch one per
    # tensor (several hundred per step for DiT-XL).
    torch._foreach_lerp_([ema_params[n] for n in live], [p.detach().float() for p in live.values()], 1.0 - decay)
    ema_buffers = dict(ema.named_buffers())
    for name, b in model.named_buffers():
        ema_buffers[name].copy_(b)
