"""TensorRT engines: graph preparation and profiles on CPU; build, run and rebuild on an NVIDIA GPU."""

import json
import os
import subprocess
import sys

import onnx
import pytest
import torch

from haplo.bundle import Bundle, GraphEntry, TensorSpec
from haplo.engines import tensorrt as trt_engines
from haplo.engines.bundle_engines import BundleEngines
from haplo.export.build import BuildOptions, build_bundle
from haplo.export.graphs import export_graph, graph_specs
from haplo.model.modeling import HaploOmniForConditionalGeneration
from haplo.model.processor import HaploOmniProcessor
from haplo.model.tokenizer import build_tokenizer
from haplo.model.vae import build_random_vae
from haplo.runtime.ddim import denoise
from haplo.runtime.decoding import understand
from haplo.runtime.torch_backend import TorchBackend


@pytest.fixture(scope="module")
def tiny_model():
    return HaploOmniForConditionalGeneration.from_preset("tiny", seed=5)


def test_prepared_nodes_bind_to_the_registered_plugins(tiny_model, tmp_path, trt_plugin):
    _, _, registry = trt_plugin
    spec = next(s for s in graph_specs(tiny_model) if s.name == "post_decoder")
    model, used = trt_engines.prepare_onnx_for_tensorrt(export_graph(spec, tmp_path / "post.onnx"))
    assert used == ["haplo::HybridAttention", "haplo::MultimodalAdaLN"]
    nodes = [n for n in model.graph.node if n.domain == "haplo"]
    assert len(nodes) == 3 * tiny_model.config.post.num_hidden_layers  # 2 AdaLN + 1 attention per layer
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs.pop("plugin_namespace") == b"haplo" and attrs.pop("plugin_version") == b"1"
        plugin = registry[f"haplo::{node.op_type}"]
        assert len(node.input) == len(plugin.input_tensor_names) and len(node.output) == plugin.num_outputs
        assert set(attrs) == set(plugin.input_attrs)


def test_an_engines_source_hash_covers_the_external_weights(tmp_path):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from haplo.engines.tensorrt.builder import graph_source_sha256

    weight = numpy_helper.from_array(np.arange(64, dtype=np.float32).reshape(8, 8), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [weight])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True, location="g.onnx.data", size_threshold=0)
    before = graph_source_sha256(path)
    assert graph_source_sha256(path) == before
    data = bytearray((tmp_path / "g.onnx.data").read_bytes())
    data[4] ^= 0xFF  # new weights, same shapes: the .onnx file itself is unchanged
    (tmp_path / "g.onnx.data").write_bytes(bytes(data))
    assert graph_source_sha256(path) != before


def test_a_plugin_node_the_parser_inlined_fails_the_build():
    from types import SimpleNamespace

    from haplo.engines.tensorrt.builder import check_plugins_bound

    trt = SimpleNamespace(LayerType=SimpleNamespace(PLUGIN_V3="plugin", MATRIX_MULTIPLY="matmul"))
    layers = [SimpleNamespace(type=t) for t in ("matmul", "plugin", "matmul", "plugin")]
    network = SimpleNamespace(num_layers=len(layers), get_layer=layers.__getitem__)
    check_plugins_bound(trt, network, 2, "base_decoder")
    with pytest.raises(trt_engines.EngineError, match="3 nodes name a haplo plugin but the parsed network has 2"):
        check_plugins_bound(trt, network, 3, "base_decoder")


def test_the_engine_stream_and_the_callers_wait_for_each_other_not_the_host(monkeypatch):
    import contextlib

    from haplo.engines.tensorrt.runner import EngineRunner

    events = []

    class Stream:
        def __init__(self, name):
            self.name, self.cuda_stream = name, 7

        def wait_stream(self, other):
            events.append((self.name, "waits for", other.name))

        def synchronize(self):
            events.append(f"{self.name} blocks the host")

    class Context:
        def set_input_shape(self, *args):
            pass

        def set_tensor_address(self, *args):
            pass

        def execute_async_v3(self, stream):
            events.append("enqueue")
            return True

    runner = object.__new__(EngineRunner)
    runner.stream, runner.context, runner.inputs, runner.outputs = Stream("engine"), Context(), ["x"], []
    producer = Stream("caller")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: producer)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    runner._run_eager({"x": torch.zeros(1)}, slot=0)
    # the engine reads its inputs after the caller wrote them; the caller reads the outputs after
    # the engine wrote them; the host is never blocked
    assert events == [("engine", "waits for", "caller"), "enqueue", ("caller", "waits for", "engine")]


