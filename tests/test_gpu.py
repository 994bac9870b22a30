"""The CUDA-only paths (FlexAttention block-sparse prefill, pinned offload with side-stream copies, the DTS conv
as GEMMs) against the CPU-checked ones. Skipped without a GPU; run on the lent device with
`python -m pytest -q tests/test_gpu.py`."""
import pytest
import torch

import videoxl
from tests.media import encoded_prompt
from videoxl.prefill.plan import BlockPlan, PrefillConfig
from videoxl.prefill.modes import dense_prefill, layerwise_prefill, block_attention, mask_prefill, streaming_prefill
from videoxl.video.sources import load_video

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = 1e-4  # float32 on the GPU (TF32 off): different kernels, different summation orders


@pytest.fixture(scope="module")
def gpu_model(tiny_dir):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return videoxl.load(tiny_dir, device="cuda", dtype="float32")


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    from videoxl.checkpoint.tiny import make_demo_video

    return make_demo_video(str(tmp_path_factory.mktemp("g") / "long.mp4"), seconds=40.0, fps=5, size=(48, 32))


def test_gpu_vision_matches_cpu(gpu_model, tiny, long_video):
    clip = load_video(long_video, 64, 1, None)
    with torch.inference_mode():
        gpu = gpu_model[0].encode_clip(clip).cpu()
        cpu = tiny[0].encode_clip(clip)
    assert ((gpu - cpu).abs().max() / cpu.abs().max()).item() < TOL


def test_flex_paths_match_sdpa_blocks(gpu_model, long_video):
    model, tokenizer = gpu_model
    prompt, embeds = encoded_prompt(model, tokenizer, long_video, 64)
    with torch.inference_mode():
        plan = BlockPlan.from_prompt(prompt, PrefillConfig(chunk_size=4, step_size=2))
        stores = {}
        for name in ("mask", "streaming", "offload", "blocks", "dense"):
            store = model.decoder.new_cache(capacity=prompt.video_end + 8, offload=name == "offload")
            if name == "mask":
                mask_prefill(model.decoder, embeds, store, plan)
            elif name in ("streaming", "offload"):
                streaming_prefill(model.decoder, embeds, store, plan)
            elif name == "blocks":
                layerwise_prefill(model.decoder, embeds, store,
                                  lambda q, k, v, sl: [block_attention(plan, q, k, v, s) for s in sl])
            else:
                dense_prefill(model.decoder, embeds, store)
            stores[name] = store
        for layer in range(model.config.text.num_hidden_layers):
            ref = stores["blocks"].layer(layer)[0].float().cpu()
            for name in ("mask", "streaming", "offload"):
                got = stores[name].layer(layer)[0].float().cpu()
                assert ((got - ref).abs().max() / ref.abs().max()).item() < TOL, (name, layer)
            dense = stores["dense"].layer(layer)[0].float().cpu()
        assert ((dense - ref).abs().max() / ref.abs().max()).item() > 10 * TOL  # the pattern matters


def test_chat_offload_decoding_matches(gpu_model, long_video):
    """Decoding reads an offloaded store through the prefetching side stream: same answer as on-GPU KVs."""
    model, tokenizer = gpu_model
    answers = []
    try:
        model.config.enable_chunk_prefill = True
        for offload in (False, True):
            model.kv_cache.clear()  # offload is not part of the cache key: build the store again, offloaded
            model.config.prefill_config = {"chunk_prefill_mode": "streaming", "chunk_size": 4, "step_size": 2,
                                           "offload": offload, "chunk_size_for_vision_tower": 8}
            a, hist = model.chat(long_video, tokenizer, "What moves?", max_num_frames=64, return_history=True,
                                 generation_config={"max_new_tokens": 16})
            built = model.last_stats  # the follow-up reuses the KVs and reports no build stats
            assert built["decode_path"] == ("eager" if offload else "captured")
            b = model.chat(long_video, tokenizer, "And then?", chat_history=hist, max_num_frames=64,
                           generation_config={"max_new_tokens": 16})
            answers.append((a, b))
    finally:
        model.config.enable_chunk_prefill = False
        model.config.prefill_config = None
    assert answers[0] == answers[1]
    assert "peak_gpu_gb" in built


def _decode(model, store, mode, gen, n=64):
    """Token ids from `mode`'s step after the store's contents, with no stop token, from a fixed first token."""
    from videoxl.decoding import decode_step, generate_tokens
    from videoxl.decoding.generation import GenerationConfig

    start = store.length
    with torch.inference_mode():
        logits = model.decoder(model.decoder.embed_tokens(torch.tensor([[5]], device="cuda")), store)
        step = decode_step(model.decoder, store, n, mode)
        stats = {}
        ids = list(generate_tokens(step, logits, GenerationConfig.from_dict(dict(gen, max_new_tokens=n)), [5],
                                   set(), model.config.text.vocab_size, stats))
    store.truncate(start)
    return ids, stats


