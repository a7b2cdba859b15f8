"""Best-checkpoint selection and early stopping, shared by every recipe that trains through ``fit``.

With ``train.metric_for_best`` each held-out evaluation is compared with the best so far; the best
step, its value and the evaluations since it live in :class:`~tunelab.training.checkpoint.TrainState`,
so they are saved in every checkpoint and ``--resume`` continues the same competition. The best
step's checkpoint is never pruned (``train.keep_last`` counts the others), and the config requires
every evaluated step to be a saved step, so the best weights are always on disk; ``fit`` loads them
back at the end. ``train.early_stopping_patience`` ends the run after that many evaluations in a row
without an improvement larger than ``train.early_stopping_min_delta``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.config.schema import TrainConfig
from tunelab.config.selection import higher_is_better
from tunelab.errors import TunelabError
from tunelab.training.checkpoint import TrainState


@dataclass(frozen=True)
class BestTracker:
    """Compares evaluations by ``metric`` (``higher`` = larger is better) and decides early stopping."""

    metric: str
    higher: bool
    patience: int | None = None
    min_delta: float = 0.0

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> BestTracker | None:
        """The tracker ``cfg`` asks for, or None without ``train.metric_for_best``."""
        if cfg.metric_for_best is None:
            return None
        return cls(cfg.metric_for_best, higher_is_better(cfg.metric_for_best), cfg.early_stopping_patience,
                   cfg.early_stopping_min_delta)

    def improves(self, value: float, best: float | None) -> bool:
        """True when ``value`` beats ``best`` by more than ``min_delta`` (any value beats None)."""
        if best is None:
            return True
        return value > best + self.min_delta if self.higher else value < best - self.min_delta

    def update(self, state: TrainState, metrics: dict[str, Any]) -> bool:
        """Record the evaluation of ``metrics`` at ``state.step`` into ``state``; True = stop now.

        Raises:
            TunelabError: the evaluation does not report ``metric`` (names the ones it does).
        """
        if self.metric not in metrics:
            numeric = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
            raise TunelabError(f"train.metric_for_best={self.metric} is not among the held-out metrics this run "
                               f"reports ({numeric}); choose one of them")
        value = float(metrics[self.metric])
        if self.improves(value, state.best_value):
            state.best_step, state.best_value, state.evals_since_best = state.step, value, 0
        else:
            state.evals_since_best += 1
        return self.patience is not None and state.evals_since_best >= self.patience
