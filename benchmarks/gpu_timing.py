"""GPU time of work replayed as a CUDA graph, shared by the kernel benchmarks: the host's launches
stay out of the figure; and the probes' rows, printed as they come and as a table last."""

from __future__ import annotations

import json

import torch


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """Milliseconds per replay of a captured graph (one replay first, untimed)."""
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def graph_ms(fn, calls: int = 20, replays: int = 10) -> float:
    """Milliseconds per call of `fn`, run on a side stream first, then `calls` of it captured in one graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return replay_ms(graph, replays) / calls


def record(rows: list, row: dict) -> None:
    """Keep a probe's row and print it as it comes (a call cut short still shows what it measured)."""
    rows.append(row)
    print(json.dumps(row), flush=True)


def finish(rows: list, out: str | None, columns: list[tuple[str, str, int]]) -> None:
    """Write the rows to `out` (JSON lines) if given, then print them as a table: (header, key, width)
    per column; floats below 0.01 in scientific notation, lists joined by " / "."""
    if out:
        with open(out, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))

    def cell(value) -> str:
        if isinstance(value, list):
            return " / ".join(map(str, value))
        if isinstance(value, float) and abs(value) < 0.01:
            return f"{value:.1e}"
        return str(value)

    print("\n" + " ".join(f"{header:>{width}}" for header, _, width in columns))
    for r in rows:
        print(" ".join(f"{cell(r[key]):>{width}}" for _, key, width in columns))
