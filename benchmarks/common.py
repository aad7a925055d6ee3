"""Shared helpers for the benchmarks: threads, interleaved median timing, peak memory, JSON.

Timings are wall-clock (``time.perf_counter``) medians of at least 3 runs after warm-up.
Peak memory is the process's resident set size sampled every few milliseconds during a call
(``/proc/self/statm``), minus its size just before the call (after ``malloc_trim``, so memory
freed by earlier calls does not hide this one's): what the call itself needed on top of what
was already allocated. ``tracemalloc`` does not see torch's allocations.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "setup_threads",
    "rss_bytes",
    "trim_heap",
    "PeakRSS",
    "measure",
    "interleaved",
    "machine_info",
    "write_json",
    "add_timing_arguments",
    "announce",
    "save_results",
]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _libc_trim() -> Callable[[], None]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to give back
        return lambda: None
    return lambda: trim(0)


trim_heap = _libc_trim()


def setup_threads(n: int) -> None:
    """Intra-op threads for torch (oneDNN and MKL follow)."""
    torch.set_num_threads(n)


def rss_bytes() -> int:
    """Current resident set size (Linux ``/proc``; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakRSS:
    """Context manager: ``peak`` = max RSS sampled during the block minus RSS at entry."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._max = 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._max = max(self._max, rss_bytes())

    def __enter__(self) -> PeakRSS:
        trim_heap()  # return freed memory to the OS, so reuse does not hide this block's need
        self.start = self._max = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._max = max(self._max, rss_bytes())
        self.peak = self._max - self.start


def _cuda_sync() -> None:
    """Wait for queued CUDA work (a no-op unless this process has used CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure(fn: Callable[[], Any]) -> tuple[float, int]:
    """(seconds, peak extra RSS bytes) of one call; CUDA work the call queued is waited for
    inside the timed span."""
    _cuda_sync()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        fn()
        _cuda_sync()
        seconds = time.perf_counter() - t0
    return seconds, mem.peak


def interleaved(fns: dict[str, Callable[[], Any]], runs: int = 3, warmup: int = 1,
                items: int = 1) -> dict[str, dict[str, Any]]:
    """Time several variants alternately (run r of each before run r+1 of any), so a busy
    machine slows them alike. Returns per variant: median seconds, items/s, all runs, peak
    extra RSS (MiB, max over runs) and, once CUDA is in use, peak extra CUDA memory."""
    if runs < 3:
        raise ValueError("take the median of at least 3 runs")
    times: dict[str, list[float]] = {k: [] for k in fns}
    peaks: dict[str, int] = dict.fromkeys(fns, 0)
    cuda_peaks: dict[str, int] = dict.fromkeys(fns, 0)
    on_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    for r in range(warmup + runs):
        for name, fn in fns.items():
            if on_cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            seconds, peak = measure(fn)
            if r >= warmup:
                times[name].append(seconds)
                peaks[name] = max(peaks[name], peak)
                if on_cuda:
                    cuda_peaks[name] = max(cuda_peaks[name],
                                           torch.cuda.max_memory_allocated() - base)
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {
            "median_s": med, "runs_s": ts, "items_per_s": items / med,
            "peak_rss_mib": peaks[name] / 2**20,
        }
        if on_cuda:  # extra GPU memory of the call (torch's allocator)
            out[name]["peak_cuda_mib"] = cuda_peaks[name] / 2**20
    return out


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(), "load_average_at_start": load,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": list(sys.argv),
    }


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write ``payload`` as JSON atomically (temporary file, then rename)."""
    from lipverify.atomic import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=2, sort_keys=True, default=_jsonable)
    atomic_write_text(path, text + "\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Sequence):
        return list(obj)
    return str(obj)


def announce(script: str, threads: int) -> dict[str, Any]:
    """Set the thread count, print the header line of a benchmark; return the machine info."""
    setup_threads(threads)
    info = machine_info(threads)
    print(f"{script}: {info['cpu']}, {threads} threads, torch {info['torch']}, load "
          f"{info['load_average_at_start']}", flush=True)
    return info


def save_results(path: str | os.PathLike | None, info: dict[str, Any], args: Any,
                 results: list[dict[str, Any]]) -> None:
    """Write the machine info, the arguments and the results as JSON to ``path`` (if given)."""
    if path:
        write_json(path, {"machine": info, "quick": args.quick,
                          "args": {k: str(v) for k, v in vars(args).items()},
                          "results": results})
        print(f"wrote {path}")


def add_timing_arguments(p: Any) -> None:
    """The options every benchmark shares: threads, runs, warm-up and batch sizes."""
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3, help="timed runs (median; at least 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--train-batch", type=int, default=128)
