"""The int8 scorer: onnxruntime dynamic quantisation of every weight matmul of an fp32 scorer graph.

onnxruntime's dynamic quantiser turns `MatMul` nodes with a constant weight into integer matmuls (int8 weights,
activations quantised per call, VNNI kernels where the CPU has them); the exporter writes `Linear` layers as
`Gemm`, so each `Gemm` with a constant weight is first rewritten as `MatMul` + `Add` (same values). The int8
graph is not bit-compatible with PyTorch: its acceptance is validation AUC, never the fp32 parity check. The
export measures it (`int8_validation`: both graphs on the checkpoint's validation events) and refuses an int8
graph whose AUC moves by more than the tolerance; loadtest/bench_model.py reports it beside the speed.
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


INT8_AUC_TOLERANCE = 0.0005  # how far the int8 graph's validation AUC may move from the fp32 graph's
INT8_AUC_EVENTS = 20_000  # validation events the export scores with both graphs (one call each)


class Int8Refused(ValueError):
    """The int8 graph moved validation AUC by more than the tolerance: it is not written."""


def validation_auc(run_row, model, valid, udg: bool, tables: dict, limit: int | None = None) -> float:
    """AUC of a scorer graph on validation events (the first `limit`), one call per event: each event is one
    user, its own history and one candidate. `run_row(feeds)` runs the graph; `tables` is the schema's item
    table (the candidate fields by item id)."""
    import torch

    from model.metrics import auc

    count = len(valid) if limit is None else min(limit, len(valid))
    with torch.inference_mode():
        user_vec, udg_vec = model.user_state(torch.as_tensor(valid.user[:count]),
                                             torch.as_tensor(valid.profile[:count]))
    user_vec = user_vec.numpy()
    udg_vec = udg_vec.numpy() if udg_vec is not None else None
    fields = {f"candidate_{name}": table for name, table in tables.items()}
    history, items = valid.history[:count], valid.item[:count]
    scores = np.empty(count, np.float32)
    for i in range(count):
        feeds = {"user_vec": user_vec[i:i + 1], "history": history[i:i + 1], "candidates": items[i:i + 1],
                 **{name: table[items[i:i + 1]] for name, table in fields.items()}}
        if udg:
            feeds["udg_vec"] = udg_vec[i:i + 1]
        scores[i] = run_row(feeds)[0]
    return auc(valid.label[:count], scores)


def int8_validation(fp32_file: Path, int8_file: Path, model, checkpoint, valid=None,
                    limit: int = INT8_AUC_EVENTS) -> dict:
    """Validation AUC of the fp32 and the int8 scorer on the checkpoint's validation split (`valid`, or prepared
    from the checkpoint's spec): {"events", "auc_fp32", "auc_int8", "auc_delta"}; {"events": 0, "reason"} where
    there are no validation events to score (the data is not on this machine, or the split is empty)."""
    import onnxruntime as ort

    from dataset.errors import DataError

    if valid is None:
        from dataset.ingest import prepare

        try:
            valid = prepare(checkpoint.spec).splits["valid"]
        except (DataError, OSError) as error:
            return {"events": 0, "reason": f"the validation data could not be prepared ({error})"}
    if not len(valid):
        return {"events": 0, "reason": "the validation split is empty"}
    from export.runtime import session_options

    options = session_options(1)
    aucs = {}
    for name, file in (("fp32", fp32_file), ("int8", int8_file)):
        session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        aucs[name] = validation_auc(lambda feeds, session=session: session.run(None, feeds)[0], model, valid,
                                    model.udg_dim > 0, checkpoint.schema.item_table, limit)
    return {"events": min(limit, len(valid)), "auc_fp32": aucs["fp32"], "auc_int8": aucs["int8"],
            "auc_delta": aucs["int8"] - aucs["fp32"]}

