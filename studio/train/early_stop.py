"""Opt-in early stopping on the held-out eval loss, keeping the adapter of the best evaluation.

The eval loss is measured on the held-out phrasings (one phrasing of each fact kept out of training),
once an epoch: the studio's measure of whether the adapter knows the facts or recites the trained
questions. With `early_stop_patience` N > 0 a run stops after N evaluations in a row without a new
best, and the adapter's weights of the best evaluation are put back before it is saved, so the
adapter the run leaves is the one that generalised best, not the last.

The best weights are a copy of the adapter's trainable tensors in host memory (tens of MB for r 16
on a 7B), taken at each new best. A stopped and resumed run starts counting again.
"""

from __future__ import annotations

import math

from transformers import TrainerCallback

MIN_IMPROVEMENT = 1e-3  # a new best must be this share lower than the last best (noise is not progress)


class EarlyStop(TrainerCallback):
    """Watches each evaluation; stops the run after `patience` evaluations without a new best."""

    def __init__(self, job, patience: int):
        self.job, self.patience = job, int(patience)
        self.best_loss: float | None = None
        self.best_step: int | None = None
        self.waited = 0
        self.stopped_at: int | None = None
        self._best_weights: list | None = None  # (a trainable tensor, its values at the best evaluation)

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is None or not math.isfinite(loss):
            return
        if self.best_loss is None or loss < self.best_loss * (1 - MIN_IMPROVEMENT):
            self.best_loss, self.best_step, self.waited = float(loss), state.global_step, 0
            self._best_weights = _trainable_copy(model) if model is not None else None
            return
        self.waited += 1
        if self.waited >= self.patience and not control.should_training_stop:
            control.should_training_stop = True
            self.stopped_at = state.global_step
            self.job.log(f"Early stop at step {state.global_step}: the eval loss has not improved for "
                         f"{self.waited} evaluations (best {self.best_loss:.4f} at step {self.best_step}).")

    def restore_best(self) -> bool:
        """Put the best evaluation's adapter weights back when a later one was worse; True when it did. The
        very tensors are written (not looked up by name), so a compiled or wrapped layer gets them too."""
        if self._best_weights is None or self.waited == 0:
            return False
        import torch

        with torch.no_grad():
            for param, best in self._best_weights:
                param.copy_(best)
        self.job.log(f"The adapter of step {self.best_step} is kept: its eval loss {self.best_loss:.4f} is the "
                     "lowest of the run.")
        return True

    def summary(self) -> dict:
        """What studio.json records of it."""
        return {"patience": self.patience, "best_step": self.best_step, "best_eval_loss": self.best_loss,
                "stopped_at": self.stopped_at}


def _trainable_copy(model) -> list:
    return [(param, param.detach().to("cpu", copy=True)) for param in model.parameters() if param.requires_grad]
