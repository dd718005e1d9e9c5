"""Gradients of a classifier's cross-entropy or distillation loss, emitted as an ONNX
backward graph.

`add_backward(model, tensors)` returns a copy of the model that also computes the loss of its
logits against an extra int64 input of target classes, and the gradient of that loss with
respect to every tensor asked for. The forward nodes stay as they are; after them comes one
vector-Jacobian product (VJP) per forward node on a path from the tensors to the logits, in
reverse topological order, each appending ONNX nodes that turn its outputs' gradients into its
inputs' gradients (`VJPS` maps op types to them). Where a tensor feeds several nodes, the
gradients add. onnxruntime then runs forward and backward in one session, no training
framework needed. Models below opset 16 are converted first (exact MaxPool gradients scatter
with `reduction="add"`, which needs it).

Modules: `emitter` (the tensor index, the node emitter, helpers), one per op family
(`elementwise`, `linear`, `windows`, `indexing`), `vjps` (op type -> VJP) and `walk` (the
losses and the reverse walk).
"""

from .emitter import LABELS, TEACHER, TEACHER_FEATURES, Emitter, Index
from .vjps import VJPS
from .walk import Backward, Distill, add_backward, find_logits, upgraded

__all__ = [
    "LABELS",
    "TEACHER",
    "TEACHER_FEATURES",
    "VJPS",
    "Backward",
    "Distill",
    "Emitter",
    "Index",
    "add_backward",
    "find_logits",
    "upgraded",
]
