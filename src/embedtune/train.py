"""The recipe: the guide's whole workflow in one call, as named stages (set up, then train, then finish).

    output -> data -> model -> loss and evaluator -> trainer (plan first) -> train -> finish (metrics first)

load pairs -> hold-out split -> FastModel + LoRA -> SentenceTransformer -> MNRL with the
NO_DUPLICATES sampler and an IR evaluator -> best checkpoint restored -> merged save. `run` reads as
those stages; each is a function below that takes what the earlier ones produced (small dataclasses)
and marks its phase in metrics.json's `phases_s`. The components they use live in their own modules
(`best_weights`, `run_checks`, `speed_choice`, `unshard`, `resilience`, `run_folder`, `save`, ...).

A run works in `OUTPUT.partial/` (trainer checkpoints live there) and the finished folder is
renamed to `OUTPUT` only at the end, so an interrupted run never leaves a half-written OUTPUT.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .checkpoint_format import (
    MODEL_CARD_COPY, checkpoint_step, discard_on_failure, prepare_work, read_evaluation_record, referenced_folder,
    resume_point, write_evaluation_record,
)
from .compile_cache import compile_seconds
from .config_file import CONFIG_NAME, resolved_config, write_config_yaml
from .data import column
from .data.sampler import no_duplicates_sampler
from .data.token_cache import install_token_cache
from . import distributed
from .errors import EmbedtuneError
from .evaluate import metric_key
from .files import check_target
from .loading import DEFAULT_MODEL_ID, FastModel, resolve_dtype
from .lora import get_peft_model
from .model_card import card_reports_final, pick_card_examples
from .plots import warm_up_callback
from .monitoring import (
    TENSORBOARD_DIR, Phases, attach_tokens_per_second, check_report_to, point_tensorboard,
    readable_logs, report_arguments,
)
from .retrieval import model_prompts
from .run_data import (
    Evaluation, build_losses, cached_texts, choose_evaluation, load_parts, similarity_evaluator, similarity_summary,
    split_parts, steps_per_epoch, text_columns, trainer_dataset,
)
from .run_eval import build_run_evaluation, read_eval_data
from .run_folder import complete_finish, recover_at_start, resolve_output, seal_finished
from .save import save_adapter, save_merged
from .speed import mark_cache_warm
from .st import to_sentence_transformer

# Components that left this module, importable here as before (tests and other modules import them
# from `embedtune.train`, and tests replace `graph_step_for` here, where the trainer stage reads it).
from .best_weights import BestWeights
from .run_checks import RunChecks, check_batches, check_settings, check_speed_options
from .speed_choice import (
    choose_speed, graph_step_for, graph_summary, settle_during_steps, start_kernel_prebuild,
)
from .unshard import unsharded_copy

EVAL_NAME = "ir-eval"
POOLING_MODES = ("cls", "mean", "max", "lasttoken", "weightedmean", "mean_sqrt_len_tokens")


@dataclass
class TrainConfig:
    """Every knob of a run; the CLI flags map one to one onto these fields."""

    data: str | list[str] | dict[str, Any] | None = None  # one file, several, or name -> file (`multi_data`)
    model: str = DEFAULT_MODEL_ID
    output_dir: str | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 32
    lr: float | None = None  # None: 2e-4 with LoRA, 2e-5 for full fine-tuning
    max_seq_length: int = 256
    lora_r: int | None = 16  # None: full fine-tuning
    lora_alpha: int | None = None  # None: equal to lora_r
    eval_size: int | None = None  # None: min(4096, 10%)
    eval: bool = True
    evals_per_run: int = 4  # in-training evaluations asked for (sized to the run: eval_plan); 0: the final one only
    eval_data: str | None = None  # a pairs file or a BEIR folder to evaluate on instead of held-out pairs
    eval_share: float = 0.25  # evaluation's share of the run's wall time, at most (1: never cut)
    pooling: str | None = None
    seed: int = 42
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    gradient_checkpointing: bool | str = False
    dtype: str | None = None
    overwrite: bool = False
    resume: bool = False  # continue from the last complete checkpoint in OUTPUT.partial
    save_every: int | None = None  # checkpoint interval in steps; None: every 10 minutes and at the end, 0: off
    logging_steps: int = 5
    fast: bool = True  # padding-free packed forward where the architecture supports it
    compile: bool | None = None  # torch.compile the packed layers (see packing.layers); None: where it pays (speed)
    cuda_graphs: bool | None = None  # replay each step as a CUDA graph (see graphs); None: where it pays (speed)
    fused_kernels: bool | None = None  # fused dropout + residual + LayerNorm (kernels.fused_norm); None: where it pays
    query_prompt: str | None = None  # e.g. "query: " (E5) or a Qwen3-Embedding instruction
    document_prompt: str | None = None  # e.g. "passage: "
    temperature: float = 0.05  # InfoNCE temperature (0.05 = MNRL's scale 20)
    symmetric: bool = False  # also train positive -> anchor
    matryoshka_dims: list[int] | None = None  # e.g. [768, 512, 256, 128, 64]
    loss: str | None = None  # mnrl, triplet, cosent, angle, marginmse, kl; None: from the columns (loss_choice)
    columns: str | dict[str, Any] | None = None  # the data's column names by role, e.g. "anchor=query,positive=doc"
    multi_dataset: str = "proportional"  # or "round-robin": how batches of several data sets take turns
    cached_loss: bool = False  # GradCache: memory flat in --batch-size
    token_budget: int | None = None  # real tokens per cached chunk (default: see losses.gpu_token_budget)
    report_to: str = "none"  # or "tensorboard" (events in OUTPUT/tensorboard) or "wandb"
    fsdp: bool = False  # shard weights, gradients and optimizer state over the ranks (full fine-tuning)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 2e-4 if self.lora_r else 2e-5


@dataclass
class RunResult:
    """What `run` returns: the trained SentenceTransformer, metrics.json's content, and the output folder."""

    model: Any
    metrics: dict
    output_dir: Path | None


