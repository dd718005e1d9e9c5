"""The ground floor of the backward graph: the index of a model's tensors, the emitter of
new nodes, and the helpers every VJP uses."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import NispError

MIN_OPSET = 16
LABELS = "nisp_labels"
TEACHER = "nisp_teacher_logits"  # the distillation loss's inputs: the teacher's logits
TEACHER_FEATURES = "nisp_teacher_features"  # and its features, where they are compared
PREFIX = "nisp_grad/"
# ops whose outputs carry no gradient (shapes, indices, comparisons)
NON_DIFF = {
    "Shape", "Size", "ArgMax", "ArgMin", "Equal", "Greater", "Less", "GreaterOrEqual",
    "LessOrEqual", "Not", "And", "Or", "Xor", "NonZero", "ConstantOfShape", "Range", "IsNaN",
    "IsInf", "Sign", "Floor", "Ceil", "Round", "RandomNormalLike", "RandomUniformLike",
}  # fmt: skip
FLOATS = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


class Index:
    """Producers, static shapes, types and constant values of a model's tensors."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.nodes = list(g.node)
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.inits = {t.name: t for t in g.initializer}
        self.info = {v.name: v.type.tensor_type for v in [*g.input, *g.value_info, *g.output]}
        self.names = set(self.producer) | set(self.inits) | {v.name for v in g.input}

    def value(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (initializer, Constant, Identity of those) or None."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Identity":
            return self.value(node.input[0])
        if node.op_type == "Constant":
            a = node.attribute[0]
            if a.name == "value":
                return numpy_helper.to_array(a.t)
            return np.asarray(helper.get_attribute_value(a))
        return None

    def shape(self, name: str) -> tuple | None:
        """Static shape, None for unknown dimensions; None when even the rank is unknown."""
        if name in self.inits:
            return tuple(self.inits[name].dims)
        t = self.info.get(name)
        if t is None or not t.HasField("shape"):
            v = self.value(name)
            return None if v is None else v.shape
        return tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)

    def rank(self, name: str) -> int | None:
        s = self.shape(name)
        return None if s is None else len(s)

    def elem_type(self, name: str) -> int | None:
        if name in self.inits:
            return self.inits[name].data_type
        t = self.info.get(name)
        return t.elem_type if t is not None and t.elem_type else None


class Emitter:
    """Appends backward nodes and constants with fresh names."""

    def __init__(self, index: Index, elem: int = TensorProto.FLOAT):
        self.idx = index
        self.elem = elem
        self.dtype = helper.tensor_dtype_to_np_dtype(elem)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0
        self._cache: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        while True:
            self._n += 1
            name = f"{PREFIX}{hint}_{self._n}"
            if name not in self.idx.names:
                return name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs: object) -> str | list:
        outs = [self.fresh(op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=outs[0], **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, value: object, dtype: type | None = None) -> str:
        arr = np.asarray(value, dtype=dtype or self.dtype)
        key = ("const", arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._cache:
            name = self.fresh("c")
            self.inits.append(numpy_helper.from_array(arr, name))
            self._cache[key] = name
        return self._cache[key]

    def ints(self, values: Iterable[int]) -> str:
        return self.const(list(values), np.int64)

    def shape(self, name: str, start: int | None = None) -> str:
        """Shape(name), or its entries from `start` on."""
        key = ("shape", name, start)
        if key not in self._cache:
            attrs = {} if start is None else {"start": start}
            self._cache[key] = self.op("Shape", name, **attrs)
        return self._cache[key]

    def zeros_like(self, name: str) -> str:
        value = numpy_helper.from_array(np.zeros(1, self.dtype))
        return self.op("ConstantOfShape", self.shape(name), value=value)

    def sum(self, names: list[str]) -> str | None:
        if not names:
            return None
        return names[0] if len(names) == 1 else self.op("Sum", *names)

    def count(self, x: str, axes: list[int]) -> str:
        """The number of elements of `x` over `axes`, as a float scalar."""
        shape = self.idx.shape(x)
        dims = [shape[a] for a in axes] if shape is not None else [None]
        if all(d is not None for d in dims):
            return self.const(float(np.prod(dims)))
        sizes = self.op("Gather", self.shape(x), self.ints(axes))
        return self.op("ReduceProd", self.op("Cast", sizes, to=self.elem), keepdims=0)


# ---------------------------------------------------------------------------------------------
# helpers for VJPs

Grads = list  # list[str | None], one per input or output
Vjp = Callable[[Emitter, onnx.NodeProto, Grads, list], Grads]


def attrs_of(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def node_label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node {node.name or node.output[0]!r}"


def fail(node: onnx.NodeProto, why: str) -> NispError:
    """The error for a node whose gradient cannot be emitted."""
    return NispError(
        f"gradients: {node_label(node)} {why}; use another criterion such as nisp-infs or l1"
    )


def _only(node: onnx.NodeProto, need: list, allowed: set[int]) -> None:
    for i, n in enumerate(need):
        if n and i not in allowed:
            raise fail(node, f"has no gradient for its input {i} ({node.input[i]!r})")


def _rank(em: Emitter, name: str, node: onnx.NodeProto) -> int:
    r = em.idx.rank(name)
    if r is None:
        raise fail(node, f"needs the rank of {name!r}, which shape inference could not find")
    return r


def unbroadcast(em: Emitter, g: str, x: str, out_rank: int, node: onnx.NodeProto) -> str:
    """Sum a gradient of a broadcast result back to the shape of input `x`."""
    shape = em.idx.shape(x)
    if shape is None:
        raise fail(node, f"needs the shape of {x!r}, which shape inference could not find")
    lead = out_rank - len(shape)
    axes = list(range(lead)) + [lead + i for i, d in enumerate(shape) if d == 1]
    if not axes:
        return g
    r = em.op("ReduceSum", g, em.ints(axes), keepdims=1)
    return em.op("Reshape", r, em.shape(x)) if lead else r


def _out_rank(em: Emitter, node: onnx.NodeProto) -> int:
    return max(_rank(em, i, node) for i in node.input if i)


def _unary(fn: Callable[[Emitter, onnx.NodeProto, str, str, str], str]) -> Vjp:
    """A VJP for an elementwise op: fn(em, node, x, y, dy) -> dx."""

    def vjp(em: Emitter, node: onnx.NodeProto, dy: Grads, need: list) -> Grads:
        _only(node, need, {0})
        return [fn(em, node, node.input[0], node.output[0], dy[0])]

    return vjp


def _where(em: Emitter, cond: str, a: str, b: str | None = None) -> str:
    """`a` where `cond`, else `b` (else 0: a product with the mask, 5x faster than Where)."""
    if b is None:
        return em.op("Mul", a, em.op("Cast", cond, to=em.elem))
    return em.op("Where", cond, a, b)


def _mul(em: Emitter, *names: str) -> str:
    out = names[0]
    for n in names[1:]:
        out = em.op("Mul", out, n)
    return out


def _positive(em: Emitter, x: str) -> str:
    return em.op("Greater", x, em.const(0.0))
