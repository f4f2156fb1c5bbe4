"""Which speed mode a run uses, and why: compiled layers and CUDA graphs by default where they pay.

A user judges a job from start to exit with the flags they did not set, so on a GPU the recipe picks
its fastest correct mode itself; `--compile`/`--no-compile` and `--cuda-graphs`/`--no-cuda-graphs`
overrule the choice. Both modes compute the same step as the eager packed path (tests/test_graphs.py,
tests/test_compile.py, benchmarks/check_graphs_gpu.py); they differ in what they cost up front:

- CUDA graphs: the first batch shape runs eagerly once and is captured at its second sight, later
  shapes are captured at their first (eagerly first with compiled layers); a run meets a few shapes,
  so graphs pay after a few dozen steps. Where the step cannot be captured (another
  loss, several processes, gradient checkpointing, ...) the run stays eager (`graphs.unsupported_reason`).
- Fused kernels (`kernels.fused_norm`, BERT-family layers not compiled): Triton builds them on their
  first use and keeps them in its on-disk cache; a cold build costs seconds (its launchers are
  compiled C), a cached one almost nothing. They save a small share of a replayed step, so with CUDA
  graphs they are on where that pays, or where the cache holds them (a marker written after a build,
  as for compiling). A run builds them ahead in a child process (`kernel_prebuild`), alongside its
  own imports and model load, and switches them on once it has ended, where they pay on a warm cache
  over the steps left (`speed_choice.choose_speed`). Without graphs
  the step is bound by host launches, to which the fused op's Python adds, so they stay off.
- Compiling the packed layers: one compile per run, 12-15 s cold on an H200 and about 3 s when torch's
  on-disk cache already holds this model's code (docs/BENCHMARKS.md). It saves a share of each step,
  so it pays when the planned steps earn the warm-up back, which the estimate below decides.

The estimate is deliberately plain: a step's time from its FLOPs at the eager packed path's measured
utilisation, the share of it that compiling saves, against the compile's cost. Its constants come from
H200 measurements (docs/BENCHMARKS.md) and lean towards eager when unsure: a wrong "compile" costs
the warm-up, a wrong "eager" a share of the step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# Micro-steps below which graphs cost more (one eager step and one capture per shape) than they save.
GRAPH_MIN_STEPS = 40
# Compile cost in seconds: cold (empty cache) per run plus per layer; warm (this model's code cached).
COMPILE_COLD_S, COMPILE_COLD_PER_LAYER_S, COMPILE_WARM_S = 12.0, 0.15, 4.0
# Share of a step that compiled layers save over the same step without them (H200, BERT-base and
# BERT-large, batch 128 x 512: 12-22% with CUDA graphs, more without).
COMPILE_GAIN = 0.12
# Fused kernels (dropout + residual + LayerNorm with the dense bias folded in, the q, k, v gradients'
# join): share of a BERT-family step they save (H200, BERT-base full, CUDA graphs, jobs of one machine:
# median 5-step windows of 492k real tokens/s with them against 426-429k without), and their build
# cost in seconds with Triton's cache cold and warm (H200: the first call in a fresh process 7.9 and 9.5 s
# cold against 5.6 and 6.2 s warm, imports included; docs/BENCHMARKS.md).
FUSED_NORM_GAIN = 0.12
FUSED_NORM_COLD_S, FUSED_NORM_WARM_S = 3.0, 0.3
# the build ahead's whole child process on an H200: 5.4-6.0 s alone, its calls in threads (check_prebuild_gpu.py;
# 6.0-7.4 s with the calls in turn); in jobs, beside the run's own start, it had ended 6.2-6.5 s after the
# start and was running at 4.6 s
FUSED_PREBUILD_S = 6.0
# Eager packed step's model FLOPs utilisation (BERT-base full on an H200: ~20%).
EAGER_MFU = 0.20
# Dense bf16 tensor-core FLOP/s by compute capability (major); the fallback is a modest card.
PEAK_FLOPS = {9: 989e12, 10: 2250e12, 8: 312e12, 7: 125e12}
FALLBACK_PEAK_FLOPS = 100e12


@dataclass(frozen=True)
class SpeedMode:
    """What a run uses and one line on why; metrics.json's `speed`."""

    compile: bool
    cuda_graphs: bool  # asked for; the graph step may still find the run unsupported (`graphs`)
    why: str
    fused_kernels: bool = False  # the fused norm kernels of BERT-family layers (`kernels.fused_norm`)

    def as_dict(self) -> dict:
        return asdict(self)


def step_seconds(tokens_per_step: float, params: int, trainable: int, peak_flops: float) -> float:
    """An eager packed step's time: 2 FLOPs per weight and token forward, 2 more backward for the
    activations' gradient, 2 more for the weights' where they train."""
    flops_per_token = 4 * params + 2 * trainable
    return tokens_per_step * flops_per_token / (EAGER_MFU * peak_flops)


