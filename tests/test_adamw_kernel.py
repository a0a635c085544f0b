"""hift._C fused AdamW, held to torch.optim.AdamW on fp32 clones and to ops.reference_adamw_.

Random inputs from a fresh seed each run (printed on failure), odd sizes, every (weight, grad)
dtype pair; tolerances come from fp32 (the master, exp_avg and exp_avg_sq are fp32 whatever the
weight is), and the low-precision weight must equal the master rounded, bit for bit.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hift import formats, ops

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


# The CPU kernel hift._C runs for each of ATen's capabilities (any other runs the portable one).
ISA_OF_CAPABILITY = {"AVX512": "avx512", "AVX2": "avx2"}
# Run in a fresh process, where ATEN_CPU_CAPABILITY is read: which kernel runs, and that it is
# held to the reference on odd sizes (each ISA's kernel is a separate compilation of the loop).
REPORT_ISA = textwrap.dedent("""
    import json, sys, torch
    from hift import _C, ops
    gen = torch.Generator().manual_seed(int(sys.argv[1]))
    sizes = [1, 15, 33, 4099, 40961]
    for weight_dtype in (torch.float32, torch.bfloat16):
        states = []
        for _ in range(2):
            g = torch.Generator().manual_seed(int(sys.argv[1]))
            masters = [torch.randn(n, generator=g) for n in sizes]
            params = masters if weight_dtype == torch.float32 else [m.to(weight_dtype) for m in masters]
            states.append((params, [] if weight_dtype == torch.float32 else masters,
                           [torch.zeros(n) for n in sizes], [torch.zeros(n) for n in sizes]))
        for step in (1, 2, 3):
            grads = [torch.randn(n, generator=gen).to(weight_dtype) for n in sizes]
            lr, step_t = torch.tensor(2e-3), torch.tensor(float(step))
            torch.ops.hift.fused_adamw_(*states[0], grads, [0.1] * len(sizes), lr, step_t,
                                        0.9, 0.999, 1e-8, None, None, [], [])
            ops.reference_adamw_(*states[1], grads, lr=lr, step=step_t, beta1=0.9, beta2=0.999,
                                 eps=1e-8, weight_decays=[0.1] * len(sizes))
        fp32_roles = lambda s: (s[1] or s[0], s[2], s[3])  # fp32 params are their own masters
        for fused, reference in zip(fp32_roles(states[0]), fp32_roles(states[1])):
            for a, b in zip(fused, reference):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    print(json.dumps([torch.ops.hift.cpu_kernel_isa(), torch.backends.cpu.get_cpu_capability()]))
""")


def isa_in_fresh_process(capability=None) -> tuple[str, str]:
    """(the kernel hift._C runs, ATen's capability) in a new interpreter with
    ATEN_CPU_CAPABILITY=capability (unset for None)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "HIFT_KERNELS")}
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    seed = fresh_seed()
    done = subprocess.run([sys.executable, "-c", REPORT_ISA, str(seed)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"seed={seed} ATEN_CPU_CAPABILITY={capability}: {done.stderr[-3000:]}"
    isa, aten = json.loads(done.stdout.strip().splitlines()[-1])
    return isa, aten


@needs_op
def test_cpu_kernel_isa_is_atens_choice():
    isa, aten = isa_in_fresh_process()
    assert isa == ISA_OF_CAPABILITY.get(aten, "portable"), f"ATen runs {aten}, hift._C runs {isa}"
    if ops.HAS_EXTENSION:
        assert ops.cpu_kernel_isa() == torch.ops.hift.cpu_kernel_isa()


@needs_op
def test_aten_cpu_capability_default_forces_the_portable_kernel():
    assert isa_in_fresh_process("default") == ("portable", "DEFAULT")


@needs_op
def test_aten_cpu_capability_avx2_caps_the_kernel():
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip(f"this CPU's capability is {torch.backends.cpu.get_cpu_capability()}")
    assert isa_in_fresh_process("avx2") == ("avx2", "AVX2")


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
        torch.tensor(float(step), device=device), BETAS[0], BETAS[1], EPS, grad_scale, found_inf, [], [])


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
                                    grads, decays, lr, step_t, 0.8, 0.95, 1e-6, scale, None, [], [])
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
            torch.tensor(0.5, device=device), torch.zeros((), device=device), [], [])
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
        torch.ops.hift.fused_adamw_([p], [], [m], [v], [g], [0.0], lr, step, 0.9, 0.999, 1e-8, None, None, [], [])
    with pytest.raises(RuntimeError, match="same length"):
        torch.ops.hift.fused_adamw_([p], [m], [m], [v], [g, g], [0.0], lr, step, 0.9, 0.999, 1e-8, None, None, [], [])
    with pytest.raises(RuntimeError, match="different sizes"):
        torch.ops.hift.fused_adamw_([p], [torch.zeros(5)], [m], [v], [g], [0.0], lr, step, 0.9, 0.999, 1e-8, None, None, [], [])
    with pytest.raises(RuntimeError, match="non-contiguous"):
        w = torch.zeros(4, 2)[:, 0]
        torch.ops.hift.fused_adamw_([w], [], [m], [v], [g], [0.0], lr, step, 0.9, 0.999, 1e-8, None, None, [], [])


