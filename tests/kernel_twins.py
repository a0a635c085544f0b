"""Run the engine on the fused kernel while holding every call to its plain-torch twin.

Training runs that differ by an ulp per step do not stay an ulp apart: the forward and backward
magnify the difference on near-zero gradients, by how much depends on the CPU's vector width
(ATen's own kernels round differently under AVX-512, AVX2 and the portable build). So a
multi-step run on the fused kernel is never compared with a run on other arithmetic. Instead,
each fused update is checked against ops.reference_adamw_ applied to clones of the very same
inputs, at fp32 tolerances, and the reference run itself is compared with torch bit for bit.
"""
import torch

from hift import formats, ops

# One update from identical inputs: the fused kernel's exact sqrt and its fused multiply-adds
# against torch's ops are a few fp32 roundings apart (test_adamw_kernel.py uses the same).
FP32 = dict(rtol=1e-6, atol=1e-7)


class CheckedFusedAdamW:
    """Stands in for ops.adamw_: the reference on clones first, then the fused kernel, then a
    comparison of every role."""

    def __init__(self, fused):
        self.fused = fused
        self.calls = 0

    def __call__(self, params, masters, exp_avgs, exp_avg_sqs, grads, **kwargs):
        twin = [[t.clone() for t in role] for role in (params, masters, exp_avgs, exp_avg_sqs)]
        scales = [kwargs.get(name, []) for name in SCALES]
        twin_scales = [[t.clone() for t in role] for role in scales]
        ops.reference_adamw_(*twin, grads, **{**kwargs, **dict(zip(SCALES, twin_scales))})
        self.fused(params, masters, exp_avgs, exp_avg_sqs, grads, **kwargs)
        self.calls += 1
        where = f"fused update call {self.calls}"
        if scales[0]:
            # int8 codes of fp32 values a few roundings apart: scales at fp32 tolerance, codes at
            # most a step apart (two for exp_avg_sq, whose boundary elements round stochastically;
            # test_adamw_kernel.py holds the codes exact where the fp32 values agree)
            for name, mine, theirs, allowed in (("exp_avg", exp_avgs, twin[2], 1), ("exp_avg_sq", exp_avg_sqs, twin[3], 2)):
                for i, (a, b) in enumerate(zip(mine, theirs)):
                    apart = int((a.to(torch.int32) - b.to(torch.int32)).abs().max()) if a.numel() else 0
                    assert apart <= allowed, f"{where}, {name} {i}: codes {apart} apart"
            for name, mine, theirs in zip(SCALES, scales, twin_scales):
                for i, (a, b) in enumerate(zip(mine, theirs)):
                    torch.testing.assert_close(a, b, **FP32, msg=lambda m: f"{where}, {name} {i}: {m}")
        ours = decoded(params, masters, exp_avgs, exp_avg_sqs, *scales)
        for name, mine, theirs, stored in zip(("master", "exp_avg", "exp_avg_sq"), ours, decoded(*twin, *twin_scales),
                                              (masters or params, exp_avgs, exp_avg_sqs)):
            if name != "master" and scales[0]:
                continue  # compared as codes above
            for i, (a, b) in enumerate(zip(mine, theirs)):
                if stored[i].dtype == torch.bfloat16:
                    # stochastic rounding of fp32 values an ulp apart can land a bf16 ulp apart
                    # (test_adamw_kernel.py holds it exact where the fp32 values agree)
                    ulp = torch.maximum(a.abs(), b.abs()) * 2**-7
                    assert bool(((a - b).abs() <= ulp).all()), f"{where}, {name} {i}: more than a bf16 ulp off"
                else:
                    torch.testing.assert_close(a, b, **FP32, msg=lambda m: f"{where}, {name} {i}: {m}")
        for i, (p, m) in enumerate(zip(params, masters)):  # a low-precision weight is its master rounded
            rounded = formats.round_to_bf16_weight(ours[0][i]) if m.dtype == torch.int16 else m.to(p.dtype)
            assert torch.equal(p, rounded), f"{where}: weight {i} is not its master rounded"


SCALES = ("exp_avg_scales", "exp_avg_sq_scales")  # int8 moments' block scales (keyword arguments)


def decoded(params, masters, exp_avgs, exp_avg_sqs, exp_avg_scales=(), exp_avg_sq_scales=()):
    """fp32 masters (the params where they are their own), exp_avgs and exp_avg_sqs."""
    if masters and masters[0].dtype == torch.int16:
        masters = [formats.join_master(p, r) for p, r in zip(params, masters)]
    if exp_avg_scales:
        return (masters or params, [formats.decode_exp_avg(q, s) for q, s in zip(exp_avgs, exp_avg_scales)],
                [formats.decode_exp_avg_sq(c, s) for c, s in zip(exp_avg_sqs, exp_avg_sq_scales)])
    return masters or params, [m.float() for m in exp_avgs], [v.float() for v in exp_avg_sqs]
