"""Where a job's first training step goes (its one-time set-up: CUDA libraries, kernels, buffers), on
the host: `embedtune train` run in this process with default flags, its first step under cProfile,
and the wall seconds of its first steps (each ended by a device sync). With `--outside-steps`, the
profile covers the job's fixed cost instead: everything the run does from the CLI's entry to its
return (set-up, the last step's checkpoint, the save) except the training steps themselves.

    PYTHONPATH=src python3 benchmarks/profile_first_step_gpu.py bert-base --tokenizer .bench/tokenizer
Writes $OUT/first_step.prof (or outside_steps.prof) and prints the heaviest calls, then the step times.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", default="bert-base", nargs="?")
    parser.add_argument("--tokenizer", default=".bench/tokenizer")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--top", type=int, default=45)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--outside-steps", action="store_true",
                        help="profile the whole run but its steps (the job's fixed cost), not the first step")
    args = parser.parse_args()

    sys.path.insert(0, HERE)
    from bench_train_gpu import build_model_dir

    from embedtune.data.stdlib import build_stdlib_pairs

    root = tempfile.mkdtemp(prefix="first-step-")
    pairs = os.path.join(root, "pairs.jsonl")
    with open(pairs, "w") as f:
        for row in build_stdlib_pairs(seed=0):
            f.write(json.dumps(row) + "\n")
    model_dir = build_model_dir(args.model, args.tokenizer, root)

    import torch

    from embedtune.cli import main as cli_main
    from embedtune.resumable_trainer import ResumableTrainer

    from transformers import TrainerCallback

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    profiler = cProfile.Profile()
    times: list[float] = []
    args_outside = args.outside_steps

    class FirstSteps(TrainerCallback):
        """The first step (from the trainer's step start to its end: forward, backward, optimizer)
        profiled; the first steps timed, each ended by a device sync."""

        start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.start = time.perf_counter()
            if args_outside:
                profiler.disable()
            elif not times:
                profiler.enable()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            if args_outside:
                profiler.enable()
            elif not times:
                profiler.disable()
            times.append(time.perf_counter() - self.start)

    plain_init = ResumableTrainer.__init__

    def init(self, *a, **k):
        plain_init(self, *a, **k)
        self.add_callback(FirstSteps())

    ResumableTrainer.__init__ = init
    sys.argv = ["embedtune", "train", pairs, "--model", model_dir, "--output", os.path.join(root, "out"),
                "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-seq-length", "512", "--no-eval", "--full"]
    if args_outside:
        profiler.enable()
    started = time.perf_counter()
    try:
        cli_main()
    except SystemExit as exc:
        if exc.code:
            raise
    finally:
        profiler.disable()
    print(f"the CLI's main returned after {time.perf_counter() - started:.2f} s")
    with open(os.path.join(root, "out", "metrics.json")) as f:
        print("phases_s:", json.load(f).get("phases_s"))
    profiler.dump_stats(os.path.join(args.out, "outside_steps.prof" if args_outside else "first_step.prof"))
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.top)
    print(text.getvalue())
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    print(text.getvalue())
    print("step seconds (device-synced):", [round(t, 3) for t in times[:12]])


if __name__ == "__main__":
    main()
