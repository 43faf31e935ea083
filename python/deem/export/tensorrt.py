"""`deem export tensorrt`: TensorRT engines from an ONNX export, with deem's plugin library for the `deem` nodes.

Needs the `tensorrt` Python package with its libraries (libnvinfer, the ONNX parser) and, for graphs with custom
nodes, libdeem_trt_plugins.so (built by CMake when it finds the TensorRT headers: DEEM_TENSORRT=ON,
TensorRT_ROOT=...). Each graph gets one optimisation profile spanning the ranges given (batch, sequence, images).
The network is strongly typed: the ONNX graph's dtypes (`deem export onnx --dtype`) decide the precision.

Not run on the development machines (TensorRT cannot be installed there); docs/export.md says what was verified.
"""

from __future__ import annotations

import ast
import json
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deem.export.lowering import ExportError
from deem.export.onnx_export import GRAPHS, load_manifest

PLUGIN_LIBRARY = "libdeem_trt_plugins.so"


@dataclass(frozen=True)
class Ranges:
    """min / opt / max of each named axis of the exported graphs."""

    batch: tuple[int, int, int] = (1, 1, 8)
    sequence: tuple[int, int, int] = (2, 256, 2048)
    images: tuple[int, int, int] = (1, 1, 8)

    def axes(self, context: int) -> dict[str, tuple[int, int, int]]:
        past = (1, self.sequence[1], min(context - 1, self.sequence[2] + 512))
        return {"batch": self.batch, "sequence": self.sequence, "images": self.images, "past_sequence": past}


def find_plugin_library(path: str | Path | None = None) -> Path | None:
    """`path`, else the library installed beside the deem package (a TensorRT-enabled build)."""
    if path is not None:
        return Path(path)
    here = Path(__file__).resolve().parent.parent / PLUGIN_LIBRARY
    return here if here.is_file() else None


def import_tensorrt():
    """The tensorrt module, or ExportError saying exactly what is missing."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ExportError(
            "TensorRT is not available: the Python package 'tensorrt' cannot be imported "
            f"({exc}). Install TensorRT with its libraries (the tensorrt-cu12 / tensorrt-cu13 wheels fetch "
            "libnvinfer from NVIDIA's package index, or use the TensorRT SDK and its Python wheel), then rerun."
        ) from exc
    except OSError as exc:  # the bindings import but the shared libraries do not load
        raise ExportError(f"TensorRT's libraries do not load ({exc}): install libnvinfer and libnvonnxparser "
                          "matching the tensorrt Python package") from exc
    for name in ("Builder", "OnnxParser", "get_plugin_registry"):
        if not hasattr(trt, name):
            raise ExportError(f"the tensorrt package has no {name} (a bindings-only or stub install?): install "
                              "the full TensorRT runtime")
    return trt


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def axis_value(expr: str | int, values: dict[str, int]) -> int:
    """An exported dimension (an int, a name, or an expression like 'past_sequence + 1') at `values`."""
    if isinstance(expr, int):
        return expr

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in values:
            return values[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ExportError(f"cannot evaluate the exported dimension {expr!r} (unknown axis or operation)")

    return int(ev(ast.parse(str(expr), mode="eval")))


def profile_shapes(io: list[dict[str, Any]], axes: dict[str, tuple[int, int, int]]) -> dict[str, list[tuple]]:
    """Per graph input: its (min, opt, max) shapes for the optimisation profile."""
    out = {}
    for spec in io:
        shapes = []
        for k in range(3):
            values = {name: r[k] for name, r in axes.items()}
            shapes.append(tuple(axis_value(d, values) for d in spec["shape"]))
        out[spec["name"]] = shapes
    return out


def build_engines(onnx_dir: str | Path, out: str | Path, plugin: str | Path | None = None,
                  ranges: Ranges = Ranges(), workspace_gib: float = 8.0) -> dict[str, Any]:
    """Build vision.engine, prefill.engine and decode.engine from an ONNX export into `out`; returns the engine
    manifest (also written as out/engines.json)."""
    manifest = load_manifest(onnx_dir)
    custom = any(manifest["graphs"][g]["custom_nodes"] for g in GRAPHS)
    library = find_plugin_library(plugin)
    missing = []
    try:
        trt = import_tensorrt()
    except ExportError as exc:
        missing.append(str(exc))
    if custom and (library is None or not library.is_file()):
        missing.append(
            f"The graphs of {onnx_dir} have deem custom nodes and the plugin library {PLUGIN_LIBRARY} was not "
            f"found{f' at {library}' if library else ' beside the deem package'}: build deem with the TensorRT "
            "headers (CMake -DDEEM_TENSORRT=ON -DTensorRT_ROOT=/path/to/TensorRT) and pass --plugin, or export "
            "with --decompose.")
    if missing:
        raise ExportError(" ".join(missing))
    logger = trt.Logger(trt.Logger.WARNING)
    if custom:
        trt.get_plugin_registry().load_library(str(library))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    axes = ranges.axes(int(manifest["model"]["context"]))
    engines: dict[str, Any] = {}
    for name in GRAPHS:
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        path = Path(onnx_dir) / f"{name}.onnx"
        if not parser.parse_from_file(str(path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"TensorRT's ONNX parser rejected {path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
        profile = builder.create_optimization_profile()
        shapes = profile_shapes(manifest["graphs"][name]["inputs"], axes)
        for inp, (lo, opt, hi) in shapes.items():
            profile.set_shape(inp, lo, opt, hi)
        config.add_optimization_profile(profile)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise ExportError(f"TensorRT could not build an engine for {path} (see its log above)")
        target = out / f"{name}.engine"
        target.write_bytes(bytes(blob))
        engines[name] = {"file": target.name, "profile": {k: [list(s) for s in v] for k, v in shapes.items()}}
    result = {"tensorrt": trt.__version__, "plugin_library": str(library) if custom else None,
              "onnx": str(Path(onnx_dir).resolve()), "engines": engines}
    (out / "engines.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
