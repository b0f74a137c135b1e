"""`haplo-export`: inspect, run on the built-in default, and one clear line for bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from haplo.cli import main

FIXTURE_CKPT = Path(__file__).parent / "fixtures" / "tiny-a" / "checkpoint"


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_paper_scale_without_allocating(capsys):
    code, out, _ = run_cli(capsys, "inspect", "--preset", "haplo-omni-9b", "--json")
    report = json.loads(out)
    assert code == 0
    assert 8.5e9 < report["parameters"]["total"] < 9.5e9
    assert report["video"]["latent_tokens"] == 17550
    assert report["parameters"]["base"] > report["parameters"]["post"] > report["parameters"]["pre"]
    assert report["kv_cache_bytes_per_token"]["fp16"] > 0


def test_inspect_checkpoint_table(capsys):
    code, out, _ = run_cli(capsys, "inspect", "--checkpoint", str(FIXTURE_CKPT))
    assert code == 0 and "total" in out and "latent tokens" in out


@pytest.mark.parametrize("argv, message", [
    (["inspect", "--preset", "huge"], "unknown preset 'huge'"),
    (["inspect", "--checkpoint", "/nonexistent/dir"], "no config.json"),
    (["run", "understand", "--checkpoint", "/nonexistent/dir"], "not a directory"),
    (["run", "understand", "--image", "/nonexistent.png"], "no such image file"),
])
def test_bad_input_is_one_clear_line(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error:") and message in err


def test_mismatched_checkpoint_is_one_clear_line(capsys, tmp_path):
    shutil.copytree(FIXTURE_CKPT, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["base_config"]["hidden_size"] = 120
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "run", "understand", "--checkpoint", str(tmp_path / "ckpt"))
    assert code == 2 and "does not match the weights" in err and err.count("\n") == 1


def test_undecodable_image_is_one_clear_line(capsys, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really an image")
    code, _, err = run_cli(capsys, "run", "understand", "--image", str(bad))
    assert code == 2 and "broken.png" in err and err.count("\n") == 1


def test_run_understand_default_with_image(capsys, tmp_path):
    image = tmp_path / "red.png"
    Image.fromarray(np.full((40, 60, 3), (200, 30, 30), dtype=np.uint8)).save(image)
    code, out, _ = run_cli(capsys, "run", "understand", "--image", str(image), "--max-new-tokens", "6", "--json")
    result = json.loads(out)
    assert code == 0 and len(result["token_ids"]) >= 1 and isinstance(result["text"], str)


def test_run_generate_default_writes_video(capsys, tmp_path):
    out_file = tmp_path / "clip.mp4"
    code, out, _ = run_cli(capsys, "run", "generate", "--steps", "2", "--out", str(out_file), "--json")
    summary = json.loads(out)
    assert code == 0
    assert out_file.stat().st_size > 0 and out_file.with_suffix(".gif").stat().st_size > 0
    assert summary["frames"] == 9 and summary["height"] == 64 and summary["width"] == 64
