"""The guide's own program as a whole job: embedtune against the same program on stock libraries.

Users start from shared/seed/embedding-finetuning-guide.md: FastModel + LoRA r8 + "unsloth" gradient
checkpointing, a SentenceTransformerTrainer with MultipleNegativesRankingLoss at batch 8 for one epoch,
then merge and save. This bench runs that program (tests/guide_program.py, with the guide's own GPU
precision lines: bf16 where supported, tf32, fp16 evaluation) as three processes, each timed from
start to exit:

- embedtune: the program as the guide has it, its import line changed to embedtune (the trainer's
  steps replay as CUDA graphs where they pay, else run eagerly with all columns in one forward,
  `embedtune.trainer_steps`);
- embedtune_eager: the same with `cuda_graphs = False` added to `FastModel.from_pretrained` (its
  steps eager, one forward); the two runs' logged losses are compared (dropout draws differ, so within noise);
- embedtune_stock_step: the embedtune program with the trainer's stock step (no graphs, MNRL's
  anchors in a forward apart from the other columns): what `trainer_steps` adds;
- stock: the same program written against transformers + peft + sentence-transformers (SDPA
  attention, non-reentrant gradient checkpointing, LoRA through peft directly; the merged encoder put
  back into the Transformer module before the save, as sentence-transformers 6 needs);
- stock_compile: stock with `torch_compile=True`, the recipe of Unsloth's encoder path (SDPA + compile
  + PEFT).

Same random-init model folder (bench_train_gpu.SHAPES), the stdlib pairs (GUIDE_TEST_SIZE held out),
a cold compile cache for each job. Each program prints one line last (appended by this bench, after the
guide's saves): the time `trainer.train()` took (timed around that call; it includes the evaluation
the trainer runs at the end of the epoch), the pairs it trained on, its logged losses, the peak GPU
memory. The table gives whole-job wall time, the time outside
`trainer.train()` (imports, loading, the merge and saves), the train rate, and the mean logged loss over the epoch's last
quarter: both sides train the same model on the same batches, so their losses should agree within
dropout's noise. Rows go to --out (JSONL) as they finish.

Device (one H200, carry [".bench", ".whl"]): `TAG=xy bash benchmarks/run_guide_gpu.sh bert-large`
(the guide's model, Snowflake arctic-embed-l, is BERT-large shaped). CPU smoke test (tiny model; the
CPU precision the test keeps): `python benchmarks/bench_guide_gpu.py tiny-bert --precision cpu`.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
GUIDE_PROGRAM = os.path.join(HERE, "..", "tests", "guide_program.py")
sys.path.insert(0, HERE)
from bench_job_gpu import Bench, elapsed, fmt  # noqa: E402

MARK = "GUIDE_BENCH "

CPU_PRECISION = """    fp16=False,
    bf16=False,
    tf32=False,
    fp16_full_eval=False,
"""
GUIDE_PRECISION = """    fp16=not torch.cuda.is_bf16_supported(),
    bf16=torch.cuda.is_bf16_supported(),
    tf32=True,
    fp16_full_eval=True,
