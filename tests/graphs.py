"""Small random-weight ONNX graphs, built with onnx.helper, that exercise every op rule."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Builder:
    """Append nodes to a graph with random weights; every method returns the output name."""

    def __init__(self, shape=(2, 3, 8, 8), opset=14, seed=0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.shape, self.opset, self.n = shape, opset, 0
        self.input = "x"

    def _name(self, prefix):
        self.n += 1
        return f"{prefix}{self.n}"

    def const(self, values, dtype=np.float32):
        name = self._name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def op(self, op_type, *inputs, outputs=1, **attrs):
        outs = [self._name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(
            helper.make_node(op_type, list(inputs), outs, name=self._name(op_type), **attrs)
        )
        return outs[0] if outputs == 1 else outs

    def weight(self, *shape):
        return self.const(self.rng.standard_normal(shape) * (1.0 / np.sqrt(np.prod(shape[1:]))))

    def conv(self, x, cin, cout, k=3, group=1, bias=True, stride=1):
        ins = [x, self.weight(cout, cin // group, k, k)]
        if bias:
            ins.append(self.const(self.rng.standard_normal(cout) * 0.1))
        return self.op(
            "Conv",
            *ins,
            kernel_shape=[k, k],
            pads=[k // 2] * 4,
            group=group,
            strides=[stride, stride],
        )

    def bn(self, x, c):
        r = self.rng
        return self.op(
            "BatchNormalization",
            x,
            self.const(r.uniform(0.5, 1.5, c)),
            self.const(r.standard_normal(c) * 0.1),
            self.const(r.standard_normal(c) * 0.1),
            self.const(r.uniform(0.5, 1.5, c)),
            epsilon=1e-5,
        )

    def cbr(self, x, cin, cout, **kw):
        return self.op("Relu", self.bn(self.conv(x, cin, cout, bias=False, **kw), cout))

    def gemm(self, x, k, n):
        return self.op(
            "Gemm", x, self.weight(n, k), self.const(self.rng.standard_normal(n) * 0.1), transB=1
        )

    def head(self, x, c, classes=5):
        return self.gemm(self.op("Flatten", self.op("GlobalAveragePool", x)), c, classes)

    def model(self, *outputs):
        graph = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info(self.input, TensorProto.FLOAT, ["N", *self.shape[1:]])],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            self.inits,
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        m.ir_version = 8
        return onnx.shape_inference.infer_shapes(m)

    def feed(self, seed=1):
        x = np.random.default_rng(seed).standard_normal(self.shape).astype(np.float32)
        return {self.input: x}