def test_a_rebuilt_engine_is_resigned_so_the_bundle_still_opens(cli_bundle, tmp_path, monkeypatch):
    import shutil
    from dataclasses import asdict

    from haplo.engines.tensorrt import backend as trt_backend
    from haplo.engines.tensorrt.builder import EngineMetadata

    root = tmp_path / "bundle"
    shutil.copytree(cli_bundle, root)
    old = EngineMetadata("lm_head", "0" * 64, "fp32", "11.0.0", "old GPU", "8.0", refittable=False)
    (root / "engines").mkdir()
    (root / "engines" / "lm_head.plan").write_bytes(b"an engine for another GPU")
    (root / "engines" / "lm_head.json").write_text(json.dumps(asdict(old)))
    manifest = Bundle.open(root).manifest
    manifest.engines["lm_head"] = {"file": "engines/lm_head.plan", "metadata": "engines/lm_head.json", "plugins": []}
    manifest.write(root)

    def rebuild(graph, source, plan, profiles, precision, options):
        new = EngineMetadata(graph, "1" * 64, precision, "11.4.0", "H200", "9.0")
        plan.write_bytes(b"the engine for this GPU")
        plan.with_suffix(".json").write_text(json.dumps(asdict(new)))
        return new

    monkeypatch.setattr(trt_backend, "build_engine", rebuild)
    monkeypatch.setattr(
        EngineMetadata, "mismatch", lambda self, sha: None if self.source_sha256 == "1" * 64 else "stale"
    )
    backend = object.__new__(trt_backend.TensorRTBackend)
    backend.bundle, backend.rebuild = Bundle.open(root), True
    backend._check_engine("lm_head", root / "engines" / "lm_head.plan", backend.bundle.graph_path("lm_head"))
    reopened = Bundle.open(root)  # checksums verified: the rebuilt plan and sidecar were re-signed
    assert reopened.manifest.engines["lm_head"]["compute_capability"] == "9.0"
    assert (root / "engines" / "lm_head.plan").read_bytes() == b"the engine for this GPU"


def test_profiles_cover_prefill_decode_and_denoise():
    inputs = [
        TensorSpec("hidden_states", "float32", ["batch", "sequence", 64]),
        TensorSpec("key_start", "int64", ["batch", "total_sequence"]),
        TensorSpec("past_key_values.0.key", "float32", ["batch", 4, "past_sequence", 16]),
    ]
    entry = GraphEntry("graphs/g.onnx", None, inputs, [], "fp32", [0, 1], "", [], {})
    ranges = trt_engines.ShapeRanges(prompt=(1, 32, 256), past=(1, 64, 512), visual_tokens=(1, 16, 128))
    profiles = trt_engines.graph_profiles(entry, ranges)
    assert list(profiles) == ["prefill", "decode", "denoise"]
    assert profiles["decode"]["hidden_states"] == ((1, 1, 64), (1, 1, 64), (2, 1, 64))
    # denoise: the CFG pair, [time token | latents] after the cached text prefix, timed at 16 latents
    assert profiles["denoise"]["hidden_states"] == ((1, 2, 64), (2, 17, 64), (2, 129, 64))
    assert profiles["denoise"]["past_key_values.0.key"][1] == (2, 4, 33, 16)
    assert profiles["prefill"]["hidden_states"][2] == (2, 256, 64)
    assert profiles["decode"]["past_key_values.0.key"][0] == (1, 4, 1, 16)  # past >= 1 (dead slot)
    assert profiles["decode"]["key_start"][2] == (2, 513)
    with pytest.raises(trt_engines.EngineError, match="no shape range for dynamic dimension 'frames'"):
        trt_engines.input_shape_range(["frames"], trt_engines.profile_dims(ranges, "prefill"))
    with pytest.raises(ValueError, match="need 1 <= min <= opt <= max"):
        trt_engines.ShapeRanges(past=(0, 8, 16))


