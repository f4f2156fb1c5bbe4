"""Where transformers' own start-up goes, in a fresh process: the distributions map that its
`import_utils` builds at import (`importlib.metadata.packages_distributions()`, which reads every
installed distribution's file list), and the scans of its `models` folder (`define_import_structure`,
which reads every model file's source for its `__all__`). Both are functions of the installed files.
Runs what the CLI imports under cProfile and prints one JSON line of the functions' calls and seconds.

    python3 benchmarks/probe_import_scan.py
"""

from __future__ import annotations

import cProfile
import importlib.metadata
import json
import pstats
import sys
import time

WATCH = ("packages_distributions", "define_import_structure", "create_import_structure_from_path",
         "_is_package_available", "version", "find_spec")


def main() -> None:
    started = time.perf_counter()
    dists = sum(1 for _ in importlib.metadata.distributions())
    listing_s = time.perf_counter() - started
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    from embedtune.deferred_imports import defer_imports
    defer_imports()
    import embedtune.cli  # noqa: F401
    import embedtune.train  # noqa: F401 - what the CLI imports
    profile.disable()
    wall = time.perf_counter() - started
    stats = pstats.Stats(profile).stats  # (file, line, name) -> (calls, primitive, tottime, cumtime, callers)
    found = {}
    for (path, _, name), (calls, _, _, cumtime, _) in stats.items():
        if name in WATCH and ("transformers" in path or "importlib" in path):
            key = f"{name} ({'/'.join(path.split('/')[-2:])})"
            calls0, cum0 = found.get(key, (0, 0.0))
            found[key] = (calls0 + calls, cum0 + cumtime)
    print(json.dumps({"python": sys.version.split()[0], "distributions": dists, "listing_s": round(listing_s, 3),
                      "imports_s_profiled": round(wall, 3),
                      "functions": {k: {"calls": c, "cum_s": round(t, 3)} for k, (c, t) in sorted(found.items())}}))


if __name__ == "__main__":
    main()
