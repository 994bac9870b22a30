"""Our Qwen2Decoder against transformers' Qwen2ForCausalLM built from the same tiny random config.

Everything runs in float32 on CPU with fixed seeds. Logit tolerance is 1e-4 absolute (logits are O(1..10)
with the weights below, so a real mistake -- wrong RoPE, GQA mapping, mask or cache position -- is orders of
magnitude larger).
"""
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from videoxl.config import TextConfig
from videoxl.language.decoder import Qwen2Decoder

TOL = 1e-4
VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 300, 64, 128, 3, 4, 2


def _build_pair():
    torch.manual_seed(0)
    hf_cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         attn_implementation="eager")
    hf = Qwen2ForCausalLM(hf_cfg).float().eval()
    # Randomise every tensor: default init leaves biases at 0 and norms at 1, which would hide
    # bias / norm-weight mistakes.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    ours = Qwen2Decoder(TextConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                   num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                   num_key_value_heads=KV_HEADS, rms_norm_eps=1e-6, rope_theta=1e6,
                                   tie_word_embeddings=False)).float().eval()
    sd = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in hf.state_dict().items()}
    missing, unexpected = ours.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    return hf, ours


@pytest.fixture(scope="module")
def models():
    return _build_pair()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (37,), generator=torch.Generator().manual_seed(2))


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(input_ids=ids[None]).logits[0].float()


def _ours(ours, ids, cache, **kw):
    with torch.no_grad():
        return ours(ours.embed_tokens(ids)[None], cache, **kw)[0]


def test_full_sequence_logits_match_hf(models, ids):
    hf, ours = models
    ref = _hf_logits(hf, ids)
    cache = ours.new_cache()
    got = _ours(ours, ids, cache, logits_for="all")
    assert got.shape == (37, VOCAB) and got.dtype == torch.float32
    assert cache.length == 37
    assert ref.std() > 0.5  # the comparison is meaningful: logits are far from constant
    assert (got - ref).abs().max() < TOL
    # "last" returns just the final position, [1, 1, vocab].
    last = ours(ours.embed_tokens(ids)[None], ours.new_cache()).detach()
    assert last.shape == (1, 1, VOCAB)
    assert (last[0, 0] - ref[-1]).abs().max() < TOL


def test_greedy_generation_matches_hf(models, ids):
    hf, ours = models
    prompt, n_new = ids[:12], 20
    with torch.no_grad():
        # No EOS: exactly n_new tokens (pad is never used with a single unfinished sequence).
        hf_out = hf.generate(prompt[None], attention_mask=torch.ones(1, 12, dtype=torch.long),
                             do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new,
                             eos_token_id=None, pad_token_id=VOCAB - 1)
    hf_new = hf_out[0, 12:].tolist()
    assert len(hf_new) == n_new

    # Our loop: prefill the prompt, then one token at a time on the cache. A small capacity forces the
    # cache to grow (reallocate) mid-generation.
    cache = ours.new_cache(capacity=8)
    logits = _ours(ours, prompt, cache)  # [1, vocab] for the last position
    mine = []
    for _ in range(n_new):
        tok = int(logits[-1].argmax())
        mine.append(tok)
        logits = _ours(ours, torch.tensor([tok]), cache)
    assert mine == hf_new
    assert cache.length == 12 + n_new
    assert len(set(mine)) > 3  # not a degenerate repeat-one-token model


def test_kv_cache_two_calls_and_prefix_reuse(models, ids):
    hf, ours = models
    split = 25
    a, b = ids[:split], ids[split:]
    ref = _hf_logits(hf, ids)

    cache = ours.new_cache(capacity=16)  # also exercises growth across calls
    _ours(ours, a, cache)
    assert cache.length == split
    got_b = _ours(ours, b, cache, logits_for="all")
    assert got_b.shape == (len(b), VOCAB)
    assert (got_b - ref[split:]).abs().max() < TOL

    # Follow-up question: drop B, keep A's KVs, run B again -> same logits.
    cache.truncate(split)
    assert cache.length == split
    again = _ours(ours, b, cache, logits_for="all")
    assert (again - got_b).abs().max() < TOL

    # And a *different* continuation on the reused prefix matches HF on A + B2.
    b2 = torch.randint(0, VOCAB, (7,), generator=torch.Generator().manual_seed(3))
    cache.truncate(split)
    got_b2 = _ours(ours, b2, cache, logits_for="all")
    ref2 = _hf_logits(hf, torch.cat([a, b2]))
    assert (got_b2 - ref2[split:]).abs().max() < TOL
    # Sanity: the two continuations really differ (so the check above is not trivially the old B).
    assert (got_b2[0] - got_b[0]).abs().max() > 100 * TOL

    with pytest.raises(ValueError):
        cache.truncate(cache.length + 1)


def test_explicit_causal_mask_equals_default(models, ids):
    _, ours = models
    split = 25
    a, b = ids[:split], ids[split:]
    n = len(b)

    # 1) Prefill from an empty cache: explicit causal bool mask vs the is_causal fast path.
    causal = torch.ones(len(a), len(a), dtype=torch.bool).tril()
    p_none = _ours(ours, a, ours.new_cache(), logits_for="all")
    p_mask = _ours(ours, a, ours.new_cache(), mask=causal, logits_for="all")
    assert (p_none - p_mask).abs().max() < TOL

    # 2) Several tokens after a cached prefix: full view of the prefix, causal among themselves.
    c1, c2 = ours.new_cache(), ours.new_cache()
    _ours(ours, a, c1)
    _ours(ours, a, c2)
    mask = torch.ones(n, split + n, dtype=torch.bool).tril(diagonal=split)
    d_none = _ours(ours, b, c1, logits_for="all")
    d_mask = _ours(ours, b, c2, mask=mask, logits_for="all")
    assert (d_none - d_mask).abs().max() < TOL

    # 3) One-token decode step with an all-True [1, cached+1] mask.
    tok = ids[:1]
    s_none = _ours(ours, tok, c1)
    s_mask = _ours(ours, tok, c2, mask=torch.ones(1, split + n + 1, dtype=torch.bool))
    assert (s_none - s_mask).abs().max() < TOL

    # Sanity: the mask is actually used -- a non-causal (all-True) mask changes the earlier positions.
    c3 = ours.new_cache()
    _ours(ours, a, c3)
    d_full = _ours(ours, b, c3, mask=torch.ones(n, split + n, dtype=torch.bool), logits_for="all")
    assert (d_full[0] - d_none[0]).abs().max() > 100 * TOL
