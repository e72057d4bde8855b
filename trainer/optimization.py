"""The optimisation both trainers share (value training, distillation): AdamW with a linear warmup
and a cosine decay to 10% of the peak, gradient clipping, one call a step (as transformers'
`Trainer` steps its optimizer and scheduler together)."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch


def total_steps(items: int, batch_size: int, epochs: int, max_steps: int | None) -> int:
    """Optimizer steps of a run: every batch of every epoch, or `max_steps` when that is fewer."""
    per_epoch = math.ceil(items / batch_size)
    return per_epoch * epochs if max_steps is None else min(max_steps, per_epoch * epochs)


def warmup_cosine(total: int, warmup: int) -> Callable[[int], float]:
    """The learning-rate factor at a step: linear up to 1 over `warmup` steps, then cosine to 0.1."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Optimizer:
    """AdamW over `params`, its warmup-cosine schedule and clipping; `step(loss)` does one update."""

    def __init__(self, params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float, total: int,
                 warmup: int, max_grad_norm: float) -> None:
        self.params = list(params)
        self.max_grad_norm = max_grad_norm
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(total, warmup))

    def step(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
