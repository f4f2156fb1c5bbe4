"""The recipe: the guide's whole workflow in one call.

load pairs -> hold-out split -> FastModel + LoRA -> SentenceTransformer -> MNRL with the
NO_DUPLICATES sampler and an IR evaluator -> best checkpoint restored -> merged save.

A run works in `OUTPUT.partial/` (trainer checkpoints live there) and the finished folder is
renamed to `OUTPUT` only at the end, so an interrupted run never leaves a half-written OUTPUT.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .compile_cache import compile_cache_dir, compile_seconds, use_persistent_compile_cache
from .config_file import CONFIG_NAME, resolved_config, write_config_yaml
from .data import column, load_pairs, train_eval_split
from .data.sampler import no_duplicates_sampler
from .data.token_cache import install_token_cache
from . import distributed
from .errors import EmbedtuneError
from .evaluate import evaluate_model, metric_key, pairs_to_ir_task, shared_ir_evaluator, summarize
from .loading import DEFAULT_MODEL_ID, FastModel, resolve_dtype
from .lora import get_peft_model
from .monitoring import (
    ENCODE_BAR_MIN_TEXTS, TENSORBOARD_DIR, Phases, attach_tokens_per_second, check_report_to, point_tensorboard,
    readable_logs, report_arguments,
)
from .run_folder import complete_finish, recover_at_start, resolve_output, seal_finished
from .save import check_target, save_adapter, save_merged
from .sharding import local_tensor
from .speed import mark_cache_warm
from .st import to_sentence_transformer

EVAL_NAME = "ir-eval"
POOLING_MODES = ("cls", "mean", "max", "lasttoken", "weightedmean", "mean_sqrt_len_tokens")

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Every knob of a run; the CLI flags map one to one onto these fields."""

    data: str
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
    evals_per_run: int = 4
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
    query_prompt: str | None = None  # e.g. "query: " (E5) or a Qwen3-Embedding instruction
    document_prompt: str | None = None  # e.g. "passage: "
    temperature: float = 0.05  # InfoNCE temperature (0.05 = MNRL's scale 20)
    symmetric: bool = False  # also train positive -> anchor
    matryoshka_dims: list[int] | None = None  # e.g. [768, 512, 256, 128, 64]
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
    model: Any
    metrics: dict
    output_dir: Path | None


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
    `resilience._NonFiniteGate`)."""
    return "adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch"


def _precision_flags(model_dtype: torch.dtype) -> dict:
    if not torch.cuda.is_available():
        return {"bf16": False, "fp16": False}
    bf16 = torch.cuda.is_bf16_supported()
    return {"bf16": bf16, "fp16": not bf16, "tf32": True}


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

    def restore(self) -> None:
        if not self._weights:
            return
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in self._weights:
                    local = local_tensor(param)
                    local.copy_(self._weights[name].to(local.device))


@contextlib.contextmanager
def discard_on_failure(work: Path, fresh: bool):
    """A fresh run that fails before its first checkpoint leaves no OUTPUT.partial behind: there is
    nothing in it to resume. (A resumed run's folder, or one with a checkpoint, stays for --resume.)"""
    from .resilience import CHECKPOINTS, latest_checkpoint

    try:
        yield
    except BaseException:
        if fresh and distributed.is_main() and latest_checkpoint(work / CHECKPOINTS) is None:
            shutil.rmtree(work, ignore_errors=True)
        raise


def check_settings(config: TrainConfig) -> None:
    """Refuse numeric settings no run can use, before anything is loaded or written (each would
    otherwise fail deep inside torch or the trainer, or quietly mean something else)."""
    def need(ok: bool, flag: str, value, rule: str) -> None:
        if not ok:
            raise EmbedtuneError(f"{flag} {value}: {rule}")

    check_finite(config)
    need(config.max_seq_length >= 1, "--max-seq-length", config.max_seq_length, "must be at least 1")
    need(config.epochs > 0, "--epochs", config.epochs, "must be positive")
    if config.max_steps is not None:
        need(config.max_steps >= 1, "--max-steps", config.max_steps, "must be at least 1")
    if config.lr is not None:
        need(config.lr > 0, "--lr", config.lr, "must be positive")
    if config.lora_r is not None:
        need(config.lora_r >= 1, "--lora-r", config.lora_r, "must be at least 1 (use --full for full fine-tuning)")
    if config.lora_alpha is not None:
        need(config.lora_alpha > 0, "lora_alpha", config.lora_alpha, "must be positive")
    need(config.evals_per_run >= 1, "--evals", config.evals_per_run, "must be at least 1 (use --no-eval to skip evaluation)")
    need(config.temperature > 0, "--temperature", config.temperature, "must be positive")
    need(TEMPERATURE_RANGE[0] <= config.temperature <= TEMPERATURE_RANGE[1], "--temperature", config.temperature,
         f"must be between {TEMPERATURE_RANGE[0]:g} and {TEMPERATURE_RANGE[1]:g}: the loss divides cosine "
         f"similarities by it, so below {TEMPERATURE_RANGE[0]:g} the scores reach "
         f"±{1 / TEMPERATURE_RANGE[0]:,.0f} and "
         f"the softmax saturates (gradients vanish or overflow), and above {TEMPERATURE_RANGE[1]:g} they all lie "
         f"within ±{1 / TEMPERATURE_RANGE[1]:g}, so the loss hardly depends on the embeddings (usual: 0.01-0.1)")
    need(0 <= config.warmup_ratio <= 1, "warmup_ratio", config.warmup_ratio, "must be between 0 and 1")
    need(config.weight_decay >= 0, "weight_decay", config.weight_decay, "must not be negative")
    need(config.logging_steps >= 1, "logging_steps", config.logging_steps, "must be at least 1")
    if config.save_every is not None:
        need(config.save_every >= 0, "--save-every", config.save_every, "must not be negative (0: off)")
    if config.token_budget is not None:
        need(config.token_budget >= 1, "--token-budget", config.token_budget, "must be at least 1")


def check_speed_options(config: TrainConfig) -> None:
    """Refuse --compile without the fast path, and --fsdp combinations it does not cover (it shards
    full fine-tuning over a torchrun launch)."""
    if config.compile and not config.fast:
        raise EmbedtuneError("--compile compiles the packed fast path: drop --no-fast")
    if config.cuda_graphs and not config.fast:
        raise EmbedtuneError("--cuda-graphs captures the packed fast path: drop --no-fast")
    if not config.fsdp:
        return
    if not distributed.launched():
        raise EmbedtuneError("--fsdp shards the model over several processes: launch with "
                             "`torchrun --nproc-per-node N -m embedtune train ...`")
    if config.lora_r:
        raise EmbedtuneError("--fsdp is for full fine-tuning (add --full); LoRA runs fit with plain DDP")
    if config.gradient_checkpointing:
        raise EmbedtuneError("--fsdp with --gradient-checkpointing is not supported yet")
    if config.resume or config.save_every:
        raise EmbedtuneError("--fsdp runs keep no resumable checkpoints yet: drop --resume/--save-every")


def graph_step_for(trainer, config: TrainConfig):
    """The run's CUDA-graph step (`embedtune.graphs`), or why not (str); a one-line notice when the
    user asked for graphs (`--cuda-graphs`) and the run cannot have them."""
    from .graphs import GraphedStep, unsupported_reason

    reason = unsupported_reason(trainer.loss, trainer.model.device)
    if reason is None and trainer.args.fp16:
        reason = "fp16 training scales its loss on the host (use bf16)"
    if reason is not None:
        if config.cuda_graphs:
            logger.warning("embedtune: --cuda-graphs off: %s", reason)
        else:  # chosen automatically: the summary says why the run stayed eager
            logger.info("embedtune: CUDA graphs off: %s", reason)
        return reason
    return GraphedStep(trainer.loss, trainer.model.max_seq_length, dtype=torch.bfloat16 if trainer.args.bf16 else None)


def graph_summary(step) -> dict:
    """metrics.json's `cuda_graphs`: steps run each way and graphs captured, or why graphs were off."""
    if isinstance(step, str):
        return {"off": step}
    return {**step.counts, "shapes": step.shapes, "off": step.off_reason}


def unsharded_copy(st_model, config: TrainConfig):
    """After FSDP training: the full weights gathered (every rank takes part) into a fresh, unsharded
    SentenceTransformer on rank 0's CPU, ready to save; None on the other ranks."""
    from .sharding import full_state_dict

    weights = full_state_dict(st_model)
    if not distributed.is_main():
        return None
    model, tokenizer = FastModel.from_pretrained(config.model, max_seq_length=config.max_seq_length,
                                                 dtype=torch.float32, device="cpu", fast=config.fast)
    model.load_state_dict(weights, strict=True)
    copy = to_sentence_transformer(model, tokenizer, pooling=config.pooling)
    copy.prompts = dict(st_model.prompts or {})
    return copy


def build_loss(st_model, config: TrainConfig):
    """The run's contrastive loss: in-batch (and cross-rank) negatives plus any hard-negative columns."""
    from .losses import ContrastiveLoss

    dimension = getattr(st_model, "get_embedding_dimension", None) or st_model.get_sentence_embedding_dimension
    width = dimension()  # ST 6 renamed the method; 5.x has only the old name
    too_wide = [d for d in config.matryoshka_dims or () if width and d > width]
    if too_wide:
        raise EmbedtuneError(f"--matryoshka-dims {too_wide}: larger than the model's embedding size {width}")
    try:
        return ContrastiveLoss(st_model, temperature=config.temperature, symmetric=config.symmetric,
                               matryoshka_dims=config.matryoshka_dims, cached=config.cached_loss,
                               token_budget=config.token_budget)
    except ValueError as exc:
        raise EmbedtuneError(f"loss options: {exc}") from None


def choose_speed(config: TrainConfig, model, tokens_per_row: float, micro_steps: int):
    """The run's speed mode (`speed.choose`) from the planned steps and the model's size, with compiling
    switched on where chosen; returns (mode, compile cache folder or None, the model's fingerprint)."""
    from . import speed as speed_mode
    from .lora import unwrap_peft

    base = unwrap_peft(model)
    params = trainable = 0
    for p in base.parameters():
        params += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    fingerprint = speed_mode.model_fingerprint(base)
    cache_dir = compile_cache_dir()
    mode = speed_mode.choose(
        compile=config.compile, cuda_graphs=config.cuda_graphs, fast=config.fast,
        cuda=torch.cuda.is_available(), steps=micro_steps,
        step_s=speed_mode.step_seconds(tokens_per_row * config.batch_size, params, trainable, speed_mode.peak_flops()),
        layers=int(getattr(base.config, "num_hidden_layers", 0) or 0),
        cache_warm=speed_mode.cache_is_warm(cache_dir, fingerprint), processes=distributed.world_size(),
    )
    compile_cache = use_persistent_compile_cache() if mode.compile else None  # later runs reuse its code
    if config.fast:
        from .packing import set_compile

        set_compile(model, mode.compile)  # decided here, for the whole run (not "auto", as loaded)
    return mode, compile_cache, fingerprint


def train(data: str | None = None, config: TrainConfig | None = None, **kwargs) -> tuple[Any, dict]:
    """Fine-tune an embedding model on anchor/positive pairs; returns (SentenceTransformer, metrics)."""
    if config is None:
        config = TrainConfig(data=data, **kwargs)
    result = run(config)
    return result.model, result.metrics


def run(config: TrainConfig, progress=None) -> RunResult:
    """The recipe behind `train` and the CLI. Validates all input before writing anything."""
    from sentence_transformers import SentenceTransformerTrainingArguments

    from .resilience import (
        CheckpointClock, ResumableTrainer, checkpoint_step, prepare_work, resume_point, save_arguments, train_resumably,
    )

    started = time.time()
    phases = Phases()  # metrics.json's phases_s
    check_settings(config)
    check_speed_options(config)
    output = None
    if config.output_dir:
        output = resolve_output(config.output_dir, config.data)  # symlinks followed; data and cwd protected
        finished = recover_at_start(output, config.resume, config.overwrite) if distributed.is_main() else None
        if finished is not None:  # a sealed run, stopped while being moved into place: nothing to train
            return _finished_result(finished)
    loaded = load_pairs(config.data)
    phases.mark("read_data")
    output = check_target(output, config.overwrite) if output else None
    if config.pooling is not None and config.pooling not in POOLING_MODES:
        raise EmbedtuneError(f"--pooling {config.pooling!r} is not one of {', '.join(POOLING_MODES)}")
    if config.batch_size < 2:
        raise EmbedtuneError("--batch-size must be at least 2: in-batch negatives need company")
    check_report_to(config.report_to, has_output=output is not None)
    eval_size = 0 if not config.eval else config.eval_size
    train_ds, eval_ds = train_eval_split(loaded.dataset, eval_size, seed=config.seed)
    if len(train_ds) < config.batch_size:
        raise EmbedtuneError(
            f"{config.data}: {len(train_ds)} training pairs, fewer than one batch of {config.batch_size}"
        )
    batches = check_batches(config, train_ds)  # no-silent-success: zero usable batches is an error, fewer a warning
    resumable = output is not None and not config.fsdp  # FSDP runs keep no resumable checkpoints (yet)
    work = Path(f"{output}.partial") if output else Path(os.environ.get("TMPDIR", "/tmp")) / f"embedtune-{os.getpid()}"
    resume_from = resume_point(work, config, resumable=resumable)  # checked before any loading
    distributed.init_if_launched()  # under torchrun: join the process group before evaluating

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
    query_prompt, document_prompt = st_model.prompts.get("query"), st_model.prompts.get("document")
    loss = build_loss(st_model, config)  # its option errors come before any evaluation or folder
    max_seq_length = st_model.max_seq_length  # what the model really uses (capped by its position table)

    evaluator, task, base_metrics = None, None, {}
    if eval_ds is not None:
        task = pairs_to_ir_task(eval_ds, corpus_texts=column(loaded.dataset, "positive"))
        big = len(task.queries) + len(task.corpus) >= ENCODE_BAR_MIN_TEXTS  # bars during training only if slow
        evaluator = shared_ir_evaluator(task, name=EVAL_NAME, query_prompt=query_prompt, document_prompt=document_prompt,
                                 show_progress=big)
        base_metrics = evaluate_model(st_model, task, query_prompt=query_prompt, document_prompt=document_prompt,
                                      show_progress=True)
        phases.mark("base_eval")

    accumulation = int(config.extra.get("gradient_accumulation_steps", 1))
    rows_per_step = config.batch_size * accumulation * distributed.world_size()  # one optimizer step's rows
    steps_per_epoch = max(1, len(train_ds) // rows_per_step)
    total_steps = config.max_steps or max(1, math.ceil(steps_per_epoch * config.epochs))
    eval_steps = max(1, math.ceil(total_steps / max(1, config.evals_per_run)))
    columns = [c for c in train_ds.column_names if c == "anchor" or c == "positive" or c.startswith("negative_")]
    tokens_per_row = _tokens_per_row(tokenizer, train_ds, columns, max_seq_length)
    speed, compile_cache, fingerprint = choose_speed(config, model, tokens_per_row,
                                                     micro_steps=total_steps * accumulation)
    phases.mark("plan")
    with discard_on_failure(work, fresh=resume_from is None):
        if distributed.is_main():  # only rank 0 writes; the others wait until the work folder exists
            prepare_work(work, config, resume_from, resumable=resumable)
        distributed.barrier()
        phases.mark("prepare_work")

        column_prompts = {c: (query_prompt if c == "anchor" else document_prompt) for c in columns}
        column_prompts = {c: p for c, p in column_prompts.items() if p}
        arguments = dict(
            output_dir=str(work / "checkpoints"),
            num_train_epochs=config.epochs,
            max_steps=config.max_steps or -1,
            per_device_train_batch_size=config.batch_size,
            per_device_eval_batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=math.ceil(config.warmup_ratio * total_steps),
            weight_decay=config.weight_decay,
            optim=_optimizer_name(),
            batch_sampler=no_duplicates_sampler(),
            eval_strategy="steps" if evaluator else "no",
            eval_steps=eval_steps,
            **save_arguments(config.save_every, resumable=resumable),
            logging_steps=config.logging_steps,
            **report_arguments(config.report_to, work, output.name if output else None,
                               SentenceTransformerTrainingArguments),
            seed=config.seed,
            max_grad_norm=1.0,
            # The trainer's NaN filter reads every loss on the host (a wait for the GPU per step); a
            # non-finite loss stops the run anyway (`resilience.ResumableTrainer.training_step`).
            logging_nan_inf_filter=False,
            dataloader_drop_last=True,
            dataloader_pin_memory=torch.cuda.is_available(),
            accelerator_config={"non_blocking": True},  # pinned batches go to the GPU without the host waiting
            prompts=column_prompts or None,
            **_precision_flags(dtype),
            ddp_broadcast_buffers=False,  # encoder buffers (position ids) are constants: skip a sync per forward
            # The same parameters take part in every step: DDP learns them on the first step instead of
            # searching the autograd graph for unused ones every step (the trainer's default for ST models).
            ddp_static_graph=True,
            # On CPU, accelerate treats a torchrun launch as distributed (DDP over gloo) only when told to use the CPU.
            use_cpu=distributed.launched() and not torch.cuda.is_available(),
        )
        arguments.update(config.extra)  # extra training arguments win over the recipe's own
        args = SentenceTransformerTrainingArguments(**arguments)
        if config.fsdp:
            from .sharding import shard_model

            if torch.cuda.is_available():
                st_model.to(torch.device("cuda", torch.cuda.current_device()))
            shard_model(st_model, param_dtype=torch.bfloat16 if args.bf16 else None)
        st_model.model_card_data.generate_widget_examples = False  # it encodes samples: slow, and not ours to show
        best = BestWeights(st_model, f"eval_{metric_key(EVAL_NAME)}")
        trainer = ResumableTrainer(  # checkpoints of the trainable weights; stops on a NaN/inf loss
            model=st_model,
            args=args,
            train_dataset=train_ds.select_columns(columns),
            loss=loss,
            evaluator=evaluator,
            callbacks=[best.callback] if evaluator else None,
        )
        phases.mark("trainer")
        graphs = graph_step_for(trainer, config) if speed.cuda_graphs else None
        if graphs is not None and not isinstance(graphs, str):
            trainer.graph_step = graphs
        rows_needed = total_steps * rows_per_step  # what the run will read
        token_cache = install_token_cache(trainer, st_model, train_ds.select_columns(columns), column_prompts,
                                          rows_needed=rows_needed, background=st_model.device.type == "cuda")
        phases.mark("token_cache")
        if config.report_to == "tensorboard":
            point_tensorboard(trainer, work)
        attach_tokens_per_second(trainer, tokens_per_row * rows_per_step)
        readable_logs(trainer)
        checks = RunChecks(st_model)  # no-silent-success: fingerprints the weights training starts from
        trainer.add_callback(phases.first_step_callback())
        phases.mark("checks")
        train_started = time.time()
        try:
            train_resumably(trainer, best if evaluator else None, resume_from, resumable=resumable,
                            clock=CheckpointClock(check_every=config.logging_steps) if config.save_every is None else None)
        finally:
            if token_cache is not None:
                token_cache.stop()  # a background fill still running is of no use now
        train_time = time.time() - train_started
        phases.mark("train")  # from the first step on (the trainer's set-up before it is trainer_setup)
        if compile_cache is not None:  # later runs of this model find its compiled code (`speed.cache_is_warm`)
            mark_cache_warm(compile_cache, fingerprint)
        best.restore()
        final_metrics = summarize(best.best_metrics) if evaluator else {}
        if config.fsdp:
            st_model = unsharded_copy(st_model, config)  # rank 0: the full model; other ranks: None
        else:
            distributed.check_in_sync(st_model)

        state = trainer.state
        first_step = checkpoint_step(resume_from) if resume_from is not None else 0  # steps before this process
        rows_seen = (state.global_step - first_step) * rows_per_step  # drop_last: full batches
        tokens = int(tokens_per_row * rows_seen)
        this_run = [entry for entry in state.log_history if entry.get("step", 0) > first_step]
        metrics = {
            "base": base_metrics,
            "final": final_metrics,
            "train_time_s": round(train_time, 2),
            "total_time_s": round(time.time() - started, 2),
            "steps": state.global_step,
            "train_pairs": len(train_ds),
            "eval_pairs": len(eval_ds) if eval_ds is not None else 0,
            "skipped_rows": loaded.skipped,
        "skipped_rows_few_negatives": loaded.skipped_few_negatives,
        "skipped_summary": loaded.skipped_summary(),
            "resumed_from_step": first_step or None,
            "tokens_per_s": _tokens_per_second(tokens, train_time, this_run),
            "compile": {"time_s": round(compile_seconds(), 2), "cache": compile_cache} if compile_cache else None,
            "cuda_graphs": graph_summary(graphs) if graphs is not None else None,
            "speed": speed.as_dict(),
            "best_step": best.best_step,
            "token_cache": token_cache.summary() if token_cache else None,
            "world_size": distributed.world_size(),
            "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if torch.cuda.is_available() else None,
            "history": state.log_history,
            "config": resolved_config(  # what config.yaml holds: replays this run with --config
                config, lr=config.learning_rate, lora_alpha=config.lora_alpha or config.lora_r,
                max_seq_length=max_seq_length,
                eval_size=len(eval_ds) if eval_ds is not None else (0 if config.eval else config.eval_size),
            ),
        }
        checks.report(metrics, state, first_step, total_steps, batches, loaded)  # no-silent-success: "warnings"
    result_dir = None
    if not distributed.is_main():
        pass  # rank 0 saves; under DDP the model in memory here is the same
    elif output is not None:
        result_dir = _finish_output(st_model, metrics, work, output, config.overwrite, phases)
    else:
        shutil.rmtree(work, ignore_errors=True)
    distributed.barrier()
    return RunResult(st_model, metrics, result_dir)


def _finish_output(st_model, metrics: dict, work: Path, output: Path, overwrite: bool,
                   phases: Phases | None = None) -> Path:
    """Assemble model/, adapter/, metrics.json, config.yaml and the curves in the work folder, beside
    its checkpoints; seal it; then move it into place (`run_folder`): a kill at any point leaves the
    previous result, or a run that `--resume` finishes (from its checkpoints, or sealed: moved only).
    The curves are drawn in a thread while this one writes the tensors."""
    from concurrent.futures import ThreadPoolExecutor

    from .plots import plot_curves

    if phases is not None:
        phases.mark("wrap_up")  # the best weights restored, the run's checks and metrics
    for leftover in ("adapter", "model"):  # written by a finish that was killed before its seal
        shutil.rmtree(work / leftover, ignore_errors=True)
    with ThreadPoolExecutor(1, thread_name_prefix="embedtune-plot") as pool:
        plot = pool.submit(plot_curves, metrics["history"], work / "training_curves.png",
                           metric=f"eval_{metric_key(EVAL_NAME)}", base=metrics["base"].get("ndcg@10"))
        lora = bool(metrics["config"].get("lora_r"))
        if lora:  # before save_merged merges it away: `embedtune export --to adapter` needs it
            save_adapter(st_model, work / "adapter")
        model_dir = save_merged(st_model, work / "model")
        if phases is not None:
            phases.mark("save_model")
            metrics["phases_s"] = dict(phases.seconds)  # up to here; sealing and moving the folder follow
        metrics["artifacts"] = {
            "model": str(output / "model"),
            "metrics": str(output / "metrics.json"),
            "plot": str(output / "training_curves.png"),
            "config": str(output / CONFIG_NAME),
        }
        if lora:
            metrics["artifacts"]["adapter"] = str(output / "adapter")
        if (work / TENSORBOARD_DIR).is_dir():
            metrics["artifacts"]["tensorboard"] = str(output / TENSORBOARD_DIR)
        write_config_yaml(metrics["config"], work / CONFIG_NAME)
        (work / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        plot.result()
    assert model_dir.exists()
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise EmbedtuneError(f"{output}: appeared during the run; results left in {work}")
    seal_finished(work)
    return complete_finish(work, output)  # a crash here leaves the previous OUTPUT or the sealed new one


def _finished_result(output: Path) -> RunResult:
    """The result of a run whose finish was completed at start (`run_folder.recover_at_start`)."""
    from sentence_transformers import SentenceTransformer

    metrics = json.loads((output / "metrics.json").read_text(encoding="utf-8"))
    return RunResult(SentenceTransformer(str(output / "model"), device="cpu"), metrics, output)


# --------------------------------------------------------------------------------------------------
# No silent success: a run that cannot train is refused before anything is written, and a run that
# trained nothing (or less than planned) says so in its summary and metrics.json ("warnings").

# The InfoNCE temperature's sane range: the loss divides cosine similarities (in [-1, 1]) by it.
TEMPERATURE_RANGE = (1e-4, 100.0)
_FLOAT_FLAGS = {"epochs": "--epochs", "lr": "--lr", "temperature": "--temperature"}


def check_finite(config: TrainConfig) -> None:
    """Every float setting (fields and `extra` training arguments) must be a finite number: inf or NaN
    would pass the range checks or fail deep in the trainer (`--epochs inf`: an OverflowError)."""
    import dataclasses

    settings = [(_FLOAT_FLAGS.get(f.name, f.name), getattr(config, f.name)) for f in dataclasses.fields(config)]
    settings += list((config.extra or {}).items())
    for flag, value in settings:
        if isinstance(value, float) and not math.isfinite(value):
            raise EmbedtuneError(f"{flag} {value}: must be a finite number")


def _sampler_is_no_duplicates(config: TrainConfig) -> bool:
    choice = (config.extra or {}).get("batch_sampler")
    return choice is None or str(getattr(choice, "value", choice)) in ("no_duplicates", "no_duplicates_hashed")


def check_batches(config: TrainConfig, train_ds) -> dict | None:
    """The full batches the NO_DUPLICATES sampler will really yield (`data.sampler.plan_batches`):
    zero optimizer steps is an error naming the data and why; fewer batches than the row count
    promises is a one-line warning, also returned for metrics.json (`batches`, with its `warning`).
    None when the run uses another sampler."""
    from .data.sampler import fitting_batch_size, plan_batches

    if not _sampler_is_no_duplicates(config):
        return None
    extra = config.extra or {}
    batch_size = int(extra.get("per_device_train_batch_size", config.batch_size))
    per_step = int(extra.get("gradient_accumulation_steps", 1)) * distributed.world_size()  # batches per step
    columns = [c for c in train_ds.column_names if c == "anchor" or c == "positive" or c.startswith("negative_")]
    plan = plan_batches(train_ds, batch_size, seed=int(extra.get("seed", config.seed)), columns=columns)
    info = {**plan.as_dict(), "warning": None}
    if not plan.short:
        return info
    steps_per_epoch = plan.per_epoch // per_step
    if steps_per_epoch == 0:
        step = f" ({per_step} batches make one optimizer step)" if per_step > 1 and plan.per_epoch else ""
        smaller = fitting_batch_size(train_ds, batch_size, int(extra.get("seed", config.seed)), columns, per_step)
        fix = (f"remove the duplicate rows or lower --batch-size (to {smaller}, for one)" if smaller else
               "remove the duplicate rows (not even --batch-size 2 fills a batch)")
        raise EmbedtuneError(f"{config.data}: {plan.describe()}{step}: the run would train no step; {fix}")
    planned_per_epoch = max(1, len(train_ds) // (batch_size * per_step))  # as `run` plans
    planned = config.max_steps or max(1, math.ceil(planned_per_epoch * config.epochs))
    expected = min(planned, steps_per_epoch * math.ceil(planned / planned_per_epoch))
    line = f"{config.data}: {plan.describe()}"
    if plan.per_epoch > plan.per_pass:
        line += f"; the sampler repeats rows to make {plan.per_epoch} batches per epoch"
    if expected < planned:
        line += f"; the run trains about {expected} of {planned} planned steps"
    if distributed.is_main():  # one line, not one per rank
        logger.warning("embedtune: %s", line)
    info.update(warning=line, planned_steps=planned, expected_steps=expected)
    return info


def _digests(model) -> dict[str, tuple[float, float]]:
    """Per trainable parameter (this rank's shard under FSDP): its sum and sum of squares in float64,
    enough to tell whether training changed it without keeping a copy of the weights."""
    with torch.no_grad():
        names, sums = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                values = local_tensor(param).detach()
                names.append(name)  # reduced where the weights live, upcast on the fly, read back once
                sums.append(torch.stack([values.sum(dtype=torch.float64),
                                         torch.linalg.vector_norm(values, dtype=torch.float64) ** 2]))
        if not names:
            return {}
        table = torch.stack([s.to(sums[0].device) for s in sums]).cpu().tolist()
        return {name: (row[0], row[1]) for name, row in zip(names, table)}


def _lora_update_vanishes(model) -> bool | None:
    """True when every LoRA layer's update leaves its base weight exactly as it is once merged
    (W + delta == W: lora_B still zero, or too small for W's precision); None without LoRA layers."""
    found = False
    with torch.no_grad():
        for module in model.modules():
            delta_of = getattr(module, "get_delta_weight", None)
            adapters = getattr(module, "lora_A", None)
            if delta_of is None or adapters is None or not hasattr(module, "get_base_layer"):
                continue
            weight = module.get_base_layer().weight
            for name in getattr(module, "active_adapters", ()):
                if name in adapters:
                    found = True
                    if not torch.equal(weight, weight + delta_of(name).to(weight.dtype)):
                        return False
    return True if found else None


class RunChecks:
    """What a finished run may have hidden, for the summary and metrics.json's `warnings`: fewer steps
    than planned, a loss that never moved, gradients that were all zero (or never finite), weights
    that ended equal to the base model's. Made just before training (it fingerprints the weights)."""

    def __init__(self, st_model):
        self.model = st_model
        self.before = _digests(st_model)

    def unchanged(self) -> bool:
        """The trained model equals the one training started from (LoRA: its merged update is nil)."""
        after = _digests(self.model)
        lora = _lora_update_vanishes(self.model)
        if lora is None:
            return after == self.before
        return lora is True and all(after[n] == self.before.get(n) for n in after if "lora_" not in n)

    def warnings(self, history: list[dict], steps: int, first_step: int, planned: int,
                 batches: dict | None) -> list[str]:
        found = []
        if batches and batches.get("warning"):
            found.append(batches["warning"])
        if steps < planned and not (batches and batches.get("expected_steps") == steps):
            found.append(f"trained {steps} of the {planned} planned steps")
        logs = [entry for entry in history if entry.get("step", 0) > first_step]
        losses = [entry["loss"] for entry in logs if isinstance(entry.get("loss"), (int, float))]
        if len(losses) >= 2 and len(set(losses)) == 1:
            found.append(f"the training loss stayed exactly {losses[0]:.6g} over the run ({len(losses)} logged "
                         "values): the model learned nothing from the data")
        norms = [entry["grad_norm"] for entry in logs if isinstance(entry.get("grad_norm"), (int, float))]
        if norms and all(n == 0 for n in norms):
            found.append("the gradient norm was 0 at every logged step: no weight received a gradient")
        elif norms and not any(math.isfinite(n) for n in norms):
            found.append("the gradient norm was never finite at a logged step: every update was clipped from inf/NaN")
        if steps > first_step and self.unchanged():
            found.append("the fine-tuned weights equal the base model's (nothing training changed survives in the "
                         "saved model): the saved model is the base model, unchanged")
        return found

    def report(self, metrics: dict, state, first_step: int, planned: int, batches: dict | None, loaded) -> None:
        """Add `warnings` (one-line strings), `planned_steps`, `batches` and `rows_negatives_cut` to metrics;
        each warning is logged too."""
        warnings = self.warnings(state.log_history, state.global_step, first_step, planned, batches)
        for line in warnings[1 if batches and batches.get("warning") else 0:]:  # the batch line was logged up front
            if distributed.is_main():
                logger.warning("embedtune: %s", line)
        metrics.update(warnings=warnings, planned_steps=planned, batches=batches,
                       rows_negatives_cut=getattr(loaded, "cut_negatives", 0))
