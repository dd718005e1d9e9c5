"""Every op rule, checked by function: the pruned model computes what the original computes
with the removed channels zeroed, and ratio 0 reproduces the original."""

import numpy as np
import onnx
import pytest
from equivalence import check_equivalent, run
from graphs import Builder

from nisp_onnx import analyze, find_frl, load_model
from nisp_onnx.rules import rule_of


def chain(b):
    x = b.cbr(b.input, 3, 8)
    x = b.op("MaxPool", x, kernel_shape=[2, 2], strides=[2, 2])
    x = b.cbr(x, 8, 12)
    x = b.op("AveragePool", x, kernel_shape=[2, 2], strides=[2, 2])
    return b.model(b.head(x, 12))


def residual_activations(b):
    s = b.cbr(b.input, 3, 8)
    for act in ["LeakyRelu", "Elu", "Selu", "Softplus", "Tanh", "HardSwish", "Sigmoid"]:
        y = b.op(act, b.bn(b.conv(s, 8, 8, bias=False), 8))
        y = b.bn(b.conv(y, 8, 8), 8)
        s = b.op("Clip", b.op("Add", s, y), b.const(0.0), b.const(6.0))
    s = b.op("Identity", b.op("Dropout", s))
    return b.model(b.head(s, 8))


def mobilenet(b):
    x = b.op("Clip", b.conv(b.input, 3, 8, stride=2), b.const(0.0), b.const(6.0))
    x = b.op("Clip", b.conv(x, 8, 8, group=8), b.const(0.0), b.const(6.0))  # depthwise
    x = b.op("Relu", b.conv(x, 8, 12, k=1))
    x = b.op("Relu", b.conv(x, 12, 24, group=12))  # depthwise, multiplier 2
    x = b.op("Relu", b.conv(x, 24, 16, group=4))  # grouped: whole groups go
    x = b.op("GlobalAveragePool", x)
    y = b.conv(x, 16, 6, k=1)  # 1x1 conv classifier after global pooling
    return b.model(b.op("Softmax", b.op("Flatten", y), axis=1))


def inception(b):
    x = b.cbr(b.input, 3, 8)
    b1 = b.cbr(x, 8, 4, k=1)
    b2 = b.cbr(b.cbr(x, 8, 6, k=1), 6, 6)
    b3 = b.cbr(b.op("MaxPool", x, kernel_shape=[3, 3], pads=[1] * 4, strides=[1, 1]), 8, 4)
    x = b.op("Concat", b1, b2, b3, x, axis=1)
    x = b.cbr(x, 22, 10)
    return b.model(b.head(x, 10))


def option_a(b):
    s = b.cbr(b.input, 3, 4)
    y = b.bn(b.conv(b.cbr(s, 4, 8, stride=2), 8, 8, bias=False), 8)
    sc = b.op(
        "Slice",
        s,
        b.const([0, 0], np.int64),
        b.const([2**62, 2**62], np.int64),
        b.const([2, 3], np.int64),
        b.const([2, 2], np.int64),
    )
    sc = b.op("Pad", sc, b.const([0, 2, 0, 0, 0, 2, 0, 0], np.int64), mode="constant")
    s = b.op("Relu", b.op("Add", y, sc))
    return b.model(b.head(s, 8))


def flatten_map(b):
    x = b.op("MaxPool", b.cbr(b.input, 3, 6), kernel_shape=[2, 2], strides=[2, 2])
    f = b.op("Relu", b.gemm(b.op("Flatten", x), 6 * 16, 20))
    r = b.op("Reshape", b.cbr(x, 6, 5), b.const([-1, 80], np.int64))
    m = b.op("Relu", b.op("MatMul", r, b.weight(80, 20)))
    return b.model(b.gemm(b.op("Add", f, m), 20, 4))


def squeeze_excite(b):
    x = b.cbr(b.input, 3, 8)
    x = b.op("Mul", x, b.op("Sigmoid", x))  # SiLU
    s = b.op("GlobalAveragePool", x)
    s = b.op("Relu", b.conv(s, 8, 4, k=1))
    s = b.op("HardSigmoid", b.conv(s, 4, 8, k=1))
    x = b.op("Mul", x, s)
    x = b.op("Mul", x, b.const(np.linspace(0.5, 2, 8).reshape(1, 8, 1, 1)))  # layer scale
    x = b.op("Add", x, b.const(np.linspace(-1, 1, 8).reshape(8, 1, 1)))
    x = b.op("Div", x, b.const(np.linspace(1, 2, 8).reshape(8, 1, 1)))
    x = b.op("Sub", x, b.const(0.5))
    x = b.op("PRelu", x, b.const(np.linspace(0.1, 0.3, 8).reshape(8, 1, 1)))
    x = b.op("GlobalMaxPool", b.cbr(x, 8, 8))
    return b.model(b.gemm(b.op("Flatten", x), 8, 3))


