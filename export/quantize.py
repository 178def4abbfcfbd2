"""The int8 scorer: onnxruntime dynamic quantisation of every weight matmul of an fp32 scorer graph.

onnxruntime's dynamic quantiser turns `MatMul` nodes with a constant weight into integer matmuls (int8 weights,
activations quantised per call, VNNI kernels where the CPU has them); the exporter writes `Linear` layers as
`Gemm`, so each `Gemm` with a constant weight is first rewritten as `MatMul` + `Add` (same values). The int8
graph is not bit-compatible with PyTorch: its acceptance is validation AUC (loadtest/bench_model.py reports it
next to the fp32 graph's), never the fp32 parity check.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np


def gemm_as_matmul(model) -> int:
    """Rewrite, in place, each `Gemm` (alpha = beta = 1, no transA) whose B is an initializer as MatMul(A, Bᵀ
    stored) [+ Add(C)]. Returns how many were rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    nodes, rewritten = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in initializers or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])
        weight = weight.T if attrs.get("transB", 0) else weight
        weight_name = f"{node.input[1]}__kn"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), weight_name))
        output = node.output[0]
        if len(node.input) > 2 and node.input[2]:
            nodes.append(helper.make_node("MatMul", [node.input[0], weight_name], [f"{output}__mm"],
                                          name=f"{node.name}__mm"))
            nodes.append(helper.make_node("Add", [f"{output}__mm", node.input[2]], [output], name=f"{node.name}__add"))
        else:
            nodes.append(helper.make_node("MatMul", [node.input[0], weight_name], [output], name=f"{node.name}__mm"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten


def int8_scorer(blob: bytes, workdir: Path | None = None) -> bytes:
    """fp32 scorer graph bytes -> int8 (signed weights, dynamic activations) scorer graph bytes."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        model = onnx.load_from_string(blob)
        gemm_as_matmul(model)
        source, target = Path(tmp) / "scorer.matmul.onnx", Path(tmp) / "scorer.int8.onnx"
        onnx.save(model, str(source))
        root.setLevel(max(level, logging.WARNING))  # the quantiser logs a line per tensor on the root logger
        try:
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
        finally:
            root.setLevel(level)
        return target.read_bytes()
