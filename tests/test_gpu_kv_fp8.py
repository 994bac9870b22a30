"""The FP8 KV cache on a GPU (language/kv_fp8.py): the compiled kernels against the eager path, the offloaded
paths through the side stream against resident stores, and the codec against the CPU's. Skipped without a CUDA
GPU of compute capability >= 8.9; run on the lent device with `python -m pytest -q tests/test_gpu_kv_fp8.py`."""
import pytest
import torch

import videoxl
from videoxl.language import kv_fp8
from videoxl.language.kv_store import KVStore

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                reason="needs a CUDA GPU with FP8 (compute capability >= 8.9)")


@pytest.fixture(scope="module")
def fp8_model(tiny_dir):
    torch.backends.cuda.matmul.allow_tf32 = False
    return videoxl.load(tiny_dir, device="cuda", dtype="float32", kv_dtype="fp8")


def test_codec_on_the_gpu_equals_the_cpus():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 999, 128) * torch.logspace(-3, 3, 128)
    q_cpu, s_cpu = kv_fp8.quantize(x)
    q_gpu, s_gpu = kv_fp8.quantize(x.cuda())
    # the same amax; the CPU divides by a scalar as a multiply by its reciprocal, so a scale may differ in its
    # last bit (seen on the H200), and a value on a rounding tie may then land one e4m3 step away: rarely
    assert ((s_gpu.cpu() - s_cpu).abs() <= s_cpu * 2.0 ** -23).all()
    diff = (q_gpu.cpu().float() - q_cpu.float()).abs()
    assert (diff > 0).float().mean() < 1e-3 and (diff <= q_cpu.float().abs() / 8 + 2 ** -9).all()


def _fill(store, k, v):
    for layer in range(store.num_layers):
        slot_k, slot_v = store.layer_slot(layer, k.shape[2])
        slot_k.copy_(k[layer:layer + 1])
        slot_v.copy_(v[layer:layer + 1])
        store.commit(layer, k.shape[2])
    store.synchronize()


@pytest.mark.parametrize("kv_dtype", [None, "fp8"])
def test_offloaded_writes_and_reads_equal_resident(kv_dtype):
    """The side stream's copies (commit's copy home, append's prefetch of the next layer, bi-level's gathers)
    give what a resident store holds."""
    torch.manual_seed(1)
    layers, n = 4, 1000
    k, v = torch.randn(layers, 4, n, 128, device="cuda") * 3, torch.randn(layers, 4, n, 128, device="cuda")
    resident = KVStore(layers, 4, 128, torch.bfloat16, "cuda", n + 64, False, kv_dtype)
    offloaded = KVStore(layers, 4, 128, torch.bfloat16, "cuda", n + 64, True, kv_dtype)
    for store in (resident, offloaded):
        _fill(store, k.bfloat16(), v.bfloat16())
    new_k, new_v = torch.randn(1, 4, 3, 128, device="cuda").bfloat16(), torch.randn(1, 4, 3, 128, device="cuda").bfloat16()
    for layer in range(layers):
        got = [s.append(layer, new_k, new_v) for s in (resident, offloaded)]
        assert all(torch.equal(a, b) for a, b in zip(*got))
    spans = [(0, 7), (100, 356), (990, 1003)]
    for layer in range(layers):
        assert all(torch.equal(a, b.to("cuda")) for a, b in zip(resident.gather(layer, spans),
                                                                 offloaded.gather(layer, spans)))
        assert all(torch.equal(a, b.to("cuda")) for a, b in zip(resident.layer(layer), offloaded.layer(layer)))


@pytest.mark.parametrize("length", [300, 1700])
def test_captured_fp8_decoding_equals_eager(fp8_model, length):
    """The CUDA graph over an fp8 store (the store kernel, the attention kernel reading e4m3 with scales) against
    the eager step over another fp8 store of the same tokens: the same 48 greedy tokens (float32 model)."""
    from tests.test_gpu import _decode

    model, _ = fp8_model
    store = model.decoder.new_cache(capacity=length + 128)
    assert store.fp8
    with torch.inference_mode():
        ids = torch.randint(0, model.config.text.vocab_size, (1, length), device="cuda")
        model.decoder(model.decoder.embed_tokens(ids), store)
    eager, _ = _decode(model, store, "eager", {}, 48)
    captured, stats = _decode(model, store, "captured", {}, 48)
    again, _ = _decode(model, store, "captured", {}, 48)  # the store's graph replayed (a follow-up question)
    assert eager == captured == again and stats["generated_tokens"] == 48


def test_fp8_chat_in_every_prefill_mode(fp8_model, tmp_path):
    """chat with the fp8 cache: captured decoding, and the same answer with streaming + offload as resident
    streaming (the offloaded layers travel quantized)."""
    from videoxl.checkpoint.tiny import make_demo_video

    video = make_demo_video(str(tmp_path / "v.mp4"), seconds=24.0, fps=4, size=(48, 32))
    model, tok = fp8_model
    answers = []
    try:
        model.config.enable_chunk_prefill = True
        for offload in (False, True):
            model.kv_cache.clear()
            model.config.prefill_config = {"chunk_prefill_mode": "streaming", "chunk_size": 4, "step_size": 2,
                                           "offload": offload}
            answers.append([model.chat(video, tok, q, max_num_frames=32, generation_config={"max_new_tokens": 12})
                            for q in ("What moves?", "And then?")])  # the follow-up replays the captured step
            assert model.last_stats["decode_path"] == ("eager" if offload else "captured")
    finally:
        model.config.enable_chunk_prefill = False
        model.config.prefill_config = None
    assert answers[0] == answers[1]


def test_bilevel_over_the_fp8_cache_captured_equals_eager(fp8_model, tmp_path):
    """Bi-level decoding over an fp8 video: its mixed store is fp8, decoded by the captured step (the fp8 kernels)
    and by the eager step, with the same answer; a follow-up replays the mixed store's graph."""
    from videoxl.checkpoint.tiny import make_demo_video

    video = make_demo_video(str(tmp_path / "b.mp4"), seconds=40.0, fps=5, size=(48, 32))
    model, tok = fp8_model
    gen = {"max_new_tokens": 16}
    answers = []
    model.config.enable_chunk_prefill, model.config.enable_sparse = True, True
    model.config.prefill_config = {"chunk_prefill_mode": "streaming", "chunk_size": 4, "step_size": 2}
    model.config.sparse_config = {"budget": 0.5}
    try:
        for mode in ("captured", "eager"):
            model.kv_cache.clear()
            model.decode_mode = mode
            answers.append(model.chat(video, tok, "What moves?", max_num_frames=64, generation_config=gen))
            assert model.last_stats["decode_path"] == mode and model.last_stats["kept_share"] < 0.9
            assert list(model.kv_cache.entries.values())[-1].decode.mixed.fp8
        model.decode_mode = "captured"
        model.chat(video, tok, "What moves?", max_num_frames=64, generation_config=gen)
        model.chat(video, tok, "And then?", max_num_frames=64, generation_config=gen)
        assert model.last_stats["capture_s"] == 0.0
    finally:
        model.decode_mode = "auto"
        model.config.enable_chunk_prefill = model.config.enable_sparse = False
        model.config.prefill_config = model.config.sparse_config = None
    assert answers[0] == answers[1]
