"""Stage 6: which channel classes each group keeps."""

from __future__ import annotations

import numpy as np

from .channels import ChannelGroup


def select(
    groups: list[ChannelGroup],
    element_class: np.ndarray,
    importance: np.ndarray,
    ratio: float | list[float],
    round_to: int = 1,
    min_keep: int = 1,
) -> np.ndarray:
    """Boolean mask over classes: true where the class is removed.

    Every tensor of a group loses `round(ratio * prunable channels)` of its channels, the least
    important first, keeping at least one: tensors with the fewest channels choose first, and
    a channel shared with a tensor that has met its quota is not taken (in an "option A"
    ResNet the narrow early stream and the wide late stream both lose `ratio`). Ties go to the
    lower class id, so the choice is deterministic. `ratio` is one for all groups or one
    per group. Every tensor keeps at least `min_keep` channels, and with `round_to` N > 1 a
    tensor that loses channels keeps a multiple of N (at least N; none lost below N).
    """
    ratios = [ratio] * len(groups) if np.ndim(ratio) == 0 else list(ratio)
    removed = np.zeros(len(importance), dtype=bool)
    frozen = np.zeros(len(importance), dtype=bool)
    for g in groups:
        frozen[g.classes[g.frozen]] = True
    for g, ratio in zip(groups, ratios):
        if ratio <= 0:
            continue  # loses nothing
        per_space = [np.unique(element_class[sp.elements]) for sp in g.spaces]
        quota = {
            i: _quota(len(c), ratio * (~frozen[c]).sum(), round_to, min_keep)
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


def _quota(size: int, cut: float, round_to: int, min_keep: int) -> int:
    """How many of `size` channels one tensor loses when `cut` are asked for."""
    quota = max(0, min(int(round(cut)), size - min_keep))
    if quota == 0 or round_to <= 1:
        return quota
    kept = int(round((size - quota) / round_to)) * round_to
    return size - min(size, max(kept, round_to, min_keep))
