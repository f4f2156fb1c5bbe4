"""Training curves as a PNG: loss on the left, the eval metric on the right."""

from __future__ import annotations

import threading
from pathlib import Path


def plot_curves(history: list[dict], path: str | Path, metric: str, base: float | None = None,
                label: str = "held-out nDCG@10") -> Path:
    """Plot the trainer's log history (loss per logging step, `metric` per eval) to `path`.

    `base` (the score before training) is drawn at step 0 so the curve shows the gain.
    """
    # Imported here, at save time (about a second): a figure drawn by the Agg canvas directly, without
    # pyplot, so the run does not switch the process's backend and the drawing may run in a thread.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    loss = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h[metric]) for h in history if metric in h and "step" in h]
    if base is not None:
        evals = [(0, base)] + evals
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_loss, ax_metric = fig.subplots(1, 2)
    if loss:
        ax_loss.plot(*zip(*loss), marker=".")
    ax_loss.set(title="training loss", xlabel="step", ylabel="MNRL loss")
    if evals:
        ax_metric.plot(*zip(*evals), marker="o", color="tab:green")
    ax_metric.set(title=label, xlabel="step", ylabel="score")
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def _load_matplotlib() -> None:
    """What `plot_curves` needs before it draws: the Agg canvas, the figure classes and the font list
    (built and cached on first use, a second or more where no cache exists yet). A failure here is
    left for the plot itself to report."""
    try:
        from matplotlib import font_manager
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401

        font_manager.findfont("DejaVu Sans")
    except Exception:
        pass


def warm_up_callback():
    """A trainer callback that loads matplotlib in a thread once the last step has run, so the finish's
    plot finds it loaded while the last step's checkpoint is written. Not earlier: a thread importing
    holds the interpreter's lock in bursts the training loop would wait on."""
    from transformers import TrainerCallback

    class WarmUpPlotting(TrainerCallback):
        started = False

        def on_step_end(self, args, state, control, **kwargs):
            if not self.started and state.is_world_process_zero and 0 < state.max_steps <= state.global_step:
                self.started = True
                threading.Thread(target=_load_matplotlib, name="embedtune-plot-warm-up", daemon=True).start()

    return WarmUpPlotting()
