"""Random valid CNN graphs for property tests: a hypothesis strategy over the op patterns
the pruner supports (conv chains, residual blocks, concat branches, depthwise and grouped
convs, pooling, squeeze-excitation), ending in a global-pool + Gemm classifier."""

from __future__ import annotations

import numpy as np
import onnx
from graphs import Builder
from hypothesis import event
from hypothesis import strategies as st
from onnx import helper

BLOCKS = ["conv", "residual", "residual_proj", "concat", "depthwise", "grouped", "pool", "se"]
ACTS = [
    "none",
    "Relu",
    "Sigmoid",
    "LeakyRelu",
    "Clip",
    "Tanh",
    "Elu",
    "HardSigmoid",
    "Softplus",
    "HardSwish",
    "PRelu",
    "Scale",
]
width = st.integers(2, 16)


class Case:
    """A generated model with its feeds and the patterns it contains; its repr (shown by
    hypothesis for a falsifying example) lists the graph node by node."""

    def __init__(self, model: onnx.ModelProto, feeds: dict, blocks: list[str]) -> None:
        self.model, self.feeds, self.blocks = model, feeds, blocks

    def __repr__(self) -> str:
        return (
            f"Case(blocks={self.blocks}, opset={self.model.opset_import[0].version}, "
            f"input={self.feeds['x'].shape})\n{describe(self.model)}"
        )


def describe(model: onnx.ModelProto) -> str:
    """One line per node: outputs = Op(inputs) attributes, initializers by shape."""
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    lines = []
    for n in model.graph.node:
        ins = [f"{i}{shapes[i]}" if i in shapes else i for i in n.input]
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        lines.append(f"  {', '.join(n.output)} = {n.op_type}({', '.join(ins)}) {attrs or ''}")
    return "\n".join(lines)


