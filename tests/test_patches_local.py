"""embedtune's patches of third-party code stay local (docs/ARCHITECTURE.md, "Patches").

A plain SentenceTransformer, built, trained and resumed by the stock trainer in a process that imported
embedtune (and even built a model with it, which installs the guide compat), trains exactly as in a
process that never imported embedtune. The stock classes keep their own functions after `import
embedtune` and after a plain model trained. Each patch that remains acts on embedtune's models only.
And the Patches table lists exactly what a scan of src/ finds.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import embedtune

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import make_tiny_model  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src" / "embedtune"
DOC = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"

# (class path, attribute) that embedtune patches or patched: each must be sentence-transformers' own.
PATCHED = [
    ("sentence_transformers.base.modules.transformer:Transformer", "__init__"),
    ("sentence_transformers.base.modules.transformer:Transformer", "__setattr__"),
    ("sentence_transformers.base.modules.transformer:Transformer", "_load_model"),
    ("sentence_transformers.base.trainer:BaseTrainer", "_load_from_checkpoint"),
    ("sentence_transformers.sentence_transformer.trainer:SentenceTransformerTrainer", "training_step"),
]

CHILD = r'''
import json, os, sys, warnings
import torch

mode, folder, out = sys.argv[1], sys.argv[2], sys.argv[3]
warnings.simplefilter("ignore")
import importlib, inspect
import sentence_transformers
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.losses import MultipleNegativesRankingLoss
from datasets import Dataset

PATCHED = json.loads(os.environ["PATCHED"])

def resolve(spec, attr):
    module, _, name = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # ST 5.x layout
        cls = {"Transformer": sentence_transformers.models.Transformer if hasattr(sentence_transformers, "models")
               else importlib.import_module("sentence_transformers.models").Transformer,
               "BaseTrainer": SentenceTransformerTrainer, "SentenceTransformerTrainer": SentenceTransformerTrainer}[name]
    return cls, inspect.getattr_static(cls, attr)

originals = {f"{s}.{a}": resolve(s, a)[1] for s, a in PATCHED}
report = {"stock": {}}

def check(stage):
    report["stock"][stage] = {key: resolve(*key.rsplit(".", 1))[1] is fn for key, fn in originals.items()}

if mode != "stock":
    import embedtune
    check("after import embedtune")
if mode == "armed":  # embedtune built a model: the guide compat is installed, acting on embedtune's models only
    from embedtune import FastModel
    FastModel.from_pretrained(folder, max_seq_length=32)
    embedtune.install_compat()

def build():
    torch.manual_seed(0)
    first = sentence_transformers.models.Transformer(folder, max_seq_length=32) if hasattr(sentence_transformers, "models") \
        else importlib.import_module("sentence_transformers.models").Transformer(folder, max_seq_length=32)
    pooling = importlib.import_module("sentence_transformers.models").Pooling(first.get_word_embedding_dimension(), "mean")
    return SentenceTransformer(modules=[first, pooling], device="cpu")

topics = ["files", "sockets", "threads", "json", "regex", "dates", "paths", "math"]
pairs = Dataset.from_dict({"anchor": [f"how to use {t} {i}" for i, t in enumerate(topics * 2)],
                           "positive": [f"def use_{t}_{i}(x): return {t}(x)" for i, t in enumerate(topics * 2)]})
losses = []

def run(model, output, resume=None):
    args = SentenceTransformerTrainingArguments(
        output_dir=output, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3, warmup_steps=0,
        report_to="none", save_strategy="steps", save_steps=2, logging_steps=1, seed=0, data_seed=0,
        dataloader_num_workers=0, use_cpu=True, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=pairs,
                                         loss=MultipleNegativesRankingLoss(model))
    trainer.train(resume_from_checkpoint=resume)
    losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])

model = build()
run(model, os.path.join(out, "run"))
resumed = build()
run(resumed, os.path.join(out, "resumed"), resume=os.path.join(out, "run", "checkpoint-2"))
if mode != "stock":
    check("after training a plain model")
torch.save({"losses": losses, "weights": model.state_dict(), "resumed": resumed.state_dict()},
           os.path.join(out, "result.pt"))
print(json.dumps(report))
'''


def _child(mode: str, folder: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PATCHED": json.dumps(PATCHED), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(folder), str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report.update(torch.load(out / "result.pt", weights_only=True))
    return report


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("patches_local")
    folder = make_tiny_model("bert", root)
    return {mode: _child(mode, folder, root / mode) for mode in ("stock", "imported", "armed")}


@pytest.mark.parametrize("mode", ["imported", "armed"])
def test_plain_model_trains_and_resumes_as_stock(runs, mode):
    """Same losses and weights, to 1e-6, as a process that never imported embedtune; a resume through
    the trainer's `_load_from_checkpoint` included."""
    stock, got = runs["stock"], runs[mode]
    assert len(got["losses"]) == 2 and all(got["losses"])
    for want_run, got_run in zip(stock["losses"], got["losses"]):
        assert got_run == pytest.approx(want_run, abs=1e-6)
    for key in ("weights", "resumed"):
        assert stock[key].keys() == got[key].keys()
        for name, tensor in stock[key].items():
            assert torch.allclose(got[key][name], tensor, atol=1e-6, rtol=0), f"{key}: {name}"