def test_each_call_runs_the_profile_whose_optimum_is_nearest():
    from haplo.engines.tensorrt.profiles import choose_profile

    entry = GraphEntry(
        "graphs/g.onnx",
        None,
        [
            TensorSpec("hidden_states", "float32", ["batch", "sequence", 64]),
            TensorSpec("past_key_values.0.key", "float32", ["batch", 4, "past_sequence", 16]),
        ],
        [],
        "fp32",
        [0],
        "",
        [],
        {},
    )
    ranges = trt_engines.ShapeRanges(prompt=(1, 32, 256), past=(1, 64, 512), visual_tokens=(1, 100, 128))
    profiles = trt_engines.graph_profiles(entry, ranges)

    def pick(seq, past, batch=1):
        return choose_profile(
            profiles, {"hidden_states": (batch, seq, 64), "past_key_values.0.key": (batch, 4, past, 16)}
        )

    assert pick(1, 80) == 1  # decode
    assert pick(30, 1) == 0  # prefill of a prompt
    assert pick(101, 30, batch=2) == 2  # a DDIM step: time token + 100 latents after a 29-token prefix
    with pytest.raises(trt_engines.EngineError, match="outside every optimisation profile"):
        pick(1, 5000)


def test_engine_ranges_take_the_models_latent_tokens():
    from haplo.model.config import preset

    config = preset("tiny")
    gen = config.video_generation
    ranges = trt_engines.ShapeRanges.for_config(config)
    assert ranges.visual_tokens[1] == gen.latent_tokens(gen.num_frames, gen.height, gen.width)
    assert (
        ranges.visual_tokens[2] >= 17550
        and ranges.latent_frames[1] == gen.latent_shape(gen.num_frames, gen.height, gen.width)[0]
    )


@pytest.mark.skipif(trt_engines.tensorrt_status()[0], reason="TensorRT is usable here")
def test_engine_build_without_tensorrt_says_what_is_needed(tmp_path):
    with pytest.raises(trt_engines.TensorRTUnavailable, match="NVIDIA GPU with TensorRT"):
        trt_engines.build_engine(
            "pre_decoder", tmp_path / "g.onnx", tmp_path / "g.plan", {}, "fp32", trt_engines.EngineOptions()
        )


# -- on an NVIDIA GPU with TensorRT ------------------------------------------------------------------

GPU_RANGES = dict(prompt=(1, 64, 256), past=(1, 64, 512), visual_tokens=(1, 48, 256))


def _build_trt(model, out, precision="fp32"):
    gen = model.config.video_generation
    return build_bundle(
        model,
        build_random_vae(model.config),
        build_tokenizer(model.config),
        BuildOptions(
            out=out,
            precision=precision,
            target="tensorrt",
            video=(gen.num_frames, gen.height, gen.width),
        ),
        BundleEngines(ranges=trt_engines.ShapeRanges(**GPU_RANGES)),
        log=lambda _: None,
    )


