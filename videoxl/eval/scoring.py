"""Log-probabilities of continuations given a video and a context: what lmms-eval's `loglikelihood` (and so every
multiple-choice task) asks for.

The video's prefix KVs come from the model's video KV cache (the same entry `chat` uses, so a video asked both
ways is prefilled once); the context (the question, in the chat template) runs once over them, then each
continuation runs after the context's KVs with logits at every position. The continuation is the assistant's
answer: it is tokenised on its own and placed right after `<|im_start|>assistant\\n`, where `chat` starts writing.
"""
from __future__ import annotations

import torch

from videoxl.devices import on_device
from videoxl.errors import VideoXLError
from videoxl.inputs import check_request
from videoxl.memory import memory_errors
from videoxl.language.prompt import build_prompt
from videoxl.pipeline import placeholder_id, video_prefix
from videoxl.settings import Settings


def score_continuations(model, tokenizer, video, context: str, continuations: list[str], sampling: tuple,
                        settings: Settings) -> list[tuple[float, bool]]:
    """[(sum of the continuation tokens' log-probabilities, whether greedy decoding would give exactly them)]."""
    r = check_request(model.config, tokenizer, video, context, None, *sampling)
    chunking = settings.prefill
    if settings.sparse is not None:
        raise VideoXLError("loglikelihood with bi-level KV decoding is not implemented: drop bilevel_budget for "
                           "multiple-choice tasks scored by log-likelihood")
    conts = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
    if any(not ids for ids in conts):
        raise VideoXLError("loglikelihood: an empty continuation has no tokens to score")
    with model._exclusive(), on_device(model.device), torch.inference_mode(), \
            memory_errors(model.device, r.max_num_frames, bool(chunking)):
        prefix = video_prefix(model, r.video, tokenizer, context, [], (r.max_num_frames, r.sample_fps,
                                                                         r.max_sample_fps), chunking, False)
        prompt = build_prompt(tokenizer, context, prefix.prompt.timestamps, model.config.tokens_per_group,
                              placeholder_id(model.config, tokenizer))
        cache, decoder = prefix.cache, model.decoder
        cache.truncate(prompt.video_end)
        question = torch.tensor(prompt.input_ids[prompt.video_end:], device=model.device)
        first = decoder(decoder.embed_tokens(question)[None], cache)[0]  # [1, vocab]: the answer's first token
        context_end = cache.length
        out = []
        for ids in conts:
            cache.truncate(context_end)
            target = torch.tensor(ids, device=model.device)
            logits = first
            if len(ids) > 1:  # the rest of the continuation, each token predicted from the ones before
                rest = decoder(decoder.embed_tokens(target[:-1])[None], cache, logits_for="all")[0]
                logits = torch.cat([first, rest])
            logp = torch.log_softmax(logits.float(), dim=-1)
            out.append((float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())))
        cache.truncate(prompt.video_end)  # the entry holds the video prefix only, as `chat` leaves it
        model.kv_cache.persist_pending()
    return out