def train(data: str | None = None, config: TrainConfig | None = None, **kwargs) -> tuple[Any, dict]:
    """Fine-tune an embedding model on anchor/positive pairs; returns (SentenceTransformer, metrics)."""
    if config is None:
        config = TrainConfig(data=data, **kwargs)
    result = run(config)
    return result.model, result.metrics


# ------------------------------------------------------------------------------------------------
# The recipe: `run`, then its stages in the order it calls them.


def run(config: TrainConfig, progress=None) -> RunResult:
    """The recipe behind `train` and the CLI: set up (data, model, loss and evaluator, plan, trainer),
    train, then finish. Every input is validated before anything is written."""
    _import_trainer_libraries()
    started = time.time()
    phases = Phases()  # metrics.json's phases_s
    check_settings(config)
    check_speed_options(config)
    prebuild = start_kernel_prebuild(config)  # builds alongside data reading and model loading
    output, finished = place_output(config)
    if finished is not None:  # a sealed run, stopped while being moved into place: nothing to train
        return _finished_result(finished)
    data = read_data(config, output, phases)
    distributed.init_if_launched()  # under torchrun: join the process group before evaluating
    distributed.quiet_other_ranks()  # one set of progress bars, rank 0's
    model = load_model(config, phases)
    objective = loss_and_evaluator(config, data, model, phases)
    with discard_on_failure(data.work, fresh=data.resume_from is None):
        setup = set_up_trainer(config, data, model, objective, phases, prebuild)
        trained = train_model(config, data, model, objective, setup, phases)
    return finish(config, started, data, objective, setup, trained, phases)


def _import_trainer_libraries() -> None:
    """Load the trainer's libraries before the run's clock starts: their import time stays in
    `phases_s`'s process_start, not in whichever stage would first use them."""
    from sentence_transformers import SentenceTransformerTrainingArguments  # noqa: F401

    from . import resilience  # noqa: F401


def place_output(config: TrainConfig) -> tuple[Path | None, Path | None]:
    """Where the result goes (links followed; the data and the current folder refused) and, on rank 0,
    what a killed finish left: with --resume a sealed result is moved into place and returned as the
    second item (nothing to train); otherwise None."""
    if not config.output_dir:
        return None, None
    from .multi_data import data_sources

    for source in data_sources(config.data, config.loss):
        output = resolve_output(config.output_dir, source.path)  # symlinks followed; data and cwd protected
    finished = recover_at_start(output, config.resume, config.overwrite) if distributed.is_main() else None
    return output, finished


@dataclass
class RunData:
    """What the data stage produced: the pairs and their split, the batches the sampler will yield,
    the checked output folder, the work folder and the checkpoint the run resumes (None: fresh)."""

    loaded: Any
    train_ds: Any
    eval_ds: Any | None
    batches: dict | None  # the sampler's batches of the one data set (`run_checks.check_batches`); None for several
    output: Path | None
    work: Path
    resumable: bool
    resume_from: Path | None
    parts: list  # each data set (`run_data.Part`); `loaded`... are the first's
    eval_source: Any = None  # --eval-data read (`run_eval.EvalSource`); None: the held-out pairs, if any


def read_data(config: TrainConfig, output: Path | None, phases: Phases) -> RunData:
    """Read the pairs, then refuse whatever would fail later, before any model loads or folder is
    written: an occupied output, bad pooling or batch size, an unusable --report-to, too few pairs for
    one batch, batches the sampler cannot fill, a --resume with nothing (or something else) to resume."""
    parts = load_parts(config)  # each data set read, its loss chosen from its columns (or --loss) and checked
    loaded = parts[0].loaded
    phases.mark("read_data")
    output = check_target(output, config.overwrite) if output else None
    if config.pooling is not None and config.pooling not in POOLING_MODES:
        raise EmbedtuneError(f"--pooling {config.pooling!r} is not one of {', '.join(POOLING_MODES)}")
    if config.batch_size < 2:
        raise EmbedtuneError("--batch-size must be at least 2: in-batch negatives need company")
    check_report_to(config.report_to, has_output=output is not None)
    eval_source = read_eval_data(config)  # --eval-data: every pair trains, unless --eval-size holds some out
    eval_size = 0 if not config.eval or (eval_source is not None and config.eval_size is None) else config.eval_size
    # per data set: split, refuse fewer rows than a batch, count the full batches (no-silent-success)
    split_parts(config, parts, eval_size)
    train_ds, eval_ds = parts[0].train_ds, parts[0].eval_ds
    batches = parts[0].batches if len(parts) == 1 else None  # several: each data set's, under metrics' `data`
    resumable = output is not None and not config.fsdp  # FSDP runs keep no resumable checkpoints (yet)
    work = Path(f"{output}.partial") if output else Path(os.environ.get("TMPDIR", "/tmp")) / f"embedtune-{os.getpid()}"
    resume_from = resume_point(work, config, resumable=resumable)  # checked before any loading
    return RunData(loaded, train_ds, eval_ds, batches, output, work, resumable, resume_from, parts, eval_source)


