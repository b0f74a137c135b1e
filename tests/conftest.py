"""Shared test setup: Triton runs kernels in its interpreter on CPU; `gpu` tests need TensorRT + CUDA."""

import os
import sys

# Must be set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _has_gpu_and_tensorrt() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    if _has_gpu_and_tensorrt():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with TensorRT")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def trt_plugin(monkeypatch):
    """(trt, trtp, registry): our plugins registered with TensorRT's Python plugin API (tensorrt_stub)."""
    import tensorrt_stub

    trt, trtp = tensorrt_stub.install(monkeypatch)
    from haplo.engines.plugins import tensorrt_plugins

    monkeypatch.setattr(tensorrt_plugins, "_registered", False)
    monkeypatch.setenv(tensorrt_plugins.ARCH_ENV, "90")
    assert tensorrt_plugins.register_plugins() == [tensorrt_plugins.ADALN_ID, tensorrt_plugins.ATTENTION_ID]
    registry = sys.modules["tensorrt.plugin._lib"].QDP_REGISTRY
    return trt, trtp, registry


@pytest.fixture(scope="session")
def cli_bundle(tmp_path_factory):
    """The README's main command: the default (tiny) bundle, built once through the CLI."""
    from haplo.commands.main import main

    out = tmp_path_factory.mktemp("cli") / "tiny"
    assert main(["build", "--out", str(out)]) == 0
    return out


@pytest.fixture
def host_copies(monkeypatch):
    """The shape of every tensor copied (or viewed) to the host through `.cpu()` / `.numpy()`."""
    shapes: list[tuple] = []
    for method in ("cpu", "numpy"):
        real = getattr(torch.Tensor, method)

        def counted(self, *args, _real=real, **kwargs):
            shapes.append(tuple(self.shape))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    return shapes
