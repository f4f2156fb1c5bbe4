"""Whether a process started beside the run's own start (the kernels' build ahead, the import memo's
warming child) has a CPU of its own."""

from __future__ import annotations

import os


def spare_cpu() -> bool:
    """At least two CPUs this process may run on: on one, a child working beside the run would slow
    the run's own start by about as much as it saves it."""
    try:
        return len(os.sched_getaffinity(0)) >= 2
    except AttributeError:  # not Linux
        return (os.cpu_count() or 1) >= 2
