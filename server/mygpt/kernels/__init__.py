"""Hand-written GPU kernels (Triton), each checked against the PyTorch/bitsandbytes path it replaces
before it is used, and that path run instead where the kernel fails or disagrees."""

from __future__ import annotations

import functools
import logging
import os
import statistics
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

try:  # Triton comes with PyTorch's CUDA builds; a CPU install has none (the interpreter needs it too)
    import triton
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def available(device: torch.device) -> bool:
    """Whether the kernels run for tensors on `device`: a GPU with Triton, or Triton's interpreter
    (TRITON_INTERPRET=1: the tests on a CPU)."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _jit(fn: Callable, interpret: bool):
    return triton.jit(fn)


def jitted(fn: Callable):
    """fn compiled by Triton, or run by its interpreter: Triton picks one when it decorates, from
    TRITON_INTERPRET, so the decoration waits for the first call (tests set it after import)."""
    return _jit(fn, os.environ.get("TRITON_INTERPRET") == "1")


def check_once(results: dict, key: tuple, run: Callable, reference: Callable) -> bool:
    """Whether the kernel for `key` may run: on its first use its outputs (`run`) are compared with the
    reference's (each: relative L2 under 2e-2, and no element off by more than 2e-2 of the largest),
    and the answer is kept in `results`. A kernel that fails or disagrees is never used (a warning).
    Called outside any CUDA graph capture: a shape's first step is eager (graphs.py warms up first)."""
    good = results.get(key)
    if good is None:
        try:
            got, want = run(), reference()
            got = got if isinstance(got, tuple) else (got,)
            want = want if isinstance(want, tuple) else (want,)
            good = True
            for g, w in zip(got, want, strict=True):
                diff, w = g.float() - w.float(), w.float()
                rel = float(diff.norm() / w.norm().clamp_min(1e-30))
                good &= rel < 2e-2 and float(diff.abs().max()) <= 2e-2 * float(w.abs().max()) + 1e-6
            if not good:
                log.warning("kernel %s disagrees with the path it replaces: not used", key)
        except Exception:
            log.warning("kernel %s failed: the path it replaces runs instead", key, exc_info=True)
            good = False
        results[key] = good
    return good


def capture(fn: Callable[[], object], calls: int = 1) -> tuple[torch.cuda.CUDAGraph, object]:
    """fn's work on the current CUDA device captured as a graph of `calls` calls, after one run on a
    side stream (as torch's own capture warm-up does): (the graph, the last call's output, which each
    replay rewrites). Capture errors are thread-local: another thread's CUDA work (the server's) does
    not break it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    out = None
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for _ in range(calls):
            out = fn()
    return graph, out


def device_seconds(
    fn: Callable[[], object], device: torch.device, graph: bool, calls: int = 4, repeats: int = 5
) -> float:
    """The seconds one call of fn takes on CUDA `device`, median of `repeats` runs of `calls` calls
    between two events. graph: the calls captured once as a CUDA graph and replayed (the device's
    time alone, as a graphed step runs them); otherwise launched from the host each time (eager
    steps: the device also waits for the host's launches). fn runs once first (Triton compiles, caches
    fill), and for the capture once more on a side stream, as torch's own capture warm-up does."""
    with torch.cuda.device(device):
        fn()
        torch.cuda.synchronize()
        run: Callable[[], object]
        if graph:
            run = capture(fn, calls)[0].replay
        else:

            def run() -> None:
                for _ in range(calls):
                    fn()

        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / calls)
        return statistics.median(times)