@needs_op
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_graph_capture_reads_lr_and_step_from_device():
    """Captured once, replayed with a new lr and step each time: capture leaves the buffers as
    they were, and each replay is one reference step from the state just before it (a graph that
    baked in the lr or step it was captured with fails from the second replay)."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    sizes = [5, 3001]
    decays = [0.1, 0.0]
    graphed = Group(sizes, torch.bfloat16, "cuda", gen)
    grads = random_grads(sizes, torch.bfloat16, "cuda", gen)
    lr, step = torch.tensor(1e-3, device="cuda"), torch.tensor(1.0, device="cuda")
    args = lambda g: (g.params, g.masters, g.exp_avgs, g.exp_avg_sqs, grads, decays, lr, step,
                      0.9, 0.999, 1e-8, None, None, [], [])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    warm = graphed.clone()
    with torch.cuda.stream(side):
        torch.ops.hift.fused_adamw_(*args(warm))  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    before_capture = graphed.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.hift.fused_adamw_(*args(graphed))
    torch.cuda.synchronize()
    for a, b in zip(graphed.buffers(), before_capture.buffers()):
        assert torch.equal(a, b), f"seed={seed}: capturing the update changed a buffer"
    for k in range(1, 4):
        lr.fill_(1e-3 * k)
        step.fill_(float(k))
        before = graphed.clone()
        graph.replay()
        eager, reference = before.clone(), before.clone()
        torch.ops.hift.fused_adamw_(*args(eager))
        ops.reference_adamw_(reference.params, reference.masters, reference.exp_avgs,
                             reference.exp_avg_sqs, grads, lr=lr, step=step, beta1=0.9,
                             beta2=0.999, eps=1e-8, weight_decays=decays)
        torch.cuda.synchronize()
        note = f"seed={seed} replay {k} (lr {1e-3 * k:g}, step {k})"
        for name in ("masters", "exp_avgs", "exp_avg_sqs"):
            for i, (a, b, prior) in enumerate(zip(getattr(graphed, name), getattr(reference, name),
                                                  getattr(before, name))):
                assert not torch.equal(a, prior), f"{note}: the replay left {name}[{i}] as it was"
                torch.testing.assert_close(a, b, **FP32, msg=lambda m: f"{note} {name}[{i}]: {m}")
        for a, b in zip(graphed.buffers(), eager.buffers()):
            assert torch.equal(a, b), f"{note}: the replay differs from the same update run eagerly"
        for p, m in zip(graphed.params, graphed.masters):
            assert torch.equal(p, m.to(torch.bfloat16)), f"{note}: weight is not its master rounded"


# --------------------------------------------------------------------------------------------
# Compact state formats (hift.formats): fp32 or int16-remainder masters, fp32 or bf16 moments.
# The kernel is held to ops.reference_adamw_ step by step from the same state (a stochastically
# rounded trajectory that differs by one bf16 ulp once draws differently ever after, so runs are
# not compared over many steps).

# (weight dtype, master format) pairs the formats have.
WEIGHT_MASTERS = [(torch.float32, "none"), (torch.float32, "fp32"), (torch.bfloat16, "fp32"),
                  (torch.bfloat16, "remainder"), (torch.float16, "fp32")]
INT8 = (torch.int8, torch.uint8)  # int8 moments: codes, with fp32 scales per block of 256
MOMENTS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
           (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), INT8]
# The steps of a run: the key hashes the integer step, 2*step + stream taken mod 2**32 (the last
# is exact in fp32 and wraps).
FORMAT_STEPS = [1, 2, 3, 3 * 2**30 + 256]
# Group element numbers start near 2**32, so they wrap inside the group, as the hash takes them.
GROUP_BASE = 2**32 - 30_001


def format_id(value):
    return str(value).replace("torch.", "") if isinstance(value, torch.dtype) else str(value)


class State:
    """One group's state in given formats, as the op takes it: params, masters ([] for "none";
    fp32; or int16 remainders), exp_avgs and exp_avg_sqs (fp32, bf16, or int8 codes with their
    scales)."""

    def __init__(self, roles, offsets, scales=([], [])):
        self.params, self.masters, self.exp_avgs, self.exp_avg_sqs = roles
        self.offsets = offsets
        self.exp_avg_scales, self.exp_avg_sq_scales = scales

    @classmethod
    def random(cls, sizes, weight_dtype, master, moments, device, gen):
        values = [torch.randn(n, generator=gen).to(device) for n in sizes]
        if master == "none":
            params, masters = values, []
        elif master == "fp32":
            params, masters = [v.to(weight_dtype) for v in values], values
        else:
            params, masters = map(list, zip(*(formats.split_master(v) for v in values)))
        exp_avgs = [(1e-2 * torch.randn(n, generator=gen)) for n in sizes]
        # spanning many octaves, with zeros, as real second moments do
        exp_avg_sqs = [1e-4 * torch.rand(n, generator=gen) ** 6 * (torch.rand(n, generator=gen) > 0.05)
                       for n in sizes]
        offsets = [GROUP_BASE + sum(sizes[:i]) for i in range(len(sizes))]
        if moments == INT8:
            m_codes, m_scales = zip(*(formats.encode_exp_avg(m) for m in exp_avgs))
            v_codes, v_scales = zip(*(formats.encode_exp_avg_sq(v, 11, o) for v, o in zip(exp_avg_sqs, offsets)))
            move = lambda ts: [t.to(device) for t in ts]  # noqa: E731
            return cls((params, masters, move(m_codes), move(v_codes)), offsets, (move(m_scales), move(v_scales)))
        exp_avgs = [m.to(device, moments[0]) for m in exp_avgs]
        exp_avg_sqs = [v.to(device, moments[1]) for v in exp_avg_sqs]
        return cls((params, masters, exp_avgs, exp_avg_sqs), offsets)

    def roles(self):
        return self.params, self.masters, self.exp_avgs, self.exp_avg_sqs

    def buffers(self):
        return [t for role in (*self.roles(), self.exp_avg_scales, self.exp_avg_sq_scales) for t in role]

    def clone(self):
        return State([[t.clone() for t in role] for role in self.roles()], self.offsets,
                     ([t.clone() for t in self.exp_avg_scales], [t.clone() for t in self.exp_avg_sq_scales]))

    def decoded_moments(self):
        """fp32 exp_avgs and exp_avg_sqs (bf16 -> fp32 is exact; int8 codes decoded exactly)."""
        if self.exp_avg_scales:
            return ([formats.decode_exp_avg(q, s) for q, s in zip(self.exp_avgs, self.exp_avg_scales)],
                    [formats.decode_exp_avg_sq(c, s) for c, s in zip(self.exp_avg_sqs, self.exp_avg_sq_scales)])
        return [m.float() for m in self.exp_avgs], [v.float() for v in self.exp_avg_sqs]

    def with_fp32_moments(self):
        """A clone whose moments are decoded to fp32."""
        params, masters, _, _ = self.clone().roles()
        exp_avgs, exp_avg_sqs = ([t.clone() for t in ts] for ts in self.decoded_moments())  # .float() may alias
        return State((params, masters, exp_avgs, exp_avg_sqs), self.offsets)

    def decoded_masters(self):
        if not self.masters:
            return self.params
        if self.masters[0].dtype == torch.int16:
            return [formats.join_master(p, r) for p, r in zip(self.params, self.masters)]
        return self.masters


def update_args(seed, step, device, scale=0.37):
    return dict(lr=torch.tensor(3e-3, device=device), step=torch.tensor(float(step), device=device),
                beta1=0.8, beta2=0.95, eps=1e-6, grad_scale=torch.tensor(scale, device=device),
                seed=seed)


def fused_update(state, grads, decays, seed, step, **overrides):
    a = {**update_args(seed, step, grads[0].device), **overrides}
    torch.ops.hift.fused_adamw_(*state.roles(), grads, decays, a["lr"], a["step"], a["beta1"],
                                a["beta2"], a["eps"], a["grad_scale"], a.get("found_inf"),
                                state.exp_avg_scales, state.exp_avg_sq_scales, a["seed"], state.offsets)


def reference_update(state, grads, decays, seed, step):
    ops.reference_adamw_(*state.roles(), grads, weight_decays=decays, offsets=state.offsets,
                         exp_avg_scales=state.exp_avg_scales, exp_avg_sq_scales=state.exp_avg_sq_scales,
                         **update_args(seed, step, grads[0].device))


def assert_master_close(ours, theirs, before, where):
    """Masters after master - update, to fp32 rounding of the operands: an update that nearly
    cancels the master (random states can ask for one as large as it) leaves a small result whose
    error is a few ulps of the operands, not of the result."""
    bound = FP32["atol"] + FP32["rtol"] * (before.abs() + theirs.abs())
    off = (ours - theirs).abs() > bound
    assert not off.any(), (f"{where}: {int(off.sum())} of {off.numel()} off, e.g. {ours[off][:3].tolist()} vs "
                           f"{theirs[off][:3].tolist()} (before {before[off][:3].tolist()})")


def bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def within_one_bf16_ulp(a, b):
    """bf16 tensors equal or neighbours (the rounding is monotone in the fp32 bits, so fp32 inputs
    an ulp apart are rounded at most one bf16 step apart)."""
    up = torch.nextafter(a, torch.full_like(a, float("inf")))
    down = torch.nextafter(a, torch.full_like(a, float("-inf")))
    return (b == a) | (b == up) | (b == down)


@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("moments", MOMENTS, ids=lambda m: "m_{}-v_{}".format(*map(format_id, m)))
@pytest.mark.parametrize("grad_dtype", DTYPES, ids=format_id)
@pytest.mark.parametrize("weight_dtype,master", WEIGHT_MASTERS, ids=format_id)
def test_compact_formats_match_reference_op(weight_dtype, master, grad_dtype, moments, device):
    run_seed = fresh_seed()
    print(f"seed={run_seed}")
    gen = torch.Generator().manual_seed(run_seed)
    seed = formats.group_seed(run_seed, 3)
    sizes = SIZES
    decays = [0.1 if i % 2 == 0 else 0.0 for i in range(len(sizes))]
    fused = State.random(sizes, weight_dtype, master, moments, device, gen)
    for step in FORMAT_STEPS:
        note = f"seed={run_seed} step={step}"
        grads = random_grads(sizes, grad_dtype, device, gen)
        reference = fused.clone()
        before = [m.clone() for m in fused.decoded_masters()]
        # The fp32 moments the kernel computes this step, from the same decoded state: what its
        # bf16 moments are the rounding of (stored moments round; the update uses these values).
        kernel_fp32, reference_fp32 = fused.with_fp32_moments(), fused.with_fp32_moments()
        fused_update(fused, grads, decays, seed, step)
        fused_update(kernel_fp32, grads, decays, seed, step)
        reference_update(reference, grads, decays, seed, step)
        reference_update(reference_fp32, grads, decays, seed, step)

        for i, (ours, theirs, twin) in enumerate(zip(fused.decoded_masters(), reference.decoded_masters(),
                                                     kernel_fp32.decoded_masters())):
            assert_master_close(ours, theirs, before[i], f"{note} master {i}")
            assert torch.equal(bits(ours), bits(twin)), \
                f"{note} master {i}: the moments' format changed the update, not only what is stored"
        if master == "remainder":
            for i, (w, r, decoded) in enumerate(zip(fused.params, fused.masters, fused.decoded_masters())):
                weight, remainder = formats.split_master(decoded)
                assert torch.equal(bits(w), bits(weight)) and torch.equal(r, remainder), \
                    f"{note}: weight {i} and remainder are not split_master of their master"
            for i, (ours, theirs) in enumerate(zip(fused.decoded_masters(), reference.decoded_masters())):
                same = bits(ours) == bits(theirs)  # where the fp32 masters agree, so do the bits stored
                assert torch.equal(bits(fused.params[i])[same], bits(reference.params[i])[same]), note
                assert torch.equal(fused.masters[i][same], reference.masters[i][same]), note
        elif master == "fp32":
            for i, (p, m) in enumerate(zip(fused.params, fused.masters)):
                assert torch.equal(p, m.to(weight_dtype)), f"{note}: weight {i} is not its master rounded"

        if moments == INT8:
            check_int8_moments(fused, reference, kernel_fp32, reference_fp32, seed, step, note)
            continue
        for name, stream in formats.MOMENT_STREAMS.items():
            key = formats.rounding_key(seed, step, stream)
            for i in range(len(sizes)):
                ours, theirs = getattr(fused, name + "s")[i], getattr(reference, name + "s")[i]
                ours_fp32, theirs_fp32 = getattr(kernel_fp32, name + "s")[i], getattr(reference_fp32, name + "s")[i]
                where = f"{note} {name} {i}"
                if ours.dtype == torch.float32:
                    torch.testing.assert_close(ours, theirs, **FP32, msg=lambda m: f"{where}: {m}")
                    continue
                # (b) exactly the reference codec applied to the kernel's own fp32 values
                expected = formats.to_bf16_stochastic(ours_fp32.cpu(), key, fused.offsets[i])
                assert torch.equal(bits(ours.cpu()), bits(expected)), f"{where}: not to_bf16_stochastic"
                # (a) against the reference run: equal where the fp32 values rounded are equal (the
                # kernel's exact sqrt and fused multiply-adds can put them an fp32 ulp apart), and
                # at most one bf16 step apart where they are not
                torch.testing.assert_close(ours_fp32, theirs_fp32, **FP32, msg=lambda m: f"{where}: {m}")
                same = bits(ours_fp32) == bits(theirs_fp32)
                assert torch.equal(bits(ours)[same], bits(theirs)[same]), f"{where}: rounded differently"
                assert bool(within_one_bf16_ulp(ours, theirs).all()), f"{where}: more than a bf16 ulp apart"


def check_int8_moments(fused, reference, kernel_fp32, reference_fp32, seed, step, note):
    """int8 moments after one update: (b) exactly the reference codecs applied to the kernel's own
    fp32 moments, codes and scales; (a) against the reference run, whose fp32 moments may be an
    ulp off the kernel's: scales at fp32 tolerance, codes equal where a block's fp32 values all
    agree, else at most a code apart (one code for a value an ulp off; an element on a code
    boundary can round stochastically from either side, so exp_avg_sq allows two)."""
    key = formats.rounding_key(seed, step, formats.MOMENT_STREAMS["exp_avg_sq"])
    for i, offset in enumerate(fused.offsets):
        where = f"{note} int8 moments {i}"
        m32, v32 = kernel_fp32.exp_avgs[i].cpu(), kernel_fp32.exp_avg_sqs[i].cpu()
        expected = (*formats.encode_exp_avg(m32), *formats.encode_exp_avg_sq(v32, key, offset))
        ours = [t.cpu() for t in (fused.exp_avgs[i], fused.exp_avg_scales[i], fused.exp_avg_sqs[i],
                                  fused.exp_avg_sq_scales[i])]
        theirs = [t.cpu() for t in (reference.exp_avgs[i], reference.exp_avg_scales[i],
                                    reference.exp_avg_sqs[i], reference.exp_avg_sq_scales[i])]
        for name, a, b in zip(("exp_avg", "exp_avg scales", "exp_avg_sq", "exp_avg_sq scales"), ours, expected):
            assert torch.equal(a, b), f"{where}: {name} are not the reference codec of the kernel's fp32 values"
        torch.testing.assert_close(m32, reference_fp32.exp_avgs[i].cpu(), **FP32)
        torch.testing.assert_close(v32, reference_fp32.exp_avg_sqs[i].cpu(), **FP32)
        torch.testing.assert_close(ours[1], theirs[1], **FP32)
        torch.testing.assert_close(ours[3], theirs[3], **FP32)
        for codes, fp32s, allowed in ((0, (m32, reference_fp32.exp_avgs[i]), 1),
                                      (2, (v32, reference_fp32.exp_avg_sqs[i]), 2)):
            a, b = ours[codes].to(torch.int32), theirs[codes].to(torch.int32)
            assert int((a - b).abs().max()) <= allowed, f"{where}: codes more than {allowed} apart"
            same = (bits(fp32s[0]) == bits(fp32s[1].cpu()))
            n = same.numel()
            whole = formats._blocks(same.float(), fill=1.0).bool().all(dim=1)  # blocks that agree
            agree = whole.repeat_interleave(formats.INT8_BLOCK)[:n]
            assert torch.equal(a[agree], b[agree]), f"{where}: coded differently from the same values"


@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_dtype", DTYPES, ids=format_id)
def test_remainder_master_is_the_fp32_master_update_bit_for_bit(grad_dtype, device):
    """Kernel against kernel: a bf16 weight + int16 remainder is the same fp32 master as an fp32
    copy, step after step; only the weight differs (ties away from zero, not to even)."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    sizes = [3, 33, 1025, 40961]
    compact = State.random(sizes, torch.bfloat16, "remainder", MOMENTS[1], device, gen)
    full = compact.clone()
    full.masters = [m.clone() for m in compact.decoded_masters()]
    for step in range(1, 6):
        grads = random_grads(sizes, grad_dtype, device, gen)
        fused_update(compact, grads, [0.1] * len(sizes), 99, step)
        fused_update(full, grads, [0.1] * len(sizes), 99, step)
    for i, (ours, theirs) in enumerate(zip(compact.decoded_masters(), full.masters)):
        assert torch.equal(bits(ours), bits(theirs)), f"seed={seed}: master {i}"
        assert torch.equal(compact.params[i], formats.round_to_bf16_weight(theirs)), f"seed={seed}: weight {i}"
        assert torch.equal(full.params[i], theirs.to(torch.bfloat16)), f"seed={seed}: weight {i}"
    for a, b in zip(compact.exp_avgs + compact.exp_avg_sqs, full.exp_avgs + full.exp_avg_sqs):
        assert torch.equal(bits(a), bits(b)), f"seed={seed}"