@dataclass
class Model:
    """What the model stage produced: the encoder (LoRA-wrapped or not) and its tokenizer, the
    SentenceTransformer around it, the dtype it trains in, and the prompts the run uses."""

    encoder: Any
    tokenizer: Any
    st: Any
    dtype: torch.dtype
    query_prompt: str | None
    document_prompt: str | None


def load_model(config: TrainConfig, phases: Phases) -> Model:
    """Seed, then load the encoder (the packed fast path where the architecture has one) with LoRA or
    activation checkpointing, as a SentenceTransformer carrying the run's prompts (saved with it)."""
    torch.manual_seed(config.seed)
    dtype = resolve_dtype(config.dtype)
    if config.lora_r is None and dtype != torch.float32:
        dtype = torch.float32  # full fine-tuning keeps fp32 master weights; autocast does the rest
    model, tokenizer = FastModel.from_pretrained(config.model, max_seq_length=config.max_seq_length, dtype=dtype,
                                                 fast=config.fast)
    if config.lora_r:
        model = get_peft_model(
            model, r=config.lora_r, lora_alpha=config.lora_alpha or config.lora_r,
            use_gradient_checkpointing=config.gradient_checkpointing, random_state=config.seed,
        )
    elif config.gradient_checkpointing:
        from .checkpointing import enable_checkpointing

        enable_checkpointing(model, config.gradient_checkpointing)
    st_model = to_sentence_transformer(model, tokenizer, pooling=config.pooling)
    phases.mark("load_model")
    if config.fsdp and any(True for module in list(st_model)[1:] for _ in module.parameters()):
        raise EmbedtuneError(f"{config.model}: --fsdp shards the encoder only, and this checkpoint's pipeline has "
                             "weights after it (Dense, LayerNorm, ...); train it without --fsdp")
    given = {"query": config.query_prompt, "document": config.document_prompt}
    st_model.prompts = {**(st_model.prompts or {}), **{k: v for k, v in given.items() if v}}  # saved with the model
    query, document = model_prompts(st_model)  # a checkpoint's "passage" / "corpus" prompt is its document prompt
    return Model(model, tokenizer, st_model, dtype, query, document)


@dataclass
class Objective:
    """What the loss-and-evaluator stage produced: the loss, the trainer's IR evaluator and the base
    model's scores (both set once the run is planned; None and {} without in-training evaluations),
    and the run's evaluations (`run_eval.RunEvaluation`; None with --no-eval)."""

    loss: Any
    evaluator: Any | None
    base_metrics: dict
    evaluation: Evaluation | None = None  # what the evaluations cover (`run_data.choose_evaluation`)
    run_eval: Any = None  # retrieval evaluations sized to the run (`run_eval.RunEvaluation`); None for similarity

    @property
    def metric(self) -> str:
        """The evaluator's key of the metric the best weights follow."""
        return self.evaluation.metric if self.evaluation is not None else metric_key(EVAL_NAME)


def loss_and_evaluator(config: TrainConfig, data: RunData, model: Model, phases: Phases) -> Objective:
    """The loss first (its option errors come before any evaluation or folder), then what the run
    evaluates: retrieval (--eval-data, else the held-out rows of the data sets with relevant positives,
    against every positive as corpus), sized to the run by `run_eval` (a timed encoding probe prices one
    evaluation; the plan and the base score follow once the steps are known); for scored pairs alone,
    their similarity, exact (sentence-transformers' EmbeddingSimilarityEvaluator)."""
    parts = data.parts
    loss = build_losses(parts, lambda name: build_loss(model.st, config, name))
    evaluation = choose_evaluation(parts, EVAL_NAME, metric_key(EVAL_NAME))
    if data.eval_source is not None:  # --eval-data: that set only (held-out rows, if any, just stay out of training)
        evaluation = Evaluation("retrieval", data.eval_source.task, metric_key(EVAL_NAME),
                                [Path(str(data.eval_source.path)).name], [p.name for p in parts])
    if evaluation is not None and evaluation.kind == "similarity":
        evaluator = similarity_evaluator(evaluation, batch_size=64)
        base_metrics = similarity_summary(evaluator(model.st))
        phases.mark("base_eval")
        return Objective(loss, evaluator, base_metrics, evaluation)
    held_out = evaluation.task if evaluation is not None and evaluation.kind == "retrieval" else None
    run_eval = build_run_evaluation(config, held_out, data.eval_source, model.query_prompt, model.document_prompt,
                                    EVAL_NAME)
    if run_eval is not None:
        saved = read_evaluation_record(data.work) if data.resume_from is not None else None
        if saved is None or not run_eval.restore(saved):  # a resumed run goes on with its plan and base score
            run_eval.probe(model.st)
        phases.mark("eval_probe")
    return Objective(loss, None, {}, evaluation, run_eval)


