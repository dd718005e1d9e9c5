"""Channel spaces and channel groups: which channels of the network must be pruned together.

A *space* is the channel axis of one tensor. Every element (channel) of every space is a node
of one big graph; op rules add edges between elements that are the same channel seen in two
tensors (ReLU: channel c in, channel c out; Concat: input channel c is output channel
offset + c; Flatten: channel c owns features c*HW .. c*HW + HW - 1). The connected components
of that graph are *channel classes*, the unit of one keep-or-remove decision, and the connected
components of spaces are *channel groups*, the unit of one ratio.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


@dataclass
class Space:
    """The channel axis `axis` of tensor `tensor`, with `size` channels at `start` globally."""

    id: int
    tensor: str
    axis: int
    size: int
    start: int
    producer: str

    @property
    def elements(self) -> np.ndarray:
        return np.arange(self.start, self.start + self.size)


@dataclass
class Link:
    """Element `a_idx[i]` of space `a` is the same channel as element `b_idx[i]` of `b`."""

    a: Space
    b: Space
    a_idx: np.ndarray
    b_idx: np.ndarray


@dataclass
class ChannelGroup:
    """Spaces coupled by links: one ratio, one ranking of their channel classes."""

    id: int
    spaces: list[Space]
    classes: np.ndarray  # the class ids in this group, sorted
    frozen: np.ndarray  # bool per entry of `classes`
    reasons: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.classes)

    @property
    def prunable(self) -> int:
        return int((~self.frozen).sum())


class ChannelGraph:
    """The spaces of a graph, the links between them, frozen elements, and mixing consumers.

    Built by `analyze`; op rules fill it through `new_space`, `link` and `freeze`.
    """

    def __init__(self, graph: gs.Graph, opset: int):
        self.graph = graph
        self.opset = opset
        self.spaces: list[Space] = []
        self.by_tensor: dict[str, Space] = {}
        self.links: list[Link] = []
        self.node_links: dict[str, list[Link]] = {}
        self.frozen_reasons: list[tuple[Space, np.ndarray, str]] = []
        self.mixing: list[tuple[gs.Node, int, Space]] = []  # (node, input index, space)
        self._current: gs.Node | None = None
        self.n_elements = 0

    # --- what rules call ---------------------------------------------------------------
    def space(self, tensor: gs.Tensor) -> Space | None:
        return self.by_tensor.get(tensor.name)

    def new_space(self, tensor: gs.Tensor, axis: int, size: int) -> Space:
        producer = self._current.name if self._current is not None else ""
        sp = Space(len(self.spaces), tensor.name, axis, int(size), self.n_elements, producer)
        self.n_elements += sp.size
        self.spaces.append(sp)
        self.by_tensor[tensor.name] = sp
        return sp

    def link(
        self,
        a: Space,
        b: Space,
        a_idx: np.ndarray | None = None,
        b_idx: np.ndarray | None = None,
    ) -> None:
        """Tie elements of `a` to elements of `b` (all of them one to one when indices are None)."""
        a_idx = np.arange(a.size) if a_idx is None else np.asarray(a_idx, dtype=np.int64)
        b_idx = np.arange(b.size) if b_idx is None else np.asarray(b_idx, dtype=np.int64)
        assert len(a_idx) == len(b_idx), "link index arrays differ in length"
        lk = Link(a, b, a_idx, b_idx)
        self.links.append(lk)
        if self._current is not None:
            self.node_links.setdefault(self._current.name, []).append(lk)

    def freeze(self, space: Space | None, reason: str, idx: np.ndarray | None = None) -> None:
        if space is None:
            return
        idx = np.arange(space.size) if idx is None else np.asarray(idx, dtype=np.int64)
        self.frozen_reasons.append((space, idx, reason))

    def consume(self, node: gs.Node, index: int) -> None:
        """Mark input `index` of `node` as read by a channel-mixing op (Conv, Gemm, MatMul)."""
        sp = self.space(node.inputs[index])
        if sp is not None:
            self.mixing.append((node, index, sp))

    # --- results -------------------------------------------------------------------------
    def classes(self) -> np.ndarray:
        """Class id of every element: connected components of the element graph."""
        n = self.n_elements
        if not self.links:
            return np.arange(n)
        rows = np.concatenate([lk.a.start + lk.a_idx for lk in self.links])
        cols = np.concatenate([lk.b.start + lk.b_idx for lk in self.links])
        adj = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
        return connected_components(adj, directed=False)[1]

    def groups(self, element_class: np.ndarray) -> list[ChannelGroup]:
        """Channel groups: connected components of spaces, with their classes and freezes."""
        n = len(self.spaces)
        rows = [lk.a.id for lk in self.links]
        cols = [lk.b.id for lk in self.links]
        adj = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
        _, space_group = connected_components(adj, directed=False)
        frozen_elem = np.zeros(self.n_elements, dtype=bool)
        for sp, idx, _ in self.frozen_reasons:
            frozen_elem[sp.start + idx] = True
        frozen_class = np.zeros(element_class.max() + 1 if len(element_class) else 0, bool)
        frozen_class[element_class[frozen_elem]] = True

        groups: list[ChannelGroup] = []
        index: dict[int, ChannelGroup] = {}
        for sp in self.spaces:
            g = index.get(space_group[sp.id])
            if g is None:
                g = ChannelGroup(len(groups), [], np.array([], np.int64), np.array([], bool))
                index[space_group[sp.id]] = g
                groups.append(g)
            g.spaces.append(sp)
            if sp.producer and sp.producer not in g.nodes:
                g.nodes.append(sp.producer)
        for sp, _, reason in self.frozen_reasons:
            g = index[space_group[sp.id]]
            if reason not in g.reasons:
                g.reasons.append(reason)
        for g in groups:
            cls = np.unique(np.concatenate([element_class[sp.elements] for sp in g.spaces]))
            g.classes, g.frozen = cls, frozen_class[cls]
        return groups


def shape_of(tensor: gs.Tensor) -> tuple | None:
    """The inferred shape (ints, or strings/None for unknown dims) or None."""
    if isinstance(tensor, gs.Constant):
        return tuple(tensor.values.shape)
    return None if tensor.shape is None else tuple(tensor.shape)


def dim(shape: tuple | None, axis: int) -> int | None:
    """A concrete dimension of a shape, or None when unknown."""
    if shape is None or not -len(shape) <= axis < len(shape):
        return None
    d = shape[axis]
    return int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None
