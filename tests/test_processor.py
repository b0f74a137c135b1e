"""Tokenizer, image tiling and packing, placeholder expansion and block starts."""

import numpy as np
import pytest
import torch
from PIL import Image

from haplo.model import vision
from haplo.model.config import preset
from haplo.model.modeling import HaploOmniForConditionalGeneration
from haplo.model.processor import CLIP_MEAN, CLIP_STD, HaploOmniProcessor, ProcessorError
from haplo.model.tokenizer import TokenizerError, build_tokenizer, load_tokenizer


def anyres_config(max_tiles=4):
    config = preset("tiny")
    for stage in config.stages.values():
        stage.image_aspect_ratio = f"anyres_max_{max_tiles}"
        stage.image_grid_pinpoints = [[56, 56], [56, 112], [112, 56], [112, 112], [56, 168], [168, 168]]
    return config


def solid(height, width, colour=(10, 200, 30)):
    return Image.fromarray(np.full((height, width, 3), colour, dtype=np.uint8))


@pytest.fixture(scope="module")
def processor():
    config = preset("tiny")
    return HaploOmniProcessor(build_tokenizer(config), config)


def test_tokenizer_round_trip_and_special_ids(tmp_path):
    config = preset("tiny")
    tok = build_tokenizer(config)
    text = "A red circle moves left. Ünïcode ✓ <image>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert ids[-1] == config.image_token_index and tok.pad_token_id == 0
    assert tok.convert_tokens_to_ids("<video>") == config.video_token_index
    assert max(tok.get_vocab().values()) < config.vocab_size
    tok.save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path)(text, add_special_tokens=False)["input_ids"] == ids


def test_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not a directory"):
        load_tokenizer(tmp_path / "none")
    small = preset("tiny")
    small.base.vocab_size = 200
    with pytest.raises(TokenizerError, match="cannot hold"):
        build_tokenizer(small)


@pytest.mark.parametrize("size", [(56, 56), (40, 100), (100, 40), (150, 150), (30, 170), (111, 57)])
def test_anyres_token_count_equals_packed_length(size):
    stage = anyres_config().base
    tiles = vision.num_image_tiles(size, stage)
    features = torch.randn(tiles, 16, 8)
    packed = vision.pack_image_embeds(features, size, torch.zeros(8), stage)
    assert packed.shape == (vision.image_token_count(size, stage), 8)


def test_anyres_packing_by_hand():
    stage = anyres_config(max_tiles=9).base
    # 56 x 112 image -> a 1 x 2 grid, map 4 x 8, no padding to remove, newline after each of 4 rows
    tiles = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 16, 1)
    packed = vision.pack_image_embeds(tiles, (56, 112), torch.tensor([-1.0]), stage)[:, 0]
    first_row = [0, 1, 2, 3, 16, 17, 18, 19, -1]  # tile 0 row 0, tile 1 row 0, newline
    assert packed[:9].tolist() == first_row and packed.numel() == 4 * 9


def test_anyres_downscales_above_the_tile_limit():
    stage = anyres_config(max_tiles=1).base
    size = (168, 168)  # 3 x 3 tiles = 12 x 12 map -> shrunk to about one tile's worth
    assert vision.anyres_map_size(size, stage) == (4, 4)
    assert vision.image_token_count(size, stage) == 4 * 5


def test_pad_mode_counts(processor):
    assert vision.image_token_count((33, 90), processor.stage) == 17
    assert vision.video_token_count(3, processor.stage) == 3 * 16 + 1


def test_clip_normalisation_of_a_known_pixel(processor):
    tiles, size = processor.image_tiles(solid(56, 56, (255, 0, 128)))
    expected = (np.array([1.0, 0.0, 128 / 255]) - CLIP_MEAN) / CLIP_STD
    np.testing.assert_allclose(tiles[0, :, 10, 10], expected, rtol=1e-5)
    assert size == (56, 56) and tiles.shape == (1, 3, 56, 56)


def test_block_starts_text_image_text_video(processor):
    frames = np.zeros((2, 20, 20, 3), dtype=np.uint8)
    out = processor(text="ab<image>c<video>d", images=[solid(56, 56)], videos=[frames])
    ids, starts = out["input_ids"][0], out["attention_start_ids"][0]
    assert ids.shape[0] == 2 + 17 + 1 + 33 + 1
    assert starts[:2].tolist() == [0, 1]
    assert (starts[2:19] == 2).all()  # one 17-token image block
    assert starts[19] == 19  # text
    assert (starts[20:36] == 20).all() and (starts[36:52] == 36).all()  # two 16-token frames
    assert starts[52] == 52 and starts[53] == 53  # the video newline alone, then text
    assert out["pixel_values"].shape == (1, 1, 3, 56, 56)
    assert out["pixel_values_videos"].shape == (1, 2, 3, 56, 56)


def test_left_padding_in_a_batch(processor):
    out = processor(text=["hello there", "<image>x"], images=[solid(30, 60)])
    mask, starts = out["attention_mask"], out["attention_start_ids"]
    assert mask[0].tolist() == [0] * 7 + [1] * 11  # the shorter row is padded on the left
    assert mask[1].all()
    assert (starts[1, :17] == 0).all() and starts[1, 17] == 17


def test_placeholder_count_mismatch(processor):
    with pytest.raises(ProcessorError, match="2 <image> placeholders but 1 images"):
        processor(text="<image><image>", images=[solid(10, 10)])


def test_undecodable_image(processor, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(ProcessorError, match="broken.jpg: cannot decode"):
        processor(text="<image>", images=[str(broken)])


def test_conversation_through_the_model_anyres():
    config = anyres_config()
    model = HaploOmniForConditionalGeneration.from_config(config, seed=0)
    proc = HaploOmniProcessor(build_tokenizer(config), config)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    inputs = proc(conversations=[conversation, conversation], images=[solid(60, 150), solid(150, 60)])
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()