@dataclass
class Plan:
    """What the plan stage decided: the steps, the columns the trainer reads, the throughput estimate's
    tokens per row, and the speed mode (with its compile cache and the model's fingerprint)."""

    rows_per_step: int
    total_steps: int
    eval_steps: int
    columns: list[str]
    max_seq_length: int
    tokens_per_row: float
    speed: Any
    compile_cache: Any
    fingerprint: Any
    settle_speed: Any = None  # the fused norm's choice left to the steps (`speed_choice.choose_speed`)


def plan_run(config: TrainConfig, data: RunData, model: Model, phases: Phases, prebuild=None) -> Plan:
    """Count the run's steps from the rows one optimizer step takes (over all ranks), measure the mean
    tokens per row on a sample, and choose the speed mode from both (`speed_choice.choose_speed`)."""
    accumulation = int(config.extra.get("gradient_accumulation_steps", 1))
    rows_per_step = config.batch_size * accumulation * distributed.world_size()  # one optimizer step's rows
    per_epoch = steps_per_epoch(config, data.parts, rows_per_step, accumulation)  # several data sets: their sampler's
    total_steps = config.max_steps or max(1, math.ceil(per_epoch * config.epochs))
    eval_steps = max(1, math.ceil(total_steps / max(1, config.evals_per_run)))
    columns = text_columns(data.parts)  # the texts; a score column goes to the trainer, not the tokenizer
    max_seq_length = model.st.max_seq_length  # what the model really uses (capped by its position table)
    rows = sum(len(p.train_ds) for p in data.parts)
    tokens_per_row = sum(len(p.train_ds) * _tokens_per_row(model.tokenizer, p.train_ds, list(p.choice.text_columns),
                                                            max_seq_length) for p in data.parts) / max(1, rows)
    speed, compile_cache, fingerprint, settle = choose_speed(  # the kernels' build ahead: settled during the steps
        config, model.encoder, tokens_per_row, micro_steps=total_steps * accumulation, prebuild=prebuild, defer_wait=True)
    phases.mark("plan")
    return Plan(rows_per_step, total_steps, eval_steps, columns, max_seq_length, tokens_per_row, speed,
                compile_cache, fingerprint, settle)


@dataclass
class Setup:
    """What the trainer stage built: the trainer, the best-weights keeper, the token cache (None where
    it does not apply), the CUDA-graph step (or why not, or None) and the checks read after training."""

    trainer: Any
    best: BestWeights
    token_cache: Any
    graphs: Any
    checks: RunChecks
    plan: Plan


