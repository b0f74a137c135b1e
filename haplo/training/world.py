"""The synthetic world as a task: one coloured shape crossing a plain background, with its answer.

A scene is a colour, a shape and a direction (4 x 3 x 4 = 48 classes). Its caption, e.g.
"A red circle moves up." or "A blue square moves to the left.", answers every question form and is
the prompt that generates it. Scenes of the train, validation and test splits (of any dataset
seed) come from disjoint clip seeds, and every split cycles through all 48 classes (in a seeded
order), so a held-out set of 96 scenes holds each class twice. `parse_caption` reads colour, shape
and direction back from a model's answer; `detect_motion` finds the moving blob of a colour in
decoded frames and its direction of travel from the centroid track.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle")
BACKGROUND = (236, 236, 232)  # the plain background of every clip
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
QUESTIONS = (
    "What moves in the video, and in which direction?",
    "Which colour is the shape that moves?",
    "Which shape moves in the video?",
    "In which direction does the shape move?",
)
IMAGE_QUESTIONS = (  # a still shows the motion as a fading trail behind the shape
    "What moves in the image, and in which direction?",
    "Which colour is the moving shape?",
    "Which shape is moving in the image?",
    "Which way is the shape going?",
)
SPLITS = ("train", "validation", "test")
SPLIT_STRIDE = 1_000_003  # clip seeds of (seed s, split k): (3 s + k) * SPLIT_STRIDE + i, disjoint for i < SPLIT_STRIDE
ATTRIBUTES = ("colour", "shape", "direction")


def caption(colour: str, shape: str, direction: str) -> str:
    """The one answer form: "A red circle moves up." / "A blue square moves to the left."."""
    return f"A {colour} {shape} moves {'to the ' if direction in ('left', 'right') else ''}{direction}."


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    direction: str
    seed: int  # where the path lies (a shift along and across the motion)

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.direction)

    def video(self, frames: int, height: int, width: int) -> np.ndarray:
        """[frames, H, W, 3] uint8."""
        return moving_shape_video(self.shape, self.colour, self.direction, frames, height, width, self.seed)

    def still(self, height: int, width: int, frames: int = 9) -> np.ndarray:
        """[H, W, 3] uint8: the clip's last frame over a fading trail of its earlier positions."""
        return motion_still(self.video(frames, height, width))

    def ref(self, kind: str, frames: int, height: int, width: int) -> str:
        """The dataset reference to this scene's video or still, rendered when read (nothing on
        disk): `world:video/red/circle/up/3000007/9x64x64`."""
        return f"{WORLD_SCHEME}{kind}/{self.colour}/{self.shape}/{self.direction}/{self.seed}/{frames}x{height}x{width}"


WORLD_SCHEME = "world:"
_REF = re.compile(r"world:(video|still)/([a-z]+)/([a-z]+)/([a-z]+)/(\d+)/(\d+)x(\d+)x(\d+)")


def is_ref(media: str) -> bool:
    return isinstance(media, str) and media.startswith(WORLD_SCHEME)


def render_ref(ref: str) -> np.ndarray:
    """uint8 frames of a `Scene.ref`: [F, H, W, 3] for a video, [1, H, W, 3] for a still."""
    match = _REF.fullmatch(ref)
    kind, colour, shape, direction = match.groups()[:4] if match else (None,) * 4
    if not match or colour not in COLOURS or shape not in SHAPES or direction not in DIRECTIONS:
        raise ValueError(f"{ref!r} is not a scene of the world (form: world:video/red/circle/up/SEED/FxHxW)")
    frames, height, width = (int(g) for g in match.groups()[5:])
    if frames < 1 or min(height, width) < 16:
        raise ValueError(f"{ref!r}: a scene needs >= 1 frame and a size >= 16x16")
    scene = Scene(colour, shape, direction, int(match.group(5)))
    return scene.still(height, width, frames)[None] if kind == "still" else scene.video(frames, height, width)


