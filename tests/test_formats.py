"""The compact state formats' reference codecs (hift.formats) and the reference update on them:
the bf16 master remainder is lossless, stochastic rounding is unbiased and reproducible, and an
update on compact state is the fp32 update on its decoded values."""
import math
import os

import pytest
import torch

from hift import formats, ops


@pytest.fixture
def gen():
    seed = int(os.environ.get("HIFT_TEST_SEED", int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF))
    print(f"seed={seed} (HIFT_TEST_SEED={seed} replays it)")
    return torch.Generator().manual_seed(seed)


def wide_floats(n, gen):
    """Normal, tiny, huge and subnormal magnitudes of both signs, and exact bf16 ties."""
    x = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-140, 120, (n,), generator=gen).float())
    ties = (torch.randn(n // 8, generator=gen).to(torch.bfloat16).float().view(torch.int32) | 0x8000).view(torch.float32)
    return torch.cat([x, ties, torch.tensor([0.0, -0.0, 1.0, -1.0, 3.0e38, -3.0e38, 1e-45])])


def test_remainder_gives_the_master_back_bit_for_bit(gen):
    master = wide_floats(40_001, gen)
    weight, remainder = formats.split_master(master)
    assert weight.dtype == torch.bfloat16 and remainder.dtype == torch.int16
    assert torch.equal(formats.join_master(weight, remainder).view(torch.int32), master.view(torch.int32))


def test_remainder_weight_is_the_nearest_bf16_ties_away_from_zero(gen):
    master = wide_floats(40_001, gen)
    weight = formats.round_to_bf16_weight(master)
    nearest = master.to(torch.bfloat16)
    # as close as round-to-even everywhere; different only on exact ties, where it is the larger magnitude
    assert torch.equal((weight.float() - master).abs(), (nearest.float() - master).abs())
    differs = weight != nearest
    ties = (master.view(torch.int32) & 0xFFFF) == 0x8000
    assert differs.any() and bool((differs <= ties).all())
    assert bool((weight.float().abs()[differs] > nearest.float().abs()[differs]).all())


def test_lowbias32_on_ints_and_tensors_agree_and_match_the_published_function():
    # values of the C reference (Wellons, lowbias32), which csrc/adamw.h implements too
    known = {0: 0, 1: 1753845952, 0xFFFFFFFF: 1734902346}
    assert {x: formats.lowbias32(x) for x in known} == known
    xs = torch.randint(0, 2**32, (1000,), dtype=torch.int64)
    assert formats.lowbias32(xs).tolist() == [formats.lowbias32(int(x)) for x in xs]


def test_stochastic_rounding_is_unbiased_and_brackets_the_value(gen):
    x = torch.rand(64, generator=gen) * 4 - 2
    draws = torch.stack([formats.to_bf16_stochastic(x.expand(4096, -1).reshape(-1), key, 0).float().view(4096, 64)
                         for key in (11, 12)]).reshape(-1, 64)
    below = x.abs().to(torch.bfloat16)
    ulp = torch.nextafter(below, torch.tensor(torch.inf, dtype=torch.bfloat16)).float() - below.float()
    assert bool(((draws - x).abs() <= ulp).all())  # only the two neighbours are ever drawn
    # the mean of 8192 draws is within 5 standard errors of x (each draw is off by < 1 ulp)
    assert bool(((draws.mean(0) - x).abs() <= 5 * ulp / 8192**0.5 ).all())


def test_stochastic_rounding_is_reproducible_and_cut_invariant(gen):
    x = torch.randn(1000, generator=gen)
    whole = formats.to_bf16_stochastic(x, key=7, offset=100)
    pieces = torch.cat([formats.to_bf16_stochastic(x[:333], 7, 100), formats.to_bf16_stochastic(x[333:], 7, 433)])
    assert torch.equal(whole, pieces) and torch.equal(whole, formats.to_bf16_stochastic(x, 7, 100))
    assert not torch.equal(whole, formats.to_bf16_stochastic(x, 8, 100))


def test_bf16_second_moment_decays_only_with_stochastic_rounding():
    """0.999 * v rounds back to v in bf16 to nearest: v never decays. Stochastically rounded,
    its mean follows 0.999**t."""
    v = torch.full((20_000,), 1.0, dtype=torch.bfloat16)
    nearest = v.clone()
    for step in range(1, 201):
        value = v.float() * 0.999
        formats.store_moment(v, value, formats.rounding_key(3, step, 1), 0)
        nearest = (nearest.float() * 0.999).to(torch.bfloat16)
    assert torch.equal(nearest, torch.ones_like(nearest))
    assert v.float().mean().item() == pytest.approx(0.999**200, rel=2e-3)


def _update(state, grads, step, seed=5):
    params, masters, m, v = state
    ops.reference_adamw_(params, masters, m, v, grads, lr=1e-2, step=step, beta1=0.9, beta2=0.99,
                         eps=1e-8, weight_decays=[0.1] * len(params), seed=seed,
                         offsets=[sum(p.numel() for p in params[:i]) for i in range(len(params))])


def test_remainder_update_equals_the_fp32_master_update_bit_for_bit(gen):
    sizes = [7, 1001, 33]
    masters = [torch.randn(n, generator=gen) for n in sizes]
    fp32 = ([m.to(torch.bfloat16) for m in masters], [m.clone() for m in masters],
            [torch.zeros(n) for n in sizes], [torch.zeros(n) for n in sizes])
    split = [formats.split_master(m) for m in masters]
    compact = ([w for w, _ in split], [r for _, r in split], [torch.zeros(n) for n in sizes], [torch.zeros(n) for n in sizes])
    for step in range(1, 8):
        grads = [torch.randn(n, generator=gen).to(torch.bfloat16) for n in sizes]
        _update(fp32, grads, step)
        _update(compact, grads, step)
    for i, (w, r) in enumerate(zip(compact[0], compact[1])):
        assert torch.equal(formats.join_master(w, r), fp32[1][i]), i
        assert torch.equal(w, formats.round_to_bf16_weight(fp32[1][i])), i
        assert torch.equal(compact[2][i], fp32[2][i]) and torch.equal(compact[3][i], fp32[3][i])


def test_bf16_moments_track_fp32_moments(gen):
    """A stochastically rounded EMA m_t = SR(beta*m_{t-1} + (1-beta)*g) is off the fp32 one by
    e_t = beta*e_{t-1} + d_t with |d_t| < one bf16 ulp (2**-7 relative, at most), so never by more
    than ulp/(1 - beta), and on average far less (the d_t are unbiased and independent)."""
    n, beta1, beta2 = 5001, 0.9, 0.99
    start = torch.randn(n, generator=gen)
    fp32 = ([start.clone()], [], [torch.zeros(n)], [torch.zeros(n)])
    bf16 = ([start.clone()], [], [torch.zeros(n, dtype=torch.bfloat16)], [torch.zeros(n, dtype=torch.bfloat16)])
    base = torch.randn(n, generator=gen)
    largest = [torch.zeros(n), torch.zeros(n)]
    for step in range(1, 51):
        grads = [base + 0.1 * torch.randn(n, generator=gen)]
        _update(fp32, grads, step)
        _update(bf16, grads, step)
        for i in range(2):
            largest[i] = torch.maximum(largest[i], fp32[2 + i][0].abs())
    for ours, theirs, top, beta in ((bf16[2][0], fp32[2][0], largest[0], beta1),
                                    (bf16[3][0], fp32[3][0], largest[1], beta2)):
        error = (ours.float() - theirs).abs()
        ulp = top * 2**-7
        assert bool((error <= ulp / (1 - beta) * 1.01).all())
        assert error.mean() <= 3 * ulp.mean()


# ------------------------------------------------------------------------------ int8 moments


def second_moments(n, gen, octaves=22):
    """Values spread over `octaves` octaves with exact zeros, as an exp_avg_sq block holds them."""
    v = torch.exp2(-octaves * torch.rand(n, generator=gen) - 10)
    return torch.where(torch.rand(n, generator=gen) < 0.05, 0.0, v)


@pytest.mark.parametrize("n", [1, 3, 255, 256, 257, 1000, 40_961])
def test_int8_exp_avg_is_within_half_a_step(gen, n):
    m = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-20, 0, (formats.int8_blocks(n),), generator=gen).float()
                                               ).repeat_interleave(formats.INT8_BLOCK)[:n]
    m[: min(n, 300)] *= 0  # a whole zero block (and a partly zero one)
    q, scale = formats.encode_exp_avg(m)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.numel() == formats.int8_blocks(n)
    decoded = formats.decode_exp_avg(q, scale)
    per_element = scale.repeat_interleave(formats.INT8_BLOCK)[:n]
    # half a step, plus the fp32 roundings of 127/absmax, absmax/127, m*(127/absmax) and q*s
    # (each 2**-24 relative, of values up to 127 steps)
    assert bool(((decoded - m).abs() <= per_element * (0.5 + 127 * 4 * 2**-24)).all())
    assert bool((q.abs() <= 127).all()) and bool((decoded[m == 0] == 0).all())
    blocks = formats._blocks(m).abs().amax(dim=1)
    assert torch.equal(scale, blocks / 127)  # each block's largest |m| is +-127 steps