def split_concat(b):
    x = b.cbr(b.input, 3, 8)
    left, right = b.op("Split", x, b.const([4, 4], np.int64), axis=1, outputs=2)
    right = b.cbr(right, 4, 4)
    x = b.op("Concat", left, right, axis=1)
    x = b.op(
        "Slice",
        b.cbr(x, 8, 10),
        b.const([2], np.int64),
        b.const([9], np.int64),
        b.const([1], np.int64),
    )
    x = b.op("ReduceMean", b.op("Relu", x), axes=[2, 3], keepdims=0)
    return b.model(b.gemm(x, 7, 3))


def transformer_mlp(b):
    b.shape = (2, 6, 16)
    h = b.op("MatMul", b.input, b.weight(16, 32))
    h = b.op("Add", h, b.const(np.zeros(32)))
    g = b.op(
        "Mul",
        b.op("Mul", h, b.const(0.5)),  # GELU as Erf
        b.op("Add", b.op("Erf", b.op("Div", h, b.const(np.sqrt(2)))), b.const(1.0)),
    )
    y = b.op("MatMul", g, b.weight(32, 16))
    t = b.op("Transpose", b.op("Add", y, b.input), perm=[0, 2, 1])
    t = b.op("ReduceMean", t, axes=[2], keepdims=0)
    return b.model(b.gemm(t, 16, 4))


def unknown_op(b):
    x = b.cbr(b.input, 3, 8)
    x = b.op("LRN", x, size=3)  # no rule: the channels it touches stay
    x = b.cbr(x, 8, 8)
    x = b.cbr(x, 8, 8)
    return b.model(b.head(x, 8))


def _shuffle(b, x, c, hw, shape=None):
    x = b.op("Reshape", x, shape or b.const([0, 2, c // 2, hw, hw], np.int64))
    x = b.op("Transpose", x, perm=[0, 2, 1, 3, 4])
    return b.op("Reshape", x, b.const([0, c, hw, hw], np.int64))


def channel_shuffle(b):
    x = b.cbr(b.input, 3, 8)
    left, right = b.op("Split", x, b.const([4, 4], np.int64), axis=1, outputs=2)
    x = _shuffle(b, b.op("Concat", left, b.cbr(right, 4, 4), axis=1), 8, 8)
    left, right = b.op("Split", x, b.const([4, 4], np.int64), axis=1, outputs=2)
    x = _shuffle(b, b.op("Concat", left, b.cbr(right, 4, 4), axis=1), 8, 8)
    return b.model(b.head(b.cbr(x, 8, 6), 6))


def run_time_shapes(b):
    """TorchScript style: the shuffle's target is computed from Shape at run time."""
    x = b.cbr(b.input, 3, 8)
    batch = b.op(
        "Unsqueeze", b.op("Gather", b.op("Shape", x), b.const(0, np.int64)), b.const([0], np.int64)
    )
    dims = b.op("Concat", batch, b.const([2, 4, 8, 8], np.int64), axis=0)
    x = _shuffle(b, x, 8, 8, shape=dims)
    flat = b.op("Concat", batch, b.const([-1], np.int64), axis=0)
    x = b.op("Reshape", b.op("GlobalAveragePool", b.cbr(x, 8, 6)), flat)
    return b.model(b.gemm(x, 6, 4))


def convnext_block(b):
    b.opset = 17
    x = b.conv(b.input, 3, 8)
    t = b.op("Transpose", b.conv(x, 8, 8, k=3, group=8), perm=[0, 2, 3, 1])
    t = b.op(
        "LayerNormalization", t, b.const(b.rng.uniform(0.5, 1.5, 8)), b.const(np.zeros(8)), axis=-1
    )
    t = b.op("Relu", b.op("MatMul", t, b.weight(8, 16)))
    t = b.op("Mul", b.op("MatMul", t, b.weight(16, 8)), b.const(b.rng.uniform(0.5, 1.5, 8)))
    x = b.op("Add", x, b.op("Transpose", t, perm=[0, 3, 1, 2]))
    t = b.op(
        "LayerNormalization",
        b.op("Transpose", x, perm=[0, 2, 3, 1]),
        b.const(b.rng.uniform(0.5, 1.5, 8)),
        axis=-1,
    )
    return b.model(b.head(b.op("Transpose", t, perm=[0, 3, 1, 2]), 8))


def attention(b):
    b.shape = (2, 6, 16)
    x = b.op("MatMul", b.input, b.weight(16, 16))
    qkv = b.op("Reshape", b.op("MatMul", x, b.weight(16, 48)), b.const([0, 6, 3, 2, 8], np.int64))
    qkv = b.op("Transpose", qkv, perm=[2, 0, 3, 1, 4])
    q, k, v = (b.op("Gather", qkv, b.const(i, np.int64), axis=0) for i in range(3))
    a = b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2]))
    a = b.op("Softmax", b.op("Mul", a, b.const(0.35)), axis=-1)
    y = b.op("Transpose", b.op("MatMul", a, v), perm=[0, 2, 1, 3])
    y = b.op("MatMul", b.op("Reshape", y, b.const([0, 6, 16], np.int64)), b.weight(16, 16))
    y = b.op("Gather", b.op("Add", x, y), b.const(0, np.int64), axis=1)  # the class token
    return b.model(b.gemm(y, 16, 4))