def test_stock_classes_keep_their_functions_after_import_and_plain_training(runs):
    stages = runs["imported"]["stock"]
    assert set(stages) == {"after import embedtune", "after training a plain model"}
    for stage, attributes in stages.items():
        assert all(attributes.values()), f"{stage}: patched {[k for k, v in attributes.items() if not v]}"


def test_stock_classes_keep_their_functions_after_import_in_either_order():
    """`import embedtune` before or after sentence-transformers: the classes' functions are their own
    (no wrapper from embedtune's code) until embedtune builds a model."""
    probe = textwrap.dedent("""
        import importlib, inspect, json, sys
        if sys.argv[1] == "st_first":
            import sentence_transformers
        import embedtune
        import sentence_transformers
        from sentence_transformers.base.trainer import BaseTrainer
        from sentence_transformers.base.modules.transformer import Transformer
        from sentence_transformers import SentenceTransformerTrainer
        out = {}
        for cls, attr in ((Transformer, "__init__"), (Transformer, "__setattr__"), (Transformer, "_load_model"),
                          (BaseTrainer, "_load_from_checkpoint"), (SentenceTransformerTrainer, "training_step")):
            fn = inspect.getattr_static(cls, attr)
            out[f"{cls.__name__}.{attr}"] = "embedtune" not in fn.__code__.co_filename  # not a wrapper of ours
        print(json.dumps(out))
    """)
    for order in ("st_first", "embedtune_first"):
        done = subprocess.run([sys.executable, "-c", probe, order], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
        seen = json.loads(done.stdout.strip().splitlines()[-1])
        assert seen.pop("Transformer._load_model"), "building the wrapper patches nothing any more"
        assert all(seen.values()), f"{order}: {seen}"


def test_backbone_assignment_is_stock_for_other_models(tmp_path):
    """With the guide compat installed (ST 6), assigning a model embedtune did not build keeps ST's own
    behaviour: a stray submodule, the old backbone running, and `tokenizer` refused."""
    import inspect

    from transformers import AutoModel, AutoTokenizer

    from embedtune.st import _backbone_is_property, install_compat, st_modules

    cls = st_modules().Transformer
    if not _backbone_is_property(cls):
        pytest.skip("sentence-transformers 5: auto_model is a plain attribute, nothing is patched")
    install_compat()
    assert hasattr(inspect.getattr_static(cls, "__setattr__"), "__wrapped__")
    folder = make_tiny_model("bert", tmp_path)
    module = cls(str(folder), max_seq_length=32)
    old = module.auto_model
    other = AutoModel.from_pretrained(str(folder))
    module.auto_model = other
    assert module.auto_model is old and module._modules["auto_model"] is other  # stock ST 6
    with pytest.raises(AttributeError):
        module.tokenizer = AutoTokenizer.from_pretrained(str(folder))


def test_the_guide_compat_leaves_other_trainers_models_to_the_stock_reload():
    """`_load_from_checkpoint` hands a model embedtune did not build to the stock method, unchanged."""
    from embedtune.st import first_backbone, embedtune_built, install_compat

    install_compat()
    try:
        from sentence_transformers.base.trainer import BaseTrainer
    except ImportError:  # older layouts: the trainer class itself
        from sentence_transformers import SentenceTransformerTrainer as BaseTrainer

    patched = BaseTrainer._load_from_checkpoint
    assert patched.__wrapped__.__module__.startswith("sentence_transformers")
    assert not embedtune_built(first_backbone(torch.nn.Sequential(torch.nn.Linear(1, 1))))


# ------------------------------------------------------------------ the Patches table against the code

# Hits of the scan that write to embedtune's own objects, not third-party code.
OWN_OBJECTS = {
    "__init__.py:__getattr__": "embedtune's own package module",
    "__init__.py:<module>": "embedtune's own package module (its class)",
    "packing/biased.py:_grids": "a PackedBatch (embedtune's) caches its bias grids",
    "deferred_imports.py:_deferred": "names the deferred function embedtune made",
}


def scan_patches(src: Path = SRC) -> dict[str, list[str]]:
    """file:function -> the writes to third-party attributes found there: assignments to private or dunder
    attributes, to `forward`, to an imported module's attributes (its submodules' too) or to `x.__dict__[...]` of anything but
    `self`, and `setattr` on anything but `self`."""
    found: dict[str, list[str]] = {}
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = {a.asname or a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                   for a in n.names}

        def name_of(node):
            return node.id if isinstance(node, ast.Name) else None

        def root_of(node):
            """The name an attribute chain starts from (`importlib` of `importlib.metadata.f`)."""
            while isinstance(node, ast.Attribute):
                node = node.value
            return name_of(node)

        def hit(node) -> str | None:
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Attribute) and name_of(target.value) != "self" and (
                            target.attr.startswith("_") or target.attr == "forward"
                            or root_of(target.value) in modules):
                        return ast.unparse(target)
                    if (isinstance(target, ast.Subscript) and isinstance(target.value, ast.Attribute)
                            and target.value.attr == "__dict__" and name_of(target.value.value) != "self"):
                        return ast.unparse(target)
            if (isinstance(node, ast.Call) and name_of(node.func) == "setattr" and node.args
                    and name_of(node.args[0]) != "self"):
                return f"setattr({ast.unparse(node.args[0])}, ...)"
            return None

        def visit(node, where: str) -> None:
            for child in ast.iter_child_nodes(node):
                inner = where
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    inner = child.name if where == "<module>" else f"{where}.{child.name}"
                what = hit(child)
                if what:
                    found.setdefault(f"{rel}:{where}", []).append(what)
                visit(child, inner)

        visit(tree, "<module>")
    return found


