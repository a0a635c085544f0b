"""Measured memory peaks (device on CUDA, process resident set on the CPU)."""
from __future__ import annotations

import torch


def _proc_status_bytes(field: str) -> int:
    """A kB field of /proc/self/status in bytes, 0 where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def host_peak_bytes() -> int:
    """Peak resident memory of this process (VmHWM)."""
    return _proc_status_bytes("VmHWM")


def host_resident_bytes() -> int:
    """Resident memory of this process now (VmRSS)."""
    return _proc_status_bytes("VmRSS")


def reset_host_peak() -> None:
    """Restart VmHWM from the current resident size (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_host_peak()


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return host_peak_bytes()
