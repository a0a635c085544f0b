"""ops.adamw_ with Python-number lr and step makes no host-to-device copy: the 0-d tensors the
kernel reads are filled on the device (a copy from pageable memory would wait for the device
every step)."""
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hift import ops

needs_op = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="hift._C is not built")
HOST_DATA_OPS = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}


class OpsSeen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


def group(device, seed):
    print(f"seed={seed}")
    gen = torch.Generator().manual_seed(seed)
    sizes = [13, 1031]
    params = [torch.randn(n, generator=gen).to(device) for n in sizes]
    return (params, [], [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
            [torch.randn(n, generator=gen).to(device) for n in sizes])


KWARGS = dict(lr=2e-3, step=3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decays=[0.1, 0.0])


@needs_op
def test_number_lr_and_step_are_filled_on_the_device_not_copied_from_the_host():
    state = group("cpu", int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF)
    with OpsSeen() as mode:
        ops.adamw_(*state, **KWARGS)
    assert not HOST_DATA_OPS & set(mode.seen), "a scalar made from host data (torch.tensor)"
    assert torch.ops.aten.full.default in mode.seen


@needs_op
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_number_lr_and_step_make_no_host_sync_on_cuda():
    state = group("cuda", int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.adamw_(*state, **KWARGS)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
