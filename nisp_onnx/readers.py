"""Calibration data readers in onnxruntime's style: `get_next()` gives `{input: batch}` or None.

`ImageFolderReader` reads a folder of images (class subfolders give labels, as ImageFolder
does); `ArrayReader` serves ready model inputs from arrays or `.npy`/`.npz` files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import NispError

log = logging.getLogger("nisp_onnx")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm"}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
TOO_SMALL = 4  # an image whose side is this many times smaller than the input's is refused


class TooSmall(ValueError):
    """An image far smaller than the model input: upscaling it would feed the model noise."""


@dataclass
class Preprocess:
    """How an image file becomes one model input."""

    size: tuple[int, int]  # (height, width) given to the model
    layout: str = "NCHW"
    color: str = "rgb"  # rgb | bgr | gray
    resize: int | None = None  # short side before the centre crop; None: resize to `size`
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    dtype: str = "float32"
    converted: int = 0  # images whose colour was converted to the model's (gray <-> colour)

    def describe(self) -> str:
        h, w = self.size
        how = f"resize short side to {self.resize}, centre crop" if self.resize else "resize"
        return (
            f"{how} to {h}x{w}, {self.color}, {self.layout}, x*{self.scale:.6g}, "
            f"mean {list(self.mean)}, std {list(self.std)}"
        )

    def __call__(self, path: Path) -> np.ndarray:
        """One input from an image file; raises `TooSmall` for an image far below the size."""
        with Image.open(path) as img:
            h, w = self.size
            if img.width * TOO_SMALL < w or img.height * TOO_SMALL < h:
                raise TooSmall(f"{img.width}x{img.height}")
            gray = img.mode in GRAY_MODES
            if gray != (self.color == "gray"):
                self.converted += 1
            img = img.convert("L" if self.color == "gray" else "RGB")
            if self.resize:
                scale = self.resize / min(img.size)
                img = img.resize(
                    (max(w, round(img.width * scale)), max(h, round(img.height * scale))),
                    Image.BILINEAR,
                )
                left, top = (img.width - w) // 2, (img.height - h) // 2
                img = img.crop((left, top, left + w, top + h))
            else:
                img = img.resize((w, h), Image.BILINEAR)
            x = np.asarray(img, dtype=np.float32)
        x = x[:, :, None] if x.ndim == 2 else x
        if self.color == "bgr":
            x = x[:, :, ::-1]
        x = (x * self.scale - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        return np.ascontiguousarray(x, dtype=self.dtype)


def model_preprocess(
    input_shape: Sequence, elem_dtype: str = "float32", **overrides: object
) -> Preprocess:
    """Defaults read from a model input's shape ([N,C,H,W] or [N,H,W,C]); overrides win."""
    dims = [d if isinstance(d, int) and d > 0 else None for d in input_shape]
    if len(dims) != 4:
        raise NispError(
            f"model input has shape {list(input_shape)}, not an image batch; "
            "give the calibration inputs as an .npy/.npz file"
        )
    nhwc = dims[3] in (1, 3) and dims[1] not in (1, 3)
    layout = "NHWC" if nhwc else "NCHW"
    c, h, w = (dims[3], dims[1], dims[2]) if nhwc else (dims[1], dims[2], dims[3])
    size = overrides.pop("size", None) or ((h, w) if h and w else None)
    if size is None:
        raise NispError("the model input has no fixed height and width; pass --size H W")
    kw = {k: v for k, v in overrides.items() if v is not None}
    pre = Preprocess(
        size=tuple(size), layout=layout, color="gray" if c == 1 else "rgb", dtype=elem_dtype
    )
    for k, v in kw.items():
        setattr(pre, k, tuple(v) if isinstance(v, list) else v)
    channels = 1 if pre.color == "gray" else 3
    if c is not None and c != channels:
        raise NispError(
            f"the model input has {c} channels but --color {pre.color} gives {channels}"
        )
    for name in ("mean", "std"):
        if len(getattr(pre, name)) not in (1, channels):
            raise NispError(f"--{name} needs 1 or {channels} values")
    return pre