@needs_op
@pytest.mark.parametrize("device", DEVICES)
def test_remainder_weight_rounds_ties_away_from_zero(device):
    """Exact bf16 ties are rare in random data, so they are made here: with lr = 0 the update
    leaves each master as it was, so the remainder format must store back exactly what
    split_master gave (ties away from zero), while an fp32 master's weight is its round to even."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    n = 4099
    values = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-30, 30, (n,), generator=gen).float())
    ties = (values.view(torch.int32) & ~0xFFFF) | 0x8000  # half way between two bf16 values
    masters = torch.where(torch.arange(n) % 2 == 0, ties, values.view(torch.int32)).view(torch.float32).to(device)
    compact = State.random([n], torch.bfloat16, "remainder", MOMENTS[1], device, gen)
    weight, remainder = formats.split_master(masters)
    compact.params, compact.masters = [weight], [remainder]
    full = State.random([n], torch.bfloat16, "fp32", MOMENTS[0], device, gen)
    full.params, full.masters = [torch.zeros_like(compact.params[0])], [masters.clone()]
    before = [t.clone() for t in (*compact.params, *compact.masters)]
    zero_lr = torch.zeros((), device=device)
    fused_update(compact, [torch.randn(n, generator=gen).to(device)], [0.1], 3, 1, lr=zero_lr)
    fused_update(full, [torch.randn(n, generator=gen).to(device)], [0.1], 3, 1, lr=zero_lr)
    assert torch.equal(bits(compact.params[0]), bits(before[0])), f"seed={seed}: weight"
    assert torch.equal(compact.masters[0], before[1]), f"seed={seed}: remainder"
    assert torch.equal(full.params[0], masters.to(torch.bfloat16)), f"seed={seed}: fp32 master's weight"
    differs = compact.params[0] != full.params[0]  # exactly the ties round to even went down on
    assert bool(differs.any()) and bool((compact.params[0].float().abs()[differs]
                                         > full.params[0].float().abs()[differs]).all()), f"seed={seed}"


@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("moments", [MOMENTS[1], INT8], ids=["bf16", "int8"])
def test_stochastic_rounding_does_not_depend_on_how_a_group_is_cut(moments, device):
    """The bits are drawn per group element (offset + index): one tensor, or the same elements as
    three tensors with their offsets, store the same moments (int8 tensors are cut at block
    multiples, as state chunks cut them)."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    n, cuts = 40961, ([0, 1000, 33001, 40961] if moments != INT8 else [0, 1024, 33024, 40961])
    whole = State.random([n], torch.float32, "none", moments, device, gen)
    cut = lambda role: [role[0][a:b].clone() for a, b in zip(cuts, cuts[1:])]  # noqa: E731
    per_block = lambda role, k: [role[0][a // 256 * k:-(-b // 256) * k].clone() for a, b in zip(cuts, cuts[1:])]  # noqa: E731
    scales = ((per_block(whole.exp_avg_scales, 1), per_block(whole.exp_avg_sq_scales, 2))
              if moments == INT8 else ([], []))
    pieces = State((cut(whole.params), [], cut(whole.exp_avgs), cut(whole.exp_avg_sqs)),
                   [whole.offsets[0] + a for a in cuts[:-1]], scales)
    for step in (1, 2):
        grad = torch.randn(n, generator=gen).to(device)
        fused_update(whole, [grad], [0.1], 7, step)
        fused_update(pieces, [grad[a:b] for a, b in zip(cuts, cuts[1:])], [0.1] * 3, 7, step)
    for name in ("params", "exp_avgs", "exp_avg_sqs") + (("exp_avg_scales", "exp_avg_sq_scales") if scales[0] else ()):
        assert torch.equal(bits(getattr(whole, name)[0]), bits(torch.cat(getattr(pieces, name)))), \
            f"seed={seed}: {name}"


@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("moments", MOMENTS, ids=lambda m: "m_{}-v_{}".format(*map(format_id, m)))
@pytest.mark.parametrize("weight_dtype,master", WEIGHT_MASTERS, ids=format_id)
def test_found_inf_leaves_every_format_untouched(weight_dtype, master, moments, device):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    sizes = [5, 1031, 77]
    state = State.random(sizes, weight_dtype, master, moments, device, gen)
    before = [t.clone() for t in state.buffers()]
    grads = random_grads(sizes, torch.bfloat16, device, gen)
    grads[1][3] = float("inf")
    fused_update(state, grads, [0.1] * 3, 5, 2, found_inf=torch.ones((), device=device))
    for a, b in zip(state.buffers(), before):
        assert torch.equal(bits(a), bits(b)), f"seed={seed}: a buffer changed although found_inf was set"
    fused_update(state, random_grads(sizes, torch.bfloat16, device, gen), [0.1] * 3, 5, 2,
                 found_inf=torch.zeros((), device=device))
    assert all(not torch.equal(a, b) for a, b in zip(state.buffers(), before) if a.numel() > 5), \
        f"seed={seed}: a clear flag did not update every role"


@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_dtype,master,moments", [
    (torch.bfloat16, "remainder", MOMENTS[1]), (torch.bfloat16, "remainder", MOMENTS[0]),
    (torch.float32, "none", MOMENTS[2]), (torch.float16, "fp32", MOMENTS[3]),
    (torch.bfloat16, "remainder", INT8), (torch.float32, "none", INT8),
], ids=format_id)
def test_opcheck_compact_formats(weight_dtype, master, moments, device):
    gen = torch.Generator().manual_seed(fresh_seed())
    sizes = [3, 40, 17]
    state = State.random(sizes, weight_dtype, master, moments, device, gen)
    grads = random_grads(sizes, torch.bfloat16, device, gen)
    args = (*state.roles(), grads, [0.1, 0.0, 0.2], torch.tensor(1e-3, device=device),
            torch.tensor(4.0, device=device), 0.9, 0.999, 1e-8, torch.tensor(0.5, device=device),
            torch.zeros((), device=device), state.exp_avg_scales, state.exp_avg_sq_scales,
            formats.group_seed(1, 2), state.offsets)
    torch.library.opcheck(torch.ops.hift.fused_adamw_.default, args)


