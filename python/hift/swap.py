"""Where each chunk of optimizer state rests between its updates: a flat fp32 host buffer per chunk
(pinned where the system allows) and a few device slots it visits for its update. The chunks are
the caller's: HostStore's are the state's chunks, DiskStore's its staging slots (each as large as
the largest chunk, holding whichever chunk is read from or written to disk).

`make_swapper` returns the compiled swapper (torch.classes.hift.StateSwapper) for a CUDA device
when hift._C is built, else `StateSwapper` below: the same interface and the same slot logic in
plain torch, which is also the reference the tests hold the compiled one to.

Copies run on two side streams, one per direction, so that the copy-out of one chunk and the
copy-in of another use both copy engines at once. The streams meet each other and the compute
stream only through events:

    prefetch(c)   copy-in stream waits for the slot's last copy-out and for the last copy-out
                  into host(c), then host(c) -> a free slot, then event in[c]
    acquire(c)    the current stream waits on in[c]; returns c's flat device buffer
    writeback(c)  copy-out stream waits for the current stream, slot -> host(c), then event
                  out[slot]; the slot is free for another chunk once out[slot] completes
    host(c)       the host waits for the last copy that touched host(c), if still in flight
    wait_for_host(c) the same wait, changing nothing: another thread (the disk store's I/O
                  workers) may call it while this one enqueues copies
    synchronize() waits for every copy (before a checkpoint reads the host buffers)
    bytes_copied() [host-to-device, device-to-host] bytes of the copies it made (plain copies on
                  the CPU too) since it was made or reset_bytes_copied()
    close()       waits for every copy, then unpins the host buffers and lets go of every buffer;
                  idempotent (garbage collection does it too); host, prefetch, acquire,
                  writeback and resident raise after it (synchronize has nothing left to do)

Host buffers are plain memory pinned in place (cudaHostRegister), as the compiled swapper does:
`torch.zeros(n, pin_memory=True)` would go through the caching host allocator, which rounds each
buffer up to a power of two (a 2.4 GB chunk would cost 4 GB of pinned memory). The device slots are
allocated before any host buffer is pinned, so that running out of device memory leaves nothing
pinned; pinning runs under the swapper's device, so it makes no context on another GPU.

On a CPU device there is nothing to overlap: acquire(c) hands out host(c) itself, unless
`force_slots=True`, which runs the slot logic with plain copies (so CPU tests exercise it).
"""
from __future__ import annotations

import contextlib
import ctypes
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

_PIN_WARNING = (
    "hift StateSwapper: pinned host memory is not available ({why}); optimizer state stays in "
    "pageable memory, so copies to and from the device are slower and not overlapped with compute."
)


def make_swapper(chunk_numels: Sequence[int], device: Union[str, torch.device], slots: int = 2,
                 pin: bool = True, force_slots: bool = False):
    """The state swapper for `device`: compiled where hift._C has one and the device is CUDA,
    else the plain-torch `StateSwapper`. `pin` is ignored on a CPU device (nothing to overlap);
    `force_slots` runs the slot logic there anyway, with plain copies."""
    device = torch.device(device)
    numels = [int(n) for n in chunk_numels]
    if device.type == "cuda" and _compiled_swapper_available():
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return torch.classes.hift.StateSwapper(numels, device, int(slots), bool(pin), False)
    return StateSwapper(numels, device, slots=slots, pin=pin and device.type != "cpu",
                        force_slots=force_slots)


def _compiled_swapper_available() -> bool:
    from hift import ops

    return ops.HAS_EXTENSION and hasattr(torch.classes.hift, "StateSwapper")


def _cudart():
    """torch's binding of the CUDA runtime, or None where there is no CUDA device."""
    return torch.cuda.cudart() if torch.cuda.is_available() else None


def _clear_cuda_error() -> None:
    # A failed cudaHostRegister stays behind as the runtime's last error, which torch's next
    # kernel-launch check would report as its own. torch's binding has no cudaGetLastError, so
    # call the runtime torch loaded (best effort: where it cannot be found, nothing is cleared).
    names = [None] + ([f"libcudart.so.{torch.version.cuda.split('.')[0]}"] if torch.version.cuda else [])
    for name in names:
        try:
            ctypes.CDLL(name).cudaGetLastError()
            return
        except (OSError, AttributeError):
            continue


def _pin_in_place(buffer: Tensor) -> Optional[str]:
    """Pins `buffer`'s memory where it is; None when it did, else why not (no CUDA error is
    left behind)."""
    cudart = _cudart()
    if cudart is None:
        return "no CUDA device"
    err = cudart.cudaHostRegister(buffer.data_ptr(), buffer.nbytes, 0)  # cudaHostRegisterDefault
    if err == cudart.cudaError.success:
        return None
    _clear_cuda_error()
    return str(cudart.cudaGetErrorString(err))


def _slot_buffer(numel: int, device: torch.device) -> Tensor:
    """One device slot (where running out of device memory shows first)."""
    return torch.empty(numel, dtype=torch.float32, device=device)