@pytest.mark.parametrize("n", [1, 2, 255, 257, 40_961])
def test_int8_exp_avg_sq_code_brackets_v_and_never_loses_it(gen, n):
    v = second_moments(n, gen)
    codes, lo_hi = formats.encode_exp_avg_sq(v, key=1234, offset=77)
    assert codes.dtype == torch.uint8 and lo_hi.numel() == 2 * formats.int8_blocks(n)
    decoded = formats.decode_exp_avg_sq(codes, lo_hi)
    assert torch.equal(codes == 0, v == 0) and bool((decoded[v == 0] == 0).all())
    positive = v > 0
    # 254 codes over 22 octaves: a step is at most 2**(1.45 * 22/254) (the bits are log2 to within
    # a mantissa's linear segment), so a value rounds to a neighbour within that factor
    step = 2 ** (1.45 * 22 / 254)
    ratio = decoded[positive] / v[positive]
    assert bool((ratio >= 1 / step).all()) and bool((ratio <= step).all()), (ratio.min(), ratio.max())
    rows = formats._blocks(v)
    lo = torch.where(rows > 0, rows, float("inf")).amin(dim=1)
    lo = torch.where(torch.isinf(lo), 0.0, lo)
    assert torch.equal(lo_hi.view(-1, 2)[:, 0], lo) and torch.equal(lo_hi.view(-1, 2)[:, 1], rows.amax(dim=1))
    assert bool((decoded[v == lo.repeat_interleave(256)[:n]] == v[v == lo.repeat_interleave(256)[:n]]).all())