@needs_op
@pytest.mark.parametrize("device", DEVICES)
def test_ops_adamw_passes_seed_and_offsets(device):
    """ops.adamw_ runs the kernel on compact state (no fallback), seed and offsets included."""
    gen = torch.Generator().manual_seed(fresh_seed())
    sizes = [11, 130]
    via_ops = State.random(sizes, torch.bfloat16, "remainder", MOMENTS[1], device, gen)
    direct = via_ops.clone()
    grads = random_grads(sizes, torch.bfloat16, device, gen)
    a = update_args(1234, 3, device)
    ops.adamw_(*via_ops.roles(), grads, weight_decays=[0.1, 0.0], offsets=via_ops.offsets, **a)
    fused_update(direct, grads, [0.1, 0.0], 1234, 3)
    for x, y in zip(via_ops.buffers(), direct.buffers()):
        assert torch.equal(bits(x), bits(y))
    via_ops = State.random(sizes, torch.bfloat16, "remainder", INT8, device, gen)
    direct = via_ops.clone()
    ops.adamw_(*via_ops.roles(), grads, weight_decays=[0.1, 0.0], offsets=via_ops.offsets,
               exp_avg_scales=via_ops.exp_avg_scales, exp_avg_sq_scales=via_ops.exp_avg_sq_scales, **a)
    fused_update(direct, grads, [0.1, 0.0], 1234, 3)
    for x, y in zip(via_ops.buffers(), direct.buffers()):
        assert torch.equal(bits(x), bits(y))


