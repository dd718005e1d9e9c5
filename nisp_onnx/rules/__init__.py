"""One rule per op family; `rule_for(op_type)` is the registry lookup."""

from __future__ import annotations

from .base import Rule
from .elementwise import BroadcastRule, PerChannelRule, UnaryRule
from .layout import (
    ConcatRule,
    ExpandRule,
    FlattenRule,
    GatherRule,
    PadRule,
    ReduceRule,
    ReshapeRule,
    ShapeRule,
    SliceRule,
    SoftmaxRule,
    SplitRule,
    TransposeRule,
)
from .mixing import ConvRule, GemmRule, MatMulRule
from .normalization import LayerNormRule

_UNARY = """Relu LeakyRelu Clip Sigmoid Tanh HardSigmoid HardSwish Elu Selu Celu Softplus Softsign
Gelu Erf Mish ThresholdedRelu Abs Neg Exp Log Sqrt Reciprocal Floor Ceil Round Sign Sin Cos
Identity Dropout Cast MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool
GlobalLpPool""".split()
_BROADCAST = "Add Sub Mul Div Pow Max Min Sum Mean PRelu".split()
_REDUCE = """ReduceMean ReduceMax ReduceMin ReduceSum ReduceProd ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceSumSquare Squeeze Unsqueeze""".split()

REGISTRY: dict[str, Rule] = {
    **{op: UnaryRule() for op in _UNARY},
    **{op: BroadcastRule() for op in _BROADCAST},
    **{op: ReduceRule() for op in _REDUCE},
    "BatchNormalization": PerChannelRule(),
    "InstanceNormalization": PerChannelRule(),
    "LayerNormalization": LayerNormRule(),
    "Conv": ConvRule(),
    "Gemm": GemmRule(),
    "MatMul": MatMulRule(),
    "Concat": ConcatRule(),
    "Expand": ExpandRule(),
    "Split": SplitRule(),
    "Slice": SliceRule(),
    "Pad": PadRule(),
    "Flatten": FlattenRule(),
    "Reshape": ReshapeRule(),
    "Gather": GatherRule(),
    "Transpose": TransposeRule(),
    "Softmax": SoftmaxRule(),
    "LogSoftmax": SoftmaxRule(),
    "Hardmax": SoftmaxRule(),
    "Shape": ShapeRule(),
    "Size": ShapeRule(),
}
UNKNOWN = Rule()


def rule_for(op_type: str) -> Rule:
    """The rule of an op type; ops without one get the rule that freezes what they touch."""
    return REGISTRY.get(op_type, UNKNOWN)


def rule_of(node: object) -> Rule:
    """The rule for a graph node: ops outside the default ONNX domain are unknown."""
    if (getattr(node, "domain", None) or "") not in ("", "ai.onnx"):
        return UNKNOWN
    return rule_for(node.op)


__all__ = ["REGISTRY", "Rule", "rule_for", "rule_of"]