def set_up_trainer(config: TrainConfig, data: RunData, model: Model, objective: Objective,
                   phases: Phases, prebuild=None) -> Setup:
    """The run's plan (`plan_run`), the work folder (fresh, or the resumed run's with half-written
    checkpoints dropped), then the trainer and what rides on it: best weights, the CUDA-graph step, the
    token cache, logging, checks."""
    from .resumable_trainer import ResumableTrainer

    plan = plan_run(config, data, model, phases, prebuild)
    run_eval = objective.run_eval
    if run_eval is not None:  # evaluations sized to the planned run (`eval_plan`), then the base score
        if run_eval.plan is None:  # (a resumed run restored both in `loss_and_evaluator`)
            run_eval.plan_and_score_base(model.st, plan.total_steps, plan.tokens_per_row * plan.rows_per_step,
                                         sum(phases.seconds.values()))
        objective.base_metrics = run_eval.base_metrics
        objective.evaluator = run_eval.evaluator()
        phases.mark("base_eval")

    if distributed.is_main():  # only rank 0 writes; the others wait until the work folder exists
        prepare_work(data.work, config, data.resume_from, resumable=data.resumable)
        if run_eval is not None and data.resumable and data.resume_from is None:
            write_evaluation_record(data.work, run_eval.record())
    distributed.barrier()
    phases.mark("prepare_work")
    st_model = model.st
    column_prompts = {c: (model.query_prompt if c == "anchor" else model.document_prompt) for c in plan.columns}
    column_prompts = {c: p for c, p in column_prompts.items() if p}
    args = training_arguments(config, data, objective, plan, model.dtype, column_prompts)
    if config.fsdp:
        from .sharding import shard_model

        if torch.cuda.is_available():
            st_model.to(torch.device("cuda", torch.cuda.current_device()))
        shard_model(st_model, param_dtype=torch.bfloat16 if args.bf16 else None)
    st_model.model_card_data.generate_widget_examples = False  # it encodes samples: slow, and not ours to show
    first = data.parts[0]  # the card's examples: texts of the first data set, picked before the trainer would, loudly
    pick_card_examples(st_model, first.train_ds.select_columns(list(first.choice.text_columns)))
    best = BestWeights(st_model, f"eval_{objective.metric}")
    trainer = ResumableTrainer(  # checkpoints of the trainable weights; stops on a NaN/inf loss
        model=st_model,
        args=args,
        train_dataset=trainer_dataset(data.parts),  # several data sets: a DatasetDict, one loss each
        loss=objective.loss,
        evaluator=objective.evaluator,
        callbacks=([best.callback] + ([objective.run_eval.schedule(plan.total_steps)] if objective.run_eval else [])
                   if objective.evaluator else None),
    )
    phases.mark("trainer")
    trainer.final_save = _final_save(config, data, st_model, best)
    graphs = graph_step_for(trainer, config) if plan.speed.cuda_graphs else None
    if graphs is not None and not isinstance(graphs, str):
        trainer.graph_step = graphs
    rows_needed = plan.total_steps * plan.rows_per_step  # what the run will read
    token_cache = install_token_cache(trainer, st_model, cached_texts(data.parts), column_prompts,  # every data set's
                                      rows_needed=rows_needed, background=st_model.device.type == "cuda")
    phases.mark("token_cache")
    if config.report_to == "tensorboard":
        point_tensorboard(trainer, data.work)
    attach_tokens_per_second(trainer, plan.tokens_per_row * plan.rows_per_step)
    readable_logs(trainer)
    checks = RunChecks(st_model)  # no-silent-success: fingerprints the weights training starts from
    if plan.settle_speed is not None and isinstance(graphs, str) and not config.fused_kernels:
        # chosen for graphs, which the run cannot have: its launches would cost more than they save
        plan.speed = replace(plan.speed, why=plan.speed.why + "; fused norm not used: CUDA graphs off")
    elif plan.settle_speed is not None:  # before the phases' marks: a wait (--fused-kernels) counts as the set-up
        held = None if graphs is None or isinstance(graphs, str) else graphs
        if held is not None:  # no graphs of kernels about to change: steps run eagerly until it is settled
            held.hold_captures = True

        def adopt(mode):
            plan.speed = mode
            if held is not None:
                held.hold_captures = False

        trainer.add_callback(settle_during_steps(plan.settle_speed, adopt))
    trainer.add_callback(phases.step_callback())
    trainer.add_callback(warm_up_callback())  # matplotlib loaded for the finish's plot during the last checkpoint
    phases.mark("checks")
    return Setup(trainer, best, token_cache, graphs, checks, plan)


def training_arguments(config: TrainConfig, data: RunData, objective: Objective, plan: Plan, dtype: torch.dtype,
                       column_prompts: dict[str, str]):
    """The trainer's arguments: the recipe's choices (constant LR after warmup, NO_DUPLICATES batches,
    evaluations spread over the run, checkpoints by the clock, a fused AdamW), then `config.extra`'s."""
    from sentence_transformers import SentenceTransformerTrainingArguments

    from .multi_data import sampler_name
    from .resumable_trainer import save_arguments

    arguments = dict(
        output_dir=str(data.work / "checkpoints"),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=math.ceil(config.warmup_ratio * plan.total_steps),
        weight_decay=config.weight_decay,
        optim=_optimizer_name(),
        batch_sampler=no_duplicates_sampler(),
        **({"multi_dataset_batch_sampler": sampler_name(config.multi_dataset)} if len(data.parts) > 1 else {}),
        eval_strategy="steps" if objective.evaluator else "no",
        eval_steps=plan.eval_steps,
        **save_arguments(config.save_every, resumable=data.resumable),
        logging_steps=config.logging_steps,
        **report_arguments(config.report_to, data.work, data.output.name if data.output else None,
                           SentenceTransformerTrainingArguments),
        seed=config.seed,
        max_grad_norm=1.0,
        # The trainer's NaN filter reads every loss on the host (a wait for the GPU per step); a
        # non-finite loss stops the run anyway (`resumable_trainer.ResumableTrainer.training_step`).
        logging_nan_inf_filter=False,
        dataloader_drop_last=True,
        dataloader_pin_memory=torch.cuda.is_available(),
        # pinned batches go to the GPU without the host waiting; on CPU there is nothing to pin or wait for
        accelerator_config={"non_blocking": torch.cuda.is_available()},
        # several data sets: per data set, so that one named like a column ("anchor") cannot take its place
        prompts=({p.name: column_prompts for p in data.parts} if len(data.parts) > 1 else column_prompts)
        if column_prompts else None,
        **_precision_flags(dtype),
        ddp_broadcast_buffers=False,  # encoder buffers (position ids) are constants: skip a sync per forward
        # The same parameters take part in every step: DDP learns them on the first step instead of
        # searching the autograd graph for unused ones every step (the trainer's default for ST models).
        ddp_static_graph=True,
        ddp_find_unused_parameters=False,  # a static graph finds them once itself (torch warns at both)
        # On CPU, accelerate treats a torchrun launch as distributed (DDP over gloo) only when told to use the CPU.
        use_cpu=distributed.launched() and not torch.cuda.is_available(),
    )
    arguments.update(config.extra)  # extra training arguments win over the recipe's own
    return SentenceTransformerTrainingArguments(**arguments)


