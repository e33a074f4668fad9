"""fp32 ONNX graph -> fp16 graph for GPU bundles, with fp32 IO and fp32 islands where needed.

The graph contract stays float32 at the interface (`keep_io_types`): Cast nodes at
the inputs and outputs convert to/from fp16, so the runtime feeds the same arrays
to fp32 and fp16 bundles.  Inside, every node runs in fp16 except:

* index/time arithmetic: nodes computed only from integer inputs (positions,
  lengths, masks as ids), from `precise_inputs` (the CFM time `t`, frame masks)
  and constants, through elementwise/shape ops (RoPE angles and cos/sin, relative
  position tables, attention masks, the sinusoidal time embedding).  fp16 cannot
  represent e.g. 1000*t or position*frequency to the needed precision;
* normalisation: LayerNormalization ops and every node inside a module whose
  name contains "norm" (the Llama RMSNorm squares activations: fp16 overflows);
* Softmax and the Add/Where that applies its additive mask (so a very negative
  fp32 mask value never becomes -inf in fp16, which turns fully masked rows into
  NaN that then leaks through 0 * NaN);
* Exp (HiFT magnitude = exp(x), which overflows fp16 above x ~ 11);
* any op type that ONNX Runtime's CPU provider cannot run in fp16 (found by
  creating a session and retrying), so the CPU can verify the graph.

`convert_fp16` returns the list of op types and node counts kept in fp32, which
the bundle records.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import TensorProto

from export.chatterbox.graph_io import EXTERNAL_DATA_BYTES, save_onnx

# Ops the closure of "index arithmetic" may pass through (no learned weights involved).
_INDEX_OPS = {
    "Cast", "Mul", "Add", "Sub", "Div", "Neg", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Expand",
    "Slice", "Cos", "Sin", "Exp", "Log", "Pow", "Sqrt", "Where", "Equal", "Less", "LessOrEqual",
    "Greater", "GreaterOrEqual", "Not", "And", "Or", "Range", "CumSum", "Transpose", "Flatten",
    "ConstantOfShape", "Shape", "Gather", "Tile", "Abs", "Floor", "Ceil", "Round", "Mod", "Clip", "Max",
    "Min", "Identity", "Reciprocal", "Sign",
}
_ALWAYS_FP32_OPS = {"LayerNormalization", "Softmax", "Exp", "ReduceL2"}
_MASK_OPS = {"Add", "Where", "Cast", "Sub"}
_NORM_SCOPE = re.compile(r"norm[^/]*/[^/]+$", re.IGNORECASE)
_MISSING_KERNEL = re.compile(r"Could not find an implementation for (\w+)\(")


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def precise_nodes(model: onnx.ModelProto, precise_inputs: tuple[str, ...] = ()) -> set[str]:
    """Names of the nodes to keep in fp32 (see the module docstring), op-type rules aside."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    derived: set[str] = set()
    for inp in graph.input:
        if inp.type.tensor_type.elem_type != TensorProto.FLOAT or inp.name in precise_inputs:
            derived.add(inp.name)
    constants = set(inits)
    keep: set[str] = set()
    for node in graph.node:           # nodes are topologically sorted
        if node.op_type == "Constant":
            constants.update(node.output)
            continue
        ins = [i for i in node.input if i]
        if (node.op_type in _INDEX_OPS and ins and any(i in derived for i in ins)
                and all(i in derived or i in constants for i in ins)
                and not (node.op_type == "Gather" and ins[0] in inits)):
            derived.update(node.output)
            keep.add(node.name)
    prod = _producers(graph)
    for node in graph.node:
        if _NORM_SCOPE.search(node.name or ""):
            keep.add(node.name)
        if node.op_type == "Softmax":
            cur = prod.get(node.input[0])
            while cur is not None and cur.op_type in _MASK_OPS:
                keep.add(cur.name)
                if cur.op_type != "Cast":
                    break
                cur = prod.get(cur.input[0])
    return keep


def _infer(model_path: Path) -> onnx.ModelProto:
    """Model with value_info filled in, shape inference run on the weightless proto (works past 2 GB)."""
    light = onnx.load(str(model_path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(light)
    model = onnx.load(str(model_path))
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def convert_fp16(src: Path, dst: Path, precise_inputs: tuple[str, ...] = (),
                 max_rounds: int = 12, external_bytes: int = EXTERNAL_DATA_BYTES) -> dict:
    """Convert `src` (fp32) to `dst` (fp16 inside, fp32 IO); returns what stayed fp32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    src, dst = Path(src), Path(dst)
    base = _infer(src)
    keep_nodes = precise_nodes(base, precise_inputs)
    block_ops = set(_ALWAYS_FP32_OPS)
    for _ in range(max_rounds):
        model = onnx.ModelProto()
        model.CopyFrom(base)
        model = convert_float_to_float16(
            model, keep_io_types=True, disable_shape_infer=True,
            op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | block_ops),
            node_block_list=sorted(keep_nodes))
        # the converter leaves inferred fp32 value_info behind; ORT re-infers types itself
        del model.graph.value_info[:]
        for stale in dst.parent.glob(dst.name + ".data"):
            stale.unlink()
        extra = save_onnx(model, dst, external_bytes)
        try:
            ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            missing = _MISSING_KERNEL.search(str(e))
            if not missing or missing.group(1) in block_ops:
                raise
            block_ops.add(missing.group(1))
            continue
        counts = Counter(n.op_type for n in base.graph.node if n.op_type in block_ops or n.name in keep_nodes)
        return {"fp32_op_types": sorted(block_ops), "fp32_nodes": dict(sorted(counts.items())),
                "nodes": len(base.graph.node), "external_data": extra}
    raise RuntimeError(f"fp16 conversion of {src.name}: ORT CPU still lacks kernels after {max_rounds} rounds")
