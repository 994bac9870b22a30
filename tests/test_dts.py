"""DTS (videoxl.vision.dts) and the projector + 2x2 pool (VisionEncoder.groups_to_tokens) against an independent
re-computation written from the spec with explicit loops / matmuls. Only parameter *tensors* are read from
the modules; none of their sub-blocks' forward methods is called by the reference.

Tolerance: float64 module vs float64 reference, rtol = atol = 1e-5 (the module pads and softmaxes in fp32 on
purpose, so agreement is ~1e-7, not 1e-15); float32 module vs float64 reference, rtol = atol = 1e-4.
"""
import math

import pytest
import torch

from videoxl.config import TextConfig, VideoXLConfig, VisionConfig
from videoxl.vision.dts import DTS, frames_to_dts_input
from videoxl.vision.encoder import VisionEncoder

C, T, MAXD = 64, 4, 64
TOL64, TOL32 = 1e-5, 1e-4


def randomise(module, seed):
    """Random weights of a sensible scale (unit-ish activations); norms and biases not at their defaults."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if ".norm." in f".{name}" and leaf == "weight":
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif leaf == "bias":
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "temporal_encoding" in name or "embeddings_table" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return module


# ---------------------------------------------------------------- reference (float64, from the spec)
def ref_layout(features, raw_view=True):
    """[F, C, H, W] -> [G, C, 4, H, W]. Spec: DTS channel c of slot t in group g holds frame 4g + c // (C/4),
    original channel 4 * (c % (C/4)) + t. `raw_view=False` is the *wrong* "proper" layout (a permute)."""
    f, c, h, w = features.shape
    out = torch.empty(f // 4, c, 4, h, w, dtype=features.dtype)
    q = c // 4
    for g in range(f // 4):
        for ch in range(c):
            for t in range(4):
                out[g, ch, t] = (features[4 * g + ch // q, 4 * (ch % q) + t] if raw_view
                                 else features[4 * g + t, ch])
    return out


def ref_group_norm(x, weight, bias, groups=32, eps=1e-6):
    """x [N, C, ...]: statistics per sample over each group's C/groups channels and all trailing dims."""
    x = x.double()
    out = torch.empty_like(x)
    cg = x.shape[1] // groups
    for gi in range(groups):
        sl = x[:, gi * cg:(gi + 1) * cg]
        dims = tuple(range(1, x.dim()))
        mean = sl.mean(dim=dims, keepdim=True)
        var = ((sl - mean) ** 2).mean(dim=dims, keepdim=True)
        out[:, gi * cg:(gi + 1) * cg] = (sl - mean) / torch.sqrt(var + eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return out * weight.double().view(shape) + bias.double().view(shape)


def ref_pointwise(x, conv):
    """1x1(x1) convolution as a channel matmul: y[n, o, ...] = sum_i W[o, i] x[n, i, ...] + b[o]."""
    w = conv.weight.double().reshape(conv.weight.shape[0], conv.weight.shape[1])
    y = torch.einsum("oi,ni...->no...", w, x)
    return y + conv.bias.double().view((1, -1) + (1,) * (x.dim() - 2))


def ref_attn_block(x, blk):
    g_, c, t_, h, w = x.shape
    y = ref_group_norm(x, blk.norm.weight, blk.norm.bias)
    q, k, v = ref_pointwise(y, blk.q), ref_pointwise(y, blk.k), ref_pointwise(y, blk.v)
    out = torch.empty_like(x)
    for g in range(g_):
        for t in range(t_):  # one single-head attention over the H*W positions per (group, time slot)
            qs, ks, vs = (a[g, :, t].reshape(c, h * w).T for a in (q, k, v))
            a = torch.softmax(qs @ ks.T * c ** -0.5, dim=-1)
            out[g, :, t] = (a @ vs).T.reshape(c, h, w)
    return x + ref_pointwise(out, blk.proj_out)


def ref_temporal(x, blk, transposed_k=True, value_rel_sign=1):
    g_, c, t_, h, w = x.shape
    wq = blk.qkv.weight.double()[:, :, 0]
    bq = blk.qkv.bias.double()
    tk = blk.relative_position_k.embeddings_table.double()
    tv = blk.relative_position_v.embeddings_table.double()
    wo, bo = blk.proj_out.weight.double()[:, :, 0], blk.proj_out.bias.double()
    row = lambda d: max(-MAXD, min(MAXD, d)) + MAXD  # noqa: E731  table row of relative distance d
    out = torch.empty_like(x)
    for g in range(g_):
        seq = x[g].permute(2, 3, 0, 1).reshape(h * w, c, t_)  # [positions, C, T]
        y = ref_group_norm(seq, blk.norm.weight, blk.norm.bias)  # stats per position over C/32 x T
        qkv = torch.einsum("oc,pct->pot", wq, y) + bq[None, :, None]
        q, k, v = qkv[:, :c] * c ** -0.25, qkv[:, c:2 * c] * c ** -0.25, qkv[:, 2 * c:]
        logits = torch.empty(h * w, t_, t_, dtype=x.dtype)
        for i in range(t_):
            for j in range(t_):
                rel = (q[:, :, j] @ tk[row(i - j)]) if transposed_k else (q[:, :, i] @ tk[row(j - i)])
                logits[:, i, j] = (q[:, :, i] * k[:, :, j]).sum(1) + rel
        a = torch.softmax(logits, dim=-1)
        o = torch.zeros(h * w, c, t_, dtype=x.dtype)
        for i in range(t_):
            for j in range(t_):
                o[:, :, i] += a[:, i, j, None] * (v[:, :, j] + tv[row(value_rel_sign * (j - i))])
        o = torch.einsum("oc,pct->pot", wo, o) + bo[None, :, None]
        out[g] = x[g] + o.reshape(h, w, c, t_).permute(2, 3, 0, 1)
    return out


def ref_same_pad_conv(x, conv):
    """Replicate pad (W 1/1, H 1/1, time 1/0), 3x3x3 conv, stride (2, 1, 1), as explicit tap sums."""
    g_, c, t_, h, w = x.shape
    it = torch.arange(-1, t_).clamp(0, t_ - 1)
    ih, iw = torch.arange(-1, h + 1).clamp(0, h - 1), torch.arange(-1, w + 1).clamp(0, w - 1)
    xp = x[:, :, it][:, :, :, ih][:, :, :, :, iw]
    wt, b = conv.weight.double(), conv.bias.double()
    t_out = (t_ + 1 - 3) // 2 + 1
    out = b.view(1, -1, 1, 1, 1).repeat(g_, 1, t_out, h, w)
    for to in range(t_out):
        for dt in range(3):
            for dh in range(3):
                for dw in range(3):
                    patch = xp[:, :, 2 * to + dt, dh:dh + h, dw:dw + w]
                    out[:, :, to] += torch.einsum("oi,gihw->gohw", wt[:, :, dt, dh, dw], patch)
    return out


def ref_dts(x, dts, **variant):
    x = x.double() + dts.temporal_encoding.double().T[None, :, :, None, None]  # x[:, c, t] += te[t, c]
    e = dts.encoder
    for attn, temporal, conv in ((e[0], e[1], e[2].conv), (e[3], e[4], e[5].conv)):
        x = ref_same_pad_conv(ref_temporal(ref_attn_block(x, attn), temporal, **variant), conv)
    g_, c, t_, h, w = x.shape
    assert t_ == 1  # time 4 -> 2 -> 1
    return x[:, :, 0].reshape(g_, c, h * w).transpose(1, 2)  # row-major positions


# ---------------------------------------------------------------- tests
def test_layout_is_raw_view():
    f, c, h, w = 8, 16, 2, 3
    feats = torch.arange(f * c * h * w, dtype=torch.float64).view(f, c, h, w)
    got = frames_to_dts_input(feats)
    assert got.shape == (2, c, 4, h, w)
    assert torch.equal(got, ref_layout(feats))
    # Spot-check the formula on single entries: group 1, DTS channel 13, slot 2 -> frame 7, channel 6.
    assert torch.equal(got[1, 13, 2], feats[4 + 13 // 4, 4 * (13 % 4) + 2])
    assert not torch.equal(got, ref_layout(feats, raw_view=False))  # a permute would differ
    # A non-contiguous input is laid out by its logical values, not its storage.
    nc = feats.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    assert not nc.is_contiguous() and torch.equal(frames_to_dts_input(nc), got)


@pytest.fixture(scope="module")
def dts_case():
    torch.manual_seed(0)
    dts = randomise(DTS(C), seed=1).double().eval()
    x = torch.randn(2, C, T, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        ref = ref_dts(x, dts)
    return dts, x, ref


def test_dts_matches_reference(dts_case):
    dts, x, ref = dts_case
    with torch.no_grad():
        got = dts(x)
    assert got.shape == ref.shape == (2, 36, C)
    torch.testing.assert_close(got, ref, rtol=TOL64, atol=TOL64)
    # float32 (the deployment dtype) against the same float64 reference
    m32 = DTS(C)
    m32.load_state_dict({k: v.float() for k, v in dts.state_dict().items()})
    with torch.no_grad():
        got32 = m32(x.float())
    torch.testing.assert_close(got32.double(), ref, rtol=TOL32, atol=TOL32)


def test_reference_distinguishes_wrong_variants(dts_case):
    """The reference (hence the test) can fail: each plausible mistake moves the output far past TOL64."""
    dts, x, ref = dts_case
    with torch.no_grad():
        wrong_k = ref_dts(x, dts, transposed_k=False)  # "standard" key term q_i . table_k[j - i]
        wrong_v = ref_dts(x, dts, value_rel_sign=-1)  # value table read at i - j
    assert (wrong_k - ref).abs().max() > 1000 * TOL64
    assert (wrong_v - ref).abs().max() > 1000 * TOL64
    feats = torch.randn(8, C, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        good, bad = ref_dts(ref_layout(feats), dts), ref_dts(ref_layout(feats, raw_view=False), dts)
        got = dts(frames_to_dts_input(feats))
    torch.testing.assert_close(got, good, rtol=TOL64, atol=TOL64)
    assert (bad - good).abs().max() > 1000 * TOL64


def test_dts_groups_are_independent(dts_case):
    dts, x, _ = dts_case
    with torch.no_grad():
        both = dts(x)
        each = torch.cat([dts(x[:1]), dts(x[1:])])
    torch.testing.assert_close(both, each, rtol=1e-12, atol=1e-12)
    assert (both[0] - both[1]).abs().max() > 1e-2  # different inputs, different outputs


def test_groups_to_tokens_matches_reference():
    torch.manual_seed(0)
    hidden = 32
    cfg = VideoXLConfig(text=TextConfig(vocab_size=100, hidden_size=hidden, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2),
                        vision=VisionConfig(hidden_size=C, intermediate_size=128, num_hidden_layers=3,
                                            num_attention_heads=4, image_size=56, patch_size=14),
                        mm_hidden_size=C)
    enc = randomise(VisionEncoder(cfg), seed=2).double().eval()
    feats = torch.randn(8, C, 24, 24, dtype=torch.float64)
    with torch.no_grad():
        got = enc.groups_to_tokens(feats)
        fused = ref_dts(ref_layout(feats), enc.dts)  # [2, 576, C]
    l1, l2 = enc.projector[0], enc.projector[2]
    z = fused @ l1.weight.double().T + l1.bias.double()
    z = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))  # exact GELU
    tokens = (z @ l2.weight.double().T + l2.bias.double()).detach()  # [2, 576, hidden], row-major 24x24
    ref = torch.empty(2, 144, hidden, dtype=torch.float64)
    for r in range(12):
        for col in range(12):
            cells = [(2 * r + a) * 24 + 2 * col + b for a in (0, 1) for b in (0, 1)]
            ref[:, r * 12 + col] = tokens[:, cells].mean(1)
    assert got.shape == (2, cfg.tokens_per_group, hidden) == (2, 144, hidden)
    torch.testing.assert_close(got, ref, rtol=TOL64, atol=TOL64)