@needs_op
def test_bad_format_combinations_fail_in_words():
    n = 4
    f32, bf16 = torch.zeros(n), torch.zeros(n, dtype=torch.bfloat16)
    f16, i16 = torch.zeros(n, dtype=torch.float16), torch.zeros(n, dtype=torch.int16)
    lr, step = torch.tensor(1e-3), torch.tensor(1.0)

    def call(params, masters, exp_avgs, exp_avg_sqs, offsets=(), scales=([], [])):
        k = len(params)
        torch.ops.hift.fused_adamw_(params, masters, exp_avgs, exp_avg_sqs, [f32] * k, [0.0] * k,
                                    lr, step, 0.9, 0.999, 1e-8, None, None, *scales, 0, list(offsets))

    i8, u8 = torch.zeros(n, dtype=torch.int8), torch.zeros(n, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"int8 moments come in pairs.*Char and Float"):
        call([f32.clone()], [], [i8.clone()], [f32.clone()], offsets=[0], scales=([torch.zeros(1)], [torch.zeros(2)]))
    with pytest.raises(RuntimeError, match=r"need one exp_avg_scales and one exp_avg_sq_scales.*got 0 and 0"):
        call([f32.clone()], [], [i8.clone()], [u8.clone()], offsets=[0])
    with pytest.raises(RuntimeError, match=r"exp_avg_sq_scales\[0\] must be .* of 2 elements \(2 per block of 256\); got Float of 1"):
        call([f32.clone()], [], [i8.clone()], [u8.clone()], offsets=[0], scales=([torch.zeros(1)], [torch.zeros(1)]))
    with pytest.raises(RuntimeError, match=r"exp_avgs are Char.*offsets.*required"):
        call([f32.clone()], [], [i8.clone()], [u8.clone()], scales=([torch.zeros(1)], [torch.zeros(2)]))
    with pytest.raises(RuntimeError, match=r"need one exp_avg_scales.*other formats none; got 1 and 1"):
        call([f32.clone()], [], [f32.clone()], [f32.clone()], scales=([torch.zeros(1)], [torch.zeros(2)]))

    with pytest.raises(RuntimeError, match=r"int16 remainders.*params\[0\] is Half"):
        call([f16.clone()], [i16.clone()], [f32.clone()], [f32.clone()])
    with pytest.raises(RuntimeError, match=r"int16 remainders.*params\[1\] is Float"):
        call([bf16.clone(), f32.clone()], [i16.clone(), i16.clone()], [f32.clone()] * 2, [f32.clone()] * 2)
    with pytest.raises(RuntimeError, match=r"exp_avgs are BFloat16.*offsets.*required"):
        call([f32.clone()], [], [bf16.clone()], [f32.clone()])
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs are BFloat16.*offsets.*required"):
        call([f32.clone()], [], [f32.clone()], [bf16.clone()])
    with pytest.raises(RuntimeError, match=r"offsets must be empty or give one per tensor.*got 1 offsets for 2"):
        call([f32.clone()] * 2, [], [bf16.clone()] * 2, [bf16.clone()] * 2, offsets=[0])
    with pytest.raises(RuntimeError, match=r"exp_avgs must all have one dtype.*exp_avgs\[1\] is BFloat16"):
        call([f32.clone()] * 2, [], [f32.clone(), bf16.clone()], [f32.clone()] * 2, offsets=[0, n])
    with pytest.raises(RuntimeError, match=r"masters must all have one dtype.*masters\[1\] is Short"):
        call([bf16.clone()] * 2, [f32.clone(), i16.clone()], [f32.clone()] * 2, [f32.clone()] * 2)
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs must be float32, bfloat16 or Byte \(int8 moments\); got Half"):
        call([f32.clone()], [], [f32.clone()], [f16.clone()])
    with pytest.raises(RuntimeError, match=r"masters must be float32 .* or int16 .*; got BFloat16"):
        call([bf16.clone()], [bf16.clone()], [f32.clone()], [f32.clone()])
