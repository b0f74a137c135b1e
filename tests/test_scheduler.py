"""The runtime's scheduler: batched rows give the tokens and latents they give alone; admission,
caps, cancellation, the queue, threads and asyncio."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from haplo.errors import RequestError
from haplo.model.modeling import HaploOmniForConditionalGeneration
from haplo.model.processor import HaploOmniProcessor
from haplo.model.shipped import shipped_checkpoint
from haplo.model.tokenizer import tokenizer_for
from haplo.model.vae import vae_for_checkpoint
from haplo.runtime import batching
from haplo.runtime.decoding import prefill, understand
from haplo.runtime.pipeline import TextToVideoPipeline
from haplo.runtime.sampling import SamplingParams
from haplo.runtime.scheduler import QueueFull, Scheduler, SchedulerConfig
from haplo.runtime.torch_backend import TorchBackend
from haplo.training.world import QUESTIONS, scenes


@pytest.fixture(scope="module")
def mini():
    """(backend, processor) of the shipped haplo-mini on PyTorch, with its VAE."""
    checkpoint = shipped_checkpoint()
    model = HaploOmniForConditionalGeneration.from_pretrained(checkpoint)
    processor = HaploOmniProcessor(tokenizer_for(model.config, checkpoint), model.config)
    return TorchBackend(model, vae_for_checkpoint(checkpoint, model.config, None)), processor


def questions(processor, count: int) -> list[dict]:
    """Held-out clips with questions of different lengths (so the batch needs padding)."""
    out = []
    for i, scene in enumerate(scenes("test", count)):
        text = "<video>\n" + QUESTIONS[i % len(QUESTIONS)] + " Answer briefly." * (i % 3)
        out.append(processor(conversations=[[{"role": "user", "content": text}]], videos=[scene.video(9, 64, 64)]))
    return out


def greedy(processor, new: int = 24) -> SamplingParams:
    return SamplingParams(max_new_tokens=new, stop_token_ids=tuple(processor.stop_token_ids))


def alone(backend, processor, inputs, params: SamplingParams) -> list[int]:
    out = understand(backend, **inputs, **vars(params))
    tokens = out.new_tokens[0].tolist()
    stops = [i for i, t in enumerate(tokens) if t in params.stop_token_ids]
    return tokens[: stops[0] + 1] if stops else tokens


def test_batched_rows_give_the_tokens_they_give_alone_with_joins_mid_batch(mini):
    backend, processor = mini
    requests, params = questions(processor, 6), greedy(processor)
    expected = [alone(backend, processor, r, params) for r in requests]
    sched = Scheduler(backend, start=False)
    streams = [sched.submit(r, params) for r in requests[:3]]
    for _ in range(5):
        sched.step()
    assert sched.stats()["running_batch"] == 3 and all(len(s.tokens) == 6 for s in streams)
    streams += [sched.submit(r, params) for r in requests[3:]]  # join a batch already 6 tokens in
    sched.step()
    assert sched.stats()["running_batch"] == 6
    sched.run_until_idle()
    assert [s.tokens for s in streams] == expected
    assert {s.finish_reason for s in streams} <= {"stop", "length"} and sched.stats()["kv_cache_bytes"] == 0
    assert "moves" in processor.decode(streams[0].tokens, skip_special_tokens=True)


def test_merge_pads_on_the_left_and_select_gives_each_row_back_exactly(mini):
    backend, processor = mini
    states = [prefill(backend, r)[1] for r in questions(processor, 3)]
    merged = batching.merge(backend, states)
    assert merged.length == max(s.length for s in states) and merged.key_start.shape[0] == 3
    for row, state in enumerate(states):
        back = batching.select(backend, merged, [row])
        assert torch.equal(back.key_start, state.key_start)
        assert torch.equal(back.next_position, state.next_position)
        for stage in state.past:
            for got, want in zip(backend.cache_tensors(back.past[stage]), backend.cache_tensors(state.past[stage])):
                assert torch.equal(got, want)
    assert batching.cache_bytes(backend, merged) == 3 * merged.length * batching.kv_bytes_per_token(backend)


def test_seeded_sampling_is_the_same_batched_and_alone(mini):
    backend, processor = mini
    requests = questions(processor, 3)
    params = [
        SamplingParams(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=20, top_p=0.9, seed=7 + i)
        for i in range(3)
    ]
    expected = [alone(backend, processor, r, p) for r, p in zip(requests, params)]
    sched = Scheduler(backend, start=False)
    streams = [sched.submit(r, p) for r, p in zip(requests, params)]
    sched.run_until_idle()
    assert [s.tokens for s in streams] == expected


def test_a_cancelled_row_leaves_at_the_next_step(mini):
    backend, processor = mini
    requests = questions(processor, 2)
    sched = Scheduler(backend, start=False)
    long = SamplingParams(max_new_tokens=200)  # no stop tokens: runs until cancelled
    first = sched.submit(requests[0], long)
    sched.step()
    before = sched.stats()
    second = sched.submit(requests[1], long)
    sched.step()
    assert sched.stats()["running_batch"] == 2
    second.cancel()
    sched.step()
    after = sched.stats()
    assert second.finish_reason == "cancelled" and second.status == "cancelled" and second.done
    assert after["running_batch"] == before["running_batch"] == 1
    assert not first.done and after["kv_cache_bytes"] < 2 * before["kv_cache_bytes"]
    first.cancel()
    sched.run_until_idle()
    assert first.finish_reason == "cancelled" and sched.stats()["running_batch"] == 0


def test_the_batch_cap_holds_rows_back_without_changing_their_tokens(mini):
    backend, processor = mini
    requests, params = questions(processor, 4), greedy(processor, 8)
    expected = [alone(backend, processor, r, params) for r in requests]
    sched = Scheduler(backend, SchedulerConfig(max_batch=2), start=False)
    streams = [sched.submit(r, params) for r in requests]
    peak = 0
    while not sched.idle:
        sched.step()
        peak = max(peak, sched.stats()["running_batch"])
    assert peak == 2 and [s.tokens for s in streams] == expected


def test_the_kv_cap_refuses_what_never_fits_and_queues_what_fits_later(mini):
    backend, processor = mini
    requests = questions(processor, 2)
    per_token = batching.kv_bytes_per_token(backend)
    prompt = requests[0]["input_ids"].shape[1]
    with pytest.raises(RequestError, match="KV cache"):
        Scheduler(backend, SchedulerConfig(max_kv_bytes=prompt * per_token), start=False).submit(
            requests[0], SamplingParams(max_new_tokens=8)
        )
    one = (max(r["input_ids"].shape[1] for r in requests) + 8) * per_token
    sched = Scheduler(backend, SchedulerConfig(max_kv_bytes=one + per_token), start=False)
    streams = [sched.submit(r, SamplingParams(max_new_tokens=8)) for r in requests]
    sched.step()
    assert sched.stats()["running_batch"] == 1 and sched.stats()["waiting_chat"] == 1
    sched.run_until_idle()
    assert all(len(s.tokens) == 8 for s in streams)


def test_a_full_queue_raises_queue_full_with_a_retry_time(mini):
    backend, processor = mini
    request = questions(processor, 1)[0]
    sched = Scheduler(backend, SchedulerConfig(max_queue=2), start=False)
    sched.submit(request, SamplingParams(max_new_tokens=2))
    sched.submit(request, SamplingParams(max_new_tokens=2))
    with pytest.raises(QueueFull) as full:
        sched.submit(request, SamplingParams(max_new_tokens=2))
    assert full.value.retry_after >= 1
    sched.run_until_idle()
    sched.submit(request, SamplingParams(max_new_tokens=2)).cancel()  # room again


def test_a_request_that_fails_alone_does_not_stop_the_batch(mini):
    backend, processor = mini
    good = questions(processor, 1)[0]
    bad = {**good, "pixel_values_videos": good["pixel_values_videos"][:, :3]}  # fewer frames than placeholders
    sched = Scheduler(backend, start=False)
    streams = [sched.submit(good, greedy(processor)), sched.submit(bad, greedy(processor))]
    sched.run_until_idle()
    assert streams[0].status == "finished" and streams[1].status == "failed"
    with pytest.raises(ValueError, match="placeholders"):
        streams[1].result()


def test_threads_and_asyncio_consume_streams_from_the_running_thread(mini):
    backend, processor = mini
    requests, params = questions(processor, 4), greedy(processor, 10)
    expected = [alone(backend, processor, r, params) for r in requests]
    sched = Scheduler(backend)
    try:

        async def consume(stream):
            return [token async for token in stream]

        async def main():
            streams = [sched.submit(r, params) for r in requests[:2]]
            return await asyncio.gather(*(consume(s) for s in streams))

        got = {}
        threads = [
            threading.Thread(target=lambda i=i: got.__setitem__(i, list(sched.submit(requests[i], params))))
            for i in (2, 3)
        ]
        for thread in threads:
            thread.start()
        got.update(enumerate(asyncio.run(main())))
        for thread in threads:
            thread.join(60)
        assert [got[i] for i in range(4)] == expected
    finally:
        sched.close()
    with pytest.raises(RequestError, match="shutting down"):
        sched.submit(requests[0], params)


def test_video_jobs_denoised_together_match_each_job_alone(mini):
    backend, processor = mini
    pipe = TextToVideoPipeline(backend, processor)
    prompts = ["A red circle moves up.", "A blue square moves to the left.", "A green triangle moves down."]
    expected = [
        pipe(p, seed=i, num_inference_steps=4, output_type="latent", progress=False).latents
        for i, p in enumerate(prompts)
    ]
    sched = Scheduler(backend, start=False)
    jobs = [
        sched.submit_video(pipe.request(p, seed=i, num_inference_steps=4, decode=i == 0))
        for i, p in enumerate(prompts[:2])
    ]
    sched.step()
    assert sched.stats()["running_video"] == 2 and jobs[0].progress == 0.25
    jobs.append(sched.submit_video(pipe.request(prompts[2], seed=2, num_inference_steps=4, decode=False)))
    sched.step()  # joins at the step boundary, at its own first timestep
    assert sched.stats()["running_video"] == 3
    sched.run_until_idle()
    for job, want in zip(jobs, expected):
        assert job.status == "finished"
        torch.testing.assert_close(job.latents, want, atol=1e-4, rtol=1e-4)
    assert list(jobs[0]) == [1, 2, 3, 4] and jobs[0].video.shape[:3] == (1, 3, 9)
    assert jobs[1].video is None


def test_a_cancelled_video_job_leaves_and_the_others_finish(mini):
    backend, processor = mini
    pipe = TextToVideoPipeline(backend, processor)
    sched = Scheduler(backend, start=False)
    keep, drop = (sched.submit_video(pipe.request(p, num_inference_steps=3, decode=False)) for p in ("A", "B"))
    sched.step()
    drop.cancel()
    sched.step()
    assert drop.status == "cancelled" and sched.stats()["running_video"] == 1
    sched.run_until_idle()
    assert keep.status == "finished" and keep.step == 3
    with pytest.raises(RequestError, match="DDIM steps"):
        sched.submit_video(pipe.request("A", num_inference_steps=0))


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(max_batch=0), "max_batch"),
        (dict(max_queue=0), "max_queue"),
        (dict(max_video_batch=0), "max_video_batch"),
        (dict(max_kv_bytes=0), "max_kv_bytes"),
        (dict(max_prefill_tokens=0), "max_prefill_tokens"),
        (dict(prefix_cache_bytes=-1), "prefix_cache_bytes"),
    ],
)
def test_scheduler_settings_out_of_range_are_refused(config, message):
    with pytest.raises(RequestError, match=message):
        SchedulerConfig(**config)


def test_the_prefill_budget_spreads_admissions_over_decode_steps(mini):
    backend, processor = mini
    requests, params = questions(processor, 3), greedy(processor, 8)
    expected = [alone(backend, processor, r, params) for r in requests]
    budget = max(r["input_ids"].shape[1] for r in requests)  # one prompt per step
    sched = Scheduler(backend, SchedulerConfig(max_prefill_tokens=budget), start=False)
    streams = [sched.submit(r, params) for r in requests]
    sizes = []
    while not sched.idle:
        sched.step()
        sizes.append(sched.stats()["running_batch"])
    assert sizes[:3] == [1, 2, 3] and [s.tokens for s in streams] == expected


def test_the_runtime_brings_only_token_ids_and_finished_videos_to_the_host(mini, host_copies):
    """Stage outputs, caches, logits and latents stay on the backend's device: on a GPU the only
    transfers are one [rows] id vector per step and a job's result (checked here on CPU, where the
    same calls would be the copies)."""
    backend, processor = mini
    inputs = questions(processor, 1)[0]
    out = understand(backend, **inputs, max_new_tokens=5)
    assert host_copies == [(1,)] * out.new_tokens.shape[1]
    host_copies.clear()
    sched = Scheduler(backend, start=False)
    streams = [sched.submit(q, SamplingParams(max_new_tokens=4)) for q in questions(processor, 2)]
    sched.run_until_idle()
    assert all(s.status == "finished" for s in streams) and not host_copies  # ids leave through int()
    pipe = TextToVideoPipeline(backend, processor)
    job = sched.submit_video(pipe.request("A red circle moves up.", num_inference_steps=2))
    sched.run_until_idle()
    latents, video = tuple(job.latents.shape), tuple(job.video.shape)
    assert host_copies == [latents, video]
