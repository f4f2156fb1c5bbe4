"""Where a run writes, and how its result gets there.

A run works in `OUTPUT.partial/` (its checkpoints live there) and only a finished run is moved to
`OUTPUT`. Two things keep that from losing work:

- The output's place is checked before anything runs (`resolve_output`): symlinks are followed (the
  run writes at their target), and an output that is the current folder, one of its parents, or a
  folder holding the training data is refused, since finishing replaces the output folder.
- The finish is a transaction (`seal_finished`, `complete_finish`, `recover_at_start`): every
  artifact is written into the work folder while its checkpoints are still there, then a marker
  says the result is complete; only after that do the checkpoints go and the folder move into place.
  A kill at any point leaves the previous result (in place, or set aside by `save.replace_folder`
  and put back at the next start) or a resumable run: checkpoints, or a sealed result that
  `--resume` moves into place without training again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from .errors import EmbedtuneError
from .files import clear_stale, replace_folder, sheltering_folder, write_text_atomic

FINISHED = "embedtune_finished.json"  # written last into OUTPUT.partial: the result there is complete

logger = logging.getLogger(__name__)


def work_folder(output: str | os.PathLike) -> Path:
    """The folder a run writing to `output` works in: `OUTPUT.partial`, beside the real output."""
    real = Path(os.path.realpath(Path(output).expanduser()))
    return real.with_name(real.name + ".partial")


def resolve_output(output: str | os.PathLike, data: str | os.PathLike | None = None) -> Path:
    """The real folder a run writes to (symlinks followed), refused if finishing it would delete the
    current folder, the home folder, one of their parents, or the training data: even with --overwrite,
    a run never replaces them."""
    given = Path(output).expanduser()
    real = Path(os.path.realpath(given))
    where = f"--output {output}" + (f" (a link to {real})" if real != given.absolute() else "")
    kind = sheltering_folder(real)
    if kind is not None:
        raise EmbedtuneError(f"{where}: is the {kind} folder or one of its parents, which the finished run "
                             "would replace; choose a new folder for the output")
    if data is not None:
        data_real = Path(os.path.realpath(Path(data).expanduser()))
        for folder in (real, work_folder(real)):
            if data_real == folder or folder in data_real.parents:
                raise EmbedtuneError(f"{where}: holds the training data {data}, which the run would delete; "
                                     "choose an output folder outside the data")
    return real


def holds_only_a_run(folder: Path) -> bool:
    """`folder` is absent, empty, or holds a finished run's result (its metrics and its saved model): what
    a demo may replace, with its own interrupted work, without being told to; anything else is the user's.
    Looked up as the run finds it (`resolve_output`): "~" expanded, links and ".." followed."""
    folder = Path(os.path.realpath(Path(folder).expanduser()))
    if not folder.is_dir():
        return not folder.exists()
    return not any(folder.iterdir()) or ((folder / "metrics.json").is_file()
                                         and (folder / "model" / "modules.json").is_file())


def is_finished(work: Path) -> bool:
    return (Path(work) / FINISHED).is_file()


def seal_finished(work: Path) -> None:
    """Mark the work folder's result complete (every artifact written and flushed); from here on it
    is moved into place rather than trained again."""
    write_text_atomic(Path(work) / FINISHED, json.dumps({"finished": True}))


def discard_checkpoints(work: Path, name: str = "checkpoints") -> None:
    """Drop a sealed run's checkpoints: renamed aside first (one step), then deleted."""
    folder = Path(work) / name
    if folder.exists():
        aside = Path(work) / f".{name}-discarded-{uuid.uuid4().hex[:8]}"
        os.replace(folder, aside)
        shutil.rmtree(aside, ignore_errors=True)
    for stray in Path(work).glob(f".{name}-discarded-*"):  # from a kill during an earlier delete
        shutil.rmtree(stray, ignore_errors=True)


def complete_finish(work: Path, output: Path) -> Path:
    """Move a sealed work folder into place (replacing the previous result) and drop its marker."""
    discard_checkpoints(work)
    result = replace_folder(work, output)
    (result / FINISHED).unlink(missing_ok=True)
    clear_stale(output)  # a previous result set aside by a finish that was killed mid-rename
    return result


def recover_at_start(output: Path, resume: bool, overwrite: bool) -> Path | None:
    """What a killed finish left, dealt with before a run starts: with `resume`, a sealed result is
    moved into place (its path is returned: nothing to train). Otherwise a previous result set aside
    mid-rename is put back (with a notice), the marker of a result already in place is dropped, a
    sealed result is named, not silently retrained over, and a resume of a finished run is refused."""
    work = work_folder(output)
    for restored in clear_stale(output):
        logger.warning("embedtune: put back %s, which a run stopped mid-save had set aside as %s", output, restored)
    if (output / FINISHED).is_file():  # a finish stopped just after its move into place: only the marker stayed
        (output / FINISHED).unlink(missing_ok=True)
    if is_finished(work):
        if resume:
            logger.warning("embedtune: %s holds a finished run that was stopped while being moved into place; "
                           "moving it to %s", work, output)
            return complete_finish(work, output)
        if not overwrite:
            raise EmbedtuneError(f"{work}: holds a finished run that was stopped while being moved into place; "
                                 "pass --resume to move it to the output, or --overwrite to train again")
    elif resume and not work.exists() and (output / "metrics.json").is_file():
        # (said here, before the output's emptiness check would answer a resume with "pass --overwrite")
        raise EmbedtuneError(f"nothing to resume: the run in {output} has finished (there is no {work})")
    return None
