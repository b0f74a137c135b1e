"""Plugin kernels: Triton (interpreter on CPU) against the PyTorch reference, PTX for sm_90, and the
tensorrt.plugin registrations, checked with TensorRT's own Python plugin API and launched exactly as
a TensorRT AOT engine launches them."""

import json

import pytest
import torch
import triton
import triton.language as tl

from haplo.engines.plugins import aot, kernels
from haplo.export import custom_ops
from haplo.model import ops
from haplo.model.config import preset
from haplo.model.modeling import HaploOmniForConditionalGeneration
from haplo.model.processor import HaploOmniProcessor
from haplo.model.tokenizer import build_tokenizer

import tensorrt_stub


def _adaln_inputs(shape, hidden, dtype=torch.float32, switch_scale=1.0):
    g = torch.Generator().manual_seed(hidden)
    x = torch.randn(*shape, hidden, generator=g) * 3 + 0.5

    def rand(*s):
        return torch.randn(*s, generator=g)

    params = dict(
        weight=rand(hidden),
        bias=rand(hidden),
        indicator_weight=rand(2, hidden) * switch_scale,
        indicator_bias=rand(2),
        ssg_l=rand(3, hidden),
        ssg_c=rand(3, hidden),
    )
    return x.to(dtype), {k: v.to(dtype) for k, v in params.items()}


def _reference_adaln(x, p, mode):
    p = {k: v.float() for k, v in p.items()}
    return ops.multimodal_adaln(
        x.float(),
        p["weight"],
        p["bias"] if mode == "layernorm" else None,
        p["indicator_weight"],
        p["indicator_bias"],
        p["ssg_l"],
        p["ssg_c"],
        1e-5,
        mode,
    )


