"""Split export, ONNX Runtime backend and bundles: parity with PyTorch, custom ops, atomic builds."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
import torch

from haplo.bundle import Bundle, BundleError
from haplo.engines.bundle_engines import BundleEngines
from haplo.engines.onnxruntime import OrtBackend
from haplo.export.build import BuildOptions, build_bundle
from haplo.export.graphs import export_graph, graph_specs
from haplo.model.modeling import HaploOmniForConditionalGeneration
from haplo.model.processor import HaploOmniProcessor
from haplo.model.tokenizer import build_tokenizer
from haplo.model.vae import build_random_vae
from haplo.runtime.ddim import denoise
from haplo.runtime.decoding import understand
from haplo.runtime.torch_backend import TorchBackend

FIXTURE_CKPT = Path(__file__).parent / "fixtures" / "tiny-a" / "checkpoint"


def build(model, out, **kwargs):
    lines = []
    manifest = build_bundle(
        model,
        build_random_vae(model.config),
        build_tokenizer(model.config),
        BuildOptions(out=out, **kwargs),
        BundleEngines(),
        log=lines.append,
    )
    return manifest, lines


@pytest.fixture(scope="module")
def tiny_model():
    return HaploOmniForConditionalGeneration.from_preset("tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_bundle(tiny_model, tmp_path_factory):
    """The tiny preset's bundle (random weights, random VAE), with its manifest."""
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    manifest, _ = build(tiny_model, out)
    return out, manifest


@pytest.fixture(scope="module")
def official_bundle(tmp_path_factory):
    model = HaploOmniForConditionalGeneration.from_pretrained(FIXTURE_CKPT)
    out = tmp_path_factory.mktemp("bundles") / "official"
    manifest, _ = build(model, out, video=(9, 64, 64))  # the checkpoint's default is 49 x 480 x 720
    return model, out, manifest


def test_every_graph_matches_torch(tiny_bundle):
    _, manifest = tiny_bundle
    names = set(manifest.graphs)
    assert names == {
        "embed_text",
        "embed_vision",
        "embed_generation",
        "pre_decoder",
        "base_decoder",
        "post_decoder",
        "lm_head",
        "latent_head",
        "vae_decoder",
    }
    assert all(err <= 1e-4 for err in manifest.parity["max_abs_error"].values())
    assert all(cos >= 0.9999 for cos in manifest.parity["cosine"].values())
    assert manifest.parity["ok"]


def test_official_checkpoint_graphs_match_torch(official_bundle):
    _, _, manifest = official_bundle
    assert max(manifest.parity["max_abs_error"].values()) <= 1e-4
    assert manifest.parity["token_agreement"] == 1.0


def test_manifest_names_and_dims(tiny_bundle):
    out, manifest = tiny_bundle
    base = manifest.graphs["base_decoder"]
    names = [i.name for i in base.inputs]
    assert names[:3] == ["hidden_states", "position_ids", "key_start"]
    assert "past_key_values.2.key" in names and "past_key_values.3.value" in names
    outputs = {o.name: o for o in base.outputs}
    assert outputs["present.2.key"].shape == ["batch", 2, "total_sequence", 16]
    assert {i.name: i for i in base.inputs}["key_start"].dtype == "int64"
    assert base.layers == [2, 3]
    assert (out / "report.md").exists() and json.loads((out / "parity.json").read_text())["graphs"]


def test_custom_domain_nodes_and_functions(tiny_bundle):
    out, manifest = tiny_bundle
    model = onnx.load(str(out / manifest.graphs["pre_decoder"].file), load_external_data=False)
    ops = {n.op_type for n in model.graph.node if n.domain == "haplo"}
    assert ops == {"MultimodalAdaLN", "HybridAttention"}
    assert {(f.domain, f.name) for f in model.functions} == {("haplo", "MultimodalAdaLN"), ("haplo", "HybridAttention")}
    assert manifest.graphs["pre_decoder"].custom_ops == ["HybridAttention", "MultimodalAdaLN"]


def test_decomposed_export_has_no_custom_nodes(tiny_model, tmp_path):
    spec = next(s for s in graph_specs(tiny_model) if s.name == "post_decoder")
    model = export_graph(spec, tmp_path / "post.onnx", decomposed=True)
    assert not [n for n in model.graph.node if n.domain == "haplo"] and not model.functions


def test_greedy_32_tokens_same_on_both_backends(tiny_model, tiny_bundle):
    out, _ = tiny_bundle
    processor = HaploOmniProcessor(build_tokenizer(tiny_model.config), tiny_model.config)
    batch = processor(
        text=["a blue circle", "what is this? <image>"],
        images=[torch.randint(0, 255, (30, 70, 3), dtype=torch.uint8).numpy()],
    )
    inputs = {k: v for k, v in batch.items()}
    reference = understand(TorchBackend(tiny_model), **inputs, max_new_tokens=32).new_tokens
    candidate = understand(OrtBackend(out), **inputs, max_new_tokens=32).new_tokens
    assert torch.equal(reference, candidate)


