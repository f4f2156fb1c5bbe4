"""Quieting third-party libraries around the calls of theirs that embedtune makes: transformers while
models load or save, and notes or bars a user can do nothing about, each silenced only around its call.

A leaf module: transformers is imported inside the helper, when a load actually runs, so importing
this module (and `embedtune`, and the CLI) stays free of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_transformers(logs: bool = True, progress_bars: bool = False) -> Iterator[None]:
    """Within the block, silence transformers' load reports (`logs`: only errors are logged, e.g. not
    the unused pooler of a checkpoint) and its per-load and per-save progress bars (`progress_bars`);
    both are put back as they were afterwards."""
    from transformers.utils import logging as hf_logging  # heavy: only when a load runs

    level = hf_logging.get_verbosity() if logs else None
    bars_were_on = hf_logging.is_progress_bar_enabled() if progress_bars else False
    if logs:
        hf_logging.set_verbosity_error()
    if progress_bars:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
        if logs:
            hf_logging.set_verbosity(level)


@contextlib.contextmanager
def ignoring_warnings(*messages: str, category: type[Warning] = Warning) -> Iterator[None]:
    """Within the block, drop the warnings whose text starts with one of `messages` (regexes, as
    `warnings.filterwarnings` reads them); every other warning still shows. For library notes about
    the library's own internals (peft reading a deprecated transformers property, say)."""
    import warnings

    with warnings.catch_warnings():
        for message in messages:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Within the block, what is written to sys.stderr is dropped, unless the block raises (then it is
    written out before the error goes on). For a library call that draws its own progress bar with no
    way to turn it off (sentence-transformers' card sampling)."""
    import io
    import sys

    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise
