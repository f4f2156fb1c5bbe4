"""Quieting transformers while embedtune loads or saves models: one helper for every caller.

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
