"""`haplo-export`: inspect, run on the built-in default, and one clear line for bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from haplo.commands.main import main

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


LONG_PROMPT = " ".join(["word"] * 20_000)

# Bad input -> the fragment its one `error:` line must contain. Placeholders: {FILE} an existing file,
# {DIR} a directory holding a user's file, {BUNDLE} a built tiny bundle, {CKPT} the official-layout
# checkpoint (no vae/ folder). Every new option adds its rows here.
BAD_INPUT = [
    (["inspect", "--preset", "huge"], "unknown preset 'huge'"),
    (["inspect", "--checkpoint", "/nonexistent/dir"], "no config.json"),
    (["inspect", "--frames", "0"], "--frames: 0 is out of range"),
    (["run", "understand", "--checkpoint", "/nonexistent/dir"], "not a directory"),
    (["run", "understand", "--image", "/nonexistent.png"], "no such image file"),
    (["run", "understand", "--video", "/nonexistent.mp4"], "no such video file"),
    (["run", "understand", "--max-new-tokens", "-3"], "--max-new-tokens: -3 is out of range"),
    (["run", "understand", "--max-new-tokens", "many"], "expected an integer, got 'many'"),
    (["run", "understand", "--top-p", "5"], "--top-p: 5.0 is out of range"),
    (["run", "understand", "--top-p", "0"], "--top-p: 0.0 is out of range"),
    (["run", "understand", "--top-k", "-1"], "--top-k: -1 is out of range"),
    (["run", "understand", "--temperature", "-1"], "--temperature: -1.0 is out of range"),
    (["run", "understand", "--temperature", "nan"], "expected a finite number"),
    (["run", "understand", "--video-frames", "0"], "--video-frames: 0 is out of range"),
    (["run", "understand", "--device", "gpu"], "expected cpu, cuda or cuda:N, got 'gpu'"),
    (["run", "understand", "--device", "cuda:x"], "expected cpu, cuda or cuda:N"),
    (["run", "understand", "--device", "cuda:99"], "--device cuda:99: this machine has"),
    (["run", "generate", "--bundle", "{BUNDLE}", "--device", "cuda"], "a bundle runs where its backend does"),
    (["run", "understand", "--demo-clip", "clip.gif"], "--demo-clip clip.gif: use a .mp4 path"),
    (["run", "understand", "--demo-clip", "{DIR}"], "use a .mp4 path"),
    (["run", "understand", "--demo-clip", "{FILE}/sub/clip.mp4"], "cannot create"),
    (["run", "understand", "--demo-clip", "c.mp4", "--video", "v.mp4"], "not allowed with argument"),
    (["run", "understand", "--threads", "0"], "--threads: 0 is out of range"),
    (["run", "understand", "--prompt", LONG_PROMPT], "more than the model's 2048 positions"),
    (["run", "--bundle", "{BUNDLE}", "understand", "--prompt", LONG_PROMPT], "more than the model's 2048 positions"),
    (["run", "--bundle", "/nonexistent/bundle", "understand"], "not a directory"),
    (["run", "--bundle", "{DIR}", "understand"], "no manifest.json"),
    (["run", "--bundle", "{BUNDLE}", "--backend", "tensorrt", "understand"], "has no TensorRT engines"),
    (["run", "--backend", "nope", "understand"], "invalid choice: 'nope'"),
    # --bundle / --backend after the task too; given in both places, the value after the task wins
    (["run", "understand", "--bundle", "/nonexistent/bundle"], "not a directory"),
    (["run", "understand", "--bundle", "{DIR}"], "no manifest.json"),
    (["run", "understand", "--bundle", "{BUNDLE}", "--backend", "tensorrt"], "has no TensorRT engines"),
    (["run", "understand", "--backend", "nope"], "invalid choice: 'nope'"),
    (["run", "understand", "--bundle", "{BUNDLE}", "--prompt", LONG_PROMPT], "more than the model's 2048 positions"),
    (["run", "--bundle", "{BUNDLE}", "understand", "--bundle", "{DIR}"], "no manifest.json"),
    (["run", "--bundle", "{DIR}", "understand", "--bundle", "{BUNDLE}", "--backend", "tensorrt"], "has no TensorRT"),
    (
        ["run", "--backend", "onnxruntime", "--bundle", "{BUNDLE}", "understand", "--backend", "tensorrt"],
        "has no TensorRT engines",
    ),
    (["run", "generate", "--bundle", "{BUNDLE}", "--frames", "17"], "decodes 9 frames of 64x64 only"),
    (["run", "understand", "--tokenizer", "/nonexistent/tokenizer"], "not a directory of tokenizer files"),
    (["run", "generate", "--steps", "0"], "--steps: 0 is out of range"),
    (["run", "generate", "--guidance", "-2"], "--guidance: -2.0 is out of range"),
    (["run", "generate", "--frames", "5"], "decodes 8k + 1 frames"),
    (["run", "generate", "--height", "50"], "multiples of 16"),
    (["run", "generate", "--out", "video.gif"], "use a .mp4 path"),
    (["run", "generate", "--out", "{DIR}"], "use a .mp4 path"),
    (["run", "generate", "--out", "{FILE}/sub/video.mp4"], "cannot create"),
    (["run", "generate", "--checkpoint", "{CKPT}"], "has no vae/ folder"),
    (["run", "generate", "--vae", "/nonexistent/vae"], "no VAE config.json"),
    (["run", "--bundle", "{BUNDLE}", "generate", "--frames", "17"], "decodes 9 frames of 64x64 only"),
    (["build", "--out", "{FILE}"], "exists and is a file"),
    (["build", "--out", "{DIR}"], "is not a bundle made by this tool"),
    (["build", "--out", "{DIR}", "--force"], "is not a bundle made by this tool"),
    (["build", "--out", "."], "working directory"),
    (["build", "--out", "{FILE}/sub/bundle"], "cannot create it"),
    (["build", "--frames", "5", "--out", "b"], "use 1 or 9"),
    (["build", "--height", "72", "--out", "b"], "multiples of 16"),
    (["build", "--precision", "int2", "--out", "b"], "invalid choice: 'int2'"),
    (["build", "--int8-weights", "half", "--out", "b"], "invalid choice: 'half'"),
    (
        ["build", "--precision", "int4", "--target", "tensorrt", "--no-engines", "--out", "b"],
        "weight-only ONNX Runtime (MatMulNBits), which TensorRT does not run",
    ),
    (["build", "--graph-precision", "lm_head", "--out", "b"], "expected GRAPH=PRECISION"),
    (["build", "--graph-precision", "decoder=fp32", "--precision", "int8", "--out", "b"], "unknown graph(s) decoder"),
    (["build", "--quant-min-cosine", "2", "--out", "b"], "--quant-min-cosine: 2.0 is out of range"),
    (["build", "--quant-min-task-accuracy", "1.5", "--out", "b"], "--quant-min-task-accuracy: 1.5 is out of range"),
    (["build", "--task-clips", "-1", "--out", "b"], "--task-clips: -1 is out of range"),
    (["build", "--task-prompts", "x", "--out", "b"], "--task-prompts: expected an integer, got 'x'"),
    (["build", "--atol", "-1", "--out", "b"], "--atol: -1.0 is out of range"),
    (["build", "--checkpoint", "{CKPT}", "--out", "b"], "has no vae/ folder"),
    (["build", "--vae", "/nonexistent/vae", "--out", "b"], "no VAE config.json"),
    (["build", "--vae", "/nonexistent/vae", "--no-vae", "--out", "b"], "not allowed with argument"),
    (["build", "--target", "tensorrt", "--out", "b"], "TensorRT engines need an NVIDIA GPU"),
    (["bench", "--out", "{FILE}"], "exists and is a file"),
    (["bench", "--out", "{DIR}"], "is not a benchmark results directory made by this tool"),
    (["eval", "--tasks", "nope"], "--tasks nope: choose from understanding, generation"),
    (["eval", "--clips", "0"], "--clips: 0 is out of range"),
    (["eval", "--prompts", "-1"], "--prompts: -1 is out of range"),
    (["eval", "--backends", "nope"], "unknown backend(s) nope"),
    (["eval", "--precisions", "fp64"], "unknown precision(s) fp64"),
    (["eval", "--out", "{FILE}"], "exists and is a file"),
    (["eval", "--out", "{DIR}"], "is not a directory of evaluation results made by this tool"),
    (["eval", "--bundle", "{DIR}"], "no manifest.json"),
    (["eval", "--int8-weights", "half"], "invalid choice: 'half'"),
    (["bench", "--repeats", "0"], "--repeats: 0 is out of range"),
    (["bench", "--new-tokens", "1"], "--new-tokens: 1 is out of range"),
    (["bench", "--peer", "llama.cpp"], "argument --peer: invalid choice: 'llama.cpp'"),
    (["bench", "--device", "tpu"], "expected cpu, cuda or cuda:N, got 'tpu'"),
    (["bench", "--device", "cuda:7", "--out", "r"], "--device cuda:7: this machine has"),
    (["bench", "--videos", "9x64", "--out", "r"], "expected FRAMESxHEIGHTxWIDTH"),
    (["bench", "--past-lengths", "8,x", "--out", "r"], "expected comma-separated integers"),
    (["bench-serve", "--clients", "0,4"], "--clients '0,4': expected comma-separated counts >= 1"),
    (["bench-serve", "--clients", "x"], "--clients 'x': expected comma-separated counts >= 1"),
    (["bench-serve", "--new-tokens", "1"], "--new-tokens: 1 is out of range"),
    (["bench-serve", "--video-jobs", "0"], "--video-jobs: 0 is out of range"),
    (["bench-serve", "--media-cache-mib", "-2"], "--media-cache-mib: -2 is out of range"),
    (["bench-serve", "--prefix-cache-mib", "-2"], "--prefix-cache-mib: -2 is out of range"),
    (["bench-serve", "--out", "{FILE}"], "exists and is a file"),
    (["bench-serve", "--out", "{DIR}"], "is not a serving results directory made by this tool"),
    (["bench-serve", "--backend", "torch", "--bundle", "{BUNDLE}"], "--backend torch serves a checkpoint or preset"),
    (["kernels", "--arch", "60"], "Triton targets sm_70 and newer"),
    (["kernels", "--dtypes", "fp64"], "choose from fp32, fp16, bf16"),
    (["kernels", "--ptx-version", "eight"], "give MAJOR.MINOR"),
    (["kernels", "--cuda-driver", "12"], "--cuda-driver '12': give MAJOR.MINOR"),
    (["kernels", "--arch", "100", "--cuda-driver", "12.4"], "sm_100 needs 8.6"),
    (["kernels", "--out", "{FILE}"], "exists and is a file"),
    (["kernels", "--out", "{DIR}"], "is not a kernels directory made by this tool"),
]


def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("argv, message", BAD_INPUT, ids=lambda v: " ".join(v)[:60] if isinstance(v, list) else None)
def test_bad_input_is_one_clear_line(capsys, tmp_path, monkeypatch, cli_bundle, argv, message):
    (tmp_path / "notes.txt").write_text("a user's file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.csv").write_text("1,2,3\n")
    places = {
        "{FILE}": str(tmp_path / "notes.txt"),
        "{DIR}": str(tmp_path / "mine"),
        "{BUNDLE}": str(cli_bundle),
        "{CKPT}": str(FIXTURE_CKPT),
    }
    argv = [places.get(a, a) for a in argv]
    argv = [a.replace("{FILE}", places["{FILE}"]) for a in argv]
    monkeypatch.chdir(tmp_path)
    before, bundle_before = _tree(tmp_path), _tree(cli_bundle)
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error:") and message in err, err
    assert _tree(tmp_path) == before and _tree(cli_bundle) == bundle_before  # nothing written or changed


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


def _without_timing(out: str) -> dict:
    result = json.loads(out)
    result.pop("seconds")
    return result


def test_bundle_and_backend_go_before_or_after_the_task(capsys, cli_bundle):
    bundle, common = str(cli_bundle), ["--max-new-tokens", "4", "--json"]
    ort = ["--backend", "onnxruntime"]
    same = [  # each group: one run, however the flags are placed (after the task wins over before it)
        [["run", "--bundle", bundle, "understand"], ["run", "understand", "--bundle", bundle]],
        [
            ["run", *ort, "--bundle", bundle, "understand"],
            ["run", *ort, "understand", "--bundle", bundle],
            ["run", "understand", *ort, "--bundle", bundle],
            ["run", "--bundle", "/nonexistent", "--backend", "tensorrt", "understand", "--bundle", bundle, *ort],
        ],
    ]
    for group in same:
        results = []
        for argv in group:
            code, out, err = run_cli(capsys, *argv, *common)
            assert code == 0, (argv, err)
            results.append(_without_timing(out))
        assert results[0]["token_ids"] and all(result == results[0] for result in results[1:]), group
    assert results[0]["backend"] == "onnxruntime"


def test_run_task_help_lists_bundle_and_backend(capsys):
    code, out, _ = run_cli(capsys, "run", "understand", "--help")
    assert code == 0 and "--bundle BUNDLE" in out and "--backend {auto,onnxruntime,tensorrt}" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--stage", "9"], "argument --stage: invalid choice: 9"),
        ([], "the following arguments are required: --stage"),
        (["--stage", "1", "--max-steps", "many"], "argument --max-steps: invalid int value: 'many'"),
        (["synthetic", "--count", "x"], "argument --count: expected an integer, got 'x'"),
        (["synthetic", "--count", "0"], "argument --count: 0 is out of range"),
        (["synthetic", "--seed", "-1"], "argument --seed: -1 is out of range"),
        (["synthetic", "--height", "8"], "argument --height: 8 is out of range: must be >= 16"),
        (["synthetic", "--split", "dev"], "argument --split: invalid choice: 'dev'"),
        (["synthetic", "--media", "disk"], "argument --media: invalid choice: 'disk'"),
        (["vae", "--out", "v"], "the following arguments are required: --data"),
        (["vae", "--data", "d.jsonl", "--out", "v", "--channels", "8,x"], "expected comma-separated integers"),
        (["vae", "--data", "d.jsonl", "--out", "v", "--channels", "0,8"], "expected positive integers"),
        (["vae", "--data", "d.jsonl", "--out", "v", "--learning-rate", "0"], "--learning-rate: 0.0 is out of range"),
        (["vae", "--data", "/nonexistent/d.jsonl", "--out", "/nonexistent/v"], "no such dataset file"),
        (["vae", "--data", "d.jsonl", "--out", "v", "--channels", "6,6"], "multiples of norm_num_groups 4"),
        (["recipe", "--config", "/nonexistent/recipe.yaml"], "no such recipe file"),
        (["--stage", "3", "--micro-batch-size", "0"], "argument --micro-batch-size: 0 is out of range"),
    ],
)
def test_train_bad_input_is_one_clear_line(capsys, argv, message):
    from haplo.commands.train import main as train_main

    code = train_main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error:") and message in err, err