@dataclass
class Trained:
    """What the train stage left: the model to save (None on FSDP's other ranks), its final scores
    (those of the best evaluation, restored) and the training time."""

    model: Any
    final_metrics: dict
    train_time: float
    saved_model_by: Path | None = None  # the last checkpoint, where it wrote the model folder and names it


def train_model(config: TrainConfig, data: RunData, model: Model, objective: Objective, setup: Setup,
                phases: Phases) -> Trained:
    """Train (resuming, checkpointing by the clock, stopping cleanly on Ctrl-C/NaN/OOM), then put the
    best evaluation's weights back, and gather them from FSDP's shards or check the ranks agree."""
    # read from `resilience` at call time: benchmarks/bench_input_cpu.py replaces train_resumably there
    from .resilience import CheckpointClock, train_resumably

    train_started = time.time()
    try:
        train_resumably(setup.trainer, setup.best if objective.evaluator else None, data.resume_from,
                        resumable=data.resumable,
                        clock=CheckpointClock(check_every=config.logging_steps) if config.save_every is None else None)
    finally:
        if setup.token_cache is not None:
            setup.token_cache.stop()  # a background fill still running is of no use now
    train_time = time.time() - train_started
    phases.mark("train")  # what followed the last step's marks (`Phases.step_callback`): the trainer's end
    plan = setup.plan
    if plan.compile_cache is not None:  # later runs of this model find its compiled code (`speed.cache_is_warm`)
        mark_cache_warm(plan.compile_cache, plan.fingerprint)
    setup.best.restore()
    final_metrics = {}
    if objective.run_eval is not None:  # exact, on the whole eval set
        final_metrics = objective.run_eval.final(model.st, setup.best if objective.evaluator else None)
        phases.mark("final_eval")
    elif objective.evaluator is not None:  # similarity: the best weights' scores, from the trainer's evaluations
        final_metrics = similarity_summary(setup.best.best_metrics)
    st_model = model.st
    if config.fsdp:
        st_model = unsharded_copy(st_model, config)  # rank 0: the full model; other ranks: None
    else:
        distributed.check_in_sync(st_model)
    return Trained(st_model, final_metrics, train_time, setup.trainer.saved_model_by)


def run_metrics(config: TrainConfig, started: float, data: RunData, objective: Objective, setup: Setup,
                trained: Trained) -> dict:
    """metrics.json: scores before and after, times, steps and data counts, throughput, the speed mode,
    the resolved config (what config.yaml replays), and the run's checks' warnings (no silent success)."""
    plan = setup.plan
    state = setup.trainer.state
    first_step = checkpoint_step(data.resume_from) if data.resume_from is not None else 0  # steps before this process
    rows_seen = (state.global_step - first_step) * plan.rows_per_step  # drop_last: full batches
    tokens = int(plan.tokens_per_row * rows_seen)
    this_run = [entry for entry in state.log_history if entry.get("step", 0) > first_step]
    loaded, eval_ds, compile_cache, token_cache = data.loaded, data.eval_ds, plan.compile_cache, setup.token_cache
    run_eval = objective.run_eval
    clock = run_eval.clock.seconds if run_eval is not None else {}
    metrics = {
        "base": objective.base_metrics,
        "final": trained.final_metrics,
        "train_time_s": round(trained.train_time - clock.get("during", 0.0), 2),  # evaluations taken out
        "eval_time_s": round(sum(clock.values()), 2),  # probe, base, in-training and final evaluations
        "total_time_s": round(time.time() - started, 2),
        "eval": run_eval.summary() if run_eval is not None else None,
        "steps": state.global_step,
        "train_pairs": sum(len(p.train_ds) for p in data.parts),
        "eval_pairs": sum(len(p.eval_ds) for p in data.parts if p.eval_ds is not None),
        "skipped_rows": sum(p.loaded.skipped for p in data.parts),
        "skipped_rows_few_negatives": sum(p.loaded.skipped_few_negatives for p in data.parts),
        "skipped_summary": loaded.skipped_summary() if len(data.parts) == 1 else "; ".join(
            f"{p.name}: {p.loaded.skipped_summary()}" for p in data.parts),
        "datasets": [p.summary() for p in data.parts],  # rows and loss per data set
        "evaluation": objective.evaluation.as_dict() | {"described": objective.evaluation.describe()}
        if objective.evaluation is not None else None,
        "resumed_from_step": first_step or None,
        "tokens_per_s": _tokens_per_second(tokens, trained.train_time, this_run),
        "compile": {"time_s": round(compile_seconds(), 2), "cache": compile_cache} if compile_cache else None,
        "cuda_graphs": graph_summary(setup.graphs) if setup.graphs is not None else None,
        "speed": plan.speed.as_dict(),
        "best_step": setup.best.best_step,
        "token_cache": token_cache.summary() if token_cache else None,
        "world_size": distributed.world_size(),
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if torch.cuda.is_available() else None,
        "history": state.log_history,
        "config": resolved_config(  # what config.yaml holds: replays this run with --config
            config, lr=config.learning_rate, lora_alpha=config.lora_alpha or config.lora_r,
            max_seq_length=plan.max_seq_length,
            eval_size=len(eval_ds) if eval_ds is not None else (0 if config.eval else config.eval_size),
        ),
    }
    setup.checks.report(metrics, state, first_step, plan.total_steps, data.batches, loaded)  # adds "warnings"
    # a loss leaving a column out, and with several data sets each one's batch shortfall (one data set's is
    # in `warnings` already)
    shortfalls = [p.batches["warning"] for p in data.parts if len(data.parts) > 1 and p.batches and p.batches.get("warning")]
    metrics["warnings"] = [p.choice.warning for p in data.parts if p.choice.warning] + metrics["warnings"] + shortfalls
    return metrics


