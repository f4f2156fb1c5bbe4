"""Quiet output: a default `embedtune train`, `eval` and `mine` on the bundled MiniLM print embedtune's
own bars, log lines and summary, and none of the third-party notes a user can do nothing about.

Each command runs as a real subprocess (stdlib code-search pairs in a JSONL, a few steps); its stdout
and stderr together must hold no line that looks like library noise (`NOISE`), and `mine`'s bars say
what they encode.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from embedtune.data.stdlib import build_stdlib_pairs

SRC = Path(__file__).resolve().parents[1] / "src"
# What third-party noise looks like: warnings of every kind, load reports, hub look-ups, the model
# card's sampling bar, transformers' load/save bars, the trainer's pin-memory hint, anonymous bars.
NOISE = re.compile(r"warn|newly initialized|could not find|widget|loading weights|writing model shards|"
                   r"non_blocking|pin_memory|\[transformers\]|^\s*batches\b|\bbatches:", re.I | re.M)


def _run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    env.pop("PYTHONWARNINGS", None)
    done = subprocess.run([sys.executable, "-m", "embedtune", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    return output


def _noise(output: str) -> list[str]:
    lines = [part for line in output.splitlines() for part in line.split("\r")]
    return sorted({line.strip() for line in lines if NOISE.search(line)})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("quiet")
    rows = build_stdlib_pairs(48)
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def trained(folder):
    output = _run(["train", "pairs.jsonl", "--output", "run", "--max-steps", "2", "--batch-size", "8",
                   "--max-seq-length", "48", "--eval-size", "8", "--evals", "1"], folder)
    return output


def test_train_prints_no_third_party_noise(trained):
    assert "held-out retrieval" in trained and "trained 2 steps" in trained  # the summary
    assert "step 2/2" in trained and "2/2 [" in trained  # the per-log line and the progress bar
    assert _noise(trained) == []


def test_eval_prints_no_third_party_noise(folder, trained):
    output = _run(["eval", "run", "pairs.jsonl", "--max-seq-length", "48"], folder)
    assert "ndcg@10" in output
    assert _noise(output) == []


def test_mine_prints_no_third_party_noise_and_names_its_bars(folder):
    output = _run(["mine", "pairs.jsonl", "--output", "mined.jsonl", "--num-negatives", "2",
                   "--max-seq-length", "48"], folder)
    assert (folder / "mined.jsonl").is_file()
    assert _noise(output) == []
    assert "Encoding queries" in output and "Encoding corpus" in output


def test_guide_lora_steps_warn_nothing(tmp_path):
    """The guide's LoRA steps in Python, offline: adding LoRA with checkpointing (peft reads transformers'
    deprecated `is_gradient_checkpointing`; transformers renamed `gradient_checkpointing_enable`) and saving the adapter of a hub-named base (peft looks its config up on
    the hub) raise no warning."""
    import warnings

    import torch

    from embedtune import FastModel

    model, _ = FastModel.from_pretrained(max_seq_length=32, fast=False, device="cpu", dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing="unsloth")  # as the guide
        assert peft_model.peft_config["default"].base_model_name_or_path == "sentence-transformers/all-MiniLM-L6-v2"
        peft_model.save_pretrained(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert [str(w.message) for w in caught] == []