def test_int8_exp_avg_sq_rounding_is_unbiased_and_reproducible(gen):
    n, draws = 1000, 800
    v = second_moments(n, gen, octaves=12)
    first = formats.encode_exp_avg_sq(v, key=5, offset=3)
    assert all(torch.equal(a, b) for a, b in zip(first, formats.encode_exp_avg_sq(v, key=5, offset=3)))
    decoded = torch.stack([formats.decode_exp_avg_sq(*formats.encode_exp_avg_sq(v, key=k, offset=3))
                           for k in range(draws)])
    # v's two neighbouring codes (the scales depend on v only): among a drawn code and the ones beside it
    codes, lo_hi = first
    around = torch.stack([formats.decode_exp_avg_sq((codes.long() + d).clamp(0, 255).to(torch.uint8), lo_hi)
                          for d in (-1, 0, 1)])
    below = torch.where(around <= v, around, -1.0).amax(dim=0)
    above = torch.where(around >= v, around, float("inf")).amin(dim=0)
    assert bool(((decoded == below) | (decoded == above)).all())  # only the two neighbours of v
    # each draw is `below` plus span times a Bernoulli(p) with p = (v - below) / span, so the mean of
    # the draws is unbiased when it stays within Bernstein's bound of v: with L = log(2 / delta),
    # |mean - p| <= sqrt(2 p (1 - p) L / n) + 2 L / (3 n) fails with probability at most delta. A
    # normal approximation (k standard deviations) does not hold where p is tiny: one rare round-up
    # in 800 draws is then many of its standard deviations (it failed 1 run in 12).
    span, v64 = (above - below).double(), v.double()
    p = ((v64 - below.double()) / span.clamp(min=1e-300)).clamp(0, 1)
    L = math.log(2 / 1e-12)  # delta: 1e-12 per element, 1e-9 for the test
    bound = span * ((2 * p * (1 - p) * L / draws).sqrt() + 2 * L / (3 * draws))
    err = (decoded.double().mean(dim=0) - v64).abs()
    assert bool((err <= bound + v64 * 2**-20).all()), float((err / (bound + 1e-300)).max())


def test_int8_second_moment_decays_with_stochastic_rounding(gen):
    """A code step is 3-9%: under round-to-nearest 0.999 * v would never leave its code."""
    v = second_moments(256 * 40, gen, octaves=10)
    codes, lo_hi = formats.encode_exp_avg_sq(v, key=0, offset=0)
    start = formats.decode_exp_avg_sq(codes, lo_hi)
    for step in range(1, 201):
        decayed = formats.decode_exp_avg_sq(codes, lo_hi) * 0.999
        codes, lo_hi = formats.encode_exp_avg_sq(decayed, key=step, offset=0)
    positive = start > 0
    # each element's decoded value is a martingale around 0.999**step times its start
    ratio = (formats.decode_exp_avg_sq(codes, lo_hi)[positive] / start[positive]).double()
    expected = 0.999**200  # 0.819: without stochastic rounding it would stay at 1
    assert abs(float(ratio.mean()) - expected) <= 6 * float(ratio.std()) / ratio.numel() ** 0.5, \
        (float(ratio.mean()), float(ratio.std()))
