"""Label-free fine-tuning of a pruned model against the original, inside onnxruntime."""

from __future__ import annotations

import onnx

from .backward import Index

# the inputs of each op that train: weights, biases, normalisation scales and shifts, slopes
TRAINS = {
    "Conv": {1, 2},
    "Gemm": {1, 2},
    "MatMul": {1},
    "BatchNormalization": {1, 2},
    "LayerNormalization": {1, 2},
    "PRelu": {1},
    "Mul": {0, 1},
    "Add": {0, 1},
    "Sub": {0, 1},
}


def trainable(model: onnx.ModelProto) -> list[str]:
    """The float initializers that train: every use of one is a trained input of its node
    (through Identity nodes), and a Mul/Add/Sub operand has more than one element."""
    idx = Index(model)
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            uses.setdefault(name, []).append((node, i))

    def trains(name: str, size: int) -> bool:
        found = uses.get(name, [])
        for node, i in found:
            if node.op_type == "Identity":
                if not trains(node.output[0], size):
                    return False
            elif i not in TRAINS.get(node.op_type, ()) or (
                node.op_type in ("Mul", "Add", "Sub") and size < 2
            ):
                return False
        return bool(found)

    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)
    return [
        t.name
        for t in model.graph.initializer
        if t.data_type in floats and t.name in idx.names and trains(t.name, _size(t))
    ]


def _size(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n