def _unpin(ptr: int) -> None:
    cudart = _cudart()
    if cudart is not None and cudart.cudaHostUnregister(ptr) != cudart.cudaError.success:
        _clear_cuda_error()


class _Slot:
    __slots__ = ("buffer", "owner", "resident", "freed_at", "copied_out")

    def __init__(self, buffer: Tensor):
        self.buffer = buffer
        self.owner = -1  # the chunk whose data the slot holds (or last held)
        self.resident = False  # holds `owner` between prefetch and writeback
        self.freed_at = 0  # writeback count when released: the oldest is reused first
        self.copied_out: Optional[torch.cuda.Event] = None


class StateSwapper:
    """Chunks of optimizer state in host buffers, visiting `slots` device buffers (see module doc)."""

    def __init__(self, chunk_numels: Sequence[int], device: Union[str, torch.device],
                 slots: int = 2, pin: bool = True, force_slots: bool = False):
        self._numels = [int(n) for n in chunk_numels]
        if any(n < 0 for n in self._numels):
            raise ValueError(f"StateSwapper: chunk sizes must be >= 0, got {self._numels}")
        device = torch.device(device)
        self._async = device.type != "cpu"
        if self._async and device.type != "cuda":
            raise ValueError(f"StateSwapper: the plain-torch swapper runs on CPU or CUDA, not {device}")
        if self._async and device.index is None:
            device = torch.device(device.type, torch.cuda.current_device())
        self._device = device
        self._use_slots = self._async or force_slots
        if self._use_slots and slots < 1:
            raise ValueError(f"StateSwapper: slots must be at least 1, got {slots}")
        self._pinned = False

        self._closed = False
        self._registered: list[int] = []  # host pointers pinned in place, unpinned by close()
        self._bytes_copied = [0, 0]  # host-to-device, device-to-host
        self._slot_of = [-1] * len(self._numels)
        self._copied_in: list[Optional[torch.cuda.Event]] = [None] * len(self._numels)
        self._host_busy: list[Optional[torch.cuda.Event]] = [None] * len(self._numels)
        self._slots: list[_Slot] = []
        self._copy_in_stream = self._copy_out_stream = None
        self._writebacks = 0
        if self._use_slots:
            self._make_slots(slots)
        with torch.cuda.device(device) if self._async else contextlib.nullcontext():
            self._host = self._make_host_buffers(pin)

    def _make_slots(self, slots: int) -> None:
        largest = max(self._numels, default=0)
        self._slots = [_Slot(_slot_buffer(largest, self._device)) for _ in range(slots)]
        if self._async:
            self._copy_in_stream = torch.cuda.Stream(self._device)
            self._copy_out_stream = torch.cuda.Stream(self._device)
            # The slots come from the current stream's pool; the copy streams use them too, so the
            # caching allocator must not hand their memory out again before their copies are done.
            for slot in self._slots:
                slot.buffer.record_stream(self._copy_in_stream)
                slot.buffer.record_stream(self._copy_out_stream)

    def _make_host_buffers(self, pin: bool) -> list[Tensor]:
        """A zeroed buffer per chunk, pinned in place where the system allows (all or none)."""
        self._pinned = pin and len(self._numels) > 0
        why = None
        host = []
        for n in self._numels:
            buffer = torch.zeros(n, dtype=torch.float32)
            if self._pinned and n > 0:
                why = _pin_in_place(buffer)  # fails without CUDA, past a memlock limit, in a container
                if why is None:
                    self._registered.append(buffer.data_ptr())
                else:
                    self._pinned = False
            host.append(buffer)
        if why is not None:
            self._unpin_all()
            warnings.warn(_PIN_WARNING.format(why=why), stacklevel=3)
        return host

    def __del__(self):
        try:
            self.close()
        except Exception:  # the interpreter or the device is going away; unpinning still matters
            self._unpin_all()

    # -- queries ---------------------------------------------------------------------------

    def num_chunks(self) -> int:
        return len(self._numels)

    def num_slots(self) -> int:
        return len(self._slots)

    def pinned(self) -> bool:
        return self._pinned

    def uses_slots(self) -> bool:
        return self._use_slots

    def bytes_copied(self) -> list[int]:
        """[host-to-device, device-to-host] bytes of the copies made since construction or
        reset_bytes_copied()."""
        return list(self._bytes_copied)

    def reset_bytes_copied(self) -> None:
        self._bytes_copied = [0, 0]

    def resident(self, chunk: int) -> bool:
        self._check(chunk, "resident()")
        return not self._use_slots or self._slot_of[chunk] >= 0

    # -- the interface the engine uses -----------------------------------------------------

    def host(self, chunk: int) -> Tensor:
        """The flat fp32 host buffer of `chunk`, once no copy touches it any more."""
        self._check(chunk, "host()")
        busy = self._host_busy[chunk]
        if busy is not None:
            busy.synchronize()
            self._host_busy[chunk] = None
        return self._host[chunk]

    def wait_for_host(self, chunk: int) -> None:
        """Wait for the last copy that touched host(chunk), changing nothing (thread-safe)."""
        self._check(chunk, "wait_for_host()")
        busy = self._host_busy[chunk]  # one read: another thread may replace it meanwhile
        if busy is not None:
            busy.synchronize()

    def prefetch(self, chunk: int) -> None:
        """Start copying `chunk` into a free slot (a no-op if it is already there)."""
        self._check(chunk, "prefetch()")
        if not self._use_slots or self._slot_of[chunk] >= 0:
            return
        index = self._take_free_slot(chunk)
        slot = self._slots[index]
        dst = slot.buffer[: self._numels[chunk]]
        if self._async:
            stream = self._copy_in_stream
            with torch.cuda.stream(stream):
                # The copy-out stream may still read the slot, or write host(chunk) (K=1).
                for before in (slot.copied_out, self._host_busy[chunk]):
                    if before is not None:
                        stream.wait_event(before)
                dst.copy_(self._host[chunk], non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            self._copied_in[chunk] = event
            self._host_busy[chunk] = event
        else:
            dst.copy_(self._host[chunk])
        self._bytes_copied[0] += dst.nbytes
        slot.copied_out = None
        slot.owner = chunk
        slot.resident = True
        self._slot_of[chunk] = index

    def acquire(self, chunk: int) -> Tensor:
        """The flat fp32 device buffer of `chunk`; the current stream waits for its copy-in."""
        self._check(chunk, "acquire()")
        if not self._use_slots:
            return self._host[chunk]
        self.prefetch(chunk)
        event = self._copied_in[chunk]
        if event is not None:
            torch.cuda.current_stream(self._device).wait_event(event)
        return self._slots[self._slot_of[chunk]].buffer[: self._numels[chunk]]

    def writeback(self, chunk: int) -> None:
        """Start copying `chunk` back to its host buffer; its slot frees once that completes."""
        self._check(chunk, "writeback()")
        if not self._use_slots:
            return
        index = self._slot_of[chunk]
        if index < 0:
            raise RuntimeError(f"StateSwapper: writeback of chunk {chunk}, which is not on the "
                               "device (prefetch/acquire it first)")
        slot = self._slots[index]
        src = slot.buffer[: self._numels[chunk]]
        if self._async:
            # (the copy-in of this chunk is behind the update already: acquire made it wait)
            computed = torch.cuda.current_stream(self._device).record_event()
            stream = self._copy_out_stream
            with torch.cuda.stream(stream):
                stream.wait_event(computed)
                self._host[chunk].copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            slot.copied_out = event
            self._host_busy[chunk] = event
        else:
            self._host[chunk].copy_(src)
        self._bytes_copied[1] += src.nbytes
        self._copied_in[chunk] = None
        slot.resident = False
        self._writebacks += 1
        slot.freed_at = self._writebacks
        self._slot_of[chunk] = -1

    def synchronize(self) -> None:
        """Wait for every copy in flight."""
        for stream in (self._copy_in_stream, self._copy_out_stream):
            if stream is not None:
                stream.synchronize()
        self._host_busy = [None] * len(self._numels)

    def close(self) -> None:
        """Wait for every copy in flight, then unpin the host buffers and let go of every buffer
        (a host buffer someone else still holds stays valid, as pageable memory). Idempotent."""
        if getattr(self, "_closed", True):  # (or __init__ never got as far as the buffers)
            return
        # No host buffer may be unpinned or freed while a copy still reads or writes it.
        self.synchronize()
        self._unpin_all()
        self._closed = True
        self._pinned = False
        self._host, self._copy_in_stream, self._copy_out_stream = [], None, None
        for slot in self._slots:  # (the count stays: num_slots() still says what there was)
            slot.buffer, slot.copied_out = None, None
        self._slot_of = [-1] * len(self._numels)
        self._copied_in = [None] * len(self._numels)

    # -- internals -------------------------------------------------------------------------

    def _unpin_all(self) -> None:
        registered, self._registered = getattr(self, "_registered", []), []
        for ptr in registered:
            _unpin(ptr)

    def _check(self, chunk: int, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"StateSwapper: {what} after close(); the swapper's buffers are gone")
        if not 0 <= chunk < len(self._numels):
            raise IndexError(f"StateSwapper: chunk {chunk} is out of range "
                             f"({len(self._numels)} chunks)")

    def _take_free_slot(self, chunk: int) -> int:
        # A never-used slot first, else the one released longest ago (its copy-out is oldest).
        best = -1
        for index, slot in enumerate(self._slots):
            if slot.resident:
                continue
            if slot.owner < 0:
                return index
            if best < 0 or slot.freed_at < self._slots[best].freed_at:
                best = index
        if best < 0:
            raise RuntimeError(f"StateSwapper: cannot prefetch chunk {chunk}: all "
                               f"{len(self._slots)} slots hold chunks that were not written back "
                               "(writeback() one first)")
        return best