"""
EMBEDTUNE_IMPORT = "import embedtune\nfrom embedtune import FastModel\n"
# steps 2-4 of the guide (load, LoRA, the SentenceTransformer wrapper), from its first line to its last
LOAD_FIRST = "model, tokenizer = FastModel.from_pretrained("
LOAD_LAST = "sbert_model = get_st_unsloth_wrapper(model, tokenizer)\n"
STOCK_LOAD = '''import torch
from peft import LoraConfig, TaskType, get_peft_model
from sentence_transformers import SentenceTransformer
from sentence_transformers.models import Normalize, Pooling, Transformer

transformer_module = Transformer(BASE_MODEL_ID, max_seq_length=MAX_SEQ_LENGTH,
                                 model_kwargs={"add_pooling_layer": False, "attn_implementation": "sdpa"})
tokenizer = transformer_module.tokenizer
backbone = transformer_module.auto_model
backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model = get_peft_model(backbone, LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, bias="none",
                                            target_modules=["query", "key", "value", "dense"],
                                            task_type=TaskType.FEATURE_EXTRACTION))
# sentence-transformers 6's auto_model is read-only: the module's own slot takes the peft model
SLOT = "model" if hasattr(transformer_module, "model") else "auto_model"
torch.nn.Module.__setattr__(transformer_module, SLOT, model)
sbert_model = SentenceTransformer(modules=[transformer_module, Pooling(model.config.hidden_size, pooling_mode="cls"),
                                           Normalize()])
'''
# step 6: merge, then save the SentenceTransformer and the plain encoder
MERGE_FIRST = "model.merge_and_unload()\n"
STOCK_MERGE = "merged = model.merge_and_unload()\ntorch.nn.Module.__setattr__(transformer_module, SLOT, merged)\n"
HF_SAVE = 'model.save_pretrained("embeddings_merged_hf")\n'
STOCK_HF_SAVE = 'merged.save_pretrained("embeddings_merged_hf")\n'
ARGS_LAST = "    max_grad_norm=1.0,\n"
LOAD_ARG_LAST = "    add_pooling_layer = False,\n"
GUIDE_CHECKPOINTING = '    use_gradient_checkpointing="unsloth",\n'
STOCK_CHECKPOINTING = 'backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})\n'
TRAIN = "trainer.train()\n"
TIMED_TRAIN = ("import time as _bench_time\n_bench_t0 = _bench_time.perf_counter()\n" + TRAIN
               + "_bench_train_s = _bench_time.perf_counter() - _bench_t0\n")
REPORT = f'''
import json as _bench_json
import sys as _bench_sys
import torch as _bench_torch
_history = trainer.state.log_history
_steps = _bench_sys.modules.get("embedtune.trainer_steps")  # which step embedtune chose, where it was imported
_choice = _steps._CHOICES.get(trainer) if _steps is not None else None
print({MARK!r} + _bench_json.dumps({{
    "steps": trainer.state.global_step,
    "trainer_step": type(_choice).__name__ if _choice is not None else "stock",
    "train_s": round(_bench_train_s, 3),
    "train": [row for row in _history if "train_runtime" in row][-1],
    "losses": [[row["step"], row["loss"]] for row in _history if "loss" in row],
    "peak_gb": round(_bench_torch.cuda.max_memory_allocated() / 1e9, 2) if _bench_torch.cuda.is_available() else None,
}}), flush=True)
'''
IMPLS = ["embedtune", "embedtune_eager", "embedtune_stock_step", "stock", "stock_compile"]
# embedtune_stock_step: the trainer's own `training_step` for every step, as before `trainer_steps`
STOCK_STEP = ("import embedtune.trainer_steps\n"
              "embedtune.trainer_steps.decide = lambda trainer, inputs: None  # the bench: the stock step\n")


def replace_once(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise SystemExit(f"bench_guide_gpu: {GUIDE_PROGRAM} no longer holds {old.splitlines()[0]!r} exactly once")
    return text.replace(old, new)


def program(impl: str, precision: str, checkpointing: bool = True) -> str:
    """The guide program's text for one side of the bench (`checkpointing=False`: the guide's
    gradient checkpointing left off on both sides, to see what it costs)."""
    with open(GUIDE_PROGRAM) as f:
        text = f.read()
    if not checkpointing:
        text = replace_once(text, GUIDE_CHECKPOINTING, "    use_gradient_checkpointing=False,\n")
    text = replace_once(text, TRAIN, TIMED_TRAIN)
    if precision == "guide":
        text = replace_once(text, CPU_PRECISION, GUIDE_PRECISION)
    if impl == "embedtune_eager":
        text = replace_once(text, LOAD_ARG_LAST, LOAD_ARG_LAST + "    cuda_graphs = False,\n")
    elif impl == "embedtune_stock_step":
        text = replace_once(text, EMBEDTUNE_IMPORT, EMBEDTUNE_IMPORT + STOCK_STEP)
    elif impl != "embedtune":
        text = replace_once(text, EMBEDTUNE_IMPORT, "")
        start, end = text.index(LOAD_FIRST), text.index(LOAD_LAST) + len(LOAD_LAST)
        text = text[:start] + (STOCK_LOAD if checkpointing else replace_once(STOCK_LOAD, STOCK_CHECKPOINTING, "")) + text[end:]
        text = replace_once(text, MERGE_FIRST, STOCK_MERGE)
        text = replace_once(text, HF_SAVE, STOCK_HF_SAVE)
    if impl == "stock_compile":
        text = replace_once(text, ARGS_LAST, ARGS_LAST + "    torch_compile=True,\n")
    return text + REPORT


def report(lines: list[str]) -> dict | None:
    found = [line[len(MARK):] for line in lines if line.startswith(MARK)]
    return json.loads(found[-1]) if found else None


def late_loss(losses: list) -> float | None:
    """Mean logged loss over the last quarter of the epoch's logged steps."""
    if not losses:
        return None
    last = losses[-max(1, len(losses) // 4):]
    return round(statistics.mean(loss for _, loss in last), 4)


def run_job(bench: Bench, impl: str, args) -> dict:
    folder = tempfile.mkdtemp(prefix=f"guide-{impl}-", dir=bench.root)
    path = os.path.join(folder, "guide_program.py")
    with open(path, "w") as f:
        f.write(program(impl, args.precision, checkpointing=not args.no_checkpointing))
    env = {"GUIDE_BASE_MODEL_ID": bench.model_dir, "GUIDE_MAX_SEQ_LENGTH": str(args.max_seq_length),
           "GUIDE_DATASET": bench.pairs, "GUIDE_TEST_SIZE": str(args.test_size)}
    cmd = [sys.executable, path]
    if args.profile_s:  # stopped by SIGINT after profile_s: cProfile still writes its file
        profile = os.path.join(folder, "profile.out")
        cmd = ["timeout", "-s", "INT", str(args.profile_s), sys.executable, "-m", "cProfile", "-o", profile, path]
        monitor = GpuMonitor(os.path.join(folder, "gpu_util.csv"))
    result = bench.run(f"guide_{impl}", cmd, cwd=folder, env=env)
    if args.profile_s:
        monitor.stop()
        print_profile(impl, profile, result["lines"], monitor)
    found = report(result.pop("lines"))
    row = {"kind": "guide", "impl": impl, **result}
    if found:
        train = found["train"]
        pairs = round(train["train_samples_per_second"] * train["train_runtime"])  # the epoch's training pairs
        row.update(steps=found["steps"], pairs=pairs, train_s=found["train_s"],
                   fixed_s=round(row["wall_s"] - found["train_s"], 2),
                   samples_per_s=round(pairs / found["train_s"], 2), peak_gb=found["peak_gb"],
                   late_loss=late_loss(found["losses"]), losses=found["losses"], trainer_step=found.get("trainer_step"),
                   saved=all(os.path.isdir(os.path.join(folder, d)) for d in ("embeddings_merged", "embeddings_merged_hf")))
    print(f"[{elapsed():5.0f}s] {impl}: rc {row['rc']}, wall {row['wall_s']} s, train {row.get('train_s')} s, "
          f"{row.get('samples_per_s')} pairs/s, late loss {row.get('late_loss')}, peak {row.get('peak_gb')} GB", flush=True)
    return bench.write(row)


class GpuMonitor:
    """nvidia-smi's GPU utilization every 200 ms while a profiled job runs: a step bound by the host
    leaves the card idle, one bound by its kernels keeps it busy."""

    def __init__(self, path: str):
        self.path = path
        self.proc = None
        if shutil.which("nvidia-smi"):
            with open(path, "w") as f:
                self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                              "-lms", "200"], stdout=f, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait()

    def busy(self) -> str:
        if not self.proc:
            return "no nvidia-smi"
        with open(self.path) as f:
            samples = [int(v) for v in f.read().split() if v.isdigit()]
        busy = [v for v in samples if v > 0]
        return (f"{len(samples)} samples, {len(busy)} non-zero, mean of those {statistics.mean(busy):.0f}%"
                if busy else f"{len(samples)} samples, all zero")


def print_profile(impl: str, path: str, lines: list[str], monitor: GpuMonitor) -> None:
    """The profiled job's last progress line, the card's utilization, and its host time by function."""
    bars = [line for line in lines if "it/s]" in line or "s/it]" in line]
    print(f"--- profile of {impl}: {bars[-1] if bars else 'no progress line'}; GPU utilization: {monitor.busy()}")
    try:
        stats = pstats.Stats(path, stream=sys.stdout).strip_dirs()
    except (OSError, EOFError, ValueError) as e:  # the job ended just as the signal came
        print(f"no profile: {e}")
        return
    for key in ("tottime", "cumulative"):
        stats.sort_stats(key).print_stats(28)


def curve_gap(rows: list[dict], impl: str = "embedtune", peer: str = "embedtune_eager") -> str | None:
    """The largest gap between two runs' logged losses over the epoch's second half, and each run's mean there."""
    found = {r["impl"]: dict((step, loss) for step, loss in r.get("losses") or []) for r in rows if r.get("losses")}
    if impl not in found or peer not in found:
        return None
    steps = sorted(set(found[impl]) & set(found[peer]))
    half = steps[len(steps) // 2:]
    if not half:
        return None
    gap = max(abs(found[impl][s] - found[peer][s]) for s in half)
    means = [statistics.mean(found[name][s] for s in half) for name in (impl, peer)]
    return (f"logged losses, {impl} against {peer}, steps {half[0]}-{half[-1]} ({len(half)} logs): largest gap "
            f"{gap:.4f}; means {means[0]:.4f} / {means[1]:.4f}")


def table(rows: list[dict], model: str, checkpointing: bool = True) -> None:
    done = {r["impl"]: r for r in rows if r["rc"] == 0 and r.get("samples_per_s")}
    peers = [p for p in ("stock", "stock_compile") if p in done]
    how = "'unsloth' checkpointing" if checkpointing else "no checkpointing"
    print(f"\n=== the guide's program, {model}: LoRA r8, {how}, batch 8, one epoch; whole jobs")
    print(f"{'impl':<21}{'step':<12}{'wall s':>9}{'train s':>9}{'other s':>9}{'pairs/s':>9}"
          + "".join(f"{'x ' + p:>16}{'wall/' + p:>19}" for p in peers) + f"{'late loss':>11}{'peak GB':>9}  saved")
    for r in rows:
        speed = r.get("samples_per_s")
        ratios = "".join(f"{fmt(speed / done[p]['samples_per_s'] if speed else None, 2):>16}"
                         f"{fmt(r['wall_s'] / done[p]['wall_s'] if r['rc'] == 0 else None, 2):>19}" for p in peers)
        print(f"{r['impl']:<21}{str(r.get('trainer_step', '-')):<12}{fmt(r['wall_s'], 1):>9}{fmt(r.get('train_s'), 1):>9}{fmt(r.get('fixed_s'), 1):>9}"
              f"{fmt(speed, 1):>9}{ratios}{fmt(r.get('late_loss'), 3):>11}{fmt(r.get('peak_gb'), 2):>9}  "
              f"{r.get('saved', '-') if r['rc'] == 0 else r.get('error', '')[:60]}")
    gap = curve_gap(rows)
    if gap:
        print(gap)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="bert-large (the guide's arctic-embed-l shape), bert-base, tiny-bert")
    ap.add_argument("--impls", type=lambda s: s.split(","), default=IMPLS)
    ap.add_argument("--precision", choices=["guide", "cpu"], default="guide",
                    help="guide: the guide's bf16/tf32 lines (a GPU); cpu: the test program's as it is")
    ap.add_argument("--max-seq-length", type=int, default=512)
    ap.add_argument("--test-size", type=int, default=512, help="pairs held out (the guide's 4,096 leave too few)")
    ap.add_argument("--pairs", type=int, default=None, help="use only the first N stdlib pairs (a shorter epoch)")
    ap.add_argument("--model-dir", default=None, help="an existing model folder instead of a random-init one")
    ap.add_argument("--budget-s", type=float, default=560.0)
    ap.add_argument("--tokenizer", default=".bench/tokenizer")
    ap.add_argument("--out", default=None, help="JSONL, appended to row by row")
    ap.add_argument("--root", default=None)
    ap.add_argument("--no-checkpointing", action="store_true",
                    help="leave the guide's gradient checkpointing off on every side (what it costs)")
    ap.add_argument("--profile-s", type=int, default=0,
                    help="run each job under cProfile for this many seconds, then print where its host time went")
    args = ap.parse_args()
    unknown = set(args.impls) - set(IMPLS)
    if unknown:
        ap.error(f"unknown --impls {sorted(unknown)}; choose from {IMPLS}")
    bench = Bench(argparse.Namespace(model=args.model, model_dir=args.model_dir, tokenizer=args.tokenizer, root=args.root,
                                     out=args.out, warm_cache=False, budget_s=args.budget_s))
    bench.fixtures()
    if args.pairs:
        with open(bench.pairs) as f:
            lines = f.readlines()[:args.pairs]
        bench.pairs = bench.pairs.replace(".jsonl", f"_{len(lines)}.jsonl")
        with open(bench.pairs, "w") as f:
            f.writelines(lines)
    rows = [run_job(bench, impl, args) for impl in args.impls]
    table(rows, args.model, checkpointing=not args.no_checkpointing)


if __name__ == "__main__":
    main()