@pytest.fixture(scope="module")
def trt_bundle(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "tiny"
    return out, _build_trt(tiny_model, out)


@pytest.mark.gpu
def test_compiled_kernels_match_reference_on_gpu():
    # Outside the interpreter: Triton compiles the kernels for this GPU.
    script = (
        "import torch\n"
        "from haplo.model import ops\n"
        "from haplo.engines.plugins import kernels\n"
        "q, k, v = torch.randn(2, 6, 40, 64, device='cuda'), torch.randn(2, 2, 40, 64, device='cuda'), "
        "torch.randn(2, 2, 40, 64, device='cuda')\n"
        "ks = torch.arange(40, device='cuda').expand(2, 40).clone(); ks[:, 5:25] = 5; ks[1, :3] = ops.MASKED_START\n"
        "for dtype in (torch.float32, torch.float16, torch.bfloat16):\n"
        "    out = kernels.hybrid_attention(q.to(dtype), k.to(dtype), v.to(dtype), ks).float()\n"
        "    ref = ops.hybrid_attention(q, k, v, ks)\n"
        "    assert (out - ref).abs().max() < 2e-2, (dtype, (out - ref).abs().max())\n"
        "x = torch.randn(3, 7, 96, device='cuda'); p = [torch.randn(96, device='cuda'), torch.randn(96, device='cuda'),"
        " torch.randn(2, 96, device='cuda'), torch.randn(2, device='cuda'), torch.randn(3, 96, device='cuda'),"
        " torch.randn(3, 96, device='cuda')]\n"
        "for mode in ('rmsnorm', 'layernorm'):\n"
        "    out, gate = kernels.multimodal_adaln(x, *p, 1e-5, mode)\n"
        "    ref, ref_gate = ops.multimodal_adaln(x, p[0], p[1] if mode == 'layernorm' else None, *p[2:], 1e-5, mode)\n"
        "    assert (out - ref).abs().max() < 1e-4 and (gate - ref_gate).abs().max() < 1e-4\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert child.returncode == 0, child.stderr


@pytest.mark.gpu
def test_tensorrt_engines_use_the_plugins_and_match_torch(tiny_model, trt_bundle):
    out, manifest = trt_bundle
    assert set(manifest.engines) == set(manifest.graphs)
    for name in ("pre_decoder", "base_decoder", "post_decoder"):
        assert manifest.engines[name]["plugins"] == ["haplo::HybridAttention", "haplo::MultimodalAdaLN"]
        assert manifest.engines[name]["profiles"] == ["prefill", "decode", "denoise"]
    assert manifest.requirements
    backend = trt_engines.TensorRTBackend(Bundle.open(out))
    processor = HaploOmniProcessor(build_tokenizer(tiny_model.config), tiny_model.config)
    batch = dict(
        processor(
            text=["a blue circle", "what is this? <image>"],
            images=[torch.randint(0, 255, (30, 70, 3), dtype=torch.uint8).numpy()],
        )
    )
    reference = understand(TorchBackend(tiny_model), **batch, max_new_tokens=32).new_tokens
    candidate = understand(backend, **batch, max_new_tokens=32).new_tokens
    assert (reference == candidate).float().mean() >= 0.95  # TF32 matmuls may flip a near tie
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    noise = torch.randn(1, 3, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    ref_latents = denoise(TorchBackend(tiny_model), ids, (ids > 0).long(), noise, 3, 6.5)
    latents = denoise(backend, ids, (ids > 0).long(), noise, 3, 6.5, reuse_prefix=True)
    assert torch.nn.functional.cosine_similarity(latents.flatten(), ref_latents.flatten(), dim=0) > 0.999


@pytest.mark.gpu
def test_engine_is_rebuilt_when_its_graph_changed(trt_bundle):
    out, manifest = trt_bundle
    plan = Bundle.open(out).path(manifest.engines["lm_head"]["file"])
    sidecar = plan.with_suffix(trt_engines.METADATA_SUFFIX)
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "source_sha256": "0" * 64}))  # stale (and off its checksum)
    backend = trt_engines.TensorRTBackend(Bundle.open(out, verify=False))
    backend.runner("lm_head")
    assert json.loads(sidecar.read_text())["source_sha256"] == meta["source_sha256"]
    Bundle.open(out)  # the rebuild re-signed the plan and the sidecar
    with pytest.raises(trt_engines.EngineError, match="rebuild"):
        sidecar.write_text(json.dumps({**meta, "source_sha256": "0" * 64}))
        trt_engines.TensorRTBackend(Bundle.open(out, verify=False), rebuild=False).runner("lm_head")