def scenes(split: str, count: int, seed: int = 0) -> list[Scene]:
    """`count` scenes of `split`, cycling through every (colour, shape, direction) in a seeded order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if not 0 <= count < SPLIT_STRIDE:
        raise ValueError(f"count must be in [0, {SPLIT_STRIDE}), got {count}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    classes = list(itertools.product(COLOURS, SHAPES, DIRECTIONS))
    order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(len(classes))
    base = (len(SPLITS) * seed + SPLITS.index(split)) * SPLIT_STRIDE  # one block of seeds per (seed, split)
    return [Scene(*classes[order[i % len(classes)]], seed=base + i) for i in range(count)]


def question_for(scene: Scene, forms: tuple[str, ...], salt: int = 0) -> str:
    """The form a scene is asked in, drawn from its seed (and `salt`, one per medium) and not from its
    class: a form tied to the class would let a model answer from the question instead of the pixels."""
    return forms[int(np.random.default_rng([scene.seed, salt]).integers(len(forms)))]


_WORDS = {
    "colour": {c: c for c in COLOURS},
    "shape": {s: s for s in SHAPES},
    "direction": {"left": "left", "right": "right", "up": "up", "down": "down", "upward": "up", "downward": "down"},
}


def parse_caption(text: str) -> dict[str, str | None]:
    """Colour, shape and direction named in `text` (the first of each kind), None where absent."""
    words = re.findall(r"[a-z]+", text.lower())
    return {kind: next((table[w] for w in words if w in table), None) for kind, table in _WORDS.items()}


# -- clips --------------------------------------------------------------------------------------------


def _draw(frame: np.ndarray, shape: str, colour, cx: float, cy: float, radius: int) -> None:
    h, w, _ = frame.shape
    yy, xx = np.mgrid[0:h, 0:w]
    if shape == "square":
        mask = (abs(xx - cx) <= radius) & (abs(yy - cy) <= radius)
    elif shape == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
    else:  # triangle pointing up
        mask = (yy >= cy - radius) & (yy <= cy + radius) & (abs(xx - cx) <= (yy - (cy - radius)) / 2)
    frame[mask] = colour


def moving_shape_video(
    shape: str, colour: str, direction: str, frames: int, height: int, width: int, seed: int = 0
) -> np.ndarray:
    """[frames, H, W, 3] uint8: one shape crossing the plain background in one direction, its path
    shifted by the seed (up to 1/16 of the frame along the motion, 1/8 across it)."""
    rng = np.random.default_rng(seed)
    radius = max(3, min(height, width) // 8)
    dx, dy = DIRECTIONS[direction]
    travel = (min(height, width) - 4 * radius) / max(frames - 1, 1)
    along, across = rng.uniform(-1, 1, 2) * min(height, width) / np.array([16, 8])
    cx = width / 2 - dx * travel * (frames - 1) / 2 + (dx * along if dx else across)
    cy = height / 2 - dy * travel * (frames - 1) / 2 + (dy * along if dy else across)
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    for f in range(frames):
        video[f] = BACKGROUND
        _draw(video[f], shape, COLOURS[colour], cx + dx * travel * f, cy + dy * travel * f, radius)
    return video


def motion_still(video: np.ndarray, trail: float = 0.6) -> np.ndarray:
    """One image of a clip's motion: each frame blended over the last (`trail` of the old image kept
    where the shape was), so earlier positions fade and the newest is solid."""
    background = np.array(BACKGROUND, dtype=np.float32)
    image = video[0].astype(np.float32)
    for frame in video[1:].astype(np.float32):
        shape = np.any(frame != background, axis=-1, keepdims=True)
        image = np.where(shape, frame, background + trail * (image - background))
    return image.round().astype(np.uint8)


# -- the motion detector -------------------------------------------------------------------------------


@dataclass
class Motion:
    found: bool  # the colour's blob is in at least half of the frames
    direction: str | None  # left / right / up / down; None when not found or it does not travel
    track: list[tuple[float, float] | None]  # centroid (x, y) per frame, None where the blob is absent
    travel: float  # net displacement over the clip, in units of the frame's smaller side


def colour_mask(frames: np.ndarray, colour: str, max_distance: float = 100.0) -> np.ndarray:
    """[F, H, W] bool: pixels nearer to `colour` than to any other colour of the world, and near it."""
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    distance = np.linalg.norm(frames.astype(np.float32)[..., None, :] - palette, axis=-1)  # [F, H, W, colours]
    index = list(COLOURS).index(colour)
    return (distance.argmin(-1) == index) & (distance[..., index] < max_distance)


def blob_centroid(mask: np.ndarray, min_pixels: int = 4, max_spread: float = 0.15) -> tuple[float, float] | None:
    """(x, y) of a [H, W] mask's pixels if they form one compact blob (their spread, the standard
    deviation of each coordinate, below `max_spread` of the frame's smaller side), else None:
    scattered pixels of the colour in a noisy frame are not a shape."""
    ys, xs = np.nonzero(mask)
    if len(xs) < min_pixels or max(xs.std(), ys.std()) > max_spread * min(mask.shape):
        return None
    return float(xs.mean()), float(ys.mean())


def detect_motion(frames: np.ndarray, colour: str, min_pixels: int = 4, min_travel: float = 0.1) -> Motion:
    """The blob of `colour` in [F, H, W, 3] uint8 frames and where it goes (first to last sighting)."""
    track = [blob_centroid(frame, min_pixels) for frame in colour_mask(frames, colour)]
    seen = [point for point in track if point is not None]
    if len(seen) < max(2, (len(track) + 1) // 2):
        return Motion(False, None, track, 0.0)
    dx, dy = seen[-1][0] - seen[0][0], seen[-1][1] - seen[0][1]
    travel = max(abs(dx), abs(dy)) / min(frames.shape[1:3])
    if travel < min_travel:
        return Motion(True, None, track, travel)
    direction = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
    return Motion(True, direction, track, travel)
