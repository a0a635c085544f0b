"""Ranks spawned by a test that look to a framework as if torchrun had started them: the 🤗
Trainer and accelerate join the process group from the environment."""
import contextlib
import os
import socket

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def become_rank(rank: int, world: int, port: int) -> None:
    """torchrun's variables for this spawned process, and one thread (the ranks share the cores)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)


# A one-process run that a test holds bit for bit to ranks (one thread each) runs on this many
# threads, on every machine: a second thread count, fixed, so that a result that depends on how
# a kernel splits its work among threads shows here, not only on machines with more cores.
REFERENCE_THREADS = 2


@contextlib.contextmanager
def reference_threads(threads: int = REFERENCE_THREADS):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
