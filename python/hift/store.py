"""Where each chunk of optimizer state rests between its group's steps, and how it reaches the
update. A chunk is a flat buffer of fp32 words holding its bytes in their formats (state.py).

- ResidentStore: every chunk on the device itself (no offload).
- HostStore: every chunk in host memory, pinned on CUDA; a StateSwapper (swap.py) copies it
  into a device slot on a side stream and back after the update.
- DiskStore: every chunk in a file under state_dir; host memory holds only a few staging
  buffers (at most two groups' state). The chunk a step will need is read ahead on a background
  thread while the current step computes, copied to the device through the same swapper, and
  written back on a background thread after its update.

All three answer the same calls, in the order the engine makes them for each chunk:
read_ahead (during an earlier step), prefetch (the step begins), acquire (the update begins),
release (the update is enqueued). synchronize() waits for every copy and write; checkpoints then
read chunks with resting(c) (the disk store reads a copy from its file) and write them with
load_chunk. bytes_copied() says [host-to-device, device-to-host] bytes the store's swapper copied
since it was made or reset_bytes_copied() (the resident store copies nothing).
"""
from __future__ import annotations

import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from hift.swap import make_swapper


class StateStoreError(OSError):
    """A state_dir that cannot hold the state; the message says what to change."""


def chunk_file(directory, c: int) -> Path:
    """Where a disk store keeps chunk c (under its rank's folder, in data parallel and FSDP2)."""
    return Path(directory) / f"chunk-{c:06d}.bin"


def state_files(state_dir) -> list[Path]:
    """The chunk files under state_dir, every rank's folder included (none where it does not exist)."""
    root = Path(state_dir)
    return sorted(root.rglob("chunk-*.bin")) if root.is_dir() else []


def _bytes_of(t: Tensor):
    """A writable memoryview of a CPU tensor's bytes (for file I/O without copies)."""
    return memoryview(t.view(torch.uint8).numpy())


class ResidentStore:
    """Every chunk stays on the device."""

    def __init__(self, numels: list[int], device: torch.device):
        self.buffers = [torch.zeros(n, dtype=torch.float32, device=device) for n in numels]

    def initialize(self, c: int, fill: Optional[Callable[[Tensor], None]]) -> None:
        """Chunk c's first bytes: fill(buffer) writes them, or None for all zeros."""
        (fill or Tensor.zero_)(self.buffers[c])

    def read_ahead(self, c: int) -> None:
        pass

    def prefetch(self, c: int) -> None:
        pass

    def acquire(self, c: int) -> Tensor:
        return self.buffers[c]

    def release(self, c: int) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        pass

    def resting(self, c: int) -> Tensor:
        """Chunk c's buffer where it rests (call synchronize() first)."""
        return self.buffers[c]

    def load_chunk(self, c: int, data: Tensor) -> None:
        self.resting(c).view(torch.uint8).copy_(data)

    def bytes_copied(self) -> list[int]:
        swapper = getattr(self, "swapper", None)
        return [0, 0] if swapper is None else list(swapper.bytes_copied())

    def reset_bytes_copied(self) -> None:
        swapper = getattr(self, "swapper", None)
        if swapper is not None:
            swapper.reset_bytes_copied()


class HostStore(ResidentStore):
    """Every chunk in host memory (pinned on CUDA), visiting device slots for its update."""

    def __init__(self, numels: list[int], device: torch.device, slots: int, pin: bool):
        # On a CPU device the slot logic still runs, with plain copies, so CPU tests exercise it.
        self.swapper = make_swapper(numels, device, slots=slots, pin=pin and device.type == "cuda",
                                    force_slots=True)

    def initialize(self, c: int, fill: Optional[Callable[[Tensor], None]]) -> None:
        (fill or Tensor.zero_)(self.swapper.host(c))

    def prefetch(self, c: int) -> None:
        self.swapper.prefetch(c)

    def acquire(self, c: int) -> Tensor:
        return self.swapper.acquire(c)

    def release(self, c: int) -> None:
        self.swapper.writeback(c)

    def synchronize(self) -> None:
        self.swapper.synchronize()

    def close(self) -> None:
        self.swapper.close()

    def resting(self, c: int) -> Tensor:
        return self.swapper.host(c)