@pytest.mark.parametrize("gen", [{}, {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "seed": 3,
                                      "repetition_penalty": 1.1}])
def test_captured_decode_equals_eager(gpu_model, gen):
    """The CUDA graph (Triton kernels, split-KV attention) against the eager step: the same 64 tokens, greedy
    and sampled with a seed, on two stores of different lengths (each gets its own capture; none goes stale)."""
    model, _ = gpu_model
    for length in (300, 1700):
        store = model.decoder.new_cache(capacity=length + 128)
        with torch.inference_mode():
            ids = torch.randint(0, model.config.text.vocab_size, (1, length), device="cuda")
            model.decoder(model.decoder.embed_tokens(ids), store)
        eager, _ = _decode(model, store, "eager", gen)
        captured, stats = _decode(model, store, "captured", gen)
        again, _ = _decode(model, store, "captured", gen)  # the store's graph replayed, not captured again
        assert eager == captured == again, length
        assert stats["generated_tokens"] == 64


def test_chat_captured_follow_up_matches_eager(gpu_model, long_video):
    """chat() picks the captured step on CUDA; first question and a follow-up on the reused KVs answer as the
    eager step does."""
    model, tokenizer = gpu_model
    answers = {}
    for mode in ("eager", "captured"):
        model.decode_mode = mode
        model.kv_cache.clear()
        a, hist = model.chat(long_video, tokenizer, "What moves?", max_num_frames=32, return_history=True,
                             generation_config={"max_new_tokens": 24})
        assert model.last_stats["decode_path"] == mode
        b = model.chat(long_video, tokenizer, "And then?", chat_history=hist, max_num_frames=32,
                       generation_config={"max_new_tokens": 24})
        answers[mode] = (a, b, model.last_stats["ttft_s"] > 0)
    model.decode_mode = "auto"
    assert answers["eager"] == answers["captured"]


def test_captured_steps_do_not_keep_stores_alive(gpu_model):
    """A video's decode state keeps its captured step for follow-ups, but the step must not keep its store."""
    import gc

    from videoxl.decoding import decode_step
    from videoxl.decoding.state import DecodeState

    model, _ = gpu_model
    store = model.decoder.new_cache(capacity=256)
    state = DecodeState()
    with torch.inference_mode():
        model.decoder(model.decoder.embed_tokens(torch.randint(0, 100, (1, 50), device="cuda")), store)
        step = decode_step(model.decoder, store, 4, "captured", state)
        step.finish(0)
        assert state.captured_step(store) is step
        assert decode_step(model.decoder, store, 4, "captured", state) is step  # reused, not captured again
        step.finish(0)
    del store
    gc.collect()
    assert step.cache_ref() is None


def test_bilevel_on_gpu(gpu_model, long_video):
    """Full budget = chunked decoding (same greedy text); half budget runs through the captured step and keeps
    less of the cache; a second question reuses the mixed store's captured graph."""
    model, tokenizer = gpu_model
    gen = {"max_new_tokens": 16}
    model.config.enable_chunk_prefill = True
    model.config.prefill_config = {"chunk_prefill_mode": "streaming", "chunk_size": 4, "step_size": 2,
                                   "offload": True}
    try:
        chunked = model.chat(long_video, tokenizer, "What moves?", max_num_frames=64, generation_config=gen)
        model.config.enable_sparse, model.config.sparse_config = True, {"budget": 1.0}
        full = model.chat(long_video, tokenizer, "What moves?", max_num_frames=64, generation_config=gen)
        model.config.sparse_config = {"budget": 0.5}
        model.chat(long_video, tokenizer, "What moves?", max_num_frames=64, generation_config=gen)
        assert model.last_stats["decode_path"] == "captured" and model.last_stats["kept_share"] < 0.9
        model.chat(long_video, tokenizer, "And then?", max_num_frames=64, generation_config=gen)
        assert model.last_stats["capture_s"] == 0.0
    finally:
        model.config.enable_chunk_prefill = model.config.enable_sparse = False
        model.config.prefill_config = model.config.sparse_config = None
    assert full == chunked


