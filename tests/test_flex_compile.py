"""FlexAttention compiles once for every length (language/decoder.mark_lengths_dynamic). Without the marks,
torch.compile(dynamic=True) specialised the first call's BlockMask sizes and compiled again at the second
length: on the GPU that cost seconds of a first long question. Checked here through dynamo with the aot_eager
backend (the guards are dynamo's, whatever the backend), on the CPU, with BlockMasks of the pattern's own kind."""
import torch

from videoxl.language.decoder import mark_lengths_dynamic


def _mask(n, m):
    from torch.nn.attention.flex_attention import create_block_mask

    cols, rows = torch.arange(m), torch.arange(n) + (m - n)

    def causal_after(b, h, q, kv):
        return cols[kv] <= rows[q]
    return create_block_mask(causal_after, None, None, n, m, device="cpu")


def test_one_compile_for_every_length():
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()
    compiles = []

    def counting(gm, inputs):
        compiles.append(1)
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, inputs)

    f = torch.compile(flex_attention, dynamic=True, backend=counting)
    for n, m in [(256, 512), (384, 896), (512, 1664)]:
        q, k, v = (torch.randn(1, 4, x, 32) for x in (n, m, m))
        mask = _mask(n, m)
        mark_lengths_dynamic(q, k, v, mask)
        out = f(q, k, v, block_mask=mask)
        ref = flex_attention(q, k, v, block_mask=mask)
        assert torch.allclose(out, ref, atol=1e-5)
    assert len(compiles) == 1
    torch._dynamo.reset()
