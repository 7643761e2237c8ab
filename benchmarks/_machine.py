"""The machine facts every benchmark writes beside its numbers, and its timing helpers."""

import os
import platform
import time

import torch


def machine_facts(device: str | torch.device = "cpu", **extra: object) -> dict:
    """Python, torch, CPU, threads, load, date (and the GPU), plus ``extra``."""
    device = torch.device(device)
    facts: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        facts["load_average"] = os.getloadavg()
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    facts["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    facts.update(extra)
    return facts


# Every benchmark's --device default.
DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA), around timings."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: str | torch.device) -> tuple[float, object]:
    """``(seconds, fn())``, the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out