def finish(config: TrainConfig, started: float, data: RunData, objective: Objective, setup: Setup,
           trained: Trained, phases: Phases) -> RunResult:
    """The run's metrics (`run_metrics`), then rank 0 saves the result and moves it into place
    (`_finish_output`), or, without an output folder, drops the work folder; every rank waits for it,
    so none returns before the result exists."""
    metrics = run_metrics(config, started, data, objective, setup, trained)
    result_dir = None
    if not distributed.is_main():
        pass  # rank 0 saves; under DDP the model in memory here is the same
    elif data.output is not None:
        result_dir = _finish_output(trained.model, metrics, data.work, data.output, config.overwrite, phases,
                                    saved_model_by=trained.saved_model_by)
    else:
        shutil.rmtree(data.work, ignore_errors=True)
    distributed.barrier()
    return RunResult(trained.model, metrics, result_dir)


# ------------------------------------------------------------------------------------------------
# What the stages use: the loss, the throughput estimate, the optimizer and precision, the finish.


def build_loss(st_model, config: TrainConfig, name: str = "mnrl"):
    """The loss `name` (`loss_choice`); by default the contrastive loss: in-batch (and cross-rank)
    negatives plus any hard-negative columns."""
    from .loss_choice import build_loss as build_named_loss

    dimension = getattr(st_model, "get_embedding_dimension", None) or st_model.get_sentence_embedding_dimension
    width = dimension()  # ST 6 renamed the method; 5.x has only the old name
    too_wide = [d for d in config.matryoshka_dims or () if width and d > width]
    if too_wide:
        raise EmbedtuneError(f"--matryoshka-dims {too_wide}: larger than the model's embedding size {width}")
    try:
        return build_named_loss(name, st_model, config)
    except ValueError as exc:
        raise EmbedtuneError(f"loss options: {exc}") from None