def compile_seconds(layers: int, warm: bool) -> float:
    return COMPILE_WARM_S if warm else COMPILE_COLD_S + COMPILE_COLD_PER_LAYER_S * layers


def choose(*, compile: bool | None, cuda_graphs: bool | None, fast: bool, cuda: bool, steps: int,
           step_s: float, layers: int, cache_warm: bool, processes: int = 1, fused_kernels: bool | None = None,
           fused_applies: bool = False, fused_warm: bool = False, prebuilt: str | None = None) -> SpeedMode:
    """The run's mode. `compile`/`cuda_graphs`/`fused_kernels`: the user's choice, None for automatic.
    `steps`: the micro-steps planned; `step_s`: an eager step's estimated time (`step_seconds`). Runs
    over several processes stay eager unless asked: graphs do not capture the gradient exchange, and
    compiled layers under DDP/FSDP are not covered by the tests. `fused_applies`: the model's layers
    have the fused norm (BERT family on the fast path); `fused_warm`: Triton's cache holds it;
    `prebuilt`: how a build ahead of the run (`kernel_prebuild`) went, for the reason."""
    if not fast:
        if compile or cuda_graphs:
            raise ValueError("compile and CUDA graphs need the packed fast path")
        return SpeedMode(False, False, "the packed fast path is off (--no-fast)")
    reasons = []
    if cuda_graphs is None:
        graphs = cuda and processes == 1 and steps >= GRAPH_MIN_STEPS
        reasons.append("CUDA graphs: " + ("no CUDA device" if not cuda else
                                          f"{processes} processes" if processes > 1 else
                                          f"{steps} steps, at least {GRAPH_MIN_STEPS} pay for the captures"
                                          if graphs else f"{steps} steps, fewer than the {GRAPH_MIN_STEPS} "
                                          "that pay for the captures"))
    else:
        graphs = cuda_graphs
        reasons.append(f"CUDA graphs: {'--cuda-graphs' if graphs else '--no-cuda-graphs'}")
    if compile is None:
        cost = compile_seconds(layers, cache_warm)
        saved = COMPILE_GAIN * step_s * steps
        compiled = cuda and processes == 1 and saved > cost
        if not cuda:
            reasons.append("compile: no CUDA device")
        elif processes > 1:
            reasons.append(f"compile: {processes} processes (--compile compiles anyway)")
        else:
            cache = "warm" if cache_warm else "cold"
            reasons.append(f"compile: saves ~{saved:.0f} s over {steps} steps against ~{cost:.0f} s of "
                           f"warm-up ({cache} cache)")
    else:
        compiled = compile
        reasons.append(f"compile: {'--compile' if compile else '--no-compile'}")
    fused = False
    if fused_kernels is not None:
        fused = fused_kernels and fused_applies and cuda and not compiled
        reasons.append(f"fused norm: {'--fused-kernels' if fused_kernels else '--no-fused-kernels'}"
                       + (f" ({prebuilt})" if prebuilt and fused else "")
                       + ("" if fused or not fused_kernels else " (not used: " + (
                           "compiled layers fuse it themselves" if compiled else
                           "no CUDA device" if not cuda else "no such layers") + ")"))
    elif fused_applies and cuda and not compiled and not graphs:
        reasons.append("fused norm: without CUDA graphs its launches cost more host time than it saves")
    elif fused_applies and cuda and not compiled:
        cost = FUSED_NORM_WARM_S if fused_warm else FUSED_NORM_COLD_S
        saved = fused_norm_saving_s(step_s, steps)
        fused = saved > cost
        reasons.append(f"fused norm: saves ~{saved:.1f} s over {steps} steps against ~{cost:.1f} s of kernel "
                       f"builds ({'warm' if fused_warm else 'cold'} cache" + (f"; {prebuilt}" if prebuilt else "") + ")")
    return SpeedMode(bool(compiled), bool(graphs), "; ".join(reasons), bool(fused))


def fused_norm_saving_s(step_s: float, steps: int) -> float:
    """Seconds the fused norm saves a run of `steps` steps of `step_s` seconds."""
    return FUSED_NORM_GAIN * step_s * steps


def prebuild_wait_s(*, fused_kernels: bool | None, steps: int, step_s: float) -> float:
    """How long waiting for the kernels' build ahead (`kernel_prebuild`) can pay, for a run that would
    use them on a warm cache. Its alternative: building them here on a cold cache where the run would
    anyway (asked for with --fused-kernels, or saving more than a cold build costs), else going without
    them, which gives up what they save over the run less a warm cache's load."""
    saved = fused_norm_saving_s(step_s, steps)
    if fused_kernels or saved > FUSED_NORM_COLD_S:
        return FUSED_NORM_COLD_S - FUSED_NORM_WARM_S
    return max(0.0, saved - FUSED_NORM_WARM_S)