def test_disk_cache_fast_reader_on_gpu(tiny_dir, long_video, tmp_path):
    """A restart reads the entry straight to the GPU through the pinned, threaded reader (not the safetensors
    fallback), byte-equal to safetensors' own loader, and answers as the run that wrote it."""
    from safetensors.torch import load_file

    from videoxl.cache.disk import read_safetensors

    cache_dir = str(tmp_path / "kv")
    ask = dict(max_num_frames=64, generation_config={"max_new_tokens": 16})
    model, tok = videoxl.load(tiny_dir, device="cuda", dtype="float32", kv_cache_dir=cache_dir)
    first = model.chat(long_video, tok, "What moves?", **ask)
    model.kv_cache.flush()
    again, tok2 = videoxl.load(tiny_dir, device="cuda", dtype="float32", kv_cache_dir=cache_dir)
    assert again.chat(long_video, tok2, "What moves?", **ask) == first
    assert again.last_stats["kv_cache"] == "disk" and again.kv_cache.disk.slow_reads == 0

    import glob
    [data] = glob.glob(f"{cache_dir}/*/kv.safetensors")
    fast, slow = read_safetensors(data, torch.device("cuda"), []), load_file(data, device="cuda")
    assert fast.keys() == slow.keys() and all(torch.equal(fast[k], slow[k]) for k in slow)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_on_the_second_gpu_answers_as_on_the_first(tiny_dir, long_video):
    """The second-GPU bug: torch.cuda.graph's default capture stream is made once per process, on the GPU
    current then; a model on another GPU captured on it. Captured decoding, bi-level decoding and NVDEC frames
    on cuda:1 give what they give on cuda:0."""
    ask = dict(max_num_frames=64, generation_config={"max_new_tokens": 16})
    answers = []
    for index in (0, 1):
        model, tok = videoxl.load(tiny_dir, device=f"cuda:{index}", dtype="float32")
        assert torch.cuda.current_device() == 0
        got = [model.chat(long_video, tok, "What moves?", **ask), model.last_stats["decode_path"],
               model.last_stats["video_decoder"]]
        model.config.enable_chunk_prefill = True
        model.config.prefill_config = {"chunk_prefill_mode": "streaming", "chunk_size": 4, "step_size": 2}
        model.config.enable_sparse = True
        model.config.sparse_config = {"budget": 0.5, "compression": 4}
        got += [model.chat(long_video, tok, "What moves?", **ask), model.last_stats["decode_path"]]
        answers.append(got)
    assert answers[0] == answers[1]
    assert answers[1][1:3] == ["captured", "nvdec"] and answers[1][4] == "captured"


NVDEC_AFTER_TORCH = """
import sys, torch, videoxl
torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")  # torch's context active first, as a 7B model makes it
model, tok = videoxl.load(sys.argv[1], device="cuda", dtype="float32")
model.chat(sys.argv[2], tok, "What moves?", max_num_frames=16, generation_config={"max_new_tokens": 4})
print(model.last_stats.get("video_decoder"), model.last_stats.get("video_nvdec_unavailable"))
"""


