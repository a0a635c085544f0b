"""hift._C fused AdamW, held to torch.optim.AdamW on fp32 clones and to ops.reference_adamw_.

Random inputs from a fresh seed each run (printed on failure), odd sizes, every (weight, grad)
dtype pair; tolerances come from fp32 (the master, exp_avg and exp_avg_sq are fp32 whatever the
weight is), and the low-precision weight must equal the master rounded, bit for bit.
"""
import os

import pytest
import torch

from hift import ops

try:  # loaded here too, so HIFT_KERNELS=reference (which keeps ops.py off it) still tests it
    from hift import _C  # noqa: F401
    BUILT, NOT_BUILT_BECAUSE = True, ""
except ImportError as err:
    BUILT, NOT_BUILT_BECAUSE = False, str(err)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Odd sizes: below, at and across the vector widths (8/16 floats, 2x for bf16), across the CPU
# work chunk (32768) and the CUDA chunk (2048), and not multiples of anything.
SIZES = [1, 3, 15, 17, 31, 33, 63, 127, 1025, 2049, 4099, 40961]
FP32 = dict(rtol=1e-6, atol=1e-7)
BETAS, EPS, LR = (0.9, 0.999), 1e-8, 1e-3

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")]),
]
needs_op = pytest.mark.skipif(not BUILT, reason="hift._C is not built (test_extension_is_built says why)")


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def test_extension_is_built():
    if os.environ.get("HIFT_NO_EXTENSION") == "1":
        pytest.skip("HIFT_NO_EXTENSION=1: the pure-Python install is intended")
    assert BUILT, (f"hift._C did not import ({NOT_BUILT_BECAUSE}): rebuild with "
                   "`pip install --no-build-isolation -e .`")
    assert hasattr(torch.ops.hift, "fused_adamw_")
    assert hasattr(torch.classes.hift, "StateSwapper")


class Group:
    """One group's tensors in the op's roles: params, masters ([] for fp32), exp_avgs,
    exp_avg_sqs; the fp32 master values start as standard normals."""

    def __init__(self, sizes, weight_dtype, device, gen):
        masters = [torch.randn(n, generator=gen).to(device) for n in sizes]
        self.weight_dtype = weight_dtype
        if weight_dtype == torch.float32:
            self.params, self.masters = masters, []
        else:
            self.params, self.masters = [m.to(weight_dtype) for m in masters], masters
        self.exp_avgs = [torch.zeros_like(m) for m in masters]
        self.exp_avg_sqs = [torch.zeros_like(m) for m in masters]

    @property
    def fp32(self):
        return self.masters or self.params

    def buffers(self):
        return self.params + self.masters + self.exp_avgs + self.exp_avg_sqs

    def clone(self):
        other = object.__new__(Group)
        other.weight_dtype = self.weight_dtype
        for name in ("params", "masters", "exp_avgs", "exp_avg_sqs"):
            setattr(other, name, [t.clone() for t in getattr(self, name)])
        return other


def fused_step(group, grads, weight_decays, step, lr=LR, grad_scale=None, found_inf=None):
    device = grads[0].device
    torch.ops.hift.fused_adamw_(
        group.params, group.masters, group.exp_avgs, group.exp_avg_sqs, grads,
        [float(w) for w in weight_decays], torch.tensor(lr, device=device),
        torch.tensor(float(step), device=device), BETAS[0], BETAS[1], EPS, grad_scale, found_inf)


def random_grads(sizes, dtype, device, gen):
    return [torch.randn(n, generator=gen).to(device=device, dtype=dtype) for n in sizes]