@pytest.mark.gpu
def test_fp8_engines_build_and_agree(tiny_model, tmp_path):
    manifest = _build_trt(tiny_model, tmp_path / "fp8", precision="fp8")
    assert manifest.graphs["base_decoder"].precision == "fp8"
    backend = trt_engines.TensorRTBackend(Bundle.open(tmp_path / "fp8"))
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    reference = understand(
        TorchBackend(tiny_model), input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32
    ).new_tokens
    candidate = understand(backend, input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32).new_tokens
    assert (reference == candidate).float().mean() >= 0.9


def test_decoder_calls_stay_on_the_device_and_ddim_steps_share_one_slot(cli_bundle, monkeypatch):
    """Stage outputs are the caller's own copies on the backend's device (no host round trip);
    calls that keep their present alternate two slots, DDIM calls (use_cache=False) use a third and
    return no present; the dead slot has the engine's cache dtype."""
    from haplo.engines.tensorrt import backend as trt_backend

    class Runner:
        def __init__(self, layers):
            self.calls, self.arenas = [], {}
            self.dtypes = {f"past_key_values.{n}.key": torch.bfloat16 for n in layers}

        def __call__(self, feeds, profile=0, slot=0):
            self.calls.append((slot, feeds))
            hidden = feeds["hidden_states"]
            out = self.arenas.setdefault(slot, {"hidden_states_out": torch.empty_like(hidden)})
            out["hidden_states_out"].copy_(hidden + 1)
            for name, past in feeds.items():
                if name.startswith("past_key_values."):
                    out[name.replace("past_key_values", "present")] = torch.cat([past, past[:, :, -1:]], 2)
            return out

    backend = object.__new__(trt_backend.TensorRTBackend)
    backend.bundle = Bundle.open(cli_bundle)
    backend.config, backend.device = backend.bundle.config, torch.device("cpu")
    backend.slots, backend.profiles = {stage: 0 for stage in trt_backend.STAGE_GRAPHS}, {"pre_decoder": {}}
    runner = Runner(backend.bundle.graphs["pre_decoder"].layers)
    monkeypatch.setattr(backend, "runner", lambda graph: runner, raising=False)
    monkeypatch.setattr(trt_backend, "choose_profile", lambda profiles, shapes: 0)
    width = backend.config.stages["pre"].hidden_size
    hidden, positions, starts = torch.zeros(2, 3, width), torch.arange(3).expand(2, 3), torch.zeros(2, 3)
    out, present = backend.run_stage("pre", hidden, positions, starts)
    dead = runner.calls[0][1][next(n for n in runner.dtypes)]
    assert dead.dtype == torch.bfloat16 and dead.shape[2] == 1 and not dead.any()
    assert torch.equal(out, hidden + 1) and out.data_ptr() != runner.arenas[1]["hidden_states_out"].data_ptr()
    kept = [t.clone() for t in present]
    second, _ = backend.run_stage("pre", hidden, positions, torch.zeros(2, 3), kept)
    for _ in range(2):
        step, none = backend.run_stage("pre", hidden, positions, torch.zeros(2, 3), kept, use_cache=False)
        assert none is None and torch.equal(step, hidden + 1)
    assert [slot for slot, _ in runner.calls] == [1, 0, trt_backend.DISCARDED, trt_backend.DISCARDED]
    assert backend.slots["pre"] == 0 and torch.equal(out, hidden + 1)  # later calls left `out` alone


def test_the_scheduler_sees_tensorrt_caches_without_their_dead_slot():
    """Batches are padded and split on the real slots; the dead first slot every call carries comes back zero."""
    from haplo.engines.tensorrt.backend import TensorRTBackend

    cache = torch.randn(2, 2, 5, 4)
    real = TensorRTBackend.cache_tensors(None, [cache])
    assert real[0].shape == (2, 2, 4, 4) and torch.equal(real[0], cache[:, :, 1:])
    back = TensorRTBackend.cache_from_tensors(None, real)[0]
    assert torch.equal(back[:, :, 1:], cache[:, :, 1:]) and not back[:, :, 0].any()


