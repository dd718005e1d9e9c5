"""Seeded augmentation of image batches for fine-tuning: flips, shifts, random resized crops."""

from __future__ import annotations

import numpy as np


def augment(batch: dict[str, np.ndarray], how: str, rng: np.random.Generator) -> dict:
    """`batch` with its image inputs (4-D float) augmented, the same for every input:
    "flip" mirrors a random half left-right; "flip-shift" also moves each by up to 1/8 of its
    size in each direction (zeros come in: CIFAR's pad-and-crop); "flip-crop" instead takes a
    random resized crop of each (8-100% of the area, aspect 3/4 to 4/3, bilinear: ImageNet's);
    "none" returns it as it is."""
    if how == "none":
        return batch
    n = len(next(iter(batch.values())))
    flips = rng.random(n) < 0.5
    h, w = next(iter(batch.values())).shape[-2:]
    boxes = [_box(rng, h, w) for _ in range(n)]
    moves = rng.integers(-(h // 8), h // 8 + 1, n), rng.integers(-(w // 8), w // 8 + 1, n)
    moves = list(zip(*moves))
    out = {}
    for name, x in batch.items():
        if x.ndim != 4 or x.dtype != np.float32:
            out[name] = x
            continue
        x = np.where(flips[:, None, None, None], x[..., ::-1], x)
        if how == "flip-crop":
            x = np.stack([_resized(xi, box) for xi, box in zip(x, boxes)])
        elif how == "flip-shift":
            x = np.stack([_shifted(xi, move) for xi, move in zip(x, moves)])
        out[name] = np.ascontiguousarray(x, dtype=np.float32)
    return out


AUGMENTS = ("none", "flip", "flip-shift", "flip-crop")


def _box(rng: np.random.Generator, h: int, w: int) -> tuple[int, int, int, int]:
    """A random crop (top, left, height, width) of 8-100% of the area, aspect 3/4..4/3."""
    for _ in range(10):
        area = rng.uniform(0.08, 1.0) * h * w
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch, cw = round(np.sqrt(area / aspect)), round(np.sqrt(area * aspect))
        if 0 < ch <= h and 0 < cw <= w:
            return int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1)), ch, cw
    return 0, 0, h, w


def _shifted(x: np.ndarray, move: tuple[int, int]) -> np.ndarray:
    """A [C, H, W] image moved down and right by `move` (negative: up, left), zeros in."""
    dy, dx = move
    h, w = x.shape[-2:]
    out = np.zeros_like(x)
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
        :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _resized(x: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The crop `box` of a [C, H, W] image resized back to [C, H, W], bilinear."""
    top, left, ch, cw = box
    h, w = x.shape[-2:]
    ys = np.clip(top + (np.arange(h) + 0.5) * ch / h - 0.5, 0, h - 1)
    xs = np.clip(left + (np.arange(w) + 0.5) * cw / w - 0.5, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top_row = x[:, y0][:, :, x0] * (1 - fx) + x[:, y0][:, :, x1] * fx
    low_row = x[:, y1][:, :, x0] * (1 - fx) + x[:, y1][:, :, x1] * fx
    return top_row * (1 - fy) + low_row * fy