@pytest.mark.parametrize("mode", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize(
    "shape, hidden, switch_scale",
    [((7,), 64, 1.0), ((2, 5), 96, 1.0), ((3,), 40, 30.0), ((5, 9), 256, 1.0), ((3,), 4096, 1.0)],
)
def test_adaln_matches_reference(mode, shape, hidden, switch_scale):
    # hidden 96 and 40 are not powers of two (masked columns); switch_scale 30 saturates the switch;
    # 45 rows of 256 take three programs of 16 rows, the last one part full; 4096 is one row a program
    x, p = _adaln_inputs(shape, hidden, switch_scale=switch_scale)
    out, gate = kernels.multimodal_adaln(x, **p, eps=1e-5, mode=mode)
    ref_out, ref_gate = _reference_adaln(x, p, mode)
    assert out.shape == x.shape and gate.shape == x.shape
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(gate, ref_gate, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adaln_half_precision_accumulates_in_fp32(dtype):
    x, p = _adaln_inputs((6,), 64, dtype)
    out, gate = kernels.multimodal_adaln(x, **p, eps=1e-5, mode="layernorm")
    ref_out, _ = _reference_adaln(x, p, "layernorm")
    assert out.dtype == dtype
    # one rounding of the output: relative error of the storage format
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.float(), ref_out, atol=tol * ref_out.abs().max().item(), rtol=tol)


def _layout(lengths_and_kinds, batch_pad):
    """Block starts of a sequence of ("text", n) / ("block", n) segments, left padded per batch row."""
    starts, pos = [], 0
    for kind, n in lengths_and_kinds:
        starts += list(range(pos, pos + n)) if kind == "text" else [pos] * n
        pos += n
    rows = []
    for pad in batch_pad:
        row = torch.tensor(starts)
        row[:pad] = ops.MASKED_START
        rows.append(row)
    return torch.stack(rows)


ATTENTION_CASES = {
    # name: (q_heads, kv_heads, q_len, head_dim, segments, left padding per batch row)
    "causal-prefill": (4, 4, None, 32, [("text", 23)], [0, 5]),
    "ragged-blocks-gqa": (6, 2, None, 24, [("text", 5), ("block", 9), ("text", 3), ("block", 16), ("text", 4)], [0, 3]),
    "decode-long-cache": (6, 2, 1, 16, [("text", 10), ("block", 70), ("text", 80)], [0, 12]),
    "chunk-inside-a-block": (4, 1, 7, 16, [("text", 6), ("block", 20)], [0, 0]),  # queries see later keys
    "all-padding-row": (2, 2, None, 16, [("text", 9)], [0, 9]),  # batch row 1: every row sees nothing
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
@pytest.mark.parametrize("tactic", [1, 2])
def test_attention_matches_reference(case, tactic):
    q_heads, kv_heads, q_len, head_dim, segments, pads = ATTENTION_CASES[case]
    key_start = _layout(segments, pads)
    batch, k_len = key_start.shape
    q_len = q_len or k_len
    g = torch.Generator().manual_seed(len(case))
    q = torch.randn(batch, q_heads, q_len, head_dim, generator=g)
    k = torch.randn(batch, kv_heads, k_len, head_dim, generator=g)
    v = torch.randn(batch, kv_heads, k_len, head_dim, generator=g)
    out = kernels.hybrid_attention(q, k, v, key_start, head_dim**-0.5, tactic=tactic)
    ref = ops.hybrid_attention(q, k, v, key_start, head_dim**-0.5)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    if case == "all-padding-row":
        assert torch.count_nonzero(out[1]) == 0


@triton.jit
def _seen_tiles_probe(starts_ptr, k_len, last_pos, out_ptr, BLOCK_N: tl.constexpr):
    first, end = kernels._seen_tiles(starts_ptr, k_len, last_pos, BLOCK_N)
    tl.store(out_ptr, first)
    tl.store(out_ptr + 1, end)


def _seen_tiles(key_start: torch.Tensor, last_pos: int, block_n: int = 64) -> tuple[int, int]:
    out = torch.zeros(2, dtype=torch.int64)
    _seen_tiles_probe[(1,)](key_start.contiguous(), key_start.numel(), last_pos, out, BLOCK_N=block_n)
    return int(out[0]), int(out[1])


def test_attention_sweeps_only_the_key_tiles_a_program_sees():
    """Causal prefill of 200 text tokens after 70 slots of left padding, tiles of 64 x 64: a program
    sweeps only the tiles from the first real key up to its own last query, and gives the reference."""
    key_start = _layout([("text", 270)], [70])
    q, k, v = (torch.randn(1, 2, 270, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    out = kernels.hybrid_attention(q, k, v, key_start, tactic=1)
    torch.testing.assert_close(out, ops.hybrid_attention(q, k, v, key_start), atol=2e-5, rtol=1e-4)
    # query tile t (rows 64t .. 64t + 63) sees key tiles 1 .. t (tile 0 is padding only)
    bounds = [_seen_tiles(key_start[0], min(64 * t + 63, 269)) for t in range(5)]
    assert bounds == [(270, 0), (64, 128), (64, 192), (64, 256), (64, 320)]
    # 1+2+3+4 tiles per head, of the 5 x 5 a program would sweep
    assert 2 * sum(max(0, end - first) // 64 for first, end in bounds) == 2 * (1 + 2 + 3 + 4)
    # a bidirectional block past the last query is still seen, up to the block's last tile
    block = _layout([("text", 10), ("block", 100), ("text", 90)], [0])[0]
    assert _seen_tiles(block, 20) == (0, 128)


def test_attention_half_precision_and_int32_starts():
    key_start = _layout([("text", 4), ("block", 12), ("text", 5)], [0, 2]).int()
    q = torch.randn(2, 4, 21, 32).half()
    k, v = torch.randn(2, 2, 21, 32).half(), torch.randn(2, 2, 21, 32).half()
    out = kernels.hybrid_attention(q, k, v, key_start)
    ref = ops.hybrid_attention(q.float(), k.float(), v.float(), key_start.long())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, atol=3e-3, rtol=3e-3)


def test_tiny_model_on_triton_kernels_matches_pytorch():
    # Every layer of all three stages, on an image prompt (bidirectional blocks) with left padding.
    model = HaploOmniForConditionalGeneration.from_preset("tiny", seed=2).eval()
    processor = HaploOmniProcessor(build_tokenizer(model.config), model.config)
    batch = processor(
        text=["a red square", "what is in <image> ?"],
        images=[torch.randint(0, 255, (40, 60, 3), dtype=torch.uint8).numpy()],
    )
    with torch.no_grad():
        reference = model(**batch).logits
        with kernels.routed_to_triton():
            candidate = model(**batch).logits
    assert ops.active() is ops.REFERENCE  # routing undone
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(candidate[valid], reference[valid], atol=1e-4, rtol=1e-4)


def test_ptx_for_sm90_for_every_kernel_variant(tmp_path):
    config = preset("tiny")
    index = aot.compile_for_config(config, tmp_path, arch=90, log=lambda _: None)
    kernels_ = index["kernels"]
    assert index["arch"] == "sm_90"
    # both norm modes' stages, both attention tiles, three dtypes
    assert {k.split("_")[0] for k in kernels_} == {"adaln", "attention"}
    assert {v["dtype"] for v in kernels_.values()} == set(aot.DTYPES)
    assert {v["constants"]["BLOCK_M"] for v in kernels_.values() if v["kernel"] == "HybridAttention"} == {16, 64}
    for info in kernels_.values():
        ptx = (tmp_path / info["file"]).read_text()
        assert ".target sm_90" in ptx and f".entry {info['name']}(" in ptx
        own_args = 10 if info["kernel"] == "MultimodalAdaLN" else 9
        assert info["param_count"] == own_args  # Triton's two scratch pointers are taken out
        assert f"{info['name']}_param_{own_args}" not in ptx
        assert info["shared_bytes"] <= kernels.SHARED_BUDGET
        assert info["block_threads"] == 32 * info["num_warps"]
        assert 0 < info["registers"] <= 255 and info["spill_bytes"] == 0  # ptxas -v of the shipped PTX
    assert json.loads((tmp_path / aot.INDEX_NAME).read_text()) == index


def test_the_ptx_targets_the_driver_and_stays_within_48_kb_at_paper_head_sizes():
    """A 12.4 driver JITs PTX up to 8.4 (Triton's bundled ptxas would write 9.x); fp32 tiles at head size
    128 shrink to fit the 48 KB a TensorRT AOT launch gets."""
    version = aot.ptx_version_for(90, (12, 4))
    assert version == 84
    specs = [
        aot.attention_spec(d, h, h**-0.5, t, "i64", 90, version)
        for d in ("fp32", "bf16")
        for h in (64, 128)
        for t in kernels.ATTENTION_TILES
    ]
    specs.append(aot.adaln_spec("bf16", 3584, 1e-6, False, 90, version))
    for spec, kernel in zip(specs, aot.compile_specs(specs)):
        assert kernel.ptx_version == "8.4" and ".version 8.4" in kernel.ptx, spec
        assert kernel.shared_bytes <= kernels.SHARED_BUDGET, (spec, kernel.shared_bytes)
        assert kernel.spill_bytes == 0 and kernel.registers > 0, (spec, kernel.registers)
        # aligned pointers and compile-time row widths: 128-bit loads (and stores, where the rows are)
        assert "ld.global.v4" in kernel.ptx, spec
        assert spec["kernel"] == "attention" or "st.global.v4" in kernel.ptx, spec
        if spec["kernel"] == "attention" and spec["dtype"] == "bf16":  # K/V tiles pipelined: async copies
            assert "cp.async" in kernel.ptx, spec
    assert kernels.attention_tiles(1, True, 128)[:2] != kernels.ATTENTION_TILES[1][:2]  # fp32 d128 shrank
    assert kernels.attention_tiles(1, False, 64)[:2] == kernels.ATTENTION_TILES[1][:2]
    # bf16 at head size 128: the estimate's 64 x 64 tiles need 80 KB once pipelined; the AOT step shrinks them
    pipelined = aot.compile_attention("bf16", 128, 128**-0.5, 1)
    assert (pipelined.constants["BLOCK_M"], pipelined.constants["BLOCK_N"]) != kernels.attention_tiles(1, False, 128)[
        :2
    ]
    assert kernels.attention_tiles(1, False, 128, shrink=9)[:2] == (16, 16)  # the smallest there is


def test_a_spilling_kernel_is_refused_and_attention_retries_with_smaller_tiles(monkeypatch):
    """ptxas -v reads the shipped PTX: a kernel that spills registers is refused, and attention
    compiles again with smaller tiles until one does not."""
    import types

    adaln = aot.compile_adaln("fp32", 256, 1e-6, False)
    registers, spills = aot.ptxas_usage(adaln.ptx)
    assert registers == adaln.registers > 0 and spills == 0
    with pytest.raises(aot.KernelCompileError, match="no .target"):
        aot.ptxas_usage(".version 8.4\n")
    meta = types.SimpleNamespace(name=adaln.name, num_warps=adaln.num_warps, shared=adaln.shared_bytes)
    compiled = types.SimpleNamespace(metadata=meta, asm={"ptx": adaln.ptx})
    monkeypatch.setattr(aot, "ptxas_usage", lambda ptx: (255, 96))
    with pytest.raises(aot.RegisterSpillError, match="spills 96 B"):
        aot._ptx_kernel("MultimodalAdaLN", compiled, 90, "fp32", {}, adaln.param_count)
    tried = []

    def tiles(*args):
        tried.append(args[-4:-2])
        if len(tried) < 3:
            raise aot.RegisterSpillError("spills")
        return args[-4:-2]

    monkeypatch.setattr(aot, "_compile_attention_tiles", tiles)
    assert aot._compile_attention_here("bf16", 64, 0.125, 1, "i64", 90) == tried[-1]
    assert tried == [kernels.attention_tiles(1, False, 64, shrink)[:2] for shrink in range(3)]


def test_driver_ptx_rules():
    assert aot.ptx_isa_for_driver(12, 6) == 85 and aot.ptx_isa_for_driver(12, 7) == 85  # 12.7: as 12.6
    assert aot.ptx_isa_for_driver(13, 2) == 90 and aot.ptx_version_for(90, None) is None
    with pytest.raises(aot.KernelCompileError, match="sm_100 needs 8.6; update the NVIDIA driver"):
        aot.ptx_version_for(100, (12, 4))
    assert aot.ptx_mismatch("9.4", (12, 4)) and "newer than the CUDA 12.4 driver" in aot.ptx_mismatch("9.4", (12, 4))
    assert aot.ptx_mismatch("8.4", (12, 4)) is None and aot.ptx_mismatch("", (12, 4)) is None
    assert aot.parse_ptx_version("8.4") == 84
    with pytest.raises(aot.KernelCompileError, match="MAJOR.MINOR"):
        aot.parse_ptx_version("eight")


def test_scratch_parameters_are_taken_out_only_when_unused():
    ptx = (
        ".version 8.4\n.entry k(\n\t.param .u64 k_param_0,\n\t.param .u64 k_param_1\n)\n"
        "{\n\tld.param.u64 %rd1, [k_param_0];\n}"
    )
    stripped = aot.strip_scratch_params(ptx, "k", 1)
    assert "k_param_1" not in stripped and "k_param_0" in stripped and stripped.count(".param .u64") == 1
    with pytest.raises(aot.KernelCompileError, match="uses k_param_0"):
        aot.strip_scratch_params(ptx, "k", 0)


def test_compile_error_names_the_kernel():
    with pytest.raises(aot.KernelCompileError, match="hybrid_attention_kernel for sm_90"):
        aot.compile_attention("fp32", 16, 0.25, tactic=1, key_start_dtype="not-a-type")


# -- tensorrt.plugin, on TensorRT's Python plugin API --------------------------------------------------


def test_plugin_signatures_match_the_onnx_nodes(trt_plugin):
    _, _, registry = trt_plugin
    schemas = {s.name: s for s in custom_ops.SCHEMAS}
    for op, plugin_id in (("MultimodalAdaLN", "haplo::MultimodalAdaLN"), ("HybridAttention", "haplo::HybridAttention")):
        plugin, schema = registry[plugin_id], schemas[op]
        # the parser maps node inputs by position and attributes by name
        assert plugin.input_tensor_names == [i.name for i in schema.inputs]
        assert set(plugin.input_attrs) == set(schema.attributes)
        assert plugin.num_outputs == len(schema.outputs)
        assert plugin.aot_impl_func and plugin.impl_func and plugin.autotune_func
    assert registry["haplo::HybridAttention"].expects_tactic


def _aot_launch(trt, trtp, plugin, descs, attrs, tactic):
    outputs = tuple(descs[0].like() for _ in range(plugin.num_outputs))
    name, ptx, launch, scalars = plugin.aot_impl_func(*descs, *attrs, outputs, tactic)
    grid = tuple(getattr(launch, f"grid_{a}")._expr.value for a in "xyz")
    return name, ptx, grid, launch.block_x._expr.value, [s._expr.value for s in scalars]


def _desc(trt, trtp, tensor, dynamic=()):
    dtype = {torch.float32: trt.float32, torch.float16: trt.float16, torch.int64: trt.int64}[tensor.dtype]
    shape = tuple((n,) if i in dynamic else n for i, n in enumerate(tensor.shape))
    return tensorrt_stub.tensor_desc(trtp, shape, dtype)


def test_adaln_plugin_launch_computes_the_reference(trt_plugin):
    trt, trtp, registry = trt_plugin
    x, p = _adaln_inputs((5, 7), 48)
    inputs = [x, *p.values()]
    descs = [_desc(trt, trtp, x, dynamic=(0, 1))] + [_desc(trt, trtp, t) for t in p.values()]
    name, ptx, grid, threads, scalars = _aot_launch(
        trt, trtp, registry["haplo::MultimodalAdaLN"], descs, (1e-5, 1), tactic=0
    )
    kernel = aot.compile_adaln("fp32", 48, 1e-5, True)
    assert kernel.constants["ROWS"] == 16 and kernel.constants["HIDDEN"] == 48
    assert grid == (3, 1, 1) and scalars == [35] and ".target sm_90" in ptx  # 35 rows, 16 a program
    assert (name, threads) == (kernel.name, kernel.block_threads)
    # launch the kernel the way the engine will: same grid, inputs, scalars, outputs, constants
    out, gate = torch.empty_like(x), torch.empty_like(x)
    kernels.multimodal_adaln_kernel[grid](*inputs, *scalars, out, gate, **kernel.constants)
    ref_out, ref_gate = _reference_adaln(x, p, "layernorm")
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(gate, ref_gate, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("q_len, tactic", [(1, 2), (19, 1), (19, 2)])
def test_attention_plugin_launch_computes_the_reference(trt_plugin, q_len, tactic):
    trt, trtp, registry = trt_plugin
    key_start = _layout([("text", 3), ("block", 10), ("text", 6)], [0, 4])
    k_len = key_start.shape[1]
    q = torch.randn(2, 6, q_len, 16)
    k, v = torch.randn(2, 2, k_len, 16), torch.randn(2, 2, k_len, 16)
    descs = [
        _desc(trt, trtp, q, (0, 2)),
        _desc(trt, trtp, k, (0, 2)),
        _desc(trt, trtp, v, (0, 2)),
        _desc(trt, trtp, key_start, (0, 1)),
    ]
    _, _, grid, _, scalars = _aot_launch(trt, trtp, registry["haplo::HybridAttention"], descs, (0.25,), tactic)
    block_m = kernels.ATTENTION_TILES[tactic][0]
    assert grid == (triton.cdiv(3 * q_len, block_m), 2 * 2, 1) and scalars == [q_len, k_len, 6, 2]
    kernel = aot.compile_attention("fp32", 16, 0.25, tactic, "i64")
    out = torch.empty_like(q)
    kernels.hybrid_attention_kernel[grid](q, k, v, key_start, *scalars, out, **kernel.constants)
    torch.testing.assert_close(out, ops.hybrid_attention(q, k, v, key_start, 0.25), atol=2e-5, rtol=1e-4)


def test_register_without_tensorrt_says_what_is_missing(monkeypatch):
    from haplo.engines.plugins import tensorrt_plugins

    monkeypatch.setattr(tensorrt_plugins, "_registered", False)
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)  # import fails as without TensorRT
    with pytest.raises(tensorrt_plugins.PluginUnavailable, match="pip install '.\\[gpu\\]'"):
        tensorrt_plugins.register_plugins()


def test_kernels_command_writes_ptx_and_rejects_bad_input(tmp_path, capsys):
    from haplo.commands.main import main

    assert main(["kernels", "--dtypes", "bf16", "--arch", "80", "--out", str(tmp_path), "--json"]) == 0
    index = json.loads(capsys.readouterr().out)
    assert index["arch"] == "sm_80" and {v["dtype"] for v in index["kernels"].values()} == {"bf16"}
    assert all(".target sm_80" in (tmp_path / v["file"]).read_text() for v in index["kernels"].values())
    assert main(["kernels", "--dtypes", "fp64", "--out", str(tmp_path)]) == 2
    assert "choose from fp32, fp16, bf16" in capsys.readouterr().err