class _Net:
    """Draws and appends blocks, tracking the current tensor, width and spatial size."""

    def __init__(self, draw: st.DrawFn, b: Builder) -> None:
        self.draw, self.b = draw, b
        self.x, self.c = b.input, b.shape[1]
        self.h, self.w = b.shape[2], b.shape[3]

    def act(self, x: str, c: int) -> str:
        b, kind = self.b, self.draw(st.sampled_from(ACTS))
        if kind == "HardSwish" and b.opset < 14:
            kind = "Relu"
        event(f"act {kind}")
        if kind == "none":
            return x
        if kind == "LeakyRelu":
            return b.op(kind, x, alpha=0.1)
        if kind == "Clip":
            return b.op(kind, x, b.const(0.0), b.const(6.0))
        if kind == "PRelu":
            return b.op(kind, x, b.const(b.rng.uniform(0.05, 0.3, (c, 1, 1))))
        if kind == "Scale":  # a per-channel constant multiply (layer scale)
            return b.op("Mul", x, b.const(b.rng.uniform(0.5, 2.0, (1, c, 1, 1))))
        return b.op(kind, x)

    def conv(self, x: str, cin: int, cout: int, k: int | None = None, **kw) -> str:
        """Conv, optional BatchNorm, optional activation."""
        b, draw = self.b, self.draw
        k = draw(st.sampled_from([1, 3])) if k is None else k
        use_bn = draw(st.booleans())
        y = b.conv(x, cin, cout, k=k, bias=draw(st.booleans()), **kw)
        if use_bn:
            y = b.bn(y, cout)
        return self.act(y, cout)

    def stride(self) -> int:
        ok = self.h >= 4 and self.w >= 4
        s = 2 if ok and self.draw(st.integers(0, 3)) == 0 else 1
        if s == 2:
            self.h, self.w = (self.h + 1) // 2, (self.w + 1) // 2
        return s

    def block(self, kind: str) -> None:
        b, draw, x, c = self.b, self.draw, self.x, self.c
        if kind == "conv":
            cout = draw(width)
            self.x, self.c = self.conv(x, c, cout, stride=self.stride()), cout
        elif kind == "residual":  # identity shortcut
            mid = draw(width) if draw(st.booleans()) else c
            y = self.conv(x, c, mid, k=3)
            y = b.conv(y, mid, c, k=draw(st.sampled_from([1, 3])), bias=draw(st.booleans()))
            if draw(st.booleans()):
                y = b.bn(y, c)
            s = b.op("Add", *((x, y) if draw(st.booleans()) else (y, x)))
            self.x = self.act(s, c)
        elif kind == "residual_proj":  # 1x1 conv shortcut, maybe strided
            cout, mid = draw(width), draw(width)
            stride = self.stride()
            y = self.conv(x, c, mid, k=3, stride=stride)
            y = b.conv(y, mid, cout, k=3, bias=draw(st.booleans()))
            sc = b.conv(x, c, cout, k=1, bias=draw(st.booleans()), stride=stride)
            if draw(st.booleans()):
                sc = b.bn(sc, cout)
            self.x, self.c = self.act(b.op("Add", y, sc), cout), cout
        elif kind == "concat":
            parts, widths = [], []
            for _ in range(draw(st.integers(2, 3))):
                branch = draw(st.sampled_from(["identity", "conv", "pool_conv", "depthwise"]))
                event(f"concat branch {branch}")
                if branch == "identity":
                    parts.append(x)
                    widths.append(c)
                elif branch == "conv":
                    wi = draw(width)
                    parts.append(self.conv(x, c, wi))
                    widths.append(wi)
                elif branch == "pool_conv":
                    p = b.op("MaxPool", x, kernel_shape=[3, 3], pads=[1] * 4, strides=[1, 1])
                    wi = draw(width)
                    parts.append(self.conv(p, c, wi))
                    widths.append(wi)
                else:
                    parts.append(self.conv(x, c, c, k=3, group=c))
                    widths.append(c)
            self.x, self.c = b.op("Concat", *parts, axis=1), sum(widths)
            if self.c > 24:  # keep the models small
                cout = draw(width)
                self.x, self.c = self.conv(self.x, self.c, cout, k=1), cout
        elif kind == "depthwise":
            mult = draw(st.sampled_from([1, 1, 2]))
            cout = c * mult
            self.x, self.c = self.conv(x, c, cout, k=3, group=c, stride=self.stride()), cout
        elif kind == "grouped":
            g = draw(st.sampled_from([2, 3, 4]))
            if c % g:
                cin = g * draw(st.integers(1, 4))
                x, c = self.conv(x, c, cin, k=1), cin
            cout = g * draw(st.integers(1, 16 // g))
            self.x, self.c = self.conv(x, c, cout, k=3, group=g), cout
        elif kind == "pool":
            op = draw(st.sampled_from(["MaxPool", "AveragePool"]))
            event(f"pool {op}")
            if self.h >= 4 and self.w >= 4 and draw(st.booleans()):
                self.x = b.op(op, x, kernel_shape=[2, 2], strides=[2, 2])
                self.h, self.w = self.h // 2, self.w // 2
            else:
                self.x = b.op(op, x, kernel_shape=[3, 3], pads=[1] * 4, strides=[1, 1])
        elif kind == "se":
            r = draw(st.integers(1, max(1, c // 2)))
            s = b.op("GlobalAveragePool", x)
            s = b.op("Relu", b.conv(s, c, r, k=1))
            gate = draw(st.sampled_from(["Sigmoid", "HardSigmoid"]))
            s = b.op(gate, b.conv(s, r, c, k=1))
            self.x = b.op("Mul", *((x, s) if draw(st.booleans()) else (s, x)))
        else:
            raise AssertionError(kind)

    def head(self) -> str:
        b, draw = self.b, self.draw
        f = b.op("Flatten", b.op("GlobalAveragePool", self.x))
        classes = draw(st.integers(2, 6))
        if draw(st.booleans()):  # an MLP head: prunable hidden neurons
            hidden = draw(width)
            event("head mlp")
            f = b.op("Relu", b.gemm(f, self.c, hidden))
            return b.gemm(f, hidden, classes)
        return b.gemm(f, self.c, classes)


@st.composite
def cnn(draw: st.DrawFn, required: str | None = None, max_blocks: int = 5) -> Case:
    """A random CNN: 1..max_blocks blocks (`required` among them), a global-pool + Gemm
    classifier."""
    opset = draw(st.integers(13, 17))
    shape = (
        draw(st.integers(1, 2)),
        draw(st.integers(3, 4)),
        draw(st.integers(8, 12)),
        draw(st.integers(8, 12)),
    )
    b = Builder(shape=shape, opset=opset, seed=draw(st.integers(0, 2**16)))
    net = _Net(draw, b)
    blocks = draw(st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=max_blocks))
    if required is not None:
        blocks.insert(draw(st.integers(0, len(blocks))), required)
    event(f"opset {opset}")
    for kind in blocks:
        event(f"block {kind}")
        net.block(kind)
    model = b.model(net.head())
    feeds = b.feed(seed=draw(st.integers(0, 100)))
    feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
    return Case(model, feeds, blocks)
