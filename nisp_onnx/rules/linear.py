"""Mixing ops seen as `y = x W + b`, one weight matrix per group, for least-squares repair.

Rows are output positions: a sample of a Conv's output pixels (the rows of its im2col
matrix), a Gemm's samples, or the positions of a MatMul's leading axes. `positions` picks
them, `patches` and `outputs` read the matching input and output rows, `params` and
`set_params` move between the node's parameters and stacked matrices [groups, K + 1, O]
whose last row is the bias.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import set_input


def _set_bias(node: gs.Node, index: int, bias: np.ndarray) -> None:
    """Write an optional bias input, adding it where the node has none."""
    if len(node.inputs) > index and isinstance(node.inputs[index], gs.Constant):
        set_input(node, index, bias)
        return
    const = gs.Constant(f"{node.name}__bias", np.ascontiguousarray(bias, dtype=np.float32))
    if len(node.inputs) > index:
        node.inputs[index] = const
    else:
        node.inputs.append(const)


class Linear:
    """The linear view of one node; `axis` is the channel axis of its output."""

    groups = 1

    def __init__(self, node: gs.Node):
        self.node = node

    def axis(self, rank: int) -> int:
        return 1

    @property
    def features(self) -> int:
        """Inputs per group (K)."""
        raise NotImplementedError

    def positions(self, y_shape: tuple, count: int, rng: np.random.Generator) -> np.ndarray:
        """`count` distinct output positions per sample, [n, count] flat indices."""
        n, total = y_shape[0], self._spots(y_shape)
        if count >= total:
            return np.broadcast_to(np.arange(total), (n, total))
        return np.sort(rng.random((n, total)).argsort(axis=1)[:, :count], axis=1)

    def _spots(self, y_shape: tuple) -> int:
        return 1

    def patches(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Input rows at `pos`: [groups, n * count, K]."""
        raise NotImplementedError

    def outputs(self, y: np.ndarray, pos: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
        """Output rows at `pos` for the kept channels: [groups, n * count, O / groups]."""
        raise NotImplementedError

    def params(self) -> np.ndarray:
        raise NotImplementedError

    def set_params(self, theta: np.ndarray) -> list[gs.Node]:
        """Write [groups, K + 1, O / groups] back; returns nodes it had to add."""
        raise NotImplementedError


class ConvLinear(Linear):
    """Conv (any spatial rank, strides, dilations, pads, groups) through sampled im2col rows."""

    def __init__(self, node: gs.Node):
        super().__init__(node)
        w = node.inputs[1].values
        self.groups = int(node.attrs.get("group", 1))
        self.kernel = tuple(w.shape[2:])
        s = len(self.kernel)
        self.strides = tuple(node.attrs.get("strides", [1] * s))
        self.dilations = tuple(node.attrs.get("dilations", [1] * s))

    @property
    def features(self) -> int:
        return int(np.prod(self.node.inputs[1].values.shape[1:]))

    def _spots(self, y_shape: tuple) -> int:
        return int(np.prod(y_shape[2:]))

    def _pads(self, spatial: tuple) -> tuple[list[int], list[int]]:
        """Begin and end padding of each spatial axis, auto_pad resolved."""
        s = len(self.kernel)
        auto = self.node.attrs.get("auto_pad", "NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = [], []
            for size, k, st, d in zip(spatial, self.kernel, self.strides, self.dilations):
                out = -(-size // st)
                total = max(0, (out - 1) * st + (k - 1) * d + 1 - size)
                small, big = total // 2, total - total // 2
                begin.append(small if auto == "SAME_UPPER" else big)
                end.append(big if auto == "SAME_UPPER" else small)
            return begin, end
        if auto == "VALID":
            return [0] * s, [0] * s
        pads = list(self.node.attrs.get("pads", [0] * 2 * s))
        return pads[:s], pads[s:]

    def patches(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        n, c = x.shape[:2]
        begin, end = self._pads(x.shape[2:])
        xp = np.pad(x, [(0, 0), (0, 0), *zip(begin, end)])
        out = [
            (size + b + e - d * (k - 1) - 1) // st + 1
            for size, b, e, k, st, d in zip(
                x.shape[2:], begin, end, self.kernel, self.strides, self.dilations
            )
        ]
        at = np.unravel_index(pos, out)  # per axis [n, count]
        offsets = np.unravel_index(np.arange(int(np.prod(self.kernel))), self.kernel)
        index = [
            a[..., None] * st + o * d
            for a, o, st, d in zip(at, offsets, self.strides, self.dilations)
        ]
        rows = xp[(np.arange(n)[:, None, None], slice(None), *index)]  # [n, count, KK, C]
        rows = rows.transpose(0, 1, 3, 2).reshape(-1, self.groups, self.features)
        return rows.transpose(1, 0, 2)

    def outputs(self, y: np.ndarray, pos: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
        n = y.shape[0]
        y = y.reshape(n, y.shape[1], -1)
        rows = y[np.arange(n)[:, None], :, pos]  # [n, count, O]: the rows first, then the
        if keep is not None:  # channels, so that a whole output is never copied
            rows = rows[..., keep]
        return rows.reshape(-1, self.groups, rows.shape[-1] // self.groups).transpose(1, 0, 2)

    def params(self) -> np.ndarray:
        w = self.node.inputs[1].values
        o, g = w.shape[0], self.groups
        wg = w.reshape(g, o // g, -1).transpose(0, 2, 1)  # [g, K, O/g]
        bias = self.node.inputs[2] if len(self.node.inputs) > 2 else None
        b = bias.values if isinstance(bias, gs.Constant) else np.zeros(o, w.dtype)
        return np.concatenate([wg, b.reshape(g, 1, o // g)], axis=1)

    def set_params(self, theta: np.ndarray) -> list[gs.Node]:
        w = self.node.inputs[1].values
        set_input(self.node, 1, theta[:, :-1].transpose(0, 2, 1).reshape(w.shape))
        _set_bias(self.node, 2, theta[:, -1].reshape(-1))
        return []


class GemmLinear(Linear):
    """Gemm y = alpha * A B + beta * C with constant B and transA = 0; rows are samples."""

    @property
    def features(self) -> int:
        b = self.node.inputs[1].values
        return b.shape[1] if self.node.attrs.get("transB", 0) else b.shape[0]

    def patches(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        return x[None]

    def outputs(self, y: np.ndarray, pos: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
        return (y if keep is None else y[:, keep])[None]

    def params(self) -> np.ndarray:
        node = self.node
        b = node.inputs[1].values
        w = (b.T if node.attrs.get("transB", 0) else b) * node.attrs.get("alpha", 1.0)
        c = node.inputs[2] if len(node.inputs) > 2 else None
        bias = np.zeros(w.shape[1], w.dtype)
        if isinstance(c, gs.Constant):
            bias = bias + c.values.reshape(-1) * node.attrs.get("beta", 1.0)
        return np.concatenate([w, bias[None]])[None]

    def set_params(self, theta: np.ndarray) -> list[gs.Node]:
        w = theta[0, :-1]
        set_input(self.node, 1, w.T if self.node.attrs.get("transB", 0) else w)
        _set_bias(self.node, 2, theta[0, -1])
        self.node.attrs["alpha"] = 1.0
        self.node.attrs["beta"] = 1.0
        return []


class MatMulLinear(Linear):
    """MatMul x @ W with constant W [K, O]: rows are positions of x's leading axes."""

    def axis(self, rank: int) -> int:
        return rank - 1

    @property
    def features(self) -> int:
        return self.node.inputs[1].values.shape[0]

    def _spots(self, y_shape: tuple) -> int:
        return int(np.prod(y_shape[1:-1]))

    def _rows(self, t: np.ndarray, pos: np.ndarray) -> np.ndarray:
        n = t.shape[0]
        t = t.reshape(n, -1, t.shape[-1])
        return t[np.arange(n)[:, None], pos].reshape(-1, t.shape[-1])[None]

    def patches(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        return self._rows(x, pos)

    def outputs(self, y: np.ndarray, pos: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
        return self._rows(y if keep is None else y[..., keep], pos)

    def params(self) -> np.ndarray:
        w = self.node.inputs[1].values
        return np.concatenate([w, np.zeros((1, w.shape[1]), w.dtype)])[None]

    def set_params(self, theta: np.ndarray) -> list[gs.Node]:
        """New weights, and an Add after the MatMul for the bias it fitted."""
        node = self.node
        set_input(node, 1, theta[0, :-1])
        bias = theta[0, -1]
        if not bias.any():
            return []
        out = node.outputs[0]
        inner = gs.Variable(f"{out.name}__matmul", dtype=out.dtype)
        node.outputs[0] = inner
        const = gs.Constant(f"{node.name}__bias", bias.astype(np.float32))
        return [gs.Node("Add", f"{node.name}__bias_add", inputs=[inner, const], outputs=[out])]
