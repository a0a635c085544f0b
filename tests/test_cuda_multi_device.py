"""Several GPUs: kernels and the engine on cuda:1 while the current device is 0 (a launch without
a device guard reads an illegal address there), and data parallel over NCCL with 2 spawned
ranks. Skipped below 2 GPUs."""
import copy
import datetime
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tiny_models as tm
from hift import fit

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]
QUIET = dict(progress=False, lr=1e-2, order="random", seed=3)


def batches_on(device, n, batch=2, seed=4):
    return [{k: v.to(device) for k, v in b.items()} for b in tm.lm_batches(n, batch=batch, seed=seed)]


def test_grad_norm_on_the_second_device_while_the_first_is_current():
    import hift_kernels
    if not hift_kernels.HAS_TRITON:
        pytest.skip("no triton")
    seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    print(f"seed={seed}")
    gen = torch.Generator().manual_seed(seed)
    torch.cuda.set_device(0)
    grads = [torch.randn(n, generator=gen).to("cuda:1", dt)
             for n, dt in ((4099, torch.bfloat16), (33, torch.float16), (70001, torch.float32))]
    out = hift_kernels.grad_norm_sq(grads)
    expected = hift_kernels.reference_grad_norm_sq(grads)
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0
    assert out.device == torch.device("cuda:1") and torch.equal(out, expected)


@pytest.mark.parametrize("options", [dict(precision="bf16", offload=True, moment_dtype="int8", state_chunk_mib=0.004),
                                     dict(precision="fp16", offload=True)], ids=["bf16-int8", "fp16"])
def test_a_model_on_the_second_device_trains_as_on_the_first(options):
    torch.cuda.set_device(0)
    model = tm.llama(layers=2)
    twin = copy.deepcopy(model)
    fit(model.to("cuda:1"), batches_on("cuda:1", 6), max_steps=6, **QUIET, **options)
    assert torch.cuda.current_device() == 0
    torch.cuda.set_device(0)
    fit(twin.to("cuda:0"), batches_on("cuda:0", 6), max_steps=6, **QUIET, **options)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p.cpu(), q.cpu()), name


# ---------------------------------------------------------------- data parallel over NCCL

STEPS = 5


def _rank(rank, world, root):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{root}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        out = {}
        for name, options in CASES.items():
            model = tm.llama(layers=2).to(f"cuda:{rank}")
            # every rank the same batch: the mean over ranks is exact, so one process is the answer
            fit(model, batches_on(f"cuda:{rank}", STEPS), max_steps=STEPS, **QUIET, **options)
            out[name] = {k: v.cpu() for k, v in model.state_dict().items()}
        torch.save(out, Path(root) / f"rank-{rank}.pt")
    finally:
        dist.destroy_process_group()


CASES = {
    "bf16-int8-offload": dict(precision="bf16", moment_dtype="int8", offload=True, state_chunk_mib=0.003),
    "bf16-reduce": dict(precision="bf16", reduce_dtype="bf16", moment_dtype="bf16", offload=True),
    "fp32": dict(max_grad_norm=0.5),
}


def test_data_parallel_over_nccl_with_two_ranks_is_one_process(tmp_path):
    mp.spawn(_rank, args=(2, str(tmp_path)), nprocs=2, join=True)
    outs = [torch.load(tmp_path / f"rank-{r}.pt") for r in range(2)]
    for name, options in CASES.items():
        model = tm.llama(layers=2).to("cuda:0")
        fit(model, batches_on("cuda:0", STEPS), max_steps=STEPS, **QUIET, **options)
        for key, value in model.state_dict().items():
            for rank, out in enumerate(outs):
                assert torch.equal(out[name][key], value.cpu()), f"{name}: rank {rank}, {key}"