CASES = [
    chain,
    residual_activations,
    mobilenet,
    inception,
    option_a,
    flatten_map,
    squeeze_excite,
    split_concat,
    transformer_mlp,
    unknown_op,
    channel_shuffle,
    run_time_shapes,
    convnext_block,
    attention,
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("seed", [0, 1])
def test_pruned_equals_zeroed_reference(case, seed):
    b = Builder(seed=seed)
    model = case(b)
    pruned, groups, keep = check_equivalent(model, b.feed(), ratio=0.5, seed=seed)
    assert not keep.all(), "nothing was pruned"
    original = sum(t.ByteSize() for t in model.graph.initializer)
    assert sum(t.ByteSize() for t in pruned.graph.initializer) < original


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_ratio_zero_reproduces_original(case):
    b = Builder()
    model = case(b)
    pruned, _, keep = check_equivalent(model, b.feed(), ratio=0.0)
    assert keep.all()
    np.testing.assert_allclose(
        run(pruned, b.feed())[0], run(model, b.feed())[0], rtol=1e-5, atol=1e-6
    )


def _group_of(model, tensor):
    loaded = load_model(model)
    cg = analyze(loaded.graph(), 14)
    groups = cg.groups(cg.classes())
    space = cg.by_tensor[tensor]
    return next(g for g in groups if space in g.spaces)


def test_residual_stream_is_one_prunable_group():
    b = Builder()
    model = residual_activations(b)
    stem = b.nodes[2].output[0]  # the Relu after the stem
    g = _group_of(model, stem)
    assert g.prunable == g.size == 8
    assert len(g.spaces) > 20  # every block's output joins the stream


def test_unknown_op_freezes_only_what_it_touches():
    b = Builder()
    model = unknown_op(b)
    lrn = next(n for n in b.nodes if n.op_type == "LRN")
    g = _group_of(model, lrn.input[0])
    assert g.prunable == 0 and any("LRN" in r for r in g.reasons)
    after = [n for n in b.nodes if n.op_type == "Relu"][1]  # first Relu after the LRN
    assert _group_of(model, after.output[0]).prunable == 8


def test_option_a_groups_early_and_late_streams():
    b = Builder()
    model = option_a(b)
    pad = next(n for n in b.nodes if n.op_type == "Pad")
    g = _group_of(model, pad.output[0])
    assert g.size == 8 and g.prunable == 8
    assert any(sp.size == 4 for sp in g.spaces)  # the early stream is in the same group


def test_grouped_conv_keeps_whole_groups():
    b = Builder()
    pruned, _, _ = check_equivalent(mobilenet(b), b.feed(), ratio=0.5)
    convs = [n for n in pruned.graph.node if n.op_type == "Conv"]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
    grouped = [n for n in convs if next(a.i for a in n.attribute if a.name == "group") > 1]
    assert grouped
    for n in grouped:
        g = next(a.i for a in n.attribute if a.name == "group")
        assert inits[n.input[1]].shape[0] % g == 0


def _producer(b, op, index=0):
    return [n for n in b.nodes if n.op_type == op][index]


def test_channel_shuffle_is_pruned_in_pairs():
    b = Builder()
    model = channel_shuffle(b)
    shuffled = _producer(b, "Reshape", 1).output[0]
    cg = analyze(load_model(model).graph(), 14)
    cls = cg.classes()
    assert len(np.unique(cls[cg.by_tensor[shuffled].elements])) == 4  # c and c + 4 go together
    g = _group_of(model, shuffled)
    assert g.prunable == g.size
    pruned, _, _ = check_equivalent(model, b.feed(), ratio=0.5)
    targets = [
        onnx.numpy_helper.to_array(t).tolist()
        for t in pruned.graph.initializer
        if t.name.endswith("__shape")
    ]
    assert [0, 2, 2, 8, 8] in targets


def test_run_time_shapes_are_folded():
    b = Builder()
    model = run_time_shapes(b)
    graph = load_model(model).graph()
    reshapes = [n for n in graph.nodes if n.op == "Reshape"]
    assert not any(n.op == "Shape" for n in graph.nodes)
    assert [n.inputs[1].values.tolist() for n in reshapes] == [
        [0, 2, 4, 8, 8],
        [0, 8, 8, 8],
        [0, -1],
    ]
    g = _group_of(model, _producer(b, "Relu").output[0])
    assert g.prunable == g.size == 4  # 8 channels shuffled in pairs


def test_layer_norm_over_channels_is_pruned():
    b = Builder()
    model = convnext_block(b)
    stream = _producer(b, "Add").output[0]
    g = _group_of(model, stream)
    assert g.prunable == g.size == 8


def test_layer_norm_over_channels_and_space_freezes():
    b = Builder(opset=17)
    x = b.cbr(b.input, 3, 8)
    x = b.op("LayerNormalization", x, b.const(np.ones((8, 8, 8))), axis=1)
    model = b.model(b.head(b.cbr(x, 8, 8), 8))
    g = _group_of(model, _producer(b, "Relu").output[0])
    assert g.prunable == 0 and any("LayerNormalization" in r for r in g.reasons)
    check_equivalent(model, b.feed(), ratio=0.5)


def test_attention_head_dims_are_pruned_together():
    b = Builder()
    model = attention(b)
    qkv = _producer(b, "MatMul", 1).output[0]
    g = _group_of(model, qkv)
    assert g.prunable == g.size == 8  # q, k and v of every head share the 8 head dims
    pruned, _, _ = check_equivalent(model, b.feed(), ratio=0.5)
    weights = {t.name: t.dims for t in pruned.graph.initializer}
    qkv_node = next(n for n in pruned.graph.node if n.output[0] == qkv)
    assert list(weights[qkv_node.input[1]])[1] == 24


def test_conv_classifier_before_global_pooling_is_found():
    b = Builder()
    x = b.cbr(b.input, 3, 8)
    logits = b.op("Relu", b.conv(x, 8, 5, k=1))
    model = b.model(b.op("Flatten", b.op("GlobalAveragePool", logits)))
    frl, node = find_frl(load_model(model).graph())
    assert frl == x


def _grouped_six_to_twelve():
    """Conv 6 -> 12 in 3 groups (2 inputs, 4 outputs each) between two plain convs."""
    b = Builder(shape=(2, 3, 8, 8))
    x = b.op("Relu", b.conv(b.input, 3, 6))
    y = b.op("Relu", b.conv(x, 6, 12, group=3))
    model = b.model(b.head(b.op("Relu", b.conv(y, 12, 4)), 4))
    graph = load_model(model).graph()
    grouped = next(n for n in graph.nodes if n.op == "Conv" and n.inputs[0].name == x)
    return graph, grouped, x


def test_grouped_conv_with_several_outputs_per_group_ties_exactly_its_group():
    """Input channels 2j, 2j+1 and output channels 4j..4j+3 are one channel class, a
    different one for every group."""
    graph, grouped, x = _grouped_six_to_twelve()
    cg = analyze(graph, 14)
    cls = cg.classes()
    inputs, outputs = (
        cls[cg.by_tensor[x].elements],
        cls[cg.by_tensor[grouped.outputs[0].name].elements],
    )
    for j in range(3):
        assert len({*inputs[2 * j : 2 * j + 2], *outputs[4 * j : 4 * j + 4]}) == 1
    assert len({inputs[0], inputs[2], inputs[4]}) == 3


def test_grouped_conv_propagates_importance_through_each_output_of_the_group():
    """NISP through the grouped Conv: input channel c of group j gets the sum over the
    group's outputs o of |W[o, c mod 2]| (summed over the kernel) times o's score."""
    graph, grouped, x = _grouped_six_to_twelve()
    cg = analyze(graph, 14)
    src, out = cg.by_tensor[x], cg.by_tensor[grouped.outputs[0].name]
    total = np.zeros(cg.n_elements)
    scores = np.random.default_rng(0).random(12)
    total[out.elements] = scores
    rule_of(grouped).backprop(grouped, cg, total)
    w = np.abs(grouped.inputs[1].values).reshape(12, 2, -1).sum(-1)
    want = [
        sum(w[o, c % 2] * scores[o] for o in range(4 * (c // 2), 4 * (c // 2) + 4))
        for c in range(6)
    ]
    np.testing.assert_allclose(total[src.elements], want, rtol=1e-6)
