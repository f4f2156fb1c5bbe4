"""Training across processes (torch.distributed, gloo on CPU).

One optimizer step with 2 ranks x B pairs must give the same parameters as one process with 2B
pairs (1e-5, fp32): that holds only if embeddings are gathered across ranks with their gradients
and the loss is scaled right (each rank's mean loss; the gather's backward sums over ranks, DDP
averages). The controls show the comparison is sharp enough to catch a missing gather.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tiny_models import make_tiny_model
from torchrun_launch import HERE, torchrun, worker_env

PER_RANK = 4


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_model("bert", tmp_path_factory.mktemp("tiny_ddp"))


def _steps(tmp_path, model, variants: dict[str, list[str]], distributed: bool) -> dict[str, dict]:
    """Each variant's weights after one step (`ddp_step.py`), all variants in one launch."""
    out = tmp_path / ("ddp" if distributed else "single")
    out.mkdir(exist_ok=True)
    args = [HERE / "ddp_step.py", model, out, PER_RANK, *(f"{name}:{','.join(flags)}" for name, flags in variants.items())]
    if distributed:
        proc = torchrun(*args)
    else:
        proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=worker_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: load_file(out / f"{name}.safetensors") for name in variants}


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


DDP_VARIANTS = {"plain": [], "cached": ["cached", "negatives"],
                "symmetric-matryoshka": ["symmetric", "matryoshka", "negatives"]}
FSDP_VARIANTS = {"plain": ["fsdp", "negatives"], "cached": ["fsdp", "cached"]}


@pytest.fixture(scope="module")
def bert_steps(tmp_path_factory, tiny_bert):
    """BERT's DDP and FSDP variants, one process against two ranks, in one launch of each (a launch's
    imports cost more than its steps). Control: without the cross-rank gather each rank sees only its
    own negatives; that must show."""
    variants = {**DDP_VARIANTS, **{f"fsdp-{name}": flags for name, flags in FSDP_VARIANTS.items()}}
    tmp_path = tmp_path_factory.mktemp("bert_steps")
    singles = _steps(tmp_path, tiny_bert, variants, distributed=False)
    return singles, _steps(tmp_path, tiny_bert, {**variants, "no-gather": ["no-gather"]}, distributed=True)


def test_two_ranks_equal_one_process_with_the_whole_batch(tiny_bert, bert_steps):
    start = load_file(str(next(Path(tiny_bert).glob("*.safetensors"))))
    singles, ddps = bert_steps
    for name in DDP_VARIANTS:
        single, ddp = singles[name], ddps[name]
        assert _max_diff(single, ddp) <= 1e-5, name
        plain = {k.split(".", 2)[2]: v for k, v in single.items()}  # "0.model.x" (ST 6) / "0.auto_model.x" (ST 5)
        moved = max((plain[k] - start[k]).abs().max().item() for k in start if k in plain)
        assert moved > 1e-3, f"{name}: the step barely moved the weights, so the comparison proves nothing"
    assert _max_diff(singles["plain"], ddps["no-gather"]) > 1e-4


def _pairs_file(path: Path, n: int) -> Path:
    words = "sort open parse join hash split read write encode decode".split()
    with path.open("w") as f:
        for i in range(n):
            w = words[i % len(words)]
            f.write(json.dumps({"anchor": f"how to {w} thing {i}", "positive": f"def {w}_{i}(x): return x"}) + "\n")
    return path


@pytest.mark.parametrize("flags", [[], ["--cached-loss", "--token-budget", "40"], ["--gradient-checkpointing", "--full"]],
                         ids=["plain", "cached", "checkpointing"])