@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("grad_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight_dtype", DTYPES, ids=str)
def test_matches_torch_adamw(weight_dtype, grad_dtype, weight_decay, device):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    sizes = SIZES
    group = Group(sizes, weight_dtype, device, gen)
    # Per-tensor decay: every other tensor is a "bias" without it.
    decays = [weight_decay if i % 2 == 0 else 0.0 for i in range(len(sizes))]
    reference = [torch.nn.Parameter(t.clone()) for t in group.fp32]
    optimizer = torch.optim.AdamW(
        [{"params": [p], "weight_decay": wd} for p, wd in zip(reference, decays)],
        lr=LR, betas=BETAS, eps=EPS, foreach=False)
    for step in range(1, 21):
        grads = random_grads(sizes, grad_dtype, device, gen)
        for p, g in zip(reference, grads):
            p.grad = g.float()
        optimizer.step()
        fused_step(group, grads, decays, step)
    note = f"seed={seed}"
    for i, p in enumerate(reference):
        state = optimizer.state[p]
        torch.testing.assert_close(group.fp32[i], p.detach(), **FP32, msg=lambda m: f"{note} master {i}: {m}")
        torch.testing.assert_close(group.exp_avgs[i], state["exp_avg"], **FP32, msg=lambda m: f"{note} exp_avg {i}: {m}")
        torch.testing.assert_close(group.exp_avg_sqs[i], state["exp_avg_sq"], **FP32, msg=lambda m: f"{note} exp_avg_sq {i}: {m}")
        if group.masters:
            assert torch.equal(group.params[i], group.masters[i].to(weight_dtype)), \
                f"{note}: weight {i} is not its master rounded to {weight_dtype}"


@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight_dtype", DTYPES, ids=str)
def test_matches_reference_op(weight_dtype, grad_dtype, device):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    sizes = [7, 4097, 333]
    fused = Group(sizes, weight_dtype, device, gen)
    reference = fused.clone()
    decays = [0.05, 0.0, 0.2]
    scale = torch.tensor(0.37, device=device)
    lr = torch.tensor(3e-3, device=device)
    for step in range(1, 6):
        grads = random_grads(sizes, grad_dtype, device, gen)
        step_t = torch.tensor(float(step), device=device)
        torch.ops.hift.fused_adamw_(fused.params, fused.masters, fused.exp_avgs, fused.exp_avg_sqs,
                                    grads, decays, lr, step_t, 0.8, 0.95, 1e-6, scale, None)
        ops.reference_adamw_(reference.params, reference.masters, reference.exp_avgs,
                             reference.exp_avg_sqs, grads, lr=lr, step=step_t, beta1=0.8,
                             beta2=0.95, eps=1e-6, weight_decays=decays, grad_scale=scale)
    for name in ("masters", "exp_avgs", "exp_avg_sqs"):
        for a, b in zip(getattr(fused, name), getattr(reference, name)):
            torch.testing.assert_close(a, b, **FP32, msg=lambda m: f"seed={seed} {name}: {m}")
    if weight_dtype == torch.float32:
        for a, b in zip(fused.params, reference.params):
            torch.testing.assert_close(a, b, **FP32, msg=lambda m: f"seed={seed} params: {m}")
    else:
        for p, m in zip(fused.params, fused.masters):
            assert torch.equal(p, m.to(weight_dtype)), f"seed={seed}"


@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_dtype", DTYPES, ids=str)
def test_found_inf_leaves_everything_untouched(weight_dtype, device):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    sizes = [5, 1031, 77]
    group = Group(sizes, weight_dtype, device, gen)
    fused_step(group, random_grads(sizes, weight_dtype, device, gen), [0.1] * 3, 1)
    before = [t.clone() for t in group.buffers()]
    grads = random_grads(sizes, weight_dtype, device, gen)
    grads[1][3] = float("inf")
    fused_step(group, grads, [0.1] * 3, 2, found_inf=torch.ones((), device=device),
               grad_scale=torch.tensor(0.5, device=device))
    for a, b in zip(group.buffers(), before):
        assert torch.equal(a, b), f"seed={seed}: a buffer changed although found_inf was set"
    # A clear flag is a normal step.
    fused_step(group, random_grads(sizes, weight_dtype, device, gen), [0.1] * 3, 2,
               found_inf=torch.zeros((), device=device))
    assert not torch.equal(group.exp_avgs[1], before[len(group.params) + len(group.masters) + 1])