class _FakeContext:
    """An execution context: remembers the shapes and addresses bound and counts its enqueues."""

    def __init__(self):
        self.shapes, self.addresses, self.enqueues, self.profile = {}, {}, 0, None

    def set_optimization_profile_async(self, index, stream):
        self.profile = index

    def set_input_shape(self, name, shape):
        self.shapes[name] = shape

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def get_tensor_shape(self, name):
        return self.shapes["x"]

    def execute_async_v3(self, stream):
        self.enqueues += 1
        return True


@pytest.fixture
def graph_runner(monkeypatch):
    """An EngineRunner over a fake engine (inputs x and past, output y), CUDA graphs faked on CPU."""
    import contextlib
    import types

    from haplo.engines.tensorrt import runner as runner_module

    class Graph:
        def __init__(self):
            self.replays = 0

        def replay(self):
            self.replays += 1

    stream = types.SimpleNamespace(cuda_stream=0, wait_stream=lambda other: None, synchronize=lambda: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", lambda g, stream=None: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    runner = object.__new__(runner_module.EngineRunner)
    runner.device = "cpu"
    runner.engine = types.SimpleNamespace(create_execution_context=_FakeContext)
    runner.context, runner.stream = _FakeContext(), stream
    runner.inputs, runner.outputs = ["x", "past"], ["y"]
    runner.dtypes = {"x": torch.float32, "past": torch.float32, "y": torch.float32}
    runner.arenas, runner.profiles, runner.cuda_graphs = {}, {}, True
    runner.graphs, runner.first_call = runner_module.OrderedDict(), runner_module.OrderedDict()
    return runner


def test_a_cuda_graph_has_its_own_context_binds_a_kept_cache_in_place_and_owns_its_outputs(graph_runner):
    past = torch.randn(1, 2, 64, 8)  # the kept text prefix: the same tensor at every DDIM step
    first_x = torch.randn(2, 4)  # kept alive, so no later x reuses its address
    graph_runner({"x": first_x, "past": past}, profile=0)
    assert not graph_runner.graphs and graph_runner.context.enqueues == 1  # first sight: eager
    x = torch.randn(2, 4)
    graph_runner({"x": x, "past": past}, profile=0)  # second: captured
    (captured,) = graph_runner.graphs.values()
    assert captured.context is not graph_runner.context and captured.context.profile == 0
    assert captured.static["past"] is past and "past" in captured.stable  # no copy of the cache
    assert captured.static["x"] is not x and "x" not in captured.stable
    arenas = {t.data_ptr() for t in graph_runner.arenas.values()}
    assert captured.outputs["y"].data_ptr() not in arenas
    new_x = torch.randn(2, 4)
    out = graph_runner({"x": new_x, "past": past}, profile=0)
    assert captured.graph.replays == 2 and torch.equal(captured.static["x"], new_x) and out is captured.outputs
    other = past.clone()  # the cache came in another tensor: captured again, copying it from now on
    graph_runner({"x": new_x, "past": other}, profile=0)
    (again,) = graph_runner.graphs.values()
    assert again is not captured and again.stable == set() and torch.equal(again.static["past"], other)
    assert again.graph.replays == 1 and graph_runner.context.enqueues == 1


def test_the_graph_cache_is_bounded(graph_runner):
    from haplo.engines.tensorrt.runner import MAX_GRAPHS

    past = torch.zeros(1, 2, 8, 8)
    for length in range(1, MAX_GRAPHS + 4):
        for _ in range(2):
            graph_runner({"x": torch.zeros(length, 4), "past": past}, profile=1)
    assert len(graph_runner.graphs) == MAX_GRAPHS
    assert min(key[2][0] for key in graph_runner.graphs) == 4  # the least recently used went first
    for length in range(100, 100 + 10 * MAX_GRAPHS):  # prefills: every shape once
        graph_runner({"x": torch.zeros(length, 4), "past": past}, profile=0)
    assert len(graph_runner.first_call) <= 8 * MAX_GRAPHS and len(graph_runner.graphs) == MAX_GRAPHS