def test_nvdec_engages_after_torch_owns_the_gpu(tiny_dir, tmp_path):
    """The full-size model never got NVDEC: FFmpeg's primary-context mode refused a context torch had made
    active first (ENOTSUP). A fresh process, so no earlier NVDEC open in this one hides the bug."""
    import subprocess
    import sys

    from tests.media import make_video
    from videoxl.video.gpu import nvdec_accel

    if nvdec_accel(torch.device("cuda"))[0] is None:
        pytest.skip("this PyAV has no CUDA decoding")
    video = make_video(str(tmp_path / "v.mp4"), seconds=8.0, fps=10, size=(320, 240), codec="libx264")
    out = subprocess.run([sys.executable, "-c", NVDEC_AFTER_TORCH, tiny_dir, video], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["nvdec", "None"], out.stdout


@pytest.mark.parametrize("mode, offload", [("dense", False), ("mask", False), ("streaming", True)])
def test_file_prefilled_while_decoding_matches_one_shot_on_gpu(gpu_model, long_video, monkeypatch, mode, offload):
    """The overlapped prefill of a file (pipeline.build_prefix, 4 frames a vision slice: 10 slices, prefilled one by
    one or batched as they come, on the CUDA paths: flash for dense rows and timestamp runs, pinned offload)
    against the one-shot prefill of the same prompt (FlexAttention for mask/streaming); fp32, TOL relative."""
    from videoxl import pipeline

    import functools

    from videoxl.video.sources import open_video

    model, tokenizer = gpu_model
    monkeypatch.setattr(pipeline, "DEFAULT_FRAMES_PER_SLICE", 4)
    # the frames load_video gives (NVDEC's are converted and resized on the GPU: other pixels, other KVs)
    monkeypatch.setattr(pipeline, "open_video", functools.partial(open_video, decoder="pyav"))
    chunking = None if mode == "dense" else PrefillConfig(mode, 4, 2, offload, chunk_size_for_vision_tower=4)
    prompt, embeds = encoded_prompt(model, tokenizer, long_video, 64)
    with torch.inference_mode():
        whole = model.decoder.new_cache(capacity=prompt.video_end + 8, offload=offload)
        model.prefill(embeds, whole, prompt, chunking)
        entry = pipeline.build_prefix(model, long_video, tokenizer, "q", [], (64, 1, None), chunking, False, None)
    assert entry.prompt.input_ids == prompt.input_ids[:prompt.video_end]
    assert entry.stats["prefill_overlapped"] == (mode == "dense")  # chunked on CUDA: one FlexAttention pass
    entry.cache.truncate(prompt.video_end)
    for layer in range(model.config.text.num_hidden_layers):
        for got, ref in zip(entry.cache.layer(layer), whole.layer(layer)):
            got, ref = got.float().cpu(), ref.float().cpu()
            assert ((got - ref).abs().max() / ref.abs().max()).item() < TOL, (mode, layer)


def test_nvdec_frames_exact_while_the_gpu_is_busy(tmp_path):
    """While other streams keep the GPU busy (a question's vision and prefill run on their own stream beside the
    decoders, SideStream), NVDEC frames must be the same, bit for bit; and within the documented 3 levels of the
    CPU decoder's."""
    from tests.media import make_video
    from videoxl.video.gpu import nvdec_accel
    from videoxl.video.sources import open_video

    if nvdec_accel(torch.device("cuda"))[0] is None:
        pytest.skip("this PyAV has no CUDA decoding")
    video = make_video(str(tmp_path / "v.mp4"), seconds=8.0, fps=10, size=(320, 240), codec="libx264")

    def frames(decoder):
        s = open_video(video, max_num_frames=80, sample_fps=None, decoder=decoder, device="cuda")
        return torch.cat([torch.as_tensor(f).cuda() for f in s.batches(16)])

    quiet = frames("nvdec")
    other = torch.cuda.Stream()
    with torch.cuda.stream(other):
        a = torch.randn(8192, 8192, device="cuda")
        for _ in range(40):  # about a second of queued work on another stream
            a = (a @ a).clamp_(-1, 1)
    busy = frames("nvdec")
    torch.cuda.synchronize()
    assert quiet.shape == (80, 384, 384, 3) and torch.equal(quiet, busy)
    cpu = frames("pyav")
    assert (cpu.int() - quiet.int()).abs().max().item() <= 3


def test_lower_right_flash_equals_sdpas_lower_right_bias():
    """`attend`'s n queries after cached keys (decoder.flash_lower_right) against SDPA with torch's own
    lower-right CausalBias (the path it replaces), grouped-query heads, bf16: equal bytes when SDPA's dispatch
    takes the same flash op, else within 2e-2 (bf16 rounding of two kernels); and against fp32 math within 2e-2."""
    from torch.nn.attention.bias import causal_lower_right

    from videoxl.language.decoder import flash_lower_right

    g = torch.Generator(device="cuda").manual_seed(0)
    for n, m in ((37, 1000), (1, 64), (256, 4096)):
        q = torch.randn(1, 28, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        k, v = (torch.randn(1, 4, m, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        got = flash_lower_right(q, k, v)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(n, m),
                                                               enable_gqa=True)
        assert got is not None and got.shape == ref.shape
        assert torch.equal(got, ref) or (got.float() - ref.float()).abs().max() < 2e-2
        kf, vf = (t.float().repeat_interleave(7, dim=1) for t in (k, v))
        allowed = torch.ones(n, m, dtype=torch.bool, device="cuda").tril(m - n)
        exact = torch.nn.functional.scaled_dot_product_attention(q.float(), kf, vf, attn_mask=allowed)
        assert (got.float() - exact).abs().max() < 2e-2


QUESTION_WITHOUT_DYNAMO = """
import sys, torch, videoxl
model, tok = videoxl.load(sys.argv[1], device="cuda", dtype="bfloat16")
model.chat(sys.argv[2], tok, "What moves?", max_num_frames=16, generation_config={"max_new_tokens": 4})
model.chat(sys.argv[2], tok, "And then?", max_num_frames=16, generation_config={"max_new_tokens": 4})
print("torch._dynamo" in sys.modules, "transformers" in sys.modules)
"""


def test_a_dense_question_imports_neither_dynamo_nor_transformers(tiny_dir, long_video):
    """A fresh process's first questions (dense, bf16, a follow-up over cached KVs) import neither torch._dynamo
    nor transformers: seconds of start-up on the first question's path (issue 19)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", QUESTION_WITHOUT_DYNAMO, tiny_dir, long_video], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["False", "False"], out.stdout
