"""The checkpoint format: what a checkpoint folder holds, when it counts, and whether a run may resume it.

The HF Trainer writes `checkpoint-N/` folders in place, file by file, so a process killed mid-save
leaves a folder that looks like a checkpoint (and transformers' `get_last_checkpoint` goes by the
folder name alone, so it would pick it). Here a folder counts only once `embedtune_checkpoint.json`
is in it: written last (after the trainer's files and the best-so-far weights are flushed to disk),
in one rename, listing every file with its size (`seal_checkpoint`, `is_complete`). A checkpoint
holds the trainable weights (safetensors; for LoRA a few MB), the optimizer, scheduler and RNG states
(torch files that transformers loads with `weights_only=True`, numpy's RNG types allow-listed:
nothing else is unpickled), `trainer_state.json` (step, log history) and `BestWeights`' best-so-far
weights (left out when they are the checkpoint's own: the best evaluation was at its step).

The last step's checkpoint of a full fine-tune may hold no weights of its own: where the run's final
weights are that step's, the run's model folder is written then (the finish's own save) and the
checkpoint names its weights file with a key map (`WEIGHTS_REFERENCE`; the file's size is in the
marker like the checkpoint's own files), so the finish does not write the same fp32 weights again.

The data order needs no state: the NO_DUPLICATES sampler reshuffles from seed + epoch and the trainer
skips the batches already trained on, then restores the RNG (dropout) state.

The run's resolved config (and a digest of the data) is kept in `OUTPUT.partial/checkpoints/run_config.json`.
Resuming with other settings is refused, except those in `RESUMABLE_CHANGES`: a different learning
rate would be silently overridden by the restored optimizer and scheduler, and anything touching
batches, data or seed would give a different run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from .config_file import dataclass_defaults
from .errors import EmbedtuneError
from .files import fsync_path, write_text_atomic
from .run_folder import work_folder

MARKER = "embedtune_checkpoint.json"
TRAINABLE_WEIGHTS = "trainable.safetensors"
BEST_WEIGHTS = "best_weights.safetensors"
WEIGHTS_REFERENCE = "weights_reference.json"  # instead of TRAINABLE_WEIGHTS: another file's tensors, by name
MODEL_CARD_COPY = "model_card.md"  # the card sentence-transformers wrote in a referenced model folder
RUN_CONFIG = "run_config.json"
EVALUATION_RECORD = "evaluation.json"  # beside RUN_CONFIG: the evaluation plan and the base score of the run
CHECKPOINTS = "checkpoints"
# The newest checkpoint is unmarked while the trainer writes it (and rotates old ones out), so the
# one before it must survive until then.
KEEP_CHECKPOINTS = 2
# Settings a resumed run may change: where things go, logging, and memory/speed knobs that compute the
# same step (activation checkpointing, the packed forward, GradCache and its chunk size). The data
# path may change; its content may not (`data_sha256`).
RESUMABLE_CHANGES = frozenset({
    "resume", "overwrite", "output_dir", "data", "logging_steps", "save_every", "report_to",
    "gradient_checkpointing", "fast", "cached_loss", "token_budget", "compile", "cuda_graphs",
})
_FLAG_NAMES = {"evals_per_run": "--evals", "eval": "--no-eval", "lora_r": "--lora-r/--full",
               "data_sha256": "the data's content", "extra": "extra training arguments",
               "world_size": "the number of processes (torchrun --nproc-per-node)"}
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


# ----------------------------------------------------------------------------------- on disk


def checkpoint_step(folder: Path) -> int | None:
    match = _CHECKPOINT_NAME.match(Path(folder).name)
    return int(match.group(1)) if match else None


def is_complete(folder: Path) -> bool:
    """A checkpoint folder whose marker exists, names its own step and lists files that are all there."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if marker.get("step") != checkpoint_step(folder) or not marker.get("files"):
        return False
    for name, size in marker["files"].items():
        path = Path(folder) / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _checkpoint_folders(checkpoints: Path) -> list[Path]:
    if not Path(checkpoints).is_dir():
        return []
    found = [p for p in Path(checkpoints).iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(checkpoints: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in a run's checkpoints folder, or None."""
    complete = [p for p in _checkpoint_folders(Path(checkpoints)) if is_complete(p)]
    return complete[-1] if complete else None


def checkpoints_dir(output: str | os.PathLike) -> Path:
    """Where the checkpoints of a run writing to `output` live (beside the real output: links followed)."""
    return work_folder(output) / CHECKPOINTS


@contextlib.contextmanager
def discard_on_failure(work: Path, fresh: bool):
    """A fresh run that fails before its first checkpoint leaves no OUTPUT.partial behind: there is
    nothing in it to resume. (A resumed run's folder, or one with a checkpoint, stays for --resume.)"""
    from . import distributed  # torch.distributed: loaded when a run starts, not on import

    try:
        yield
    except BaseException:
        if fresh and distributed.is_main() and latest_checkpoint(work / CHECKPOINTS) is None:
            shutil.rmtree(work, ignore_errors=True)
        raise


def discard_incomplete(checkpoints: Path) -> None:
    for folder in _checkpoint_folders(checkpoints):
        if not is_complete(folder):
            shutil.rmtree(folder, ignore_errors=True)


def write_json_atomic(path: Path, data: Any) -> None:
    """`data` as indented JSON at `path`, in one rename, flushed to disk with its folder entry."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str), durable=True)


def seal_checkpoint(folder: Path, step: int, best=None) -> None:
    """Add the best-so-far weights to a checkpoint the trainer has just written (unless they are its
    own weights), then mark it complete."""
    meta = None
    if best is not None:
        meta, weights = best.state()
        if weights and meta.get("step") != step:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / BEST_WEIGHTS))
        if meta.get("step") is None:
            meta = None  # no evaluation yet
    files = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name != MARKER):
        fsync_path(path)
        files[path.name] = path.stat().st_size
    reference = _reference(folder)
    if reference is not None:  # the weights file it names counts like its own
        path = folder / reference["file"]
        fsync_path(path)
        files[reference["file"]] = path.stat().st_size
    write_json_atomic(folder / MARKER, {"step": step, "files": files, "best": meta})


def restore_best(best, checkpoint: Path) -> None:
    """Give a resumed run's BestWeights the best-so-far weights and score saved with the checkpoint
    (its own weights where the best evaluation was at its step)."""
    meta = json.loads((checkpoint / MARKER).read_text(encoding="utf-8")).get("best")
    if best is not None and meta:
        weights = checkpoint / BEST_WEIGHTS
        if weights.exists():
            best.load_state(meta, load_file(str(weights), device="cpu"))
        elif meta.get("step") == checkpoint_step(checkpoint):
            best.load_state(meta, checkpoint_weights(checkpoint))
        else:
            best.load_state(meta, {})


def _reference(checkpoint: Path) -> dict | None:
    path = Path(checkpoint) / WEIGHTS_REFERENCE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def referenced_folder(checkpoint: Path) -> Path | None:
    """The folder of the weights file a checkpoint names instead of holding its own (a run's model
    folder, written at its last step), or None."""
    reference = _reference(checkpoint)
    return (Path(checkpoint) / reference["file"]).resolve().parent if reference is not None else None


def checkpoint_weights(checkpoint: Path) -> dict:
    """A checkpoint's trainable weights by the trainer's names: its own file, or the referenced one."""
    reference = _reference(checkpoint)
    if reference is None:
        return load_file(str(Path(checkpoint) / TRAINABLE_WEIGHTS), device="cpu")
    stored = load_file(str(Path(checkpoint) / reference["file"]), device="cpu")
    return {name: stored[key] for name, key in reference["keys"].items()}


_SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}


def reference_weights(checkpoint: Path, weights_file: Path, params: dict, stored_names: dict[int, list[str]]) -> bool:
    """Make `checkpoint` name `weights_file`'s tensors as its trainable weights instead of a copy of its
    own. `params`: the trainer's trainable tensors by name; `stored_names`: each tensor's possible
    names in the file, by `id`. Written only where every tensor is in the file under one of them, with
    its shape and dtype (True); else nothing is written (False) and the caller saves the weights itself."""
    from safetensors import safe_open

    keys = {}
    with safe_open(str(weights_file), framework="pt") as stored:
        present = set(stored.keys())
        for name, tensor in params.items():
            key = next((k for k in stored_names.get(id(tensor), []) if k in present), None)
            if key is None:
                return False
            found = stored.get_slice(key)
            dtype = _SAFETENSORS_DTYPE.get(str(tensor.dtype).removeprefix("torch."))
            if list(found.get_shape()) != list(tensor.shape) or found.get_dtype() != dtype:
                return False
            keys[name] = key
    write_json_atomic(Path(checkpoint) / WEIGHTS_REFERENCE,
                      {"file": os.path.relpath(weights_file, checkpoint), "keys": keys})
    return True


# ----------------------------------------------------------------------------------- same run?

DIGEST_OF_A_FILE = "content and format"  # what a lone data file's digest covers (before: content and name)


def data_digest(path: str | os.PathLike, exclude: tuple[str | os.PathLike, ...] = (),
                file_name: bool = False) -> str | None:
    """sha256 of a data file and its format (or of every file of a dataset folder, but those under
    `exclude`: a run's own folders inside it; of a hub dataset id, every data file of the snapshot it
    names now); None for anything else. `file_name`: a lone file's name instead of its format, as runs
    recorded it before `DIGEST_OF_A_FILE` (their checkpoints still resume)."""
    from .data.formats import file_format

    root = Path(path)
    skip = [Path(os.path.realpath(folder)) for folder in exclude]
    hub = False
    if not root.exists():
        from .data.hub import dataset_folder, is_hub_id

        if is_hub_id(os.fspath(path)):
            root, hub = dataset_folder(os.fspath(path)), True

    def kept(file: Path) -> bool:
        if hub:  # the hub's cache may also hold a card or a script fetched by other tools
            return file_format(file)[0] is not None
        real = Path(os.path.realpath(file))
        return not any(folder == real or folder in real.parents for folder in skip)

    files = ([root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and kept(p))
             if root.is_dir() else [])
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        # a folder's files by their names (which order and type them); a lone file by how it is read, so
        # a renamed copy of the same data still resumes
        lone = file.name if file_name else file_format(file)
        digest.update(str(file.relative_to(root) if file != root else lone).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def run_record(config, file_name: bool = False) -> dict:
    """What must match between a checkpointed run and its resumption (JSON-normalised); `file_name`: the
    data's digest as older runs recorded it."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_CHANGES}
    own = ()
    if getattr(config, "output_dir", None):  # a run's folders may lie inside a dataset folder
        work = work_folder(config.output_dir)
        own = (work.with_name(work.name.removesuffix(".partial")), work)
    data = config.data
    if isinstance(data, (list, tuple, dict)):  # several data sets: each file's digest, in order
        from .multi_data import data_sources

        digest = {s.name: data_digest(s.path, exclude=own, file_name=file_name) for s in data_sources(data)}
    else:
        digest = data_digest(data, exclude=own, file_name=file_name)
    from . import distributed

    record = {"config": fields, "data_sha256": digest, "world_size": distributed.world_size(),
              **({} if file_name else {"data_file": DIGEST_OF_A_FILE})}
    return json.loads(json.dumps(record, default=str))


def _defaults(config) -> dict:
    return json.loads(json.dumps(dataclass_defaults(type(config)), default=str))


def _flag(name: str) -> str:
    return _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def _shown(value) -> str:
    """A setting's value in a refusal; None is embedtune's own choice."""
    return "automatic" if value is None else repr(value)


def check_same_run(checkpoints: Path, config) -> None:
    """Refuse to resume a run made with other settings, naming the first difference."""
    try:
        saved = json.loads((checkpoints / RUN_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise EmbedtuneError(f"{checkpoints / RUN_CONFIG}: missing or unreadable, so this run can't be resumed; "
                             "start over with --overwrite") from None
    now, defaults = run_record(config, file_name=saved.get("data_file") != DIGEST_OF_A_FILE), _defaults(config)
    then = saved.get("config", {})
    diffs = [(k, then.get(k, defaults.get(k)), v) for k, v in now["config"].items() if then.get(k, defaults.get(k)) != v]
    if saved.get("data_sha256") != now["data_sha256"]:
        diffs.append(("data_sha256", "", ""))
    if saved.get("world_size", now["world_size"]) != now["world_size"]:  # (older records lack it)
        diffs.append(("world_size", saved["world_size"], now["world_size"]))
    if diffs:
        name, was, is_ = diffs[0]
        detail = (f"{_flag(name)} changed" if name in ("data_sha256", "extra")
                  else f"{_flag(name)} is {_shown(is_)}, was {_shown(was)}")
        more = f" (and {', '.join(_flag(d[0]) for d in diffs[1:])})" if len(diffs) > 1 else ""
        raise EmbedtuneError(f"can't resume {checkpoints.parent}: {detail}{more}; rerun with the settings of the "
                             "interrupted run, or drop --resume and pass --overwrite to start over")


def resume_point(work: Path, config, resumable: bool) -> Path | None:
    """The checkpoint `config.resume` continues from (None: a fresh start), validated before anything
    is loaded or written. A fresh start refuses to throw away an interrupted run unless `overwrite`."""
    checkpoints = work / CHECKPOINTS
    latest = latest_checkpoint(checkpoints)
    if getattr(config, "resume", False):
        if not resumable:
            raise EmbedtuneError("--resume needs the output folder of the interrupted run (--output)")
        if latest is None:
            finished = work.with_name(work.name.removesuffix(".partial"))
            if not work.exists() and (finished / "metrics.json").exists():
                raise EmbedtuneError(f"nothing to resume: the run in {finished} has finished")
            raise EmbedtuneError(f"nothing to resume: {checkpoints} holds no complete checkpoint; "
                                 "run without --resume to start")
        check_same_run(checkpoints, config)
        return latest
    if latest is not None and not config.overwrite:
        raise EmbedtuneError(f"{work}: holds an interrupted run (checkpoint at step {checkpoint_step(latest)}); "
                             "pass --resume to continue it or --overwrite to start over")
    return None


def write_evaluation_record(work: Path, record: dict) -> None:
    """Keep the run's evaluation plan and base score with its checkpoints (after `prepare_work`)."""
    write_json_atomic(work / CHECKPOINTS / EVALUATION_RECORD, record)


def read_evaluation_record(work: Path) -> dict | None:
    """The evaluation plan and base score an interrupted run kept (None: none kept, or unreadable)."""
    try:
        record = json.loads((work / CHECKPOINTS / EVALUATION_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def prepare_work(work: Path, config, resume_from: Path | None, resumable: bool) -> None:
    """Resuming: drop checkpoints a crash left half-written. Else: a fresh work folder holding the
    run's config, which a later --resume must match."""
    checkpoints = work / CHECKPOINTS
    if resume_from is not None:
        discard_incomplete(checkpoints)
        return
    if work.exists():
        shutil.rmtree(work)
    checkpoints.mkdir(parents=True)
    if resumable:
        write_json_atomic(checkpoints / RUN_CONFIG, run_record(config))