def test_torchrun_train_end_to_end_writes_once(tmp_path, tiny_bert, flags):
    """Under torchrun (DDP over gloo): trains, the ranks end in sync (checked by the run itself), rank
    0 alone writes; also with the cached loss (its own gradient all-reduce) and with checkpointing."""
    data = _pairs_file(tmp_path / "pairs.jsonl", 96)
    output = tmp_path / "run"
    proc = torchrun("-m", "embedtune", "train", data, "--model", tiny_bert, "--output", output,
                     "--max-steps", "3", "--batch-size", "8", "--eval-size", "16", "--max-seq-length", "32",
                     "--evals", "1", *flags, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["world_size"] == 2
    assert metrics["final"]["ndcg@10"] > 0
    assert (output / "model" / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl", "run"]  # no stray partial/temp folders
    assert proc.stdout.count("trained 3 steps") == 1  # one summary, from rank 0
    # one set of progress bars, rank 0's (every rank drew its evaluation's and the sampler's hashing bars)
    assert proc.stderr.count("Encoding queries:   0%") == 1, proc.stderr[-4000:]
    assert proc.stderr.count("Hashing dataset values:   0%") <= 1, proc.stderr[-4000:]
    assert "broadcast_buffers" not in proc.stderr and "find_unused_parameters" not in proc.stderr


def test_torchrun_bad_input_is_one_line_and_names_each_rank(tmp_path, tiny_bert):
    """Bad input under torchrun: the one-line error printed once (by rank 0, not once per rank), and
    torchrun's failure summary gives each rank's reason instead of a pointer to its docs."""
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"anchor": "a", "positive": "b"}\n{"anchor": "a", "positive": \n')
    proc = torchrun("-m", "embedtune", "train", data, "--model", tiny_bert, "--output", tmp_path / "run",
                    "--max-steps", "2", cwd=tmp_path)
    assert proc.returncode != 0
    printed = [row for row in proc.stderr.splitlines() if row.startswith(("error:", "rank 1 error:"))]
    assert len(printed) == 1 and printed[0].endswith("pairs.jsonl:2: invalid JSON: Expecting value at column 1"), proc.stderr
    assert proc.stderr.count(f"traceback : {printed[0]}") == 2, proc.stderr  # both ranks, in torchrun's summary
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_torchrun_resume_mid_epoch_ends_with_the_uninterrupted_weights(tmp_path, tiny_bert):
    """A run under torchrun stopped mid-epoch (steps 13-24 are its second epoch; the last checkpoint is at
    step 15) and resumed under torchrun trains the batches the uninterrupted run trained: the same weights
    (dropout on, so the ranks' RNG states come back too). The resumed epoch used to replay epoch 0's order."""
    data = _pairs_file(tmp_path / "pairs.jsonl", 96)  # 96 pairs / (4 x 2 ranks): 12 steps an epoch
    flags = ["--model", tiny_bert, "--max-steps", "20", "--batch-size", "4", "--max-seq-length", "16", "--no-eval",
             "--save-every", "3", "--lr", "1e-3", "--lora-r", "4"]
    whole = torchrun("-m", "embedtune", "train", data, "--output", tmp_path / "whole", *flags, cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-4000:]
    crashed = torchrun(HERE / "ddp_crash.py", "train", data, "--output", tmp_path / "run", *flags, cwd=tmp_path,
                       env={"CRASH_AT_STEP": "17"})
    assert crashed.returncode != 0 and (tmp_path / "run.partial" / "checkpoints" / "checkpoint-15").is_dir()
    resumed = torchrun("-m", "embedtune", "train", data, "--output", tmp_path / "run", *flags, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["resumed_from_step"] == 15
    a, b = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("whole", "run"))
    assert _max_diff(a, b) <= 1e-6


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    return make_tiny_model("qwen3", tmp_path_factory.mktemp("tiny_fsdp"))


@pytest.mark.parametrize("arch", ["bert", "qwen3"])
def test_fsdp_two_ranks_equal_one_process_with_the_whole_batch(tmp_path, request, arch, tiny_bert, tiny_qwen3):
    """FSDP (weights sharded over 2 ranks, packed forward through the layers' FSDP step method) takes
    the same step as one process with the whole batch, plain and cached."""
    model = tiny_bert if arch == "bert" else tiny_qwen3
    start = load_file(str(next(Path(model).glob("*.safetensors"))))
    if arch == "bert":
        singles, shardeds = request.getfixturevalue("bert_steps")
        prefix = "fsdp-"
    else:
        singles = _steps(tmp_path, model, FSDP_VARIANTS, distributed=False)
        shardeds = _steps(tmp_path, model, FSDP_VARIANTS, distributed=True)
        prefix = ""
    for name in FSDP_VARIANTS:
        single, sharded = singles[prefix + name], shardeds[prefix + name]
        assert set(single) == set(sharded) and set(single) >= set(start) - {"pooler.dense.weight", "pooler.dense.bias"}
        assert _max_diff(single, sharded) <= 1e-5, name
        moved = max((single[k] - start[k]).abs().max().item() for k in single)
        assert moved > 1e-3, f"{name}: the step barely moved the weights"


def test_torchrun_train_fsdp_end_to_end(tmp_path, tiny_qwen3):
    """`embedtune train --full --fsdp` under torchrun: sharded training, evaluation on every rank, and
    one unsharded model saved that stock sentence-transformers loads."""
    from sentence_transformers import SentenceTransformer

    data = _pairs_file(tmp_path / "pairs.jsonl", 96)
    output = tmp_path / "run"
    proc = torchrun("-m", "embedtune", "train", data, "--model", tiny_qwen3, "--output", output, "--full", "--fsdp",
                     "--max-steps", "3", "--batch-size", "8", "--eval-size", "16", "--max-seq-length", "32",
                     "--evals", "2", "--lr", "1e-3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["world_size"] == 2 and metrics["final"]["ndcg@10"] > 0
    saved = load_file(output / "model" / "model.safetensors")
    start = load_file(str(next(Path(tiny_qwen3).glob("*.safetensors"))))
    assert set(saved) == set(start) and all(saved[k].shape == start[k].shape for k in start)  # whole, not shards
    assert max((saved[k] - start[k]).abs().max().item() for k in start) > 1e-4
    model = SentenceTransformer(str(output / "model"), device="cpu")
    assert model.encode(["def f(): pass"]).shape == (1, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl", "run"]


def test_fsdp_refuses_what_it_does_not_cover(tmp_path, tiny_qwen3):
    data = _pairs_file(tmp_path / "pairs.jsonl", 96)
    alone = subprocess.run([sys.executable, "-m", "embedtune", "train", str(data), "--model", str(tiny_qwen3),
                            "--output", str(tmp_path / "a"), "--full", "--fsdp"],
                           capture_output=True, text=True, env=worker_env(), timeout=300)
    assert alone.returncode != 0 and "torchrun" in alone.stderr and not (tmp_path / "a").exists()
    lora = torchrun("-m", "embedtune", "train", data, "--model", tiny_qwen3, "--output", tmp_path / "b", "--fsdp")
    assert lora.returncode != 0 and "--full" in lora.stderr and not (tmp_path / "b").exists()


def test_a_finished_torchrun_worker_leaves_its_process_group_before_exiting(tmp_path):
    """A worker whose command finished ends its process group itself: left to the interpreter's teardown,
    torch's communication threads sometimes aborted it ("terminate called without an active exception"),
    and torchrun reported the finished, saved run as failed."""
    from torchrun_launch import free_port

    script = tmp_path / "worker.py"
    script.write_text(
        "import torch.distributed as dist\n"
        "from embedtune import cli\n"
        "def command():\n"
        "    dist.init_process_group('gloo', rank=0, world_size=1)\n"
        "cli.main = command\n"
        "destroy = dist.destroy_process_group\n"
        "def spy(*args, **kwargs):\n"
        "    print('process group ended', flush=True)\n"
        "    destroy(*args, **kwargs)\n"
        "dist.destroy_process_group = spy\n"
        "cli.console_main()\n"
        "print('not reached: the command exits', flush=True)\n")
    env = {**worker_env(), "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["process group ended"], proc.stdout
