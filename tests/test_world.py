"""The synthetic world as a task: splits, captions, answer parsing, and the motion detector."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from haplo.training.world import (
    BACKGROUND,
    COLOURS,
    DIRECTIONS,
    IMAGE_QUESTIONS,
    QUESTIONS,
    SHAPES,
    Scene,
    caption,
    colour_mask,
    detect_motion,
    moving_shape_video,
    parse_caption,
    scenes,
)


def test_splits_are_disjoint_balanced_and_reproducible():
    test = scenes("test", 96)
    assert scenes("test", 96) == test
    assert not {s.seed for s in test} & {s.seed for s in scenes("train", 1000)}
    assert not {s.seed for s in test} & {s.seed for s in scenes("validation", 200)}
    counts = {}
    for s in test:
        counts[(s.colour, s.shape, s.direction)] = counts.get((s.colour, s.shape, s.direction), 0) + 1
    assert set(counts) == set(itertools.product(COLOURS, SHAPES, DIRECTIONS)) and set(counts.values()) == {2}
    assert scenes("train", 48, seed=1) != scenes("train", 48, seed=0)
    assert not {s.seed for s in scenes("train", 500, seed=1)} & {s.seed for s in test}  # any seed, any split
    with pytest.raises(ValueError, match="unknown split"):
        scenes("dev", 4)


@pytest.mark.parametrize("colour, shape, direction", [("red", "circle", "up"), ("blue", "square", "left")])
def test_caption_round_trips(colour, shape, direction):
    text = caption(colour, shape, direction)
    assert text in ("A red circle moves up.", "A blue square moves to the left.")
    assert parse_caption(text) == {"colour": colour, "shape": shape, "direction": direction}


def test_parse_caption_takes_what_is_there():
    assert parse_caption("It is GREEN, a triangle going downward") == {
        "colour": "green",
        "shape": "triangle",
        "direction": "down",
    }
    assert parse_caption("\ufffd md j") == {"colour": None, "shape": None, "direction": None}


@pytest.mark.parametrize("colour, direction", list(itertools.product(COLOURS, DIRECTIONS)))
def test_detector_finds_every_colour_and_direction(colour, direction):
    for shape in SHAPES:
        video = Scene(colour, shape, direction, seed=7).video(9, 64, 64)
        motion = detect_motion(video, colour)
        assert motion.found and motion.direction == direction, (shape, motion)
        assert all(point is not None for point in motion.track)


def test_detector_says_when_nothing_moves_or_the_colour_is_absent():
    video = moving_shape_video("square", "red", "left", 9, 64, 64)
    assert detect_motion(video, "blue").found is False
    still = np.repeat(video[:1], 9, axis=0)
    motion = detect_motion(still, "red")
    assert motion.found and motion.direction is None and motion.travel == 0.0
    assert colour_mask(video, "red")[0].sum() > 50  # the blob, not the light background


def test_scattered_pixels_of_a_colour_are_not_a_shape():
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (9, 64, 64, 3), dtype=np.uint8)
    assert colour_mask(noise, "red").sum() > 9 * 20  # the colour is there, scattered
    assert not any(detect_motion(noise, c).found for c in COLOURS)


def test_detector_tolerates_blur_and_noise():
    rng = np.random.default_rng(0)
    video = Scene("yellow", "circle", "down", seed=3).video(9, 64, 64).astype(np.int16)
    noisy = np.clip(video + rng.integers(-30, 31, video.shape), 0, 255).astype(np.uint8)
    assert detect_motion(noisy, "yellow").direction == "down"


def test_synthetic_dataset_is_the_task(tmp_path):
    from haplo.training.data import make_synthetic_dataset, read_jsonl

    records = read_jsonl(make_synthetic_dataset(tmp_path / "val", 8, 9, 32, 32, split="validation"))
    held_out = scenes("validation", 8)
    for key, placeholder in (("video", "<video>"), ("images", "<image>")):
        asked = [r for r in records if r["type"] == "understanding" and key in r]
        assert [r["conversations"][1]["content"] for r in asked] == [s.caption for s in held_out]
        forms = QUESTIONS if key == "video" else IMAGE_QUESTIONS
        assert all(r["conversations"][0]["content"] in {f"{placeholder}\n{q}" for q in forms} for r in asked)
    assert [r["caption"] for r in records if r["type"] == "generation"] == [s.caption for s in held_out]
    assert all((tmp_path / "val" / r["images"][0]).is_file() for r in records if "images" in r)


def test_the_question_form_says_nothing_about_the_class():
    from haplo.training.world import question_for

    forms: dict[tuple, set] = {}
    for scene in scenes("train", 48 * 8):  # each class 8 times
        forms.setdefault((scene.colour, scene.shape, scene.direction), set()).add(question_for(scene, QUESTIONS))
    assert len(forms) == 48 and sum(len(f) >= 3 for f in forms.values()) >= 40  # a class is asked every way
    scene = scenes("test", 1)[0]
    assert question_for(scene, QUESTIONS) == question_for(scene, QUESTIONS)  # a function of the clip


def test_a_world_dataset_refers_to_scenes_rendered_when_read(tmp_path):
    from haplo.training.data import load_frames, make_synthetic_dataset, read_jsonl

    jsonl = make_synthetic_dataset(tmp_path / "w", 6, 9, 32, 32, split="validation", media="world", generation=2)
    assert [p.name for p in (tmp_path / "w").iterdir()] == ["data.jsonl"]  # nothing else on disk
    records = read_jsonl(jsonl)
    held_out = scenes("validation", 6)
    videos = [r for r in records if r["type"] == "understanding" and "video" in r]
    assert [r["conversations"][1]["content"] for r in videos] == [s.caption for s in held_out]
    assert np.array_equal(load_frames(videos[3]), held_out[3].video(9, 32, 32))
    stills = [r for r in records if "images" in r]
    still = load_frames({**stills[1], "image": stills[1]["images"][0]}, "image")[0]
    assert np.array_equal(still, held_out[1].still(32, 32))
    assert [r["caption"] for r in records if r["type"] == "generation"] == [s.caption for s in held_out[:2]]


@pytest.mark.parametrize(
    "ref",
    ["world:video/red/star/up/1/9x32x32", "world:photo/red/circle/up/1/9x32x32", "world:video/red/circle/up/1/9x8x8"],
)
def test_a_bad_scene_reference_is_named(ref):
    from haplo.training.data import DataError, load_frames

    with pytest.raises(DataError, match="world:"):
        load_frames({"_root": ".", "video": ref})


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_a_still_shows_the_motion_as_a_trail_behind_the_shape(direction):
    scene = Scene("blue", "square", direction, seed=3)
    video, still = scene.video(9, 64, 64), scene.still(64, 64)
    assert np.array_equal(still[colour_mask(video, "blue")[-1]], video[-1][colour_mask(video, "blue")[-1]])  # solid now
    trail = np.abs(still.astype(int) - np.array(BACKGROUND)).sum(-1) > 0  # anything that is not background
    ys, xs = np.nonzero(trail & ~colour_mask(video, "blue")[-1])
    head_x, head_y = (v.mean() for v in np.nonzero(colour_mask(video, "blue")[-1])[::-1])
    dx, dy = DIRECTIONS[direction]
    behind = (head_x - xs) * dx + (head_y - ys) * dy  # distance behind the head along the motion
    assert len(xs) > 20 and np.mean(behind > 0) > 0.95
    assert parse_caption(scene.caption)["direction"] == direction


def test_the_seed_moves_the_path_and_the_background_is_plain():
    a, b = (Scene("red", "circle", "up", seed=s).video(9, 64, 64) for s in (1, 2))
    assert not np.array_equal(a, b)
    for video in (a, b):
        corners = video[:, [0, 0, -1, -1], [0, -1, 0, -1]]
        assert (corners == np.array(BACKGROUND)).all()
