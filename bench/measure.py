"""Peak memory of one training phase, and the clock that leaves evaluation out.

CPU: the process's resident set. VmHWM (hift.memory.host_peak_bytes) restarts from the current
resident size when 5 is written to /proc/self/clear_refs (hift.memory.reset_host_peak); the
peak above the loaded model is VmHWM minus the resident size measured right after that reset.
Each method runs in its own process, started with glibc's mmap threshold fixed at 64 KiB
(MALLOC_MMAP_THRESHOLD_) so that a freed tensor's pages go back to the system instead of
lingering in malloc's heap: the resident set then follows the bytes torch holds.
GPU: torch.cuda.max_memory_allocated (and max_memory_reserved) above what was allocated after
the model was loaded.
"""
from __future__ import annotations

import ctypes
import gc
import os

import torch

from hift.memory import host_peak_bytes, host_resident_bytes, reset_host_peak

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536",
              "MALLOC_ARENA_MAX": "2"}


def release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMeter:
    """The most memory above a baseline over one or more phases (evaluation left out)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self.peak_reserved = 0
        self.baseline = 0
        self.baseline_reserved = 0

    def start(self) -> None:
        release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.baseline_reserved = torch.cuda.memory_reserved(self.device)
        else:
            reset_host_peak()
            self.baseline = host_resident_bytes()
        self.resume()

    def resume(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            release_free_memory()
            reset_host_peak()

    def pause(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device) - self.baseline)
            self.peak_reserved = max(self.peak_reserved,
                                     torch.cuda.max_memory_reserved(self.device) - self.baseline_reserved)
        else:
            self.peak = max(self.peak, host_peak_bytes() - self.baseline)

    def where(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated above the loaded model"
        return "process VmHWM above the resident size with the model loaded"


def malloc_env() -> dict:
    env = dict(os.environ)
    env.update(MALLOC_ENV)
    return env
