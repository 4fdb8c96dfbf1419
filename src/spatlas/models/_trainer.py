"""The training loop shared by the fusion models: a fixed number of AdamW steps, readable top down.

A model hands the loop a ``step(i) -> LossParts`` function (it draws its own mini-batch); the
loop owns the optimiser, the learning-rate schedule, the progress bar and the loss history.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._logging import logger
from .._progress import progress
from ._losses import LossParts


@dataclass
class TrainSettings:
    """Optimisation settings (``train()`` arguments of every model).

    ``steps``: optimiser steps (a fixed budget whatever the number of spots); ``lr`` peak
    learning rate; ``weight_decay`` of AdamW; ``schedule``: ``constant`` or ``cosine`` (linear
    warm-up over the first 5 % of steps, then cosine decay to 10 % of ``lr``); ``log_every``:
    steps between entries of the loss history.
    """

    steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    log_every: int = 10

    def as_params(self, batch_size: int) -> dict[str, float | int | str]:
        """The settings (and the batch size) as recorded in a model's ``train_params``."""
        return {
            "steps": int(self.steps),
            "batch_size": int(batch_size),
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "schedule": self.schedule,
        }


def _lr_factor(step: int, settings: TrainSettings) -> float:
    if settings.schedule == "constant":
        return 1.0
    warmup = max(1, settings.steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress_ = (step - warmup) / max(1, settings.steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress_))


def train_loop(
    module: torch.nn.Module,
    step_fn: Callable[[int], LossParts],
    settings: TrainSettings,
    *,
    desc: str,
    show_progress: bool = True,
) -> list[dict[str, float]]:
    """Run ``settings.steps`` AdamW steps of ``step_fn``'s loss on ``module``.

    Parameters
    ----------
    module
        The network; put in train mode here.
    step_fn
        ``step_fn(i)`` draws mini-batch ``i``, runs the forward pass and returns its
        :class:`~spatlas.models._losses.LossParts`.
    settings
        Steps, learning rate, weight decay, schedule, logging interval.
    desc
        Label of the progress bar.
    show_progress
        Show a progress bar (silent anyway when stderr is not a terminal).

    Returns
    -------
    The loss history: one dict per ``log_every`` steps (``step``, ``lr`` and every loss part),
    plus the last step.
    """
    if settings.schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown schedule {settings.schedule!r} (constant | cosine)")
    optimiser = torch.optim.AdamW(
        module.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda i: _lr_factor(i, settings))
    module.train()
    history: list[dict[str, float]] = []
    steps = range(settings.steps)
    bar = progress(steps, desc=desc, total=settings.steps) if show_progress else steps
    for i in bar:
        parts = step_fn(i)
        if not torch.isfinite(parts.total):
            raise FloatingPointError(f"{desc}: loss became {float(parts.total)} at step {i}")
        optimiser.zero_grad(set_to_none=True)
        parts.total.backward()
        optimiser.step()
        scheduler.step()
        if i % settings.log_every == 0 or i == settings.steps - 1:
            record = {"step": float(i), "lr": optimiser.param_groups[0]["lr"], **parts.as_dict()}
            history.append(record)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(
                    {k: f"{v:.3f}" for k, v in record.items() if k not in ("step", "lr")},
                    refresh=False,
                )
    if history:
        last = history[-1]
        logger.info(
            "%s: %d steps, final loss %.4f (%s)",
            desc,
            settings.steps,
            last["total"],
            ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k not in ("step", "lr", "total")),
        )
    return history
