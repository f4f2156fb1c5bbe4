"""The best evaluation's weights, kept in memory during a run and put back at its end."""

from __future__ import annotations

import torch

from .sharding import local_tensor


class BestWeights:
    """Keep an in-memory copy of the trainable weights at the best eval score, and restore it at the end.

    Cheaper and sturdier than reloading a checkpoint folder: LoRA weights are a few MB, and the
    metric of the restored weights is exactly the one measured, so no final re-evaluation is needed.
    It also forces an evaluation at the last step, so the final weights always compete.
    """

    def __init__(self, model, key: str):
        from transformers import TrainerCallback

        outer = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.max_steps and state.global_step >= state.max_steps:
                    control.should_evaluate = True

            def on_evaluate(self, args, state, control, metrics=None, **kw):
                outer.offer(metrics or {}, state.global_step)

        self.callback = _Callback()
        self.model = model
        self.key = key
        self.best_value: float | None = None
        self.best_metrics: dict = {}
        self.best_step: int | None = None
        self._weights: dict[str, torch.Tensor] = {}

    def offer(self, metrics: dict, step: int) -> None:
        value = metrics.get(self.key)
        if value is None or (self.best_value is not None and value < self.best_value):  # ties: the later step
            return
        self.best_value, self.best_metrics, self.best_step = float(value), dict(metrics), step
        self._weights = {n: local_tensor(p).detach().to("cpu", copy=True)  # under FSDP: this rank's shard
                         for n, p in self.model.named_parameters() if p.requires_grad}

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """The best score so far and its weights: what a checkpoint keeps so a resumed run picks the same best."""
        return {"value": self.best_value, "metrics": self.best_metrics, "step": self.best_step}, self._weights

    def load_state(self, meta: dict, weights: dict[str, torch.Tensor]) -> None:
        self.best_value, self.best_metrics, self.best_step = meta["value"], dict(meta["metrics"]), meta["step"]
        self._weights = dict(weights)

    def restores_other_than(self, step: int) -> bool:
        """Whether `restore` would put back weights other than those of `step` (a best found earlier)."""
        return bool(self._weights) and self.best_step != step

    def restore(self) -> None:
        if not self._weights:
            return
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in self._weights:
                    local = local_tensor(param)
                    local.copy_(self._weights[name].to(local.device))