def table_rows(doc: Path = DOC) -> set[str]:
    """The file:function of each row of ARCHITECTURE.md's Patches table (its second column)."""
    text = doc.read_text(encoding="utf-8")
    section = text.split("\n## Patches", 1)[1].split("\n## ", 1)[0]
    rows = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and re.fullmatch(r"`[\w/.]+\.py:[\w.<>]+`", cells[1]):
            rows.add(cells[1].strip("`"))
    return rows


def test_patches_table_matches_the_code():
    found = set(scan_patches()) - set(OWN_OBJECTS)
    rows = table_rows()
    assert found - rows == set(), f"patches of third-party code missing from the Patches table: {sorted(found - rows)}"
    assert rows - found == set(), f"Patches table rows the code no longer has: {sorted(rows - found)}"
    assert set(OWN_OBJECTS) <= set(scan_patches()), "OWN_OBJECTS lists writes the code no longer has"


def test_the_scan_finds_a_class_patch(tmp_path):
    """The scan itself: a class-level patch, a private attribute and a setattr of a third-party object are
    found; writes to `self` are not."""
    (tmp_path / "mod.py").write_text(textwrap.dedent("""
        import torch
        def patch(cls, obj):
            cls.__setattr__ = None
            obj._private = 1
            setattr(cls, "flag", True)
            torch.something = 2
        class Own:
            def __init__(self):
                self._mine = 1
    """), encoding="utf-8")
    assert scan_patches(tmp_path) == {"mod.py:patch": ["cls.__setattr__", "obj._private", "setattr(cls, ...)",
                                                       "torch.something"]}
