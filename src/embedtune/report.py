"""`embedtune report OUTPUT_DIR`: a finished run, read back from its metrics.json.

Prints the before/after retrieval table, the run's key facts and its curves as text (sparklines
and a per-evaluation table), and renders the curves to a PNG with :func:`embedtune.plots.plot_curves`.
Reads only metrics.json, so it works on any machine the run folder is copied to, without torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from embedtune.errors import EmbedtuneError
from embedtune.plots import plot_curves
from embedtune.run_folder import work_folder

METRICS_FILE = "metrics.json"
DEFAULT_PNG = "report.png"
METRICS = ("ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100", "map@100",
           "spearman_cosine", "pearson_cosine")  # the last two: runs on scored pairs only (`run_data`)
CURVE_METRICS = ("ndcg@10", "mrr@10", "recall@10")  # the per-evaluation table's columns
_BLOCKS = "▁▂▃▄▅▆▇█"
_SPARK_WIDTH = 48


def load_run(folder: str | os.PathLike) -> dict[str, Any]:
    """The run's metrics.json as a dict, or a one-line error saying what is wrong with the folder."""
    name = os.fspath(folder)
    p = Path(name)
    if not p.exists():
        partial = work_folder(p)  # as `train --output` names it: "run/" and "run" both work in run.partial
        if partial.is_dir():
            raise EmbedtuneError(f"{name}: the run has not finished (its work folder {partial} exists)")
        raise EmbedtuneError(f"{name}: no such folder")
    if not p.is_dir():
        raise EmbedtuneError(f"{name}: not a folder; give the output folder of `embedtune train`")
    path = p / METRICS_FILE
    if not path.is_file():
        raise EmbedtuneError(f"{name}: no {METRICS_FILE}; not an `embedtune train` output folder (or unfinished)")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EmbedtuneError(f"{path}:{e.lineno}: invalid JSON: {e.msg} at column {e.colno}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise EmbedtuneError(f"{path}: unreadable: {' '.join(str(e).split())[:200]}") from None
    except OSError as e:
        raise EmbedtuneError(f"{path}: cannot read: {e.strerror or e}") from None
    if not isinstance(metrics, dict):
        raise EmbedtuneError(f"{path}: expected a JSON object, got {type(metrics).__name__}")
    for key, kind in (("base", dict), ("final", dict), ("history", list), ("config", dict)):
        if key in metrics and not isinstance(metrics[key], kind):
            raise EmbedtuneError(f"{path}: {key!r} should be a JSON {'object' if kind is dict else 'array'}")
    if not all(isinstance(h, dict) for h in metrics.get("history", [])):
        raise EmbedtuneError(f"{path}: 'history' should hold JSON objects")
    return metrics


def eval_key(history: list[dict], metric: str = "ndcg@10") -> str | None:
    """The trainer's log key for ``metric`` (e.g. eval_ir-eval_cosine_ndcg@10), found in the history."""
    for entry in history:
        for key in entry:
            if key.startswith("eval_") and key.endswith(f"_{metric}"):
                return key
    return None


def loss_points(history: list[dict]) -> list[tuple[int, float]]:
    return [(h["step"], h["loss"]) for h in history if _number(h.get("loss")) and "step" in h]


def eval_points(history: list[dict], metric: str) -> list[tuple[int, float]]:
    key = eval_key(history, metric)
    return [(h["step"], h[key]) for h in history if key and _number(h.get(key)) and "step" in h]


def sparkline(values: list[float], width: int = _SPARK_WIDTH) -> str:
    """Values as one line of block characters, averaged into at most ``width`` buckets."""
    values = [v for v in values if _number(v)]
    if not values:
        return ""
    if len(values) > width:
        size = len(values) / width
        values = [_mean(values[int(i * size) : max(int(i * size) + 1, int((i + 1) * size))]) for i in range(width)]
    low, high = min(values), max(values)
    span = high - low
    if span == 0:
        return _BLOCKS[len(_BLOCKS) // 2] * len(values)
    return "".join(_BLOCKS[min(len(_BLOCKS) - 1, int((v - low) / span * len(_BLOCKS)))] for v in values)


def render_png(metrics: dict, path: str | os.PathLike) -> Path:
    """Draw the run's loss and held-out nDCG@10 curves to ``path`` (written atomically)."""
    target = _check_png(path)
    history = metrics.get("history") or []
    key = eval_key(history) or "eval_ndcg@10"
    base = (metrics.get("base") or {}).get("ndcg@10")
    # the temp name ends in the target's suffix, which picks the image format (none: PNG, as --png says)
    tmp = target.parent / f".{target.stem}.tmp-{os.getpid()}{target.suffix or '.png'}"
    try:
        plot_curves(history, tmp, metric=key, base=base if _number(base) else None)
        os.replace(tmp, target)
    except ValueError as e:  # e.g. an image format matplotlib doesn't know
        raise EmbedtuneError(f"{target}: cannot render: {' '.join(str(e).split())[:200]}") from None
    except OSError as e:
        raise EmbedtuneError(f"{target}: cannot write: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _check_png(path: str | os.PathLike) -> Path:
    target = Path(path)
    if target.is_dir():
        raise EmbedtuneError(f"{target}: is a folder; give an image file name such as report.png")
    if not target.parent.is_dir():
        raise EmbedtuneError(f"{target}: folder {target.parent} does not exist")
    if target.suffix:  # checked here, before the report is printed, not when the image is drawn
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        if target.suffix[1:].lower() not in formats:
            raise EmbedtuneError(f"{target}: cannot render a {target.suffix} image; name it .png (or one of "
                                 f"{', '.join('.' + f for f in sorted(formats))})")
    return target


def print_report(folder: str | os.PathLike, png: str | os.PathLike | None = None, console=None) -> Path:
    """Print the report of the run in ``folder`` and render its curves; returns the PNG's path."""
    from rich.console import Console

    console = console or Console()
    metrics = load_run(folder)
    png = _check_png(png if png is not None else Path(folder) / DEFAULT_PNG)  # fail before printing
    history = metrics.get("history") or []
    from rich.text import Text

    console.print(Text(os.fspath(folder), style="bold"))  # Text: a path is never markup
    evaluation = metrics.get("eval") or {}
    plan = evaluation.get("plan") or {}
    if plan.get("subsampled") and metrics.get("base"):  # base and best share the subsample; final: exact
        table = metric_table(metrics["base"], evaluation.get("best_during") or {}, title="in-training subsample",
                             after="best")
        console.print(table)
        table = metric_table({}, metrics.get("final") or {}, title="final, exact")
    else:
        table = metric_table(metrics.get("base") or {}, metrics.get("final") or {})
    if table is not None:
        console.print(table)
    else:
        console.print("no held-out evaluation in this run (--no-eval)")
    console.print(facts_table(metrics))
    for line in curve_lines(history, metrics.get("base") or {}):
        console.print(line, highlight=False, soft_wrap=True)
    evals = eval_table(history, metrics.get("base") or {}, metrics.get("best_step"))
    if evals is not None:
        console.print(evals)
    out = render_png(metrics, png)
    console.print(Text(f"curves: {out}"), soft_wrap=True)
    return out


# --------------------------------------------------------------------------------------------------
# Pieces of the report


def metric_table(base: dict, final: dict, title: str = "held-out retrieval", after: str = "fine-tuned"):
    """Base vs fine-tuned for every metric either side has; None when the run had no evaluation."""
    from rich.table import Table

    names = [m for m in METRICS if m in base or m in final]
    if not names:
        return None
    similarity = names[0] in ("spearman_cosine", "pearson_cosine")
    if similarity and title == "held-out retrieval":
        title = "held-out similarity (cosine vs score)"
    table = Table(title=title, title_justify="left")
    for column, justify in (("metric", "left"), ("base", "right"), (after, "right"), ("change", "right")):
        table.add_column(column, justify=justify)
    for name in names:
        before, after = base.get(name), final.get(name)
        change = f"{after - before:+.4f}" if _number(before) and _number(after) else "-"
        table.add_row(name, _fmt(before), _fmt(after), change)
    return table


def facts_table(metrics: dict):
    """Model, data, size, time and speed of the run, one fact per row."""
    from rich.table import Table

    config = metrics.get("config") or {}
    table = Table(title="run", title_justify="left", show_header=False)
    table.add_column("fact")
    table.add_column("value")
    lora = config.get("lora_r")
    facts = [
        ("model", config.get("model")),
        ("data", config.get("data")),
        ("data sets", "\n".join(f"{d['name']}: {d['train_rows']} training rows, loss {d['loss']}"
                                for d in metrics["datasets"]) if len(metrics.get("datasets") or ()) > 1 else None),
        ("method", None if "lora_r" not in config else (f"LoRA r{lora}" if lora else "full fine-tuning")),
        ("steps", metrics.get("steps")),
        ("batch size", batch_fact(config.get("batch_size"), metrics.get("world_size"))),
        ("learning rate", config.get("lr")),
        ("train pairs", metrics.get("train_pairs")),
        ("held-out pairs", metrics.get("eval_pairs")),
        ("rows skipped", metrics.get("skipped_summary") or metrics.get("skipped_rows")),
        ("warnings", "\n".join(metrics["warnings"]) if metrics.get("warnings") else None),  # what the run could not do
        ("train time", f"{metrics['train_time_s']:.1f} s" if _number(metrics.get("train_time_s")) else None),
        ("eval time", f"{metrics['eval_time_s']:.1f} s" if _number(metrics.get("eval_time_s")) else None),
        ("eval plan", ((metrics.get("eval") or {}).get("plan") or {}).get("reason")),
        ("total time", f"{metrics['total_time_s']:.1f} s" if _number(metrics.get("total_time_s")) else None),
        ("tokens/s", f"{metrics['tokens_per_s']:,.0f}" if _number(metrics.get("tokens_per_s")) else None),
        ("speed mode", speed_fact(metrics.get("speed"), metrics.get("cuda_graphs"))),
        ("compile time", _compile_fact(metrics.get("compile"))),
        ("CUDA graphs", graphs_fact(metrics.get("cuda_graphs"))),
        ("best step", metrics.get("best_step")),
    ]
    from rich.text import Text

    for name, value in facts:
        if value is not None:
            table.add_row(name, Text(str(value)))  # paths and model names are not markup
    return table


def _compile_fact(compile_info) -> str | None:
    """'41.9 s (cache: FOLDER)' for a --compile run, None otherwise."""
    if not isinstance(compile_info, dict) or not _number(compile_info.get("time_s")):
        return None
    return f"{compile_info['time_s']:.1f} s (cache: {compile_info.get('cache')})"


def speed_fact(speed, graphs=None) -> str | None:
    """'compiled layers + CUDA graphs (why ...)': the mode a run trained in (`embedtune.speed`)."""
    if not isinstance(speed, dict):
        return None
    off = isinstance(graphs, dict) and graphs.get("off")
    ran = [name for name, on in (("compiled layers", speed.get("compile")),
                                 ("CUDA graphs", speed.get("cuda_graphs") and not off)) if on]
    return f"{' + '.join(ran) or 'eager'} ({speed.get('why')})"


def graphs_fact(graphs) -> str | None:
    """'153 of 157 steps replayed (4 graphs)' for a --cuda-graphs run, or why graphs were off."""
    if not isinstance(graphs, dict):
        return None
    steps = sum(graphs.get(k) or 0 for k in ("eager", "replayed"))
    text = f"{graphs.get('replayed') or 0} of {steps} steps replayed ({graphs.get('shapes') or 0} graphs)"
    return f"off: {graphs['off']}" + (f"; {text}" if steps else "") if graphs.get("off") else text


def curve_lines(history: list[dict], base: dict | None = None) -> list[str]:
    """Loss, tokens/s and nDCG@10 (from the base score at step 0) over the run as labelled sparklines,
    with first, last and best values."""
    base_ndcg = (base or {}).get("ndcg@10")
    ndcg = eval_points(history, "ndcg@10")
    if ndcg and _number(base_ndcg):
        ndcg = [(0, base_ndcg)] + ndcg
    speed = [(h["step"], h["tokens_per_s"]) for h in history if _number(h.get("tokens_per_s")) and "step" in h]
    series = [("loss", loss_points(history), min, _fmt), ("tokens/s", speed, max, "{:,.0f}".format),
              ("ndcg@10", ndcg, max, _fmt)]
    lines = []
    for label, points, best, fmt in series:
        if not points:
            continue
        values = [v for _, v in points]
        step, value = best(points, key=lambda p: p[1])
        word = "min" if best is min else "max"
        count = f"{len(points)} point{'s' if len(points) != 1 else ''}"
        lines.append(f"{label:>9} {sparkline(values)}  {fmt(values[0])} -> {fmt(values[-1])} "
                     f"({word} {fmt(value)} at step {step}; {count})")
    return lines


def eval_table(history: list[dict], base: dict, best_step):
    """One row per evaluation (step 0 = before training), best step marked; None without evaluations."""
    from rich.table import Table

    columns = {m: eval_points(history, m) for m in CURVE_METRICS}
    steps = sorted({s for points in columns.values() for s, _ in points})
    if not steps:
        return None
    loss = loss_points(history)
    table = Table(title="evaluations", title_justify="left")
    table.add_column("step", justify="right")
    for metric in CURVE_METRICS:
        table.add_column(metric, justify="right")
    table.add_column("train loss", justify="right")
    if any(m in base for m in CURVE_METRICS):
        table.add_row("0 (base)", *[_fmt(base.get(m)) for m in CURVE_METRICS], "-")
    for step in steps:
        values = [dict(columns[m]).get(step) for m in CURVE_METRICS]
        recent = [v for s, v in loss if s <= step]
        mark = " *" if step == best_step else ""
        table.add_row(f"{step}{mark}", *[_fmt(v) for v in values], _fmt(recent[-1]) if recent else "-")
    table.caption = "* best step: its weights are the saved model" if best_step in steps else None
    return table


def batch_fact(batch_size, world_size) -> str | None:
    """The batch a step trains: per process, and in all where several processes train (torchrun)."""
    if batch_size is None:
        return None
    if isinstance(world_size, int) and world_size > 1:
        return f"{batch_size} per process x {world_size} processes = {batch_size * world_size}"
    return str(batch_size)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _fmt(value) -> str:
    if not _number(value):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