@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_dtype", DTYPES, ids=str)
def test_grad_scale_folds_in(grad_dtype, device):
    """A grad_scale s is exactly the update on fp32 grads g*s (the product is formed in fp32)."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    sizes = [9, 2051, 300]
    scaled = Group(sizes, torch.bfloat16, device, gen)
    prescaled = scaled.clone()
    scale = torch.tensor(0.0123, device=device)
    for step in (1, 2, 3):
        grads = random_grads(sizes, grad_dtype, device, gen)
        fused_step(scaled, grads, [0.01] * 3, step, grad_scale=scale)
        fused_step(prescaled, [g.float() * scale for g in grads], [0.01] * 3, step)
    for a, b in zip(scaled.buffers(), prescaled.buffers()):
        assert torch.equal(a, b), f"seed={seed}"


@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_dtype", DTYPES, ids=str)
def test_opcheck(weight_dtype, device):
    gen = torch.Generator().manual_seed(fresh_seed())
    sizes = [3, 40, 17]
    group = Group(sizes, weight_dtype, device, gen)
    grads = random_grads(sizes, weight_dtype, device, gen)
    args = (group.params, group.masters, group.exp_avgs, group.exp_avg_sqs, grads, [0.1, 0.0, 0.2],
            torch.tensor(1e-3, device=device), torch.tensor(4.0, device=device), 0.9, 0.999, 1e-8,
            torch.tensor(0.5, device=device), torch.zeros((), device=device))
    torch.library.opcheck(torch.ops.hift.fused_adamw_.default, args)


@needs_op
@pytest.mark.parametrize("device", DEVICES)
def test_ops_adamw_uses_the_kernel_and_accepts_numbers(device):
    gen = torch.Generator().manual_seed(fresh_seed())
    sizes = [11, 130]
    fused, reference = Group(sizes, torch.bfloat16, device, gen), None
    reference = fused.clone()
    grads = random_grads(sizes, torch.bfloat16, device, gen)
    kwargs = dict(lr=2e-3, step=1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decays=[0.1, 0.0])
    ops.adamw_(fused.params, fused.masters, fused.exp_avgs, fused.exp_avg_sqs, grads, **kwargs)
    ops.reference_adamw_(reference.params, reference.masters, reference.exp_avgs,
                         reference.exp_avg_sqs, grads, **kwargs)
    for a, b in zip(fused.masters, reference.masters):
        torch.testing.assert_close(a, b, **FP32)


@needs_op
def test_bad_arguments_fail_in_words():
    p = torch.zeros(4, dtype=torch.bfloat16)
    m, v, g = torch.zeros(4), torch.zeros(4), torch.zeros(4)
    lr, step = torch.tensor(1e-3), torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="no fp32 master"):
        torch.ops.hift.fused_adamw_([p], [], [m], [v], [g], [0.0], lr, step, 0.9, 0.999, 1e-8, None, None)
    with pytest.raises(RuntimeError, match="same length"):
        torch.ops.hift.fused_adamw_([p], [m], [m], [v], [g, g], [0.0], lr, step, 0.9, 0.999, 1e-8, None, None)
    with pytest.raises(RuntimeError, match="different sizes"):
        torch.ops.hift.fused_adamw_([p], [torch.zeros(5)], [m], [v], [g], [0.0], lr, step, 0.9, 0.999, 1e-8, None, None)
    with pytest.raises(RuntimeError, match="non-contiguous"):
        w = torch.zeros(4, 2)[:, 0]
        torch.ops.hift.fused_adamw_([w], [], [m], [v], [g], [0.0], lr, step, 0.9, 0.999, 1e-8, None, None)


@needs_op
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_graph_capture_reads_lr_and_step_from_device():
    gen = torch.Generator().manual_seed(fresh_seed())
    sizes = [5, 3001]
    graphed = Group(sizes, torch.bfloat16, "cuda", gen)
    eager = graphed.clone()
    grads = random_grads(sizes, torch.bfloat16, "cuda", gen)
    lr, step = torch.tensor(1e-3, device="cuda"), torch.tensor(1.0, device="cuda")
    args = lambda g: (g.params, g.masters, g.exp_avgs, g.exp_avg_sqs, grads, [0.1, 0.0], lr, step,
                      0.9, 0.999, 1e-8, None, None)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    warm = graphed.clone()
    with torch.cuda.stream(side):
        torch.ops.hift.fused_adamw_(*args(warm))  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.hift.fused_adamw_(*args(graphed))
    graphed_state = [t.clone() for t in graphed.buffers()]  # capture does not run the kernel
    for a, b in zip(graphed.buffers(), graphed_state):
        assert torch.equal(a, b)
    for k in range(1, 4):
        lr.fill_(1e-3 * k)
        step.fill_(float(k))
        graph.replay()
        torch.ops.hift.fused_adamw_(*args(eager))
    torch.cuda.synchronize()
    for a, b in zip(graphed.buffers(), eager.buffers()):
        assert torch.equal(a, b)
