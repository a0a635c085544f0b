"""Which 8-bit code should hold AdamW's moments? A training study and a codec test.

Blockwise dynamic quantization (B elements share one fp32 scale, as in bitsandbytes' and torchao's
8-bit Adam): exp_avg is signed, absmax-linear int8 is its baseline; exp_avg_sq is non-negative and
spans many octaves inside a block, so its mapping is the open question. The failure that matters is
a v decoded to 0 (or far below its value) while m is not: the update m / (sqrt(v) + eps) blows up.

Each candidate trains the same small LLaMA (same init, same batches) with a hand-written fp32 AdamW
on flat state buffers; after every step both moments go through quantize -> dequantize. References:
fp32 moments (no codec) and bf16 moments rounded stochastically (hift.formats.to_bf16_stochastic).
Afterwards the fp32 run's real exp_avg_sq snapshots are pushed through every codec directly.

    python bench/int8_moments_study.py --quick                 # smoke run, a minute
    python bench/int8_moments_study.py --out bench/results/int8_moments.md
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from hift import formats  # noqa: E402

BETA1, BETA2, EPS, LR, WD = 0.9, 0.999, 1e-8, 1e-3, 0.01


# ------------------------------------------------------------------------------------ codecs


def dynamic_tree_map_unsigned() -> torch.Tensor:
    """bitsandbytes' unsigned dynamic map (create_dynamic_map(signed=False)): 7 decades below 1,
    2**(i+1) linearly spaced midpoints in decade i, plus 0 and 1; 256 sorted values."""
    data = []
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2 ** (i + 1) + 1, dtype=torch.float64)
        data += (10.0 ** (i - 6) * (edges[:-1] + edges[1:]) / 2).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256
    return torch.tensor(sorted(data), dtype=torch.float32)


DTREE = dynamic_tree_map_unsigned()


def _uniform(x: torch.Tensor, gen) -> torch.Tensor:
    return torch.rand(x.shape, generator=gen, dtype=torch.float32)


def _safe(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def signed_linear(x: torch.Tensor, block: int, gen) -> torch.Tensor:
    """exp_avg: q = round(127 x / absmax) per block, int8 in [-127, 127]."""
    xb = x.view(-1, block)
    scale = _safe(xb.abs().amax(1, keepdim=True) / 127)
    t = xb / scale
    q = torch.floor(t + _uniform(t, gen)) if gen is not None else torch.round(t)
    return (q.clamp_(-127, 127) * scale).view(-1)


def v_linear(v: torch.Tensor, block: int, gen) -> torch.Tensor:
    """(a) q = round(255 v / max), decode q * max / 255."""
    vb = v.view(-1, block)
    scale = _safe(vb.amax(1, keepdim=True) / 255)
    t = vb / scale
    q = torch.floor(t + _uniform(t, gen)) if gen is not None else torch.round(t)
    return (q.clamp_(0, 255) * scale).view(-1)


def v_sqrt_linear(v: torch.Tensor, block: int, gen) -> torch.Tensor:
    """(b) q = round(255 sqrt(v) / sqrt(max)), decode (q s)**2. Stochastic rounding is unbiased in
    v (the EMA's domain): up with probability (v - lo**2) / (hi**2 - lo**2)."""
    vb = v.view(-1, block)
    scale = _safe(vb.amax(1, keepdim=True).sqrt() / 255)
    t = vb.sqrt() / scale
    if gen is None:
        q = torch.round(t)
    else:
        lo = torch.floor(t)
        p = (t * t - lo * lo) / (2 * lo + 1)
        q = lo + (_uniform(t, gen) < p).float()
    return ((q.clamp_(0, 255) * scale) ** 2).view(-1)


def v_log_minmax(v: torch.Tensor, block: int, gen) -> torch.Tensor:
    """(c1) code 0 is exact zero; codes 1..255 lie evenly on log2(v) between the block's smallest
    positive and largest v (two fp32 per block). Round to nearest in log2; stochastic rounding
    unbiased in v."""
    vb = v.view(-1, block)
    pos = vb > 0
    logv = torch.where(pos, vb.clamp_min(torch.finfo(torch.float32).tiny).log2(), torch.zeros_like(vb))
    lmax = torch.where(pos, logv, torch.full_like(logv, -math.inf)).amax(1, keepdim=True)
    lmin = torch.where(pos, logv, torch.full_like(logv, math.inf)).amin(1, keepdim=True)
    empty = ~pos.any(1, keepdim=True)
    lmax = torch.where(empty, torch.zeros_like(lmax), lmax)
    lmin = torch.where(empty, torch.zeros_like(lmin), lmin)
    step = (lmax - lmin) / 254
    step = torch.where(step > 0, step, torch.ones_like(step))
    t = ((logv - lmin) / step).clamp_(0, 254)
    if gen is None:
        k = torch.round(t)
    else:
        lo = torch.floor(t)
        vlo, vhi = torch.exp2(lmin + lo * step), torch.exp2(lmin + (lo + 1) * step)
        p = ((vb - vlo) / (vhi - vlo)).clamp_(0, 1)
        k = (lo + (_uniform(t, gen) < p).float()).clamp_(0, 254)
    out = torch.exp2(lmin + k * step)
    return torch.where(pos, out, torch.zeros_like(out)).view(-1)


def v_dynamic_tree(v: torch.Tensor, block: int, gen) -> torch.Tensor:
    """(c2) bitsandbytes' unsigned dynamic-tree code on v / absmax (7 decades, then 0).
    Round to the nearest code value; stochastic rounding unbiased in v."""
    vb = v.view(-1, block)
    scale = _safe(vb.amax(1, keepdim=True))
    x = (vb / scale).clamp_(0, 1)
    hi = torch.bucketize(x, DTREE).clamp_(1, 255)  # DTREE[hi-1] < x <= DTREE[hi]
    lo = hi - 1
    clo, chi = DTREE[lo], DTREE[hi]
    if gen is None:
        up = (x - clo) > (chi - x)
    else:
        up = _uniform(x, gen) < (x - clo) / (chi - clo)
    return (torch.where(up, chi, clo) * scale).view(-1)


V_MAPPINGS = {
    "lin": (v_linear, 4),  # name: (codec, scale bytes per block)
    "sqrt": (v_sqrt_linear, 4),
    "log2": (v_log_minmax, 8),
    "dtree": (v_dynamic_tree, 4),
}


class Candidate:
    """How the moments rest between steps."""

    def __init__(self, name, m_codec=None, v_codec=None, block=0, stochastic=False,
                 bytes_per_param=8.0, bf16=False):
        self.name, self.m_codec, self.v_codec = name, m_codec, v_codec
        self.block, self.stochastic, self.bytes_per_param, self.bf16 = block, stochastic, bytes_per_param, bf16

    @property
    def quantized(self):
        return self.m_codec is not None or self.v_codec is not None or self.bf16


def candidates(blocks, mappings, roundings):
    out = [Candidate("fp32"), Candidate("bf16-sr", bytes_per_param=4.0, bf16=True)]
    for block in blocks:
        for sr in roundings:
            for name in mappings:
                codec, scale_bytes = V_MAPPINGS[name]
                out.append(Candidate(
                    f"{name}-B{block}-{'sr' if sr else 'rtn'}", signed_linear, codec, block, sr,
                    bytes_per_param=2 + (4 + scale_bytes) / block))
    # m alone at int8 (v fp32): how much of any loss is exp_avg's
    out.append(Candidate("m-only-B256-rtn", signed_linear, None, 256, False, 5 + 4 / 256))
    return out


# -------------------------------------------------------------------------------------- data


def token_stream(n_tokens: int, vocab: int, seed: int) -> np.ndarray:
    """Zipf unigrams mixed with a fixed sparse trigram table: a stream whose loss can fall well
    below the unigram entropy. The tables come from a fixed seed; `seed` draws the stream."""
    tables = np.random.default_rng(1234)
    ranks = np.arange(1, vocab + 1)
    unigram = 1.0 / ranks**1.1
    unigram /= unigram.sum()
    n_ctx, fan = 1 << 14, 4
    follow = tables.choice(vocab, size=(n_ctx, fan), p=unigram)  # rare tokens stay rare
    follow_p = np.array([0.55, 0.25, 0.12, 0.08])
    rng = np.random.default_rng(seed)
    from_table = rng.random(n_tokens) < 0.8
    which = rng.choice(fan, size=n_tokens, p=follow_p)
    fresh = rng.choice(vocab, size=n_tokens, p=unigram)
    out = np.empty(n_tokens, dtype=np.int64)
    a, b = 1, 2
    for i in range(n_tokens):
        tok = follow[(a * 7919 + b * 104729) % n_ctx, which[i]] if from_table[i] else fresh[i]
        out[i] = tok
        a, b = b, tok
    return out


def batches(stream: np.ndarray, n: int, batch: int, seq: int):
    need = batch * (seq + 1)
    return [torch.from_numpy(stream[i * need:(i + 1) * need].reshape(batch, seq + 1)) for i in range(n)]


# ------------------------------------------------------------------------------------ training


def build_model(seed: int, hidden: int, layers: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 32 * 32,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), max_position_embeddings=512,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    return model


def flatten(model, block: int):
    """Params as views of one fp32 buffer (padded to a block multiple), grads likewise."""
    params = [p for p in model.parameters()]
    n = sum(p.numel() for p in params)
    padded = (n + block - 1) // block * block
    flat = torch.zeros(padded)
    grad = torch.zeros(padded)
    off = 0
    for p in params:
        k = p.numel()
        flat[off:off + k].copy_(p.data.reshape(-1))
        p.data = flat[off:off + k].view_as(p)
        p.grad = grad[off:off + k].view_as(p)
        off += k
    return flat, grad, n


def loss_of(model, tokens):
    return model(input_ids=tokens[:, :-1], labels=tokens[:, 1:]).loss


@torch.no_grad()
def eval_loss(model, held):
    return float(np.mean([loss_of(model, t).item() for t in held]))


def train(cand: Candidate, seed: int, args, train_batches, held, snapshot_steps=()):
    model = build_model(seed, args.hidden, args.layers, args.vocab)
    flat, grad, n = flatten(model, 256)
    m = torch.zeros_like(flat)
    v = torch.zeros_like(flat)
    gen = torch.Generator().manual_seed(seed * 1000 + 17) if cand.stochastic else None
    run_key = formats.group_seed(seed, 0)
    losses, evals, snaps = [], {}, {}
    stats = {"under2x": [], "zero": [], "denom_inflation": [], "upd_ratio_m_big": [], "max_update": 0.0}
    diverged = False
    for step, tokens in enumerate(train_batches, start=1):
        grad.zero_()
        loss = loss_of(model, tokens)
        loss.backward()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            diverged = True
            break
        with torch.no_grad():
            bc1 = 1 - BETA1**step
            bc2s = math.sqrt(1 - BETA2**step)
            flat.mul_(1 - LR * WD)
            m.lerp_(grad, 1 - BETA1)
            v.mul_(BETA2).addcmul_(grad, grad, value=1 - BETA2)
            update = (m / bc1) / (v.sqrt() / bc2s + EPS)
            stats["max_update"] = max(stats["max_update"], float(update[:n].abs().max()))
            flat.add_(update, alpha=-LR)
            if step in snapshot_steps:
                snaps[step] = (m[:n].clone(), v[:n].clone())
            if cand.bf16:
                m.copy_(formats.to_bf16_stochastic(m, formats.rounding_key(run_key, step, 0), 0).float())
                v.copy_(formats.to_bf16_stochastic(v, formats.rounding_key(run_key, step, 1), 0).float())
            elif cand.quantized:
                m_dec = cand.m_codec(m, cand.block, gen) if cand.m_codec else m
                v_dec = cand.v_codec(v, cand.block, gen) if cand.v_codec else v
                if step % args.stat_every == 0 and cand.v_codec is not None:
                    record_stats(stats, m, v, m_dec, v_dec, n, cand.block, step)
                m.copy_(m_dec)
                v.copy_(v_dec)
        if step in args.eval_at:
            evals[step] = eval_loss(model, held)
    final_eval = evals.get(len(train_batches), eval_loss(model, held) if not diverged else float("nan"))
    summary = {k: (float(np.mean(x)) if k in ("under2x", "zero") else (float(np.max(x)) if x else None))
               if isinstance(x, list) else x for k, x in stats.items()}
    return {"losses": losses, "evals": evals, "held": final_eval, "diverged": diverged,
            "stats": summary}, snaps


def record_stats(stats, m, v, m_dec, v_dec, n, block, step):
    """How v's code under-represents the true v, and what that would do to the update."""
    v, vd, m, md = v[:n], v_dec[:n], m[:n], m_dec[:n]
    pos = v > 0
    npos = max(int(pos.sum()), 1)
    stats["under2x"].append(float(((vd < 0.5 * v) & pos).sum()) / npos)
    stats["zero"].append(float(((vd == 0) & pos).sum()) / npos)
    bc2s = math.sqrt(1 - BETA2**step)
    d, dd = v.sqrt() / bc2s + EPS, vd.sqrt() / bc2s + EPS
    stats["denom_inflation"].append(float((d / dd).max()))
    # elements whose m is not small (>= 1% of its block's absmax): |m_dec / d_dec| over |m / d|
    mb = m[: n // block * block].view(-1, block).abs()
    big = ((mb >= 0.01 * mb.amax(1, keepdim=True)) & (mb > 0)).view(-1)
    k = big.numel()
    ratio = (md[:k].abs() / dd[:k]) / (m[:k].abs() / d[:k])
    stats["upd_ratio_m_big"].append(float(ratio[big].max()) if big.any() else 1.0)


# -------------------------------------------------------------------------------- codec test


def codec_test(snaps, blocks):
    rows = []
    gen = torch.Generator().manual_seed(99)
    for step, (m, v) in sorted(snaps.items()):
        bc2s = math.sqrt(1 - BETA2**step)
        k = v.numel() // 256 * 256
        v = v[:k]
        pos = v > 0
        vb = v.view(-1, 256)
        vb_pos = torch.where(vb > 0, vb, torch.full_like(vb, math.inf))
        rng = (vb.amax(1) / vb_pos.amin(1)).log2()
        rng = rng[torch.isfinite(rng)]
        for block in blocks:
            for name, (codec, _) in V_MAPPINGS.items():
                for sr in (False, True):
                    vd = codec(v, block, gen if sr else None)
                    rel = ((vd[pos] - v[pos]).abs() / v[pos])
                    d, dd = v.sqrt() / bc2s + EPS, vd.sqrt() / bc2s + EPS
                    drel = (dd / d - 1).abs()
                    rows.append({
                        "step": step, "codec": f"{name}-B{block}-{'sr' if sr else 'rtn'}",
                        "median_rel": float(rel.median()), "p99_rel": float(torch.quantile(rel[:: max(1, rel.numel() // 2_000_000)], 0.99)),
                        "under2x": float((vd[pos] < 0.5 * v[pos]).float().mean()),
                        "zero": float((vd[pos] == 0).float().mean()),
                        "sum_bias": float(vd.double().sum() / v.double().sum() - 1),
                        "denom_p99": float(torch.quantile(drel[:: max(1, drel.numel() // 2_000_000)], 0.99)),
                        "denom_max_inflation": float((d / dd).max()),
                        "block_range_octaves_median": float(rng.median()) if rng.numel() else 0.0,
                        "block_range_octaves_p99": float(torch.quantile(rng, 0.99)) if rng.numel() else 0.0,
                    })
    return rows


# -------------------------------------------------------------------------------------- report


def plot(results, names, path, seed):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"lin": "tab:red", "sqrt": "tab:blue", "log2": "tab:green", "dtree": "tab:purple"}
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
    for ax, block in zip(axes, (64, 256)):
        for name in names:
            r = results[(name, seed)]
            y = np.array(r["losses"], dtype=float)
            w = 10
            ys = np.convolve(y, np.ones(w) / w, mode="valid") if len(y) >= w else y
            x = np.arange(len(ys)) + (w if len(y) >= w else 1)
            if name in ("fp32", "bf16-sr"):
                ax.plot(x, ys, color="black", ls="-" if name == "fp32" else ":", lw=2, label=name)
            elif name.startswith("m-only"):
                ax.plot(x, ys, color="tab:orange", ls="-.", lw=1.2, label=name)
            elif f"-B{block}-" in name:
                mp = name.split("-")[0]
                ax.plot(x, ys, color=colors[mp], ls="-" if name.endswith("rtn") else "--", lw=1.2, label=name)
        ax.set_title(f"block {block}: m signed-linear int8, v mapping as named (seed {seed})")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[0].set_ylabel("train loss (10-step mean)")
    lo = min(min(results[(n, seed)]["losses"][-50:]) for n in names if results[(n, seed)]["losses"])
    axes[0].set_ylim(lo - 0.2, lo + 4.0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(args, results, cands, seeds, codec_rows, out, png, wall):
    model = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")][0]
    lines = [
        "# 8-bit AdamW moments: which code for exp_avg_sq",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%a %b %d %H:%M:%S UTC %Y')}",
        f"- machine: {model}, nproc={os.cpu_count()}, torch threads={torch.get_num_threads()}; torch {torch.__version__}",
        f"- command: `{sys.argv[0] if len(sys.argv) == 1 and ' ' in sys.argv[0] else 'python ' + ' '.join(sys.argv)}`",
        f"- model: LlamaForCausalLM, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, untied, random init; "
        f"{args.n_params:,} params. Data: synthetic Zipf(1.1) unigrams mixed 20/80 with a fixed sparse trigram table. "
        f"Batch {args.batch} x seq {args.seq}, {args.steps} steps, held-out loss on {args.held} separate batches. "
        f"AdamW fp32 (lr {LR}, betas {BETA1}/{BETA2}, eps {EPS}, wd {WD}, no warm-up or clipping). "
        f"Seeds {seeds} (seed = init and stream). Wall time {wall / 60:.1f} min.",
        "- every candidate: after each step m goes through signed absmax-linear int8 (same block, same rounding), "
        "v through the named mapping; quantize -> dequantize in fp32. `rtn` = round to nearest "
        "(in the mapping's own domain: v, sqrt v, log2 v, or code value); `sr` = stochastic, unbiased in the "
        "value (for sqrt and log2: up with probability (v - lo)/(hi - lo) between the decoded neighbours), "
        "bits from torch.rand with a per-run generator. bf16-sr uses hift.formats.to_bf16_stochastic "
        "with a key per step and moment.",
        "- B/param: both moments with their scales (fp32 absmax per block; log2 keeps min and max, 8 B per block).",
        "",
        "## Training",
        "",
        "| candidate | B/param | final train loss | vs fp32 | held-out loss | vs fp32 | v < true/2 (mean frac) | "
        "v -> 0 (mean frac) | worst 1/denominator vs true | worst update ratio (m not small) | max applied update / lr |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def mean_over(name, key):
        vals = [results[(name, s)][key] for s in seeds if (name, s) in results]
        return float(np.mean(vals)) if vals else float("nan")

    def final_train(name, s):
        ls = results[(name, s)]["losses"]
        return float(np.mean(ls[-20:])) if ls and not results[(name, s)]["diverged"] else float("nan")

    ref_train = np.mean([final_train("fp32", s) for s in seeds])
    ref_held = mean_over("fp32", "held")
    for c in cands:
        if not all((c.name, s) in results for s in seeds):
            continue
        tr = np.mean([final_train(c.name, s) for s in seeds])
        he = mean_over(c.name, "held")
        st = [results[(c.name, s)]["stats"] for s in seeds]

        def agg(key, fn, fmt):
            vals = [x[key] for x in st if x.get(key) is not None and not math.isnan(x[key])]
            return fmt.format(fn(vals)) if vals else "-"

        div = [len(results[(c.name, s)]["losses"]) for s in seeds if results[(c.name, s)]["diverged"]]
        lines.append(
            f"| {c.name}{' (diverged at step %s)' % ','.join(map(str, div)) if div else ''} | {c.bytes_per_param:.3f} | {tr:.4f} | {100 * (tr / ref_train - 1):+.2f}% | "
            f"{he:.4f} | {100 * (he / ref_held - 1):+.2f}% | {agg('under2x', np.mean, '{:.2e}')} | {agg('zero', np.mean, '{:.2e}')} | "
            f"{agg('denom_inflation', np.max, '{:.3g}')} | {agg('upd_ratio_m_big', np.max, '{:.3g}')} | {agg('max_update', np.max, '{:.3g}')} |")
    lines += [
        "",
        f"final train loss: mean of the last 20 steps' losses, averaged over seeds; held-out: after the last step. "
        f"Statistics of v's code are taken every {args.stat_every} steps at the moment of encoding, over elements with v > 0: "
        "`v < true/2` and `v -> 0` are fractions of elements; `worst 1/denominator` is the largest "
        "(sqrt(v_hat)+eps)/(sqrt(v_hat_decoded)+eps) seen; `worst update ratio` is the largest "
        "|m_dec/(sqrt(v_dec)+eps)| / |m/(sqrt(v)+eps)| over elements whose |m| is at least 1% of its block's absmax; "
        "`max applied update / lr` is the largest |m_hat/(sqrt(v_hat)+eps)| any step applied (an fp32 Adam step is "
        "bounded near (1-b1)/sqrt(1-b2) = 3.2 times a gradient's own scale).",
        "",
        f"![loss curves]({os.path.basename(png)})",
        "",
        "## Codec test on the fp32 run's real exp_avg_sq (seed %d)" % seeds[0],
        "",
        "| step | codec | median rel err | p99 rel err | v < true/2 | v -> 0 | sum bias | denominator p99 rel err | worst 1/denominator | block range (octaves, median / p99, B=256) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in codec_rows:
        lines.append(f"| {r['step']} | {r['codec']} | {r['median_rel']:.3g} | {r['p99_rel']:.3g} | {r['under2x']:.2e} | {r['zero']:.2e} | "
                     f"{r['sum_bias']:+.2e} | {r['denom_p99']:.3g} | {r['denom_max_inflation']:.3g} | "
                     f"{r['block_range_octaves_median']:.1f} / {r['block_range_octaves_p99']:.1f} |")
    lines += ["", "relative errors over elements with v > 0; denominator = sqrt(v_hat) + eps.", ""]
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny model, few steps, few candidates")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--held", type=int, default=8)
    ap.add_argument("--stat-every", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--blocks", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--only", nargs="*", default=None, help="candidate names to run (default all)")
    ap.add_argument("--out", default="bench/results/int8_moments.md")
    ap.add_argument("--merge", nargs="*", default=None,
                    help="write the report from these runs' JSON files (runs split across processes) instead of training")
    ap.add_argument("--commands", default=None, help="with --merge: the commands that made the JSON files")
    ap.add_argument("--wall-min", type=float, default=0.0, help="with --merge: their wall time")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # 1: OpenMP spin-waits badly on cores shared with other work
    if args.merge:
        merge(args)
        return
    if args.quick:
        args.steps, args.hidden, args.layers, args.vocab, args.held = 30, 64, 2, 512, 2
        args.out = "/tmp/int8_moments_quick.md"
    torch.set_num_threads(args.threads)  # 1: OpenMP spin-waits badly on cores shared with other work
    args.eval_at = {args.steps}
    cands = candidates(args.blocks, list(V_MAPPINGS), (False, True))
    if args.only:
        cands = [c for c in cands if c.name in args.only or c.name == "fp32"]
    if args.quick:
        cands = [c for c in cands if c.name in ("fp32", "bf16-sr", "lin-B64-rtn", "sqrt-B64-sr", "log2-B256-rtn", "dtree-B256-sr", "m-only-B256-rtn")]
    args.n_params = sum(p.numel() for p in build_model(0, args.hidden, args.layers, args.vocab).parameters())
    t0 = time.time()
    results, snaps = {}, {}
    png = os.path.splitext(args.out)[0] + "_loss.png"
    jpath = "/tmp/" + os.path.splitext(os.path.basename(args.out))[0] + ".json"  # raw numbers, kept out of the repo
    snapshot_steps = sorted({min(10, args.steps), args.steps // 3, args.steps})
    for seed in args.seeds:
        need = (args.steps + args.held) * args.batch * (args.seq + 1)
        stream = token_stream(need, args.vocab, seed)
        train_b = batches(stream, args.steps, args.batch, args.seq)
        held = batches(stream[args.steps * args.batch * (args.seq + 1):], args.held, args.batch, args.seq)
        for c in cands:
            ts = time.time()
            r, s = train(c, seed, args, train_b, held, snapshot_steps if (c.name == "fp32" and seed == args.seeds[0]) else ())
            results[(c.name, seed)] = r
            if s:
                snaps = s
            print(f"seed {seed} {c.name:18s} train {np.mean(r['losses'][-20:]):.4f} held {r['held']:.4f} "
                  f"div {r['diverged']} stats {r['stats']} ({time.time() - ts:.0f}s)", flush=True)
            with open(jpath, "w") as f:
                json.dump({f"{k[0]}@{k[1]}": v for k, v in results.items()}, f)
    codec_rows = codec_test(snaps, args.blocks)
    with open(jpath, "w") as f:
        json.dump({"runs": {f"{k[0]}@{k[1]}": v for k, v in results.items()}, "codec_test": codec_rows}, f)
    plot(results, [c.name for c in cands], png, args.seeds[0])
    write_report(args, results, cands, args.seeds, codec_rows, args.out, png, time.time() - t0)
    print(f"wrote {args.out}, {png}, {jpath} in {(time.time() - t0) / 60:.1f} min")


def merge(args):
    """One report from runs made by several processes (each given a share of the candidates)."""
    results, codec_rows = {}, []
    for path in args.merge:
        blob = json.load(open(path))
        for key, r in blob.get("runs", blob).items():  # a run still going has written its runs alone
            name, seed = key.rsplit("@", 1)
            results.setdefault((name, int(seed)), r)
        codec_rows = codec_rows or blob.get("codec_test", [])
    seeds = sorted({s for _, s in results})
    cands = [c for c in candidates(args.blocks, list(V_MAPPINGS), (False, True)) if (c.name, seeds[0]) in results]
    args.eval_at = {args.steps}
    args.n_params = sum(p.numel() for p in build_model(0, args.hidden, args.layers, args.vocab).parameters())
    png = os.path.splitext(args.out)[0] + "_loss.png"
    plot(results, [c.name for c in cands], png, seeds[0])
    if args.commands:
        sys.argv = [args.commands]
    write_report(args, results, cands, seeds, codec_rows, args.out, png, args.wall_min * 60)
    print(f"wrote {args.out}, {png}")


if __name__ == "__main__":
    main()