def image_files(folder: Path) -> tuple[list[Path], np.ndarray | None, list[str]]:
    """Images under `folder` (recursively, sorted), with labels when every image sits in a
    class subfolder: (files, labels or None, class names)."""
    if not folder.is_dir():
        raise NispError(f"{folder}: calibration folder does not exist")
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise NispError(
            f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    parents = [p.relative_to(folder).parts for p in files]
    if all(len(parts) == 2 for parts in parents):
        classes = sorted({parts[0] for parts in parents})
        index = {c: i for i, c in enumerate(classes)}
        return files, np.array([index[parts[0]] for parts in parents]), classes
    return files, None, []


class ImageFolderReader:
    """Batches of preprocessed images from a folder; unreadable files are skipped with a
    warning. `labels` holds the labels of the samples served so far (None without classes)."""

    def __init__(
        self,
        folder: str | os.PathLike,
        input_name: str,
        preprocess: Preprocess,
        batch_size: int = 32,
        num_samples: int | None = None,
        seed: int = 0,
    ):
        self.folder = Path(folder)
        files, labels, self.classes = image_files(self.folder)
        order = np.arange(len(files))
        if num_samples is not None and num_samples < len(files):
            order = np.sort(np.random.default_rng(seed).choice(len(files), num_samples, False))
        self.files = [files[i] for i in order]
        self._all_labels = None if labels is None else labels[order]
        self.input_name, self.preprocess, self.batch_size = input_name, preprocess, batch_size
        self._pos = 0
        self._served: list[int] = []
        self._small: list[str] = []

    @property
    def labels(self) -> np.ndarray | None:
        return None if self._all_labels is None else self._all_labels[self._served]

    def __len__(self) -> int:
        return len(self.files)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = []
        while len(batch) < self.batch_size and self._pos < len(self.files):
            path = self.files[self._pos]
            try:
                batch.append(self.preprocess(path))
                self._served.append(self._pos)
            except TooSmall as e:
                self._small.append(f"{path.name} ({e})")
            except (UnidentifiedImageError, OSError, ValueError) as e:
                log.warning("skipping %s: not a readable image (%s)", path, e)
            self._pos += 1
        if self._pos == len(self.files):
            self._finish()
        return {self.input_name: np.stack(batch)} if batch else None

    def _finish(self) -> None:
        """With the last file read: one line for each kind of conversion or refusal."""
        h, w = self.preprocess.size
        if self._small:
            what = (
                f"{len(self._small)} image(s) far smaller than the model's {h}x{w} input "
                f"(e.g. {self._small[0]})"
            )
            if not self._served:
                raise NispError(f"{self.folder}: all {what}; give images of about {h}x{w}")
            log.warning("skipped %s", what)
            self._small = []
        if not self._served:
            raise NispError(f"{self.folder}: none of the images could be read")
        if self.preprocess.converted:
            to = "gray" if self.preprocess.color == "gray" else "RGB"
            log.warning(
                "converted %d image(s) to %s, the model input's colour; check that these "
                "are the images meant for this model",
                self.preprocess.converted,
                to,
            )
            self.preprocess.converted = 0


class ArrayReader:
    """Batches from arrays: a dict {input name: array of samples}, or a `.npy` (single-input
    models) or `.npz` (keyed by input names) file, loaded without pickle."""

    def __init__(
        self,
        data: dict[str, np.ndarray] | str | os.PathLike,
        input_names: Sequence[str],
        batch_size: int = 32,
        num_samples: int | None = None,
        labels: np.ndarray | None = None,
    ):
        arrays = _load_arrays(data, input_names) if not isinstance(data, dict) else data
        missing = [n for n in input_names if n not in arrays]
        if missing:
            raise NispError(
                f"calibration data has arrays {sorted(arrays)} but the model needs "
                f"{list(input_names)}; key them by the model's input names"
            )
        n = min(len(arrays[k]) for k in input_names)
        n = n if num_samples is None else min(n, num_samples)
        self.arrays = {k: np.asarray(arrays[k][:n]) for k in input_names}
        self.labels = None if labels is None else np.asarray(labels)[:n]
        self.batch_size, self.n, self._pos = batch_size, n, 0

    def __len__(self) -> int:
        return self.n

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= self.n:
            return None
        sl = slice(self._pos, self._pos + self.batch_size)
        self._pos += self.batch_size
        return {k: v[sl] for k, v in self.arrays.items()}


def _load_arrays(path: str | os.PathLike, input_names: Sequence[str]) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise NispError(f"{path}: calibration file does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise NispError(f"{path}: not a readable .npy/.npz file ({e})") from None
    if isinstance(loaded, np.ndarray):
        if len(input_names) != 1:
            raise NispError(
                f"{path}: a .npy file feeds single-input models; this one has inputs "
                f"{list(input_names)}: use an .npz keyed by input name"
            )
        return {input_names[0]: loaded}
    with loaded:
        return {k: loaded[k] for k in loaded.files}
