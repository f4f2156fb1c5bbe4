"""Whole training jobs as a user runs them, one GPU: stock sentence-transformers vs `embedtune train`.

Each job is a separate process timed from start to exit (load, tokenize, compile, train, save):
stock (benchmarks/stock_job.py: SentenceTransformerTrainer + MNRL, SDPA, bf16, fused AdamW, 4
dataloader workers), stock_plain (the same with the trainer's default of none: --impls), stock
with `torch_compile=True`, and `python -m embedtune train` with no speed flags (its defaults pick
compile / CUDA graphs); optionally embedtune forced eager or forced compile + graphs (--variants).
Same stdlib pairs, same random-init model folder, batch 128, max_seq_length 512, LoRA r8 and full.
Every job gets cold compile and Triton caches; the bytecode and transformers' import scans
(`embedtune.import_memo`) are warm as an installed environment's earlier runs leave them, except for
a 'first' job (--jobs), the machine's first, which writes its own memo.
Steady pairs/s come from two job lengths, (N2 - N1) * batch / (wall(N2) - wall(N1)); stock also
reports its in-job rate over the last half of its steps (stock + compile runs at N1 only by
default: its warm-up takes minutes). Rows go to --out (JSONL) as they finish; a job that would not
fit in --budget-s is skipped, one that overruns is killed. The table is printed last.

--check-curves instead trains full BERT 100 steps three times (eager, compile, compile + CUDA
graphs) and compares the loss curves against eager.

Device (one H200, carry [".bench", ".whl"]), one call per model (rows that do not fit are skipped,
most important first: per mode embedtune N1, stock N1, embedtune N2, stock N2; then stock + compile):
    bash benchmarks/run_job_gpu.sh bert-base
    bash benchmarks/run_job_gpu.sh bert-large
    JOB_TAG=curves bash benchmarks/run_job_gpu.sh bert-base --check-curves
The whole matrix over several calls (--modes, --impls), one table from their files afterwards:
    JOB_TAG=compile bash benchmarks/run_job_gpu.sh bert-base --impls stock_compile --modes full
    python benchmarks/bench_job_gpu.py bert-base --table-from job_bert-base.jsonl job_bert-base_compile.jsonl
CPU smoke test (tiny model; each job is mostly process start-up there, ~30 s):
    bash benchmarks/run_job_gpu.sh tiny-bert --steps 4,8 --max-seq-length 64 --batch-size 16 --impls embedtune,stock
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = {"bert-base": (150, 450), "bert-large": (80, 240)}
STOCK_RATE = {"bert-base": 646.0, "bert-large": 247.0}  # stock eager pairs/s on an H200: the budget's first guesses
PRIOR_OVERHEAD_S = {"stock": 30.0, "stock_compile": 200.0, "embedtune": 25.0}  # other embedtune*: 90
# a first guess's speed of the default flags against stock eager (measured 4.7-5.3x, with 9-13 s of
# fixed cost and a 1.3-2.4 s first step): a job alone in a call is no longer skipped at twice its time
DEFAULT_OVER_STOCK = 4.0
EMBEDTUNE_FLAGS = {"embedtune": [], "embedtune_eager": ["--no-compile", "--no-cuda-graphs"],
                   "embedtune_graphs": ["--no-compile", "--cuda-graphs"],
                   "embedtune_forced": ["--compile", "--cuda-graphs"],
                   "embedtune_fused": ["--fused-kernels"],  # the default mode with the fused norm forced on
                   "embedtune_unfused": ["--no-fused-kernels"]}  # ... and off: what the fused kernels gain
STOCK_IMPLS = ["stock", "stock_plain", "stock_compile"]  # stock_plain: the trainer's default of no dataloader workers
IMPLS = [*STOCK_IMPLS, *EMBEDTUNE_FLAGS]  # the table's order
CURVE_FLAGS = {"eager": ["--no-compile", "--no-cuda-graphs"], "compile": ["--compile", "--no-cuda-graphs"],
               "graphs": ["--compile", "--cuda-graphs"], "default": [],
               "fused": ["--no-compile", "--cuda-graphs", "--fused-kernels"]}
RESERVE_S = 10.0  # kept for the table
START = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - START


class Bench:
    def __init__(self, args):
        self.args, self.rows = args, []
        self.root = args.root or tempfile.mkdtemp(prefix="jobbench-")
        os.makedirs(self.root, exist_ok=True)
        self.out = open(args.out, "a") if args.out else None
        self.shared_cache = os.path.join(self.root, "warm-cache")
        # transformers' scans of the installed files, remembered as an installed environment's earlier
        # runs leave them (embedtune.import_memo); the 'first' job gets a memo of its own, empty
        self.import_memo = os.path.join(self.root, "import-scans")

    def remaining(self) -> float:
        return self.args.budget_s - elapsed()

    def write(self, row: dict) -> dict:
        row = {"model": self.args.model, **row, "at_s": round(elapsed(), 1)}
        self.rows.append(row)
        if self.out:
            self.out.write(json.dumps(row) + "\n")
            self.out.flush()
        return row

    def fixtures(self) -> None:
        from embedtune.data.stdlib import build_stdlib_pairs

        sys.path.insert(0, HERE)
        from bench_train_gpu import build_model_dir

        self.pairs = os.path.join(self.root, "pairs.jsonl")
        with open(self.pairs, "w") as f:
            for row in build_stdlib_pairs(seed=0):
                f.write(json.dumps(row) + "\n")
        self.model_dir = self.args.model_dir or build_model_dir(self.args.model, self.args.tokenizer, self.root)
        with open(os.path.join(self.model_dir, "config.json")) as f:
            config = json.load(f)
        dropout = {k: config.get(k) for k in ("hidden_dropout_prob", "attention_probs_dropout_prob")}
        # warm the page cache and .pyc files for every job alike, and the import memo for all but the
        # 'first' job: the first job timed should not pay them
        warm = subprocess.run([sys.executable, "-c", "from embedtune.import_memo import remember_import_scans; "
                               "remember_import_scans(); import torch, datasets, sentence_transformers, peft, "
                               "embedtune.cli, embedtune.train; torch.cuda.is_available() and torch.zeros(1, device='cuda')"],
                              capture_output=True, text=True, env={**os.environ, "EMBEDTUNE_IMPORT_MEMO_DIR": self.import_memo})
        print(f"[{elapsed():5.0f}s] fixtures in {self.root}: {self.model_dir}, dropout {dropout}"
              + ("" if warm.returncode == 0 else f"; import warm-up failed: {warm.stderr[-300:]}"), flush=True)
        self.write({"kind": "fixtures", "model_dir": self.model_dir, "dropout": dropout, "args": vars(self.args)})

    def run(self, name: str, cmd: list[str], first: bool = False, cwd: str | None = None,
            env: dict[str, str] | None = None) -> dict:
        """Run one job (in `cwd`, if given, with `env` added to the environment) in a fresh cache (unless
        --warm-cache) with what is left of the budget; its output goes to a log file in the root. Returns
        rc, wall_s and the last lines of the log."""
        cache = self.shared_cache if self.args.warm_cache else tempfile.mkdtemp(prefix="cache-", dir=self.root)
        memo = os.path.join(cache, "import-scans") if first else self.import_memo
        env = {**os.environ, **(env or {}), "EMBEDTUNE_IMPORT_MEMO_DIR": memo, "XDG_CACHE_HOME": os.path.join(cache, "xdg"),
               "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, "inductor"),
               "TRITON_CACHE_DIR": os.path.join(cache, "inductor", "triton")}
        log = os.path.join(self.root, name + ".log")
        timeout = self.remaining() - RESERVE_S
        with open(log, "w") as f:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
            try:
                rc = proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # with its compile workers
                proc.wait()
                rc = "timeout"
            wall = time.perf_counter() - t0
        with open(log, errors="replace") as f:
            lines = [" ".join(re.sub("[─│╭╮╰╯]", " ", line).split())  # progress bars' \r; rich's error boxes
                     for line in re.split("[\r\n]", f.read())]
        lines = [line for line in lines if line]
        result = {"rc": rc, "wall_s": round(wall, 2), "log": log}
        if rc != 0:
            result["error"] = f"killed after {wall:.0f} s (budget)" if rc == "timeout" else " | ".join(lines[-4:])[-600:]
            print(f"--- {name} failed (rc {rc}); last lines of its log:\n" + "\n".join(lines[-25:]), flush=True)
        result["lines"] = lines
        if not self.args.warm_cache:
            shutil.rmtree(cache, ignore_errors=True)
        return result

    # one job ---------------------------------------------------------------------------------------

    def job(self, mode: str, impl: str, length: str, steps: int) -> None:
        a = self.args
        base = {"kind": "job", "mode": mode, "impl": impl, "length": length, "steps_asked": steps}
        earlier = self.find(mode, impl)
        if earlier and earlier.get("rc") != 0:
            print(f"[{elapsed():5.0f}s] skip {mode} {impl} {length}: its earlier run failed", flush=True)
            self.write({**base, "skipped": "an earlier run of it failed"})
            return
        guess = self.estimate(mode, impl, steps)
        if guess > self.remaining() - RESERVE_S:
            print(f"[{elapsed():5.0f}s] skip {mode} {impl} {length}={steps}: needs ~{guess:.0f} s, "
                  f"{self.remaining():.0f} s left", flush=True)
            self.write({**base, "skipped": f"needs ~{guess:.0f} s, {self.remaining():.0f} s left"})
            return
        output = os.path.join(self.root, f"out-{mode}-{impl}-{steps}")
        shared = ["--max-steps", str(steps), "--batch-size", str(a.batch_size), "--max-seq-length", str(a.max_seq_length)]
        if impl.startswith("stock"):
            cmd = [sys.executable, os.path.join(HERE, "stock_job.py"), self.pairs, self.model_dir, output, *shared,
                   "--lora-r", "0" if mode == "full" else "8"] + (["--torch-compile"] if impl == "stock_compile" else []) \
                + (["--workers", "0"] if impl == "stock_plain" else [])
        else:
            cmd = [sys.executable, "-m", "embedtune", "train", self.pairs, "--model", self.model_dir, "--output", output,
                   *shared, "--no-eval", *(["--full"] if mode == "full" else ["--lora-r", "8"]), *EMBEDTUNE_FLAGS[impl]]
        result = self.run(f"{mode}-{impl}-{steps}", cmd, first=length == "first")
        lines = result.pop("lines")
        row = {**base, **result, "guess_s": round(guess)}
        if impl.startswith("stock"):
            report = next((json.loads(line) for line in reversed(lines) if line.startswith('{"steps"')), None)
            if report:
                times = report.pop("step_times")
                half = times[len(times) // 2:]
                report["in_job_pairs_s"] = round(a.batch_size * len(half) / sum(half), 1) if len(half) >= 2 else None
                report["step_s_last_half"] = [round(min(half), 4), round(sorted(half)[len(half) // 2], 4),
                                              round(max(half), 4)] if half else None  # min, median, max
                row.update(report)
            elif row["rc"] == 0:
                row["error"] = "no JSON report in its output"
        else:
            try:
                with open(os.path.join(output, "metrics.json")) as f:
                    m = json.load(f)
                row.update({k: m.get(k) for k in ("steps", "train_time_s", "total_time_s", "peak_gpu_gb", "speed",
                                                  "cuda_graphs", "compile", "tokens_per_s", "phases_s", "token_cache")})
                row["in_job_pairs_s"] = in_job_rate(m, a.batch_size)
                row.update(fixed_cost(m.get("phases_s"), row["wall_s"]))
                row["windows"] = [(h["step"], round(h["tokens_per_s"])) for h in m.get("history", [])
                                  if h.get("tokens_per_s") and h.get("step")]  # the logged rate along the job
            except (OSError, ValueError) as e:
                row.setdefault("error", f"no metrics.json: {e}")
        if not a.keep_outputs:
            shutil.rmtree(output, ignore_errors=True)
        if row.get("rc") == 0 and row.get("steps") not in (None, steps):
            row["error"] = f"ran {row.get('steps')} steps, not {steps}"
        row = self.write(row)
        peak = row.get("peak_gb", row.get("peak_gpu_gb"))
        if row.get("error"):
            print(f"[{elapsed():5.0f}s] {mode} {impl} {length}={steps}: rc {row['rc']}, wall {row['wall_s']:.1f} s, "
                  f"ERROR {row['error']}", flush=True)
            return
        print(f"[{elapsed():5.0f}s] {mode} {impl} {length}={steps}: rc {row['rc']}, wall {row['wall_s']:.1f} s "
              f"(guessed {guess:.0f}), train {row.get('train_s', row.get('train_time_s'))} s, peak {peak} GB"
              + (f", in-job {row['in_job_pairs_s']} pairs/s" if row.get("in_job_pairs_s") else "")
              + (f", speed {speed_note(row.get('speed'), row.get('cuda_graphs'))}" if not impl.startswith("stock") else "")
              + (f", phases {row['phases_s']}, fixed {row.get('fixed_s')} s (after phases {row.get('after_phases_s')} s)"
                 if row.get("phases_s") else "")
              + (f", data wait {row['data_wait_s']} s" if row.get("data_wait_s") is not None else ""),
              flush=True)

    def find(self, mode: str, impl: str, length: str | None = None) -> dict | None:
        for row in reversed(self.rows):
            if row.get("kind") == "job" and row["mode"] == mode and row["impl"] == impl and "skipped" not in row \
                    and (length is None or row["length"] == length):
                return row
        return None

    def estimate(self, mode: str, impl: str, steps: int) -> float:
        """Seconds a job should take: an earlier run of it plus the extra steps at its in-job rate (else
        stock eager's, for embedtune an upper bound), else a first guess."""
        before = self.find(mode, impl)
        rate = ((before or {}).get("in_job_pairs_s") or (self.find(mode, "stock") or {}).get("in_job_pairs_s")
                or STOCK_RATE.get(self.args.model, 5000.0))
        step_s = self.args.batch_size / rate
        if before and before.get("rc") == 0:
            return before["wall_s"] + max(0, steps - before["steps_asked"]) * step_s
        default = self.find(mode, "embedtune") if impl.startswith("embedtune_") and not before else None
        if default and default.get("rc") == 0 and default.get("in_job_pairs_s"):  # a variant of the default flags
            extra = max(0, steps - default["steps_asked"]) * self.args.batch_size / default["in_job_pairs_s"]
            return 1.25 * (default["wall_s"] + extra)
        if impl == "embedtune" and not before:  # default flags: see DEFAULT_OVER_STOCK
            return PRIOR_OVERHEAD_S["embedtune"] + steps * step_s / DEFAULT_OVER_STOCK
        return PRIOR_OVERHEAD_S.get(impl, 90.0) + steps * step_s

    # the table -------------------------------------------------------------------------------------

    def table(self) -> None:
        jobs = [r for r in self.rows if r.get("kind") == "job"]
        fixtures = next((r["args"] for r in self.rows if r.get("kind") == "fixtures"), vars(self.args))
        b = fixtures["batch_size"]
        n = {length: next((r["steps_asked"] for r in jobs if r["length"] == length), None) for length in ("N1", "N2")}
        print(f"\n=== {fixtures['model']}: whole jobs, batch {b}, max_seq_length {fixtures['max_seq_length']}, "
              f"N1={n['N1']}, N2={n['N2']} steps; steady/s = (N2-N1)*{b} / (wall(N2)-wall(N1)); "
              "in-job/s = the last half of the steps, from step-end (stock) or log (embedtune) host times")
        summary = {}
        for mode in dict.fromkeys(r["mode"] for r in jobs):
            stats = {}
            for impl in sorted({r["impl"] for r in jobs if r["mode"] == mode}, key=IMPLS.index):
                r1, r2 = self.find(mode, impl, "N1"), self.find(mode, impl, "N2")
                ok = [r for r in (r1, r2) if r and r.get("rc") == 0]
                wall = {k: r["wall_s"] if r in ok else None for k, r in (("N1", r1), ("N2", r2))}
                steady = ((n["N2"] - n["N1"]) * b / (wall["N2"] - wall["N1"])
                          if None not in wall.values() and wall["N2"] > wall["N1"] else None)
                in_job = next((r["in_job_pairs_s"] for r in (r2, r1) if r and r.get("in_job_pairs_s")), None)
                peaks = [p for p in (r.get("peak_gb", r.get("peak_gpu_gb")) for r in ok) if p is not None]
                speeds = {r["length"]: speed_note(r.get("speed"), r.get("cuda_graphs")) for r in ok if r.get("speed")}
                speed = (next(iter(speeds.values())) if len(set(speeds.values())) == 1  # the default may differ by length
                         else "; ".join(f"{k}: {v}" for k, v in speeds.items()))
                notes = [r.get("error") for r in (r1, r2) if r and r.get("error")]
                notes += [f"{r['length']} skipped: {r['skipped']}" for r in jobs
                          if r["mode"] == mode and r["impl"] == impl and "skipped" in r]
                if impl.startswith("stock_compile") and not steady and in_job:
                    notes.insert(0, "rate: in-job only")
                stats[impl] = {"wall_N1": wall["N1"], "wall_N2": wall["N2"], "steady": steady, "in_job": in_job,
                               "peak_gb": max(peaks) if peaks else None,
                               "speed": speed, "notes": notes}
            stock_peak = (stats.get("stock") or {}).get("peak_gb")
            print(f"\n{mode}:")
            print(f"{'impl':<17}{'wall N1':>9}{'wall N2':>9}{'steady/s':>10}{'in-job/s':>10}{'x stock':>9}"
                  f"{'x st.comp':>10}{'peak GB':>9}{'% stock':>9}  speed mode / notes")
            for impl, st in stats.items():
                st["x_stock"], st["x_stock_compile"] = ratio(st, stats.get("stock")), ratio(st, stats.get("stock_compile"))
                st["peak_pct_stock"] = 100 * st["peak_gb"] / stock_peak if st["peak_gb"] and stock_peak else None
                note = " | ".join(x for x in [st["speed"], *st["notes"]] if x)
                print(f"{impl:<17}{fmt(st['wall_N1'], 1):>9}{fmt(st['wall_N2'], 1):>9}{fmt(st['steady'], 0):>10}"
                      f"{fmt(st['in_job'], 0):>10}{fmt(st['x_stock'], 2):>9}{fmt(st['x_stock_compile'], 2):>10}"
                      f"{fmt(st['peak_gb'], 1):>9}{fmt(st['peak_pct_stock'], 0):>9}  {note[:200]}")
            e, st = stats.get("embedtune", {}), stats.get("stock", {})
            ratios = {k: e[k] / st[k] if e.get(k) and st.get(k) else None for k in ("wall_N1", "wall_N2")}
            print(f"whole-job wall embedtune/stock: N1 {fmt(ratios['wall_N1'], 2)}, N2 {fmt(ratios['wall_N2'], 2)}")
            fixed = {r["length"]: (r.get("fixed_s"), (r.get("phases_s") or {}).get("process_start"))
                     for r in jobs if r["mode"] == mode and r["impl"] == "embedtune" and r.get("fixed_s") is not None}
            if fixed:
                print("embedtune fixed cost (wall less the steps; process start in brackets): "
                      + ", ".join(f"{k} {fmt(v[0], 2)} s ({fmt(v[1], 2)} s)" for k, v in fixed.items())
                      + ("; 'first' = the machine's first job, N1 steps" if "first" in fixed else ""))
            summary[mode] = {"impls": stats, "wall_ratio_embedtune_stock": ratios,
                             "fixed_s": {k: v[0] for k, v in fixed.items()}}
        if self.out:
            self.write({"kind": "table", "n1": n["N1"], "n2": n["N2"], "summary": summary})

    # --check-curves --------------------------------------------------------------------------------

    def curves(self) -> None:
        a = self.args
        config = os.path.join(self.root, "curves.yaml")  # logging_steps has no flag of its own
        with open(config, "w") as f:
            f.write(f"logging_steps: {a.curve_log_steps}\n")
        curves = {}
        for name in a.curve_modes:
            label = name if name not in curves else f"{name}#{len(curves)}"
            output = os.path.join(self.root, f"curve-{len(curves)}-{name}")
            cmd = [sys.executable, "-m", "embedtune", "train", self.pairs, "--model", self.model_dir, "--output", output,
                   "--max-steps", str(a.curve_steps), "--batch-size", str(a.batch_size), "--max-seq-length",
                   str(a.max_seq_length), "--no-eval", "--full", "--seed", "42", "--config", config, *CURVE_FLAGS[name]]
            result = self.run(f"curve-{len(curves)}-{name}", cmd)
            result.pop("lines")
            row = {"kind": "curve", "curve": label, "flags": CURVE_FLAGS[name], **result}
            try:
                with open(os.path.join(output, "metrics.json")) as f:
                    m = json.load(f)
                row["loss"] = {int(h["step"]): h["loss"] for h in m.get("history", []) if "loss" in h and "step" in h}
                row.update({k: m.get(k) for k in ("steps", "train_time_s", "speed", "cuda_graphs", "compile")})
                curves[label] = row["loss"]
            except (OSError, ValueError) as e:
                row.setdefault("error", f"no metrics.json: {e}")
                curves[label] = {}
            shutil.rmtree(output, ignore_errors=True)
            self.write(row)
            print(f"[{elapsed():5.0f}s] curve {label}: rc {row['rc']}, wall {row['wall_s']:.1f} s, "
                  f"speed {speed_note(row.get('speed'), row.get('cuda_graphs'))}, cuda_graphs {row.get('cuda_graphs')}",
                  flush=True)
        names = list(curves)
        steps = sorted({s for c in curves.values() for s in c})
        print(f"\n=== loss curves: {a.model}, full, {a.curve_steps} steps, batch {a.batch_size}, "
              f"max_seq_length {a.max_seq_length}, seed 42")
        print(f"{'step':>6}" + "".join(f"{n:>12}" for n in names))
        for s in steps:
            print(f"{s:>6}" + "".join(f"{fmt(curves[n].get(s), 4):>12}" for n in names))
        ref, since = names[0], a.curve_steps // 2
        verdict = {}
        for n in names[1:]:
            common = [s for s in steps if s >= since and s in curves[ref] and s in curves[n]]
            diff = max((abs(curves[n][s] - curves[ref][s]) for s in common), default=None)
            verdict[n] = {"max_abs_diff": diff, "steps_compared": len(common),
                          "agree": diff is not None and diff <= a.curve_tol}
            print(f"{n} vs {ref}, steps >= {since}: max |diff| {fmt(diff, 4)} over {len(common)} logs -> "
                  + ("n/a (no curve)" if diff is None else "AGREE" if diff <= a.curve_tol else "DIFFER")
                  + f" (tolerance {a.curve_tol})")
        ok = bool(verdict) and all(v["agree"] for v in verdict.values())
        print(f"verdict: {'all modes agree with ' + ref if ok else 'NOT all modes agree with ' + ref}")
        self.write({"kind": "curve_verdict", "reference": ref, "since_step": since, "tolerance": a.curve_tol,
                    "modes": verdict, "agree": ok})


def in_job_rate(metrics: dict, batch: int) -> float | None:
    """embedtune's pairs/s over the last half of its steps, from the windowed tokens/s of its training
    logs (host clock at each log, like stock's step times) and its mean tokens per pair."""
    steps, rate, train_s = metrics.get("steps"), metrics.get("tokens_per_s"), metrics.get("train_time_s")
    logs = [h for h in metrics.get("history", []) if "loss" in h and h.get("tokens_per_s") and h.get("step")]
    late = [h["tokens_per_s"] for h in logs if h["step"] > (steps or 0) / 2]
    if not (steps and rate and train_s and late):
        return None
    tokens_per_pair = rate * train_s / (steps * batch)
    return round(len(late) / sum(1 / r for r in late) / tokens_per_pair, 1)  # windows of equal steps: harmonic mean


def fixed_cost(phases: dict | None, wall: float) -> dict:
    """The job's fixed cost: its wall time less its training steps (the first step, a one-time warm-up,
    counts as training), and the part of the wall time after the last named phase (exit)."""
    if not phases:
        return {}
    steps = phases.get("first_step", 0.0) + phases.get("train", 0.0)
    return {"fixed_s": round(wall - steps, 2), "after_phases_s": round(wall - sum(phases.values()), 2)}


def speed_note(speed, graphs) -> str:
    """metrics.json's `speed` in a few words, and why CUDA graphs were off if asked for but refused."""
    if not isinstance(speed, dict):
        return "" if speed is None else short(speed)
    text = ("compile" if speed.get("compile") else "eager") + ("+graphs" if speed.get("cuda_graphs") else "")
    if isinstance(graphs, dict) and graphs.get("off"):
        text += f" (graphs off: {graphs['off']})"
    return text + f" [{speed.get('why', '')}]"


def ratio(row: dict, ref: dict | None) -> float | None:
    """Like for like: the two-length steady rates where both have one, else the in-job rates; a side
    that ran one length only (stock, whose in-job rate has no start-up in it) gives its in-job rate."""
    for key in ("steady", "in_job"):
        if ref and row[key] and ref[key]:
            return row[key] / ref[key]
    mine, theirs = row["steady"] or row["in_job"], ref and (ref["steady"] or ref["in_job"])
    return mine / theirs if mine and theirs else None


def fmt(x, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def short(x, width: int = 70) -> str:
    text = x if isinstance(x, str) else json.dumps(x, separators=(",", ":"))
    return text if len(text) <= width else text[:width - 3] + "..."


def pick(names: list[str], known) -> list[str]:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; known: {list(known)}")
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="bert-base, bert-large (any name in bench_train_gpu.SHAPES)")
    ap.add_argument("--modes", type=lambda s: s.split(","), default=["full", "lora"])
    ap.add_argument("--impls", type=lambda s: pick(s.split(","), [*STOCK_IMPLS, "embedtune"]),
                    default=["embedtune", "stock", "stock_compile"],
                    help="a subset, to split the matrix over several calls")
    ap.add_argument("--variants", type=lambda s: pick([f"embedtune_{v}" for v in s.split(",") if v], list(EMBEDTUNE_FLAGS)[1:]),
                    default=[],
                    help="extra embedtune rows: eager (--no-compile --no-cuda-graphs), forced (--compile --cuda-graphs)")
    ap.add_argument("--steps", type=lambda s: tuple(int(n) for n in s.split(",")), default=None,
                    help="N1,N2 (default 150,450 for bert-base, 80,240 for bert-large)")
    ap.add_argument("--stock-compile-lengths", action="store_true", help="stock + compile at N2 too")
    ap.add_argument("--jobs", type=lambda s: s.split(","), default=None,
                    help="an explicit plan instead of the default one: MODE:IMPL:N1|N2|first,... run in this order, "
                         "e.g. full:embedtune:N1,full:embedtune:N2,full:stock:N2 (stock's rate is then its in-job one); "
                         "'first' runs N1 steps as the machine's first job, apart from the rates: its fixed cost "
                         "against the later N1 job's is what a fresh machine adds")
    ap.add_argument("--budget-s", type=float, default=540.0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-seq-length", type=int, default=512)
    ap.add_argument("--warm-cache", action="store_true", help="one compile cache for all jobs (default: a cold one each)")
    ap.add_argument("--tokenizer", default=".bench/tokenizer")
    ap.add_argument("--out", default=None, help="JSONL, appended to row by row")
    ap.add_argument("--root", default=None, help="fixtures and job folders (default: a new temp folder)")
    ap.add_argument("--keep-outputs", action="store_true",
                    help="keep each job's output folder under --root (check_saved_job_model.py reads them)")
    ap.add_argument("--check-curves", action="store_true", help="loss curves of eager / compile / graphs instead")
    ap.add_argument("--curve-steps", type=int, default=100)
    ap.add_argument("--curve-log-steps", type=int, default=10)
    ap.add_argument("--curve-tol", type=float, default=0.15, help="max |loss diff| vs eager over the second half")
    ap.add_argument("--curve-modes", type=lambda s: pick(s.split(","), CURVE_FLAGS), default=["eager", "compile", "graphs"],
                    help=argparse.SUPPRESS)  # the first is the reference; "default" = no flags
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)  # an existing model folder
    ap.add_argument("--table-from", nargs="+", default=None, help="only print the table of these JSONL files' rows")
    args = ap.parse_args()
    if args.table_from:  # e.g. the rows of a matrix split over several calls
        bench = Bench(argparse.Namespace(**{**vars(args), "out": None, "root": tempfile.gettempdir()}))
        bench.rows = [json.loads(line) for path in args.table_from for line in open(path) if line.strip()]
        bench.rows = [r for r in bench.rows if r.get("model") == args.model]
        bench.table()
        return
    bench = Bench(args)
    try:
        run_all(bench, args)
    finally:
        if not args.root:
            shutil.rmtree(bench.root, ignore_errors=True)


def run_all(bench: Bench, args) -> None:
    bench.fixtures()
    if args.check_curves:
        bench.curves()
        return
    n1, n2 = args.steps or STEPS.get(args.model, (20, 60))
    if args.jobs:  # an explicit plan: MODE:IMPL:N1|N2, in this order
        for token in args.jobs:
            mode, impl, length = token.split(":")
            bench.job(mode, impl, length, n2 if length == "N2" else n1)  # "first": N1 steps, not in the rates
        bench.table()
        return
    plan = []
    for mode in args.modes:
        plan += [(mode, "embedtune", "N1", n1), (mode, "stock", "N1", n1), (mode, "embedtune", "N2", n2), (mode, "stock", "N2", n2)]
    for mode in args.modes:
        plan += [(mode, "stock_plain", "N1", n1)]
    for mode in args.modes:
        plan += [(mode, "stock_compile", "N1", n1)] + ([(mode, "stock_compile", "N2", n2)] if args.stock_compile_lengths else [])
    for mode in args.modes:
        plan += [(mode, v, length, n) for v in args.variants for length, n in (("N1", n1), ("N2", n2))]
    for job in plan:
        if job[1] in args.impls or job[1] in args.variants:
            bench.job(*job)
    bench.table()


if __name__ == "__main__":
    main()
