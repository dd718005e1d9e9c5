"""Stage 6: which channel classes each group keeps."""

from __future__ import annotations

import numpy as np

from .channels import ChannelGroup


def select(
    groups: list[ChannelGroup],
    element_class: np.ndarray,
    importance: np.ndarray,
    ratio: float | list[float],
) -> np.ndarray:
    """Boolean mask over classes: true where the class is removed.

    Every tensor of a group loses `round(ratio * prunable channels)` of its channels, the least
    important first, keeping at least one: tensors with the fewest channels choose first, and
    a channel shared with a tensor that has met its quota is not taken (in an "option A"
    ResNet the narrow early stream and the wide late stream both lose `ratio`). Ties go to the
    lower class id, so the choice is deterministic. `ratio` is one for all groups or one
    per group.
    """
    ratios = [ratio] * len(groups) if np.ndim(ratio) == 0 else list(ratio)
    removed = np.zeros(len(importance), dtype=bool)
    frozen = np.zeros(len(importance), dtype=bool)
    for g in groups:
        frozen[g.classes[g.frozen]] = True
    for g, ratio in zip(groups, ratios):
        per_space = [np.unique(element_class[sp.elements]) for sp in g.spaces]
        quota = {
            i: min(int(round(ratio * (~frozen[c]).sum())), len(c) - 1)
            for i, c in enumerate(per_space)
        }
        done = dict.fromkeys(quota, 0)
        owners: dict[int, list[int]] = {}
        for i, c in enumerate(per_space):
            for k in c:
                owners.setdefault(int(k), []).append(i)
        for i in sorted(quota, key=lambda i: (len(per_space[i]), i)):
            c = per_space[i]
            for k in c[np.lexsort((c, importance[c]))]:
                if done[i] >= quota[i]:
                    break
                if removed[k] or frozen[k] or any(done[j] >= quota[j] for j in owners[int(k)]):
                    continue
                removed[k] = True
                for j in owners[int(k)]:
                    done[j] += 1
    return removed