class DiskStore:
    """Every chunk in its own file under `directory`, staged through a few host buffers.

    Staging slot life: free -> reading (a background read of the chunk's file) -> staged ->
    [on CUDA: its swapper slot copied to the device, updated, copied back] -> writing (a
    background write of the chunk's file) -> free. A chunk is read ahead while the step before
    its own computes, so the read hides behind compute as the copy to the device does.
    """

    def __init__(self, numels: list[int], device: torch.device, directory, slots: int, pin: bool,
                 device_slots: int = 1, workers: int = 3, force_slots: bool = False):
        """force_slots: on a CPU device, copy each chunk through device slots anyway (plain
        copies), as on CUDA, so that CPU tests exercise that path."""
        self.numels = numels
        self.device = device
        self.directory = Path(directory)
        self.paths = [chunk_file(self.directory, c) for c in range(len(numels))]
        self._create_files()
        largest = max(numels, default=0)
        # The swapper's chunks are the staging slots: it owns their (pinned) host buffers and,
        # on CUDA, the device slots they are copied through. On the CPU the update works on the
        # staging buffer itself.
        self._through_slots = device.type != "cpu" or force_slots
        self.swapper = make_swapper([largest] * slots, device, slots=device_slots,
                                    pin=pin and device.type == "cuda", force_slots=force_slots)
        # a chained read waits inside a worker for a write in another: three never starve
        self._swapper_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hift-state-io")
        self._slot_of: dict[int, int] = {}  # chunk -> staging slot holding it
        self._owner = [-1] * slots  # staging slot -> chunk
        self._reading: dict[int, Future] = {}  # chunk -> its read in flight
        self._writing: list[Optional[Future]] = [None] * slots  # slot -> its write in flight
        self._held: set[int] = set()  # chunks between prefetch and release
        self._last_write: dict[int, Future] = {}  # chunk -> its last write to its file
        self._used_at = [0] * slots
        self._clock = 0

    # -- files -----------------------------------------------------------------------------

    def _create_files(self) -> None:
        """Sparse files of the chunks' sizes: a fresh run writes no zeros (the file system
        returns zeros for what was never written); say in words what cannot work."""
        needed = sum(self.numels) * 4
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / ".hift-write-test"
            probe.write_bytes(b"hift")
            probe.unlink()
        except OSError as err:
            raise StateStoreError(f"state_dir {self.directory} is not a directory hift can write to "
                                  f"({err.strerror or err}); pass a writable state_dir") from None
        free = shutil.disk_usage(self.directory).free
        existing = sum(p.stat().st_size for p in self.paths if p.exists())
        if free + existing < needed:
            raise StateStoreError(
                f"state_dir {self.directory} has {free / 2**30:.1f} GiB free; the optimizer state "
                f"needs {needed / 2**30:.1f} GiB there: free some space, pass a state_dir on a "
                "larger disk, or make the state smaller (moment_dtype='bf16')")
        for path, n in zip(self.paths, self.numels):
            with open(path, "wb") as f:  # truncates any earlier run's file
                f.truncate(n * 4)

    def _read_file(self, c: int, into: Tensor) -> None:
        with open(self.paths[c], "rb", buffering=0) as f:
            view, done = _bytes_of(into[: self.numels[c]]), 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise StateStoreError(f"{self.paths[c]} is shorter than its chunk: was state_dir "
                                          "changed while hift ran?")
                done += got

    def _host_buffer(self, slot: int) -> Tensor:
        """Staging slot's host buffer, once the copies touching it are done. Worker threads and
        the main thread both ask, and a swapper is not thread-safe: one at a time. The wait for
        the device comes first, outside the lock, so that the main thread goes on queueing
        copies and updates meanwhile (wait_for_host changes nothing in the swapper)."""
        self.swapper.wait_for_host(slot)
        with self._swapper_lock:
            return self.swapper.host(slot)

    def _read_slot(self, c: int, slot: int) -> None:
        self._read_file(c, self._host_buffer(slot))

    def _write_file(self, c: int, slot: int) -> None:
        self._write_bytes(c, self._host_buffer(slot)[: self.numels[c]])  # waits for the copy back

    def _write_bytes(self, c: int, data: Tensor) -> None:
        """Chunk c's whole file from `data` (a write may take less than it is given)."""
        with open(self.paths[c], "r+b", buffering=0) as f:
            view, done = _bytes_of(data), 0
            while done < len(view):
                done += f.write(view[done:])

    # -- staging slots ---------------------------------------------------------------------

    def _take_slot(self, for_chunk: int) -> int:
        """A slot for another chunk: one never used, else the least recently used one whose chunk
        is neither held (between prefetch and release) nor being read; a chunk read ahead and
        not yet asked for goes last (its read would be lost), but once its read is done it no
        longer pins the slot. Its write, if still in flight, is not waited for here: the read
        that follows is chained behind it."""
        def in_use(owner: int) -> bool:
            return owner in self._held or (owner in self._reading and not self._reading[owner].done())

        candidates = [s for s, owner in enumerate(self._owner) if owner < 0 or not in_use(owner)]
        if not candidates:
            raise RuntimeError(f"DiskStore: no staging slot is free for chunk {for_chunk}: all "
                               f"{len(self._owner)} hold chunks in use")
        slot = min(candidates, key=lambda s: (self._owner[s] >= 0, self._owner[s] in self._reading,
                                              self._used_at[s]))
        evicted = self._owner[slot]
        if evicted >= 0:
            del self._slot_of[evicted]
            pending = self._reading.pop(evicted, None)
            if pending is not None:
                pending.result()  # done already; raises what the read raised
        self._owner[slot] = -1
        return slot

    def _wait_write(self, slot: int) -> None:
        pending, self._writing[slot] = self._writing[slot], None
        if pending is not None:
            pending.result()

    def _stage(self, c: int) -> int:
        """The slot chunk c is staged in; read from its file in the background if it is not."""
        self._clock += 1
        if c in self._slot_of:
            slot = self._slot_of[c]
        else:
            slot = self._take_slot(c)
            self._owner[slot], self._slot_of[c] = c, slot
            # One worker writes the slot's previous chunk back, then reads this one into it: both
            # overlap the step that computes meanwhile, and two slots are enough. The read also
            # waits for this chunk's own last write, which may still be going on from another slot.
            previous_write, self._writing[slot] = self._writing[slot], None
            before = [previous_write, self._last_write.get(c)]
            self._reading[c] = self._pool.submit(self._after(before, self._read_slot), c, slot)
        self._used_at[slot] = self._clock
        return slot

    @staticmethod
    def _after(pending: list[Optional[Future]], work):
        def run(*args):
            for future in pending:
                if future is not None:
                    future.result()
            work(*args)
        return run

    def _staged(self, c: int) -> int:
        slot = self._stage(c)
        pending = self._reading.pop(c, None)
        if pending is not None:
            pending.result()
        return slot

    # -- the store's calls -----------------------------------------------------------------

    def initialize(self, c: int, fill: Optional[Callable[[Tensor], None]]) -> None:
        """Write chunk c's first bytes; all zeros (fill None) are the sparse file's already."""
        if fill is None:
            return
        buffer = torch.empty(self.numels[c], dtype=torch.float32)
        fill(buffer)
        self._write_bytes(c, buffer)

    def read_ahead(self, c: int) -> None:
        self._stage(c)

    def prefetch(self, c: int) -> None:
        self._held.add(c)
        slot = self._stage(c)
        if self._through_slots:
            self._staged(c)
            with self._swapper_lock:
                self.swapper.prefetch(slot)

    def acquire(self, c: int) -> Tensor:
        self._held.add(c)
        slot = self._staged(c)
        # The update overwrites the staged bytes (on the CPU) or the copy back will (on CUDA):
        # the last write of this chunk must have read them first (K=1 trains it every step).
        self._wait_write(slot)
        with self._swapper_lock:
            return self.swapper.acquire(slot)[: self.numels[c]]

    def release(self, c: int) -> None:
        slot = self._slot_of[c]
        with self._swapper_lock:
            self.swapper.writeback(slot)
        self._writing[slot] = self._last_write[c] = self._pool.submit(self._write_file, c, slot)
        self._held.discard(c)

    def synchronize(self) -> None:
        for c in list(self._reading):
            self._reading.pop(c).result()
        for slot in range(len(self._owner)):
            self._wait_write(slot)
        self.swapper.synchronize()

    def close(self) -> None:
        try:
            self.synchronize()
        finally:
            self._pool.shutdown(wait=True)
            self.swapper.close()

    def resting(self, c: int) -> Tensor:
        """A copy of chunk c read from its file (call synchronize() first)."""
        buffer = torch.empty(self.numels[c], dtype=torch.float32)
        self._read_file(c, buffer)
        return buffer

    def load_chunk(self, c: int, data: Tensor) -> None:
        self.synchronize()
        slot = self._slot_of.pop(c, None)
        if slot is not None:  # a staged copy would be stale now
            self._owner[slot] = -1
        self._write_bytes(c, data.contiguous())

    def bytes_copied(self) -> list[int]:
        """[host-to-device, device-to-host] bytes between the staging buffers and the device
        slots; each copy moves a whole staging buffer (the largest chunk's bytes)."""
        return list(self.swapper.bytes_copied())

    def reset_bytes_copied(self) -> None:
        self.swapper.reset_bytes_copied()

    def disk_bytes(self) -> int:
        """Bytes the chunk files occupy on disk now (sparse parts not counted)."""
        return sum(os.stat(p).st_blocks * 512 for p in self.paths)