def triton_cache_dir() -> Path:
    """Where Triton keeps built kernels (its own default unless TRITON_CACHE_DIR says otherwise)."""
    import os

    return Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def fused_kernels_fingerprint(source: str) -> str:
    """The fused kernels' source and the card's compute capability: a build of other code or for
    another card does not count as cached."""
    import torch

    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)
    return hashlib.sha256(f"{source}|{capability}".encode()).hexdigest()[:16]


def fused_kernels_cached(fingerprint: str) -> bool:
    return cache_is_warm(triton_cache_dir(), "fused-" + fingerprint)


def mark_fused_kernels_built(fingerprint: str) -> None:
    mark_cache_warm(triton_cache_dir(), "fused-" + fingerprint)


def model_fingerprint(model) -> str:
    """What the compiled layer code depends on: torch, the GPU, the model's config, its weights' dtype
    and which of them train (LoRA's rank changes the count). Runs of the same fingerprint reuse each
    other's on-disk compile cache."""
    import torch

    config = getattr(model, "config", None)
    params = list(model.parameters())
    record = {"torch": torch.__version__, "config": config.to_dict() if config is not None else None,
              "dtype": str(params[0].dtype) if params else None,
              "trainable": sum(p.numel() for p in params if p.requires_grad), "params": sum(p.numel() for p in params),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for key in ("_name_or_path", "transformers_version", "name_or_path"):
        (record["config"] or {}).pop(key, None)
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _marker(cache_dir: str | Path, fingerprint: str) -> Path:
    return Path(cache_dir) / "embedtune-compiled" / fingerprint


def cache_is_warm(cache_dir: str | Path, fingerprint: str) -> bool:
    """True if a run of this fingerprint compiled into `cache_dir` (the marker is written after it did)."""
    return _marker(cache_dir, fingerprint).exists()


def mark_cache_warm(cache_dir: str | Path, fingerprint: str) -> None:
    marker = _marker(cache_dir, fingerprint)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:
        pass  # a read-only cache folder: later runs just estimate a cold compile


def peak_flops() -> float:
    import torch

    if not torch.cuda.is_available():
        return FALLBACK_PEAK_FLOPS
    major, _ = torch.cuda.get_device_capability()
    return PEAK_FLOPS.get(major, FALLBACK_PEAK_FLOPS)


class CompileWhenItPays:
    """`compile="auto"` where the planned steps are unknown (a SentenceTransformerTrainer over a
    `FastModel`, say; the recipe decides up front with `choose`). The layers run eagerly until the
    training time spent so far would have paid for the compile, then compiled: the ski-rental rule,
    which costs at most about twice the better choice whatever the run's length. Compiled at once
    where this model's code is already in the compile cache. Only training forwards on a GPU count.
    The switch is announced as a warning: no run summary of embedtune's reports this path's mode, and
    the warm-up pauses the trainer's progress bar for a while."""

    MAX_GAP_S = 5.0  # a longer pause between training forwards (evaluation, saving) is not step time

    def __init__(self, model):
        self.model = model  # the packed model (its config and weights make the fingerprint)
        self.on = False
        self.spent = 0.0
        self._last: float | None = None
        self._cost: float | None = None
        self._fingerprint: str | None = None
        self._marked = False

    def __call__(self, cuda: bool, training: bool) -> bool:
        """Whether this forward runs compiled."""
        if self.on or not (cuda and training):
            return self.on
        if self._cost is None:
            from .compile_cache import compile_cache_dir

            self._fingerprint = model_fingerprint(self.model)
            warm = cache_is_warm(compile_cache_dir(), self._fingerprint)
            self._cost = compile_seconds(int(getattr(self.model.config, "num_hidden_layers", 0) or 0), warm)
            if warm:
                return self._switch_on("this model's compiled code is cached")
        now = time.perf_counter()
        if self._last is not None:
            self.spent += min(now - self._last, self.MAX_GAP_S)
        self._last = now
        if COMPILE_GAIN * self.spent >= self._cost:
            return self._switch_on(f"{self.spent:.0f} s of training would have paid for it")
        return False

    def _switch_on(self, why: str) -> bool:
        from .compile_cache import use_persistent_compile_cache

        use_persistent_compile_cache()
        logger.warning("embedtune: compiling the packed layers now, a warm-up of about %.0f s (%s); "
                       "FastModel.from_pretrained(..., compile=False) keeps them eager", self._cost, why)
        self.on = True
        return True

    def compiled(self) -> None:
        """After the first compiled forward: later runs of this model find its code cached."""
        if not self._marked and self._fingerprint is not None:
            from .compile_cache import compile_cache_dir

            mark_cache_warm(compile_cache_dir(), self._fingerprint)
            self._marked = True
