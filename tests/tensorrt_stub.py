"""tensorrt.plugin on a machine without TensorRT's libraries, for CPU tests of the plugin code.

tensorrt-cu13-bindings ships `tensorrt_bindings/plugin/` (pure Python: the register / autotune /
aot_impl decorators, their signature validation, TensorDesc, shape expressions, launch parameters)
next to a compiled core that needs libnvinfer. `install` loads that real Python API as
`tensorrt.plugin` over a stand-in `tensorrt` module whose names are inert classes, with an
expression builder that evaluates shape expressions on integers, so plugin registrations run and
an aot_impl's launch parameters can be computed and checked on CPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import operator
import sys
import types
from dataclasses import dataclass

import pytest

_classes: dict[str, type] = {}


class _StubMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return stub_class(f"{cls.__qualname__}.{name}")


class _Stub(metaclass=_StubMeta):
    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: _Stub()


def stub_class(qualname: str) -> type:
    if qualname not in _classes:
        _classes[qualname] = _StubMeta(qualname.rsplit(".", 1)[-1], (_Stub,), {"__qualname__": qualname})
    return _classes[qualname]


class _StubTensorRT(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return stub_class(f"tensorrt.{name}")


@dataclass
class Dim(stub_class("tensorrt.IDimensionExpr")):
    """An IDimensionExpr stand-in: an integer, constant at build time or not."""

    value: int
    constant: bool = True

    def is_constant(self) -> bool:
        return self.constant

    def get_constant_value(self) -> int:
        return self.value


_OPERATIONS = {
    "SUM": operator.add,
    "SUB": operator.sub,
    "PROD": operator.mul,
    "FLOOR_DIV": operator.floordiv,
    "CEIL_DIV": lambda a, b: -(-a // b),
    "MAX": max,
    "MIN": min,
    "EQUAL": lambda a, b: int(a == b),
    "LESS": lambda a, b: int(a < b),
}


class ExprBuilder:
    def constant(self, value: int) -> Dim:
        return Dim(value)

    def operation(self, op, first: Dim, second: Dim) -> Dim:
        return Dim(_OPERATIONS[op.__name__](first.value, second.value), first.constant and second.constant)


def install(monkeypatch) -> tuple[types.ModuleType, types.ModuleType]:
    """Load tensorrt.plugin over the stand-in core; monkeypatch undoes it. Returns (trt, trtp)."""
    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tensorrt-cu13-bindings (the Python half of TensorRT) is not installed")
    trt = _StubTensorRT("tensorrt")
    trt.__path__ = list(spec.submodule_search_locations)
    trt.__version__ = "stub"
    trt.Dims = types.SimpleNamespace(MAX_DIMS=8)
    # TensorRT's dtype aliases are its DataType members
    for alias, member in {
        "float32": "FLOAT",
        "float16": "HALF",
        "bfloat16": "BF16",
        "int64": "INT64",
        "int32": "INT32",
        "int8": "INT8",
        "bool": "BOOL",
    }.items():
        setattr(trt, alias, getattr(trt.DataType, member))
    for name in [n for n in sys.modules if n == "tensorrt" or n.startswith("tensorrt.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    trtp = importlib.import_module("tensorrt.plugin")
    for name in [n for n in sys.modules if n.startswith("tensorrt.")]:
        monkeypatch.setitem(sys.modules, name, sys.modules[name])  # so that teardown removes them
    # TensorRT sets its IExprBuilder while it computes shapes and launch parameters; here: always.
    monkeypatch.setattr(trtp.SymInt32.__mro__[1], "_exprBuilder", ExprBuilder())  # SymIntExpr
    return trt, trtp


def tensor_desc(trtp, shape: tuple[int | tuple[int], ...], dtype):
    """A TensorDesc; a dimension given as (n,) is dynamic (not a build-time constant) with value n."""
    exprs = [trtp.ShapeExpr(d[0]) if isinstance(d, tuple) else trtp.ShapeExpr(d) for d in shape]
    for expr, d in zip(exprs, shape):
        if isinstance(d, tuple):
            expr._int_expr = Dim(d[0], constant=False)
    return trtp.TensorDesc(trtp.ShapeExprs.from_tuple(tuple(exprs)), dtype)
