"""The recipe (`embedtune.train.run`, what `embedtune train` runs) with and without `--cuda-graphs`, same
seed, data and settings, on a GPU: the graphed run must replay its steps (through the trainer's
step, gradient accumulation's scale included) and train as well as the plain one.

    python benchmarks/smoke_train_graphs_gpu.py --tokenizer .bench/tokenizer [--model bert-base]

Prints, per run: steps replayed, first and last logged loss, held-out nDCG@10, train time, and the
recipe's throughput: over the run, and the median of its later logging windows (its steady rate, to
hold against `bench_train_gpu.py`'s step at the same settings: what the trainer's loop costs).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from bench_train_gpu import build_model_dir


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--model", default="bert-base")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--logging-steps", type=int, default=10,
                        help="the recipe's tokens/s is windowed between logs: the later windows are its steady rate")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the host over the later half of the graphed run's steps (where it waits, what it runs)")
    parser.add_argument("--trace", action="store_true",
                        help="torch.profiler over 6 later steps of the graphed run: GPU busy time per step, top kernels")
    parser.add_argument("--only-graphs", action="store_true", help="skip the run without CUDA graphs")
    args = parser.parse_args()
    if args.profile:
        _profile_later_steps(args.steps)
    if args.trace:
        _trace_later_steps(args.steps)

    from embedtune.data.stdlib import build_stdlib_pairs, write_jsonl
    from embedtune.train import TrainConfig, run

    rows = []
    with tempfile.TemporaryDirectory() as root:
        path = build_model_dir(args.model, args.tokenizer, root)
        data = write_jsonl(build_stdlib_pairs(seed=0), os.path.join(root, "pairs.jsonl"))
        for graphs in (True,) if args.only_graphs else (False, True):
            config = TrainConfig(data=str(data), model=path, output_dir=os.path.join(root, f"out-{graphs}"),
                                 max_steps=args.steps, batch_size=args.batch, max_seq_length=args.max_seq_length,
                                 lora_r=None, eval_size=512, evals_per_run=1, compile=args.compile,
                                 cuda_graphs=graphs, logging_steps=args.logging_steps,
                                 extra={"gradient_accumulation_steps": args.accumulation})
            result = run(config)
            history = result.metrics["history"]
            losses = [h["loss"] for h in history if "loss" in h]
            windows = [h["tokens_per_s"] for h in history if "tokens_per_s" in h]
            later = sorted(windows[len(windows) // 2:])
            final = result.metrics["final"]
            rows.append({"cuda_graphs": graphs, "graphs": result.metrics.get("cuda_graphs"),
                         "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                         "ndcg@10": next((v for k, v in final.items() if "ndcg@10" in k), None),
                         "train_time_s": result.metrics["train_time_s"], "tokens_per_s": result.metrics["tokens_per_s"],
                         "windows_tokens_per_s": windows,
                         "steady_tokens_per_s": later[len(later) // 2] if later else None})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\ncard: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}  torch {torch.__version__}")
    for r in rows:
        print(f"cuda_graphs={r['cuda_graphs']!s:5s} loss {r['first_loss']} -> {r['last_loss']}  ndcg@10 {r['ndcg@10']}  "
              f"train {r['train_time_s']} s  tokens/s {r['tokens_per_s']} (later windows' median "
              f"{r['steady_tokens_per_s']})  graphs {r['graphs']}")


def _add_to_every_trainer(callback) -> None:
    """Every ResumableTrainer made in this process from now on gets `callback(trainer)` as a callback."""
    from embedtune.resilience import ResumableTrainer

    original = ResumableTrainer.__init__

    def init(self, *a, **kw):
        original(self, *a, **kw)
        self.add_callback(callback(self))

    ResumableTrainer.__init__ = init


def _profile_later_steps(steps: int) -> None:
    """Every ResumableTrainer of this process cProfiles its steps from steps/2 to the end, if it replays
    CUDA graphs, and prints the top functions by own time and by cumulative time."""
    import cProfile
    import pstats

    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        def __init__(self, trainer):
            self.trainer, self.profiler = trainer, None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.profiler is None and state.global_step == steps // 2 and self.trainer.graph_step is not None:
                self.profiler = cProfile.Profile()
                self.profiler.enable()

        def on_train_end(self, args, state, control, **kwargs):
            if self.profiler is not None:
                self.profiler.disable()
                print(f"\nhost profile of steps {steps // 2}-{steps} (graphed run):")
                for key in ("tottime", "cumulative"):
                    pstats.Stats(self.profiler).sort_stats(key).print_stats(22)
                self.profiler = None

    _add_to_every_trainer(Profile)


def _trace_later_steps(steps: int, count: int = 6) -> None:
    """Every graphed ResumableTrainer of this process traces `count` steps from 2/3 of the run with
    torch.profiler: wall and GPU-busy time per step, and the top CUDA kernels and CPU ops."""
    import time

    from transformers import TrainerCallback

    first = steps * 2 // 3

    class Trace(TrainerCallback):
        def __init__(self, trainer):
            self.trainer, self.prof, self.started = trainer, None, None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first and self.trainer.graph_step is not None:
                torch.cuda.synchronize()
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is not None and state.global_step == first + count:
                torch.cuda.synchronize()
                wall = time.perf_counter() - self.started
                self.prof.__exit__(None, None, None)
                from torch.autograd import DeviceType

                busy = sum(e.self_device_time_total for e in self.prof.events()
                           if e.device_type == DeviceType.CUDA) / 1e3  # ms: kernels and copies
                print(f"\ntrace of steps {first}-{first + count}: wall {wall / count * 1e3:.1f} ms/step, "
                      f"GPU kernel time {busy / count:.1f} ms/step")
                print(self.prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
                print(self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18,
                                                     max_name_column_width=60))
                self.prof = None

    _add_to_every_trainer(Trace)


if __name__ == "__main__":
    main()