def _tokens_per_row(tokenizer, dataset, columns: list[str], max_len: int, sample: int = 2048) -> float:
    """Mean real (unpadded, truncated) tokens per training row over all its columns, from a sample.

    A fast (Rust) tokenizer encodes with the GIL released: the sample goes through it in chunks on a
    few threads (the same ids, one chunk per thread call; the first call alone, so that the later ones
    find the truncation already set and only read the tokenizer's settings)."""
    rows = dataset.select(range(min(sample, len(dataset))))
    from .data.token_cache import char_budget, clip_inputs, tokenizer_threads

    texts = clip_inputs([text for name in columns for text in column(rows, name)], char_budget(max_len, tokenizer))

    def tokens(chunk: list[str]) -> int:
        return sum(len(ids) for ids in tokenizer(chunk, truncation=True, max_length=max_len)["input_ids"])

    threads = tokenizer_threads()
    if not getattr(tokenizer, "is_fast", False) or threads < 2 or len(texts) < 512:
        return tokens(texts) / max(1, len(rows)) if texts else 0.0
    size = -(-len(texts) // (2 * threads))
    chunks = [texts[i : i + size] for i in range(0, len(texts), size)]
    from concurrent.futures import ThreadPoolExecutor

    total = tokens(chunks[0])
    with ThreadPoolExecutor(threads, thread_name_prefix="embedtune-tokens") as pool:
        total += sum(pool.map(tokens, chunks[1:]))
    return total / max(1, len(rows))


def _tokens_per_second(tokens: int, train_time: float, history: list[dict]) -> float | None:
    """Training throughput with the in-run evaluations' time taken out (as the progress bar shows it)."""
    busy = train_time - sum(float(entry.get("eval_runtime", 0.0)) for entry in history)
    return round(tokens / busy, 1) if busy > 0 else None


def _optimizer_name() -> str:
    """The trainer's AdamW: the fused kernel on CUDA (one launch, and it can skip a step on the device:
    `guards._NonFiniteGate`)."""
    return "adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch"


def _precision_flags(model_dtype: torch.dtype) -> dict:
    if not torch.cuda.is_available():
        return {"bf16": False, "fp16": False}
    bf16 = torch.cuda.is_bf16_supported()
    return {"bf16": bf16, "fp16": not bf16, "tf32": True}


def _finish_output(st_model, metrics: dict, work: Path, output: Path, overwrite: bool,
                   phases: Phases | None = None, saved_model_by: Path | None = None) -> Path:
    """Assemble model/, adapter/, metrics.json, config.yaml and the curves in the work folder, beside
    its checkpoints; seal it; then move it into place (`run_folder`): a kill at any point leaves the
    previous result, or a run that `--resume` finishes (from its checkpoints, or sealed: moved only).
    The curves are drawn in a thread while this one writes the tensors. `saved_model_by`: the last
    step's checkpoint that wrote the model folder with these weights and names it: the folder is kept,
    its card completed again from the copy the checkpoint keeps of it."""
    from concurrent.futures import ThreadPoolExecutor

    from .plots import plot_curves

    if phases is not None:
        phases.mark("wrap_up")  # the best weights restored, the run's checks and metrics
    kept = saved_model_by is not None and referenced_folder(saved_model_by) == (work / "model").resolve()
    for leftover in ("adapter",) if kept else ("adapter", "model"):  # by a finish killed before its seal
        shutil.rmtree(work / leftover, ignore_errors=True)
    with ThreadPoolExecutor(1, thread_name_prefix="embedtune-plot") as pool:
        plot = pool.submit(plot_curves, metrics["history"], work / "training_curves.png",
                           metric=f"eval_{(metrics.get('evaluation') or {}).get('metric') or metric_key(EVAL_NAME)}",
                           base=metrics["base"].get("ndcg@10", metrics["base"].get("spearman_cosine")))
        lora = bool(metrics["config"].get("lora_r"))
        if lora:  # before save_merged merges it away: `embedtune export --to adapter` needs it
            save_adapter(st_model, work / "adapter")
        if kept:
            model_dir = work / "model"
            card = Path(saved_model_by) / MODEL_CARD_COPY  # as sentence-transformers wrote it, before completion
            if card.is_file():
                shutil.copyfile(card, model_dir / "README.md")
        else:
            if (metrics.get("evaluation") or {}).get("kind") == "retrieval":
                card_reports_final(st_model, EVAL_NAME, metrics["final"], lambda m: metric_key(EVAL_NAME, m))
            model_dir = save_merged(st_model, work / "model")
        from .export import complete_run_card, write_run_adapter_card

        complete_run_card(st_model, model_dir, metrics)  # the card sentence-transformers wrote, with embedtune's facts
        if lora:
            write_run_adapter_card(st_model, work / "adapter", metrics)
        if phases is not None:
            phases.mark("save_model")
        plot.result()
        if phases is not None:
            phases.mark("plot")  # what the curves took beyond the save, drawn beside it
            metrics["phases_s"] = dict(phases.seconds)  # up to here; sealing and moving the folder follow
        # Named relative to the run folder: it is moved, copied and shared whole.
        metrics["artifacts"] = {"model": "model", "metrics": "metrics.json", "plot": "training_curves.png",
                                "config": CONFIG_NAME}
        if lora:
            metrics["artifacts"]["adapter"] = "adapter"
        if (work / TENSORBOARD_DIR).is_dir():
            metrics["artifacts"]["tensorboard"] = TENSORBOARD_DIR
        write_config_yaml(metrics["config"], work / CONFIG_NAME)
        (work / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    assert model_dir.exists()
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise EmbedtuneError(f"{output}: appeared during the run; results left in {work}")
    seal_finished(work)
    return complete_finish(work, output)  # a crash here leaves the previous OUTPUT or the sealed new one


def _final_save(config: TrainConfig, data: RunData, st_model, best: BestWeights):
    """For `ResumableTrainer.final_save`: a full fine-tune in one process writes its model folder at
    the last step's checkpoint, which then references those weights, where the final weights are that
    step's (no earlier best evaluation to put back): the fp32 weights are written once, not twice.
    None (the trainer writes its own copy, the finish saves) for LoRA (a few MB), FSDP and several
    processes."""
    if config.lora_r is not None or config.fsdp or distributed.world_size() > 1 or not data.resumable:
        return None

    def final_save(step: int):
        if best.restores_other_than(step):
            return None
        folder = data.work / "model"
        shutil.rmtree(folder, ignore_errors=True)  # a finish killed before its seal left it
        model_dir = save_merged(st_model, folder)
        names: dict[int, list[str]] = {}
        for key, tensor in st_model[0].auto_model.state_dict(keep_vars=True).items():
            names.setdefault(id(tensor), []).append(key)
        return model_dir, model_dir / "model.safetensors", names

    return final_save


def _finished_result(output: Path) -> RunResult:
    """The result of a run whose finish was completed at start (`run_folder.recover_at_start`)."""
    from sentence_transformers import SentenceTransformer

    metrics = json.loads((output / "metrics.json").read_text(encoding="utf-8"))
    return RunResult(SentenceTransformer(str(output / "model"), device="cpu"), metrics, output)