def test_ddim_latents_and_prefix_reuse_on_onnxruntime(tiny_model, tiny_bundle):
    out, _ = tiny_bundle
    ort_backend = OrtBackend(out)
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = (ids > 0).long()
    noise = torch.randn(1, 3, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    reference = denoise(TorchBackend(tiny_model), ids, mask, noise, 3, 6.5)
    reused = denoise(ort_backend, ids, mask, noise, 3, 6.5, reuse_prefix=True)
    full = denoise(ort_backend, ids, mask, noise, 3, 6.5, reuse_prefix=False)
    torch.testing.assert_close(reused, reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reused, full, atol=1e-5, rtol=1e-5)


def test_rerun_reuses_graphs(tiny_model, tiny_bundle, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_bundle[0], out)
    _, lines = build(tiny_model, out)
    assert lines and all(": reused" in line for line in lines if line.startswith("["))
    Bundle.open(out)


@pytest.mark.slow
def test_force_rebuilds_every_graph(tiny_model, tiny_bundle, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_bundle[0], out)
    _, lines = build(tiny_model, out, force=True)
    assert all(": exported" in line for line in lines if line.startswith("["))
    Bundle.open(out)


def test_modified_file_is_refused(tiny_bundle, tmp_path):
    out = tmp_path / "tampered"
    shutil.copytree(tiny_bundle[0], out)
    data = out / "graphs" / "lm_head.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="lm_head.onnx.data fails its sha256"):
        Bundle.open(out)


def test_killed_build_leaves_no_bundle(tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "haplo.commands.main", "build", "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".killed.tmp-*/graphs/*.onnx")):
        time.sleep(0.2)
    assert proc.poll() is None, "the build ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with pytest.raises(BundleError):
        Bundle.open(out)
    result = subprocess.run(
        [sys.executable, "-m", "haplo.commands.main", "run", "--bundle", str(out), "understand"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "error:" in result.stderr


def test_vae_frame_counts_that_do_not_round_trip_are_refused(tiny_model):
    from haplo.model.config import ConfigError

    gen = tiny_model.config.video_generation
    assert [gen.latent_shape(f, 64, 64)[0] for f in (1, 9, 17, 49)] == [1, 3, 5, 13]
    for frames in (5, 13, 10, 0):
        with pytest.raises(ConfigError, match="8k \\+ 1 frames"):
            gen.latent_shape(frames, 64, 64)


def test_checks_run_at_a_small_latent_size_whatever_the_video(tiny_model):
    from haplo.export.build import check_latent_shape

    assert check_latent_shape((13, 16, 60, 90)) == (3, 16, 8, 8)  # 17,550 latent tokens -> 48
    assert check_latent_shape((1, 16, 4, 6)) == (1, 16, 4, 6)


def test_checkpoint_without_vae_is_refused_or_built_without_one(tmp_path, capsys):
    from haplo.commands.main import main

    assert main(["build", "--checkpoint", str(FIXTURE_CKPT), "--out", str(tmp_path / "b")]) == 2
    assert "has no vae/ folder: pass --vae DIR" in capsys.readouterr().err and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_official_shaped_checkpoint_builds_at_its_default_video_size(tmp_path, capsys):
    """tiny-a keeps the official 49 x 480 x 720 video: the VAE graph is built and checked at that size,
    the end-to-end checks run at a small latent size (not 17,550 tokens)."""
    from haplo.commands.main import main

    build_random_vae(HaploOmniForConditionalGeneration.from_pretrained(FIXTURE_CKPT).config).save_pretrained(
        tmp_path / "vae"
    )
    assert (
        main(
            [
                "build",
                "--checkpoint",
                str(FIXTURE_CKPT),
                "--vae",
                str(tmp_path / "vae"),
                "--out",
                str(tmp_path / "b"),
                "--json",
            ]
        )
        == 0
    )
    manifest = Bundle.open(tmp_path / "b").manifest
    assert manifest.vae.video == [49, 480, 720] and manifest.vae.latent_shape == [13, 16, 60, 90]
    assert manifest.graphs["vae_decoder"].outputs[0].shape == [1, 3, 49, 480, 720]
    assert manifest.parity["ok"] and manifest.parity["ddim_latent_shape"] == [3, 16, 8, 8]
    assert manifest.parity["max_abs_error"]["vae_decoder"] <= 2 / 255


@pytest.mark.slow
def test_build_without_vae_and_generate_says_so(tiny_model, tmp_path):
    from haplo.errors import RequestError

    manifest = build_bundle(
        tiny_model,
        None,
        build_tokenizer(tiny_model.config),
        BuildOptions(out=tmp_path / "novae", check_steps=4),
        BundleEngines(),
        log=lambda _: None,
    )
    assert "vae_decoder" not in manifest.graphs and manifest.vae is None and manifest.parity["ok"]
    with pytest.raises(RequestError, match="no VAE decoder graph"):
        OrtBackend(tmp_path / "novae").check_vae_size((3, 16, 8, 8))


def test_task_accuracy_goes_into_the_report_and_a_floor_refuses_the_bundle(tiny_model, tmp_path):
    from haplo.bench.evaluation import task_check
    from haplo.export.validate import ParityError

    lines = []
    out = tmp_path / "gated"
    options = BuildOptions(out=out, min_task_accuracy=0.5)
    with pytest.raises(ParityError, match=r"task accuracy below --quant-min-task-accuracy 50.0%: understanding 0.0%"):
        build_bundle(
            tiny_model,
            build_random_vae(tiny_model.config),
            build_tokenizer(tiny_model.config),
            options,
            BundleEngines(),
            lines.append,
            task_check(clips=2, prompts=0, progress=False),
        )
    assert not out.exists()  # random weights answer nothing right: refused, nothing at the target
    report = (tmp_path / "gated.failed-report.md").read_text()
    assert "## Task accuracy on held-out clips" in report and "| understanding (all correct) | 2 | 0.0% |" in report
    assert any("task: understanding 0.0% all three correct on 2 held-out clips" in line for line in lines)
