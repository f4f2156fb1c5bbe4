"""A training step's forward, loss and backward replayed as one CUDA graph per batch shape.

Why: on the packed path a BERT-base step is bound by the host, not the GPU. An H200 was busy 45-62%
of each step (docs/BENCHMARKS.md), waiting on Python to launch ~1,300-1,600 kernels one by one; a
captured graph launches them all with one call. Capture needs fixed shapes and no host sync, so:

- every column is padded to the model's max_seq_length and all columns go through one forward, as
  `ContrastiveLoss` does on the packed path;
- the packed stream is padded to a multiple of `token_multiple` tokens and its plan is built on the
  device (`PackedOptions.fixed_stream`, held by the packed forwards for the step), so a run sees a handful of shapes (a new shape costs one eager step
  and one capture; padding costs every step, so the multiple is finer than the packed path's size
  classes: 3% padding on the stdlib pairs against 5%);
- gradients accumulate into buffers that outlive the graph, re-attached to the parameters before each
  replay (the trainer may have set them to None).

The first batch shape runs eagerly the first time it is seen (CUDA's libraries, kernels, cuBLAS
workspaces and Triton builds load outside capture), is captured the second time and replayed from then
on. Once a capture has succeeded, a new shape is captured at its first sight, which saves an eager
step per shape; with compiled layers a new shape still runs eagerly first (a compile for a new size
cannot run inside a capture: capturing at first sight failed on an H200 with compiled layers), and a
first-sight capture that fails falls back to that order for the rest of the run. All graphs share one
memory pool: it holds one step's activations. Anything capture cannot take (a host sync somewhere in
a model or loss) turns graphs off for the run with a one-line notice; the step then runs eagerly.
(torch 2.11 does not always clean up after a failed capture: one that failed mid-compile left later
eager steps unable to run; then the step stops with an error that says so. Warming each shape up
eagerly first is what keeps captures from failing.)
The step reads its batch on the host (a device copy of the masks costs one sync per step) to pick
the shape before any work is queued; `prepare` does that host work apart, so a data loader (or a
benchmark, outside its timed window) can do it ahead of the step.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from .checkpointing import blocks_graphs
from .distributed import world_size
from .errors import EmbedtuneError
from .packing import PackedForward, main_grad

logger = logging.getLogger(__name__)

# Packed forwards whose plan comes from `PackedBatch.for_forward` and whose attention is one device
# op: nothing in their step needs the host. (MPNet and DeBERTa build bias grids on the host.)
GRAPH_ARCHS = {"bert", "roberta", "xlm-roberta", "electra", "distilbert", "modernbert", "qwen2", "qwen3", "llama",
               "mistral", "gemma3_text"}
TOKEN_MULTIPLE = 1024  # packed streams are padded to a multiple of this many tokens


def unsupported_reason(loss, device: torch.device, checkpointing: bool = True) -> str | None:
    """Why this loss's steps cannot run as CUDA graphs, or None if they can. `checkpointing=False`
    leaves gradient checkpointing to the caller (`checkpointing.skip_for_run` may settle it)."""
    from .losses import ContrastiveLoss

    if device.type != "cuda":
        return "the model is not on a CUDA device"
    if not isinstance(loss, ContrastiveLoss):
        return f"the loss is {type(loss).__name__}, not embedtune's ContrastiveLoss"
    if loss.cached:
        return "the cached loss runs its own backward in chunks"
    if world_size() > 1:
        return "training spans several processes (their gradient exchange is not captured)"
    packed = [m for m in loss.model.modules() if isinstance(m.__dict__.get("forward"), PackedForward)]
    if not packed:
        return "the model does not run the packed fast path"
    model_type = packed[0].config.model_type
    if model_type not in GRAPH_ARCHS:
        return f"the packed forward of {model_type} builds its plans on the host"
    if checkpointing and blocks_graphs(loss.model):
        return "gradient checkpointing is on"
    if loss.runs_sharded:
        return "the model is sharded (FSDP)"
    return None


def _packed_forwards(model) -> list:
    return [m.__dict__["forward"] for m in model.modules() if isinstance(m.__dict__.get("forward"), PackedForward)]


@contextlib.contextmanager
def _fixed_stream_on(forwards: list, stream: int):
    """Inside this block the packed forwards run fixed-length streams of `stream` tokens: each holds it
    (`PackedForward.fixed_stream`) and passes it down in its `PackedOptions`."""
    for forward in forwards:
        forward.fixed_stream = stream
    try:
        yield
    finally:
        for forward in forwards:
            forward.fixed_stream = None


@contextlib.contextmanager
def _fresh_leaf_streams():
    """Let autograd send gradients of parameters whose accumulation node was made on another stream
    (an earlier step's, kept alive by something else) to the capturing stream, instead of making that
    stream wait on one outside the capture, which breaks it. Where torch lacks the switch, capture goes
    on without it."""
    getter = getattr(torch._C, "_override_stale_capture_stream", None)
    setter = getattr(torch._C, "_set_override_stale_capture_stream", None)
    if getter is None or setter is None:
        yield
        return
    before = getter()
    setter(True)
    try:
        yield
    finally:
        setter(before)


_UNSEEN = object()


def train_mode(model: torch.nn.Module, modules: list[torch.nn.Module]) -> None:
    """Put every module of `model` in train mode, as the trainer's own step does (`model.train()`), but
    skip that walk through every module (1-3 ms a step on LoRA models) when all of `modules` (the
    model's, listed once) already train. The model's own flag alone says nothing about its modules:
    `from_pretrained` leaves an encoder in eval mode inside a wrapper whose flag says training."""
    if not all(m.training for m in modules):
        model.train()


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


@dataclass
class StaticBatch:
    """A step's columns made static on the host (`GraphedStep.prepare`): merged and padded to the
    fixed width, with each column's row count and the packed stream's length."""

    inputs: dict[str, Any]
    rows: tuple[int, ...]
    stream: int


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, Tensor]  # static device buffers, refilled before each replay
    loss: Tensor  # written by each replay


class GraphedStep:
    """`step(features, scale)`: forward, loss and `(loss * scale).backward()` for one batch of columns
    (a list of tokenized batches, as sentence-transformers hands a loss); gradients accumulate into
    the parameters' `.grad` as in eager mode. Returns the loss, detached and unscaled.

    Args:
        loss: an embedtune `ContrastiveLoss` (uncached) whose model runs the packed fast path.
        max_seq_length: columns are padded to this width (wider batches get a graph of their width).
        dtype: autocast dtype (bf16 or fp16 without a grad scaler), or None for no autocast.
        main_grads: run fp32 linears through `packing.main_grad` (off: autocast's own casts; a benchmark A/B).
    """

    def __init__(self, loss, max_seq_length: int, dtype: torch.dtype | None = torch.bfloat16,
                 token_multiple: int = TOKEN_MULTIPLE, main_grads: bool = True):
        self.loss = loss
        self.width = int(max_seq_length)
        self.dtype = dtype
        self.token_multiple = token_multiple
        self.params = [p for p in loss.parameters() if p.requires_grad]
        self._modules = list(loss.modules())  # their train/eval flags are part of each graph's key
        self._packed = _packed_forwards(loss.model)
        # fp32 weights under half-precision autocast: their casts once a step, gradients into .grad by the GEMMs
        self._shadows = main_grad.Shadows(dtype) if main_grads and dtype in (torch.bfloat16, torch.float16) else None
        self._grads: list[Tensor] | None = None
        self._graphs: dict[tuple, _Graph | None] = {}  # None: seen once, ran eagerly
        self._kernels = tuple(bool(f.fused_kernels) for f in self._packed)  # which the graphs were captured with
        self._pool = None
        self._stream: torch.cuda.Stream | None = None
        self._scale: Tensor | None = None
        self.off_reason: str | None = None
        self.counts = {"eager": 0, "captured": 0, "replayed": 0}  # steps run each way (a capture is replayed too)
        self.warmup_s = 0.0  # host seconds of the steps that met a new shape (eager first sights and captures)
        self.first_sight_captures = True  # off after one fails: new shapes then run eagerly before their capture
        # set while the layers' kernels may still change (the recipe's fused norm, built ahead): steps run
        # eagerly in their static form, and capture starts once the kernels are settled
        self.hold_captures = False
        self.last: str | None = None  # how the last step ran: "eager", "captured" or "replayed"

    @property
    def shapes(self) -> int:
        """Graphs captured so far."""
        return sum(g is not None for g in self._graphs.values())

    def prepare(self, features: list[dict[str, Any]]) -> StaticBatch | list[dict[str, Any]]:
        """The host work of a step, done apart: the columns as a `StaticBatch`, or the columns as they
        are when they cannot be made static (they then run eagerly). Pass the result to the step."""
        return self._batch(features) or features

    def __call__(self, features: list[dict[str, Any]] | StaticBatch, scale: float = 1.0) -> Tensor:
        self.last = None
        if isinstance(features, StaticBatch):
            batch = features
        else:
            batch = None if self.off_reason else self._batch(features)
        if batch is None:
            return self._eager(features, None, scale)
        inputs, rows, stream = batch.inputs, batch.rows, batch.stream
        if self.off_reason:  # a batch prepared before graphs went off runs eagerly as it is
            return self._eager(inputs, (rows, stream), scale)
        # A graph replays the modes it was captured in (dropout on or off in every module) and the kernels
        # it was captured with, so both belong in its key like the shapes do.
        self._drop_other_kernels()
        if self.hold_captures:  # kernels about to change: their graphs would be captured twice
            return self._eager(inputs, (rows, stream), scale)
        key = (tuple((k, tuple(v.shape), v.dtype) if isinstance(v, Tensor) else (k, repr(v))
                     for k, v in inputs.items()), rows, stream, tuple(m.training for m in self._modules),
               self._kernels)
        entry = self._graphs.get(key, _UNSEEN)
        if entry is _UNSEEN and not self._captures_at_first_sight():
            # First sight of a shape: run it eagerly, so that whatever it sets up the first time
            # (CUDA's libraries, a compile for a new size, Triton builds, cuBLAS workspaces) happens
            # outside capture.
            self._graphs[key] = None
            started = time.perf_counter()
            loss = self._eager(inputs, (rows, stream), scale)
            self.warmup_s += time.perf_counter() - started
            return loss
        captured = entry is None or entry is _UNSEEN
        started = time.perf_counter() if captured else None
        if captured:
            first_sight = entry is _UNSEEN
            entry, error = self._capture(inputs, rows, stream)
            if entry is None:
                return self._after_failed_capture(key, inputs, (rows, stream), scale, error, first_sight, started)
            self._graphs[key] = entry
        for name, value in inputs.items():
            if isinstance(value, Tensor):
                entry.inputs[name].copy_(value, non_blocking=True)
        self._scale.fill_(scale)
        self._attach_grads()
        entry.graph.replay()
        if started is not None:
            self.warmup_s += time.perf_counter() - started
        self.counts["replayed"] += 1
        self.last = "captured" if captured else "replayed"
        return entry.loss.clone()

    def _captures_at_first_sight(self) -> bool:
        """Whether a new shape may be captured without an eager run first: once a capture with the
        layers' current kernels has worked (everything a step loads on first use is loaded), unless a
        layer compiles (a new size would compile inside the capture) or such a capture failed before."""
        return self.first_sight_captures and self.shapes > 0 and not any(f.compile for f in self._packed)

    def _drop_other_kernels(self) -> None:
        """Forget the graphs captured with other kernels than the layers use now (the recipe switches
        the fused norm on once its build ahead is done, `speed_choice.choose_speed`): they would replay
        the old ones, and they hold their buffers. Their memory pool goes with them (torch frees a pool
        no graph uses, and a capture into a freed pool fails), and the shapes run eagerly once with the
        new kernels (their first use in this process loads them) before they are captured again."""
        kernels = tuple(bool(f.fused_kernels) for f in self._packed)
        if kernels != self._kernels:
            self._graphs, self._pool, self._kernels = {}, None, kernels

    def _after_failed_capture(self, key, inputs, static, scale, error, first_sight, started) -> Tensor:
        """A shape's capture failed. At its first sight: run it eagerly, as a warm-up, and let every new
        shape from now on do so before its capture. At its second: CUDA graphs off for the run."""
        if first_sight:
            self.first_sight_captures = False
            self._graphs[key] = None
            logger.info("embedtune: a new batch shape's capture failed (%s); new shapes now run eagerly once "
                        "before their capture", error)
        else:
            self.off_reason = error
            logger.warning("embedtune: CUDA graphs off for this run, capture failed (%s); steps run eagerly", error)
        try:
            loss = self._eager(inputs, static, scale)
        except RuntimeError as exc:  # torch did not clean up after the failed capture
            raise EmbedtuneError(f"a CUDA graph capture failed ({error}) and left torch unable to run the "
                                 f"step eagerly ({exc}); rerun (or --resume) without --cuda-graphs") from exc
        self.warmup_s += time.perf_counter() - started
        return loss

    # -- the batch, made static

    def _batch(self, features: list[dict[str, Any]]) -> StaticBatch | None:
        """All columns as one batch padded to the fixed width, on the host, with each column's row count
        and the packed stream's length (the real token count rounded up to `token_multiple`); None if the
        columns do not merge (then the step runs eagerly)."""
        from .losses import padding_side

        host = [{k: v.cpu() if isinstance(v, Tensor) else v for k, v in f.items()} for f in features]
        merged = self.loss.merged_columns(host)
        if merged is None:
            return None
        batch, rows = merged
        mask = batch["attention_mask"]
        width = max(self.width, mask.shape[1])
        extra = width - mask.shape[1]
        if extra:
            left = padding_side(mask) == "left"
            batch = {k: F.pad(v, (extra, 0) if left else (0, extra)) if isinstance(v, Tensor) and v.shape == mask.shape
                     else v for k, v in batch.items()}
        tokens = max(int(batch["attention_mask"].sum()), 1)
        if self._device().type == "cuda":  # page-locked, so the copy into the graph's buffers is a plain DMA
            batch = {k: v.pin_memory() if isinstance(v, Tensor) else v for k, v in batch.items()}
        return StaticBatch(batch, tuple(rows), -(-tokens // self.token_multiple) * self.token_multiple)

    # -- running it

    def _forward_backward(self, inputs: dict[str, Any], rows: tuple[int, ...], stream: int, scale) -> Tensor:
        with self._autocast(), _fixed_stream_on(self._packed, stream), self._main_grads():
            embeddings = self.loss.model(dict(inputs))["sentence_embedding"]
            loss = self.loss.loss_from_embeddings(list(embeddings.split(list(rows))))
        (loss * scale).backward()
        return loss.detach()

    def _eager(self, inputs: list | dict, static: tuple | None, scale: float) -> Tensor:
        """One step without a graph: on the capture stream for a batch made static (its first sight
        warms up what capture will need), else the loss as it is."""
        self.counts["eager"] += 1
        self.last = "eager"
        device = self._device()
        if static is None:
            inputs = [_to_device(f, device) for f in inputs]
            with self._autocast():
                loss = self.loss(inputs)
            (loss * scale).backward()
            return loss.detach()
        stream = self._capture_stream()
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            loss = self._forward_backward(_to_device(inputs, device), *static, scale)
        torch.cuda.current_stream(device).wait_stream(stream)
        return loss

    def _capture(self, inputs: dict[str, Any], rows: tuple[int, ...], stream: int) -> tuple[_Graph | None, str | None]:
        device = self._device()
        static = _to_device(inputs, device)
        if self._scale is None:
            self._scale = torch.ones((), device=device)
        self._attach_grads()
        graph = torch.cuda.CUDAGraph()
        capture = self._capture_stream()
        # What torch.cuda.graph does, less its device-wide drain and the freeing of both memory caches
        # (cached device blocks and pinned host buffers would only be allocated again): the capture
        # stream waits for the work queued before it, and nothing in a capture runs until its replay.
        capture.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(capture), _fresh_leaf_streams():
                graph.capture_begin(pool=self._pool)
                try:
                    loss = self._forward_backward(static, rows, stream, self._scale)
                finally:
                    graph.capture_end()
        except Exception as exc:  # noqa: BLE001 - any failure to capture means: run eagerly
            while exc.__context__ is not None:  # the first error, not capture_end's complaint about it
                exc = exc.__context__
            torch.cuda.synchronize(device)
            return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if self._pool is None:
            self._pool = graph.pool()
        self.counts["captured"] += 1
        return _Graph(graph, static, loss), None

    def _attach_grads(self) -> None:
        """Point every parameter's `.grad` at its static buffer (what the graphs write into), keeping
        what the buffer should hold: zeros after the trainer set grads to None, else their values."""
        if self._grads is None:
            self._grads = [torch.zeros_like(p) for p in self.params]
        zero, copy_to, copy_from = [], [], []
        for p, g in zip(self.params, self._grads):
            if p.grad is None:
                zero.append(g)
            elif p.grad is not g:
                copy_to.append(g)
                copy_from.append(p.grad)
            p.grad = g
        if zero:
            torch._foreach_zero_(zero)
        if copy_to:
            torch._foreach_copy_(copy_to, copy_from)

    def _main_grads(self):
        """The layers' weights in the compute dtype, copied from the fp32 weights as the step starts
        (`packing.main_grad`: this step owns its gradients, in one process)."""
        if self._shadows is None:
            return contextlib.nullcontext()
        self._shadows.refresh()
        return main_grad.active(self._shadows)

    def _autocast(self):
        # no weight-cast cache: casts made outside a capture must not stand in for casts inside it
        return torch.autocast("cuda", dtype=self.dtype or torch.float32, enabled=self.dtype is not None,
                              cache_enabled=False)

    def _device(self) -> torch.device:
        return self.params[0].device

    def _capture_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self._device())
        return self._stream
