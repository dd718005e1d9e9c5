"""Stage 5: NISP, importance propagated from the final response layer to every channel.

`s_k = |W_{k+1}|^T s_{k+1}` through mixing layers, scaled through BatchNorm and constant
multiplies, passed unchanged through activations and index maps; where a tensor has several
consumers their contributions add (Yu et al., CVPR 2018).
"""

from __future__ import annotations

import numpy as np

from .channels import ChannelGraph, Space
from .rules import rule_of


def propagate(cg: ChannelGraph, frl: Space, seed: np.ndarray) -> np.ndarray:
    """Importance of every channel element as read by its consumers.

    Returns, per element, the importance delivered by mixing consumers (and the FRL seed):
    summing it over a channel class counts every removed neuron once, not once per tensor
    that merely carries it.
    """
    total = np.zeros(cg.n_elements)
    direct = np.zeros(cg.n_elements)
    seed = np.asarray(seed, dtype=np.float64)
    total[frl.elements] += seed
    direct[frl.elements] += seed
    mixing: dict[str, list[Space]] = {}
    for node, _, sp in cg.mixing:
        mixing.setdefault(node.name, []).append(sp)
    for node in reversed(cg.graph.nodes):
        read = mixing.get(node.name, [])
        before = [total[sp.elements].copy() for sp in read]
        rule_of(node).backprop(node, cg, total)
        for sp, old in zip(read, before):
            direct[sp.elements] += total[sp.elements] - old
    return direct


def class_importance(direct: np.ndarray, element_class: np.ndarray) -> np.ndarray:
    """Importance per channel class: the sum over its elements."""
    return np.bincount(element_class, weights=direct, minlength=element_class.max() + 1)
