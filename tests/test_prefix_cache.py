"""Kept prompt prefixes: a prompt that begins with an earlier one's tokens and media prefills only the
rest, its logits match a whole prefill, its media is not encoded again, and the budget holds."""

from __future__ import annotations

import pytest
import torch

from haplo.model.modeling import HaploOmniForConditionalGeneration
from haplo.model.processor import HaploOmniProcessor
from haplo.model.shipped import shipped_checkpoint
from haplo.model.tokenizer import tokenizer_for
from haplo.runtime.batching import kv_bytes_per_token
from haplo.runtime.decoding import prefill, understand
from haplo.runtime.prefix_cache import PrefixCache, cut_points, media_bytes, media_end, media_of
from haplo.runtime.sampling import SamplingParams
from haplo.runtime.scheduler import Scheduler, SchedulerConfig
from haplo.runtime.torch_backend import TorchBackend
from haplo.training.world import QUESTIONS, scenes


@pytest.fixture(scope="module")
def mini():
    checkpoint = shipped_checkpoint()
    model = HaploOmniForConditionalGeneration.from_pretrained(checkpoint)
    processor = HaploOmniProcessor(tokenizer_for(model.config, checkpoint), model.config)
    return TorchBackend(model), processor


def ask(processor, clip: int, question: str, history: list | None = None) -> dict:
    chat = [*(history or []), {"role": "user", "content": question if history else "<video>\n" + question}]
    return processor(conversations=[chat], videos=[scenes("test", 4)[clip].video(9, 64, 64)])


@pytest.fixture
def video_calls(mini, monkeypatch):
    backend, _ = mini
    calls = []
    real = backend.embed_videos
    monkeypatch.setattr(backend, "embed_videos", lambda pixels: calls.append(pixels.shape) or real(pixels))
    return calls


def test_a_prompt_that_begins_with_a_kept_prefix_prefills_only_the_rest(mini, video_calls):
    backend, processor = mini
    first, other_question = ask(processor, 0, QUESTIONS[0]), ask(processor, 0, QUESTIONS[1])
    other_clip = ask(processor, 1, QUESTIONS[0])
    assert torch.equal(first["input_ids"], other_clip["input_ids"])  # only the pixels differ
    length, after_media = first["input_ids"].shape[1], media_end(backend, first["input_ids"][0])
    assert 0 < after_media < length - 1
    cache = PrefixCache(backend, 64 * 2**20)
    cases = [(first, 0, 1), (first, length - 1, 0), (other_question, after_media, 0), (other_clip, 0, 1)]
    for inputs, reused, encoded in cases:
        expected, _ = prefill(backend, inputs)
        before = len(video_calls)
        logits, state, n = cache.prefill(inputs)
        assert n == reused and len(video_calls) - before == encoded
        assert (logits - expected).abs().max() < 1e-4 and torch.equal(logits.argmax(-1), expected.argmax(-1))
        assert state.length == inputs["input_ids"].shape[1] and int(state.next_position[0]) == state.length
    assert (cache.hits, cache.misses, cache.reused_tokens) == (2, 2, length - 1 + after_media)
    assert cache.bytes == sum(e.nbytes for e in cache._entries.values()) <= cache.max_bytes


def test_cuts_never_split_a_block_of_bidirectional_attention(mini):
    backend, _ = mini
    video = backend.config.video_token_index
    ids = torch.tensor([[5, 6, video, video, video, 7, 8, 9]])
    starts = torch.tensor([[0, 1, 2, 2, 2, 5, 6, 7]])  # the video block is slots 2-4
    assert cut_points(backend, {"input_ids": ids, "attention_start_ids": starts}) == [5, 7]
    starts = torch.tensor([[0, 1, 2, 2, 2, 2, 6, 7]])  # slot 5 is inside the block: no cut there
    assert cut_points(backend, {"input_ids": ids, "attention_start_ids": starts}) == [7]
    assert cut_points(backend, {"input_ids": ids[:, :1]}) == []  # one token: nothing to keep


def test_the_budget_keeps_the_most_recently_used_prefixes(mini):
    backend, processor = mini
    prompts = [ask(processor, clip, QUESTIONS[0]) for clip in range(3)]
    length = prompts[0]["input_ids"].shape[1]
    per_prompt = (media_end(backend, prompts[0]["input_ids"][0]) + length - 1) * kv_bytes_per_token(backend)
    per_prompt += 2 * media_bytes(media_of(prompts[0]))  # each entry counts the pixels it holds
    cache = PrefixCache(backend, per_prompt + 1)  # one prompt's two cuts fit, not two prompts'
    for inputs in prompts:
        cache.prefill(inputs)
        assert cache.bytes <= cache.max_bytes
    assert len(cache) == 2 and cache.lookup(prompts[2]) is not None and cache.lookup(prompts[0]) is None
    tiny = PrefixCache(backend, kv_bytes_per_token(backend))  # no cut fits at all
    tiny.prefill(prompts[0])
    assert len(tiny) == 0 and tiny.bytes == 0


def test_scheduled_requests_reuse_prefixes_and_give_the_tokens_they_give_alone(mini):
    backend, processor = mini
    params = SamplingParams(max_new_tokens=12, stop_token_ids=tuple(processor.stop_token_ids))
    first = ask(processor, 2, QUESTIONS[0])
    answer = understand(backend, **first, **vars(params)).new_tokens[0].tolist()
    reply = processor.decode(answer, skip_special_tokens=True)
    history = [{"role": "user", "content": "<video>\n" + QUESTIONS[0]}, {"role": "assistant", "content": reply}]
    requests = [first, ask(processor, 2, QUESTIONS[2]), first, ask(processor, 2, "And then?", history)]
    expected = [understand(backend, **r, **vars(params)).new_tokens[0].tolist() for r in requests]
    sched = Scheduler(backend, start=False)
    streams = []
    for inputs in requests:  # one after another, so each finds the ones before it kept
        streams.append(sched.submit(inputs, params))
        sched.run_until_idle()
    for stream, tokens in zip(streams, expected):
        stops = [i for i, t in enumerate(tokens) if t in params.stop_token_ids]
        assert stream.tokens == (tokens[: stops[0] + 1] if stops else tokens)
    reused = [s.reused_tokens for s in streams]
    assert reused[0] == 0 and 0 < reused[1] < reused[2] == first["input_ids"].shape[1] - 1
    assert reused[3] == first["input_ids"].shape[1] - 1  # the next turn begins with the whole first prompt
    assert sched.stats()["prefix_cache_bytes"] == sched.prefix_cache.bytes > 0
    assert Scheduler(backend, SchedulerConfig(prefix_cache_bytes=0), start=False).prefix_cache is None


def test_kept_prefixes_stay_on_the_device(mini, host_copies):
    """Looking up, cutting, keeping and resuming copy nothing to the host: media are compared where
    they lie, caches are cut on the backend's device."""
    backend, processor = mini
    inputs = ask(processor, 3, QUESTIONS[3])
    cache = PrefixCache(backend, 64 * 2**20)
    cache.prefill(inputs)  # a miss, kept
    cache.prefill(inputs)  # a hit
    assert cache.hits == 1 and host_copies == []
