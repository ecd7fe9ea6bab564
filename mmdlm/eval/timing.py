"""How evaluations and benchmarks take their timings: CUDA-synchronised clocks (`Timer`, `timed`), the
median / min / max of repeated measurements, and what the machine was (`machine_info`, its load average).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA only), so a clock read after it covers that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """`with Timer(device) as t: ...; t.seconds` (synchronises CUDA so the time is the work's)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, 0.0

    def __enter__(self) -> Timer:
        sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._start


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call, CUDA synchronised on both sides."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def stats(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements."""
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values)),
            "n": len(values)}


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """What the timings were taken on: CPU count, torch threads and version, the GPU if any."""
    info: dict[str, Any] = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "device": str(device) if device is not None else "cpu",
        # other work on the machine skews every timing: 1/5/15-min load averages when measured
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def load_text(machine: dict[str, Any]) -> str:
    """A `machine_info`'s load averages as "1.00 / 0.50 / 0.25" ("n/a" where unknown)."""
    load = machine.get("load_average")
    return "n/a" if not load else " / ".join(f"{x:.2f}" for x in load)
