"""Readers for the real models and images in ../shared/data (benchmarks and optional tests).

Each entry gives the model path, calibration inputs and evaluation inputs with labels, kept
disjoint: CIFAR-10 calibrates on JPEG test images after the first 1,017 and evaluates on the
first 1,017 lossless ones; ImageNet splits the 200 images in halves; MNIST calibrates on the
first 1,000 test digits and evaluates on the rest.
"""

import gzip
from pathlib import Path

import numpy as np

from nisp_onnx.readers import Preprocess

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
CIFAR_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
CIFAR_STD = np.array([0.229, 0.224, 0.225], np.float32)


CALIB_LABELS = {}  # labels of the calibration inputs last loaded, by dataset


def calib_labels(name):
    """Labels of a model's calibration inputs (for criteria that use labels)."""
    if name.startswith("ResNet"):
        return CALIB_LABELS["cifar"]
    if name.startswith("MobileNet"):
        return CALIB_LABELS["imagenet" + ("128" if "0.25" in name else "160")]
    return CALIB_LABELS["mnist"]


def available() -> bool:
    return DATA.is_dir()


def _cifar(x):
    return ((x.astype(np.float32) / 255 - CIFAR_MEAN) / CIFAR_STD).transpose(0, 3, 1, 2)


def cifar(n_calib=256, n_eval=1017, draw=0):
    """Calibration: block `draw` of `n_calib` JPEG images after the first 1,017 (draws are
    disjoint); evaluation: the first `n_eval` lossless images."""
    lossless = np.load(DATA / "cifar10" / "cifar10_test_first1017.npz")
    jpeg = np.load(DATA / "cifar10" / "cifar10_test_jpeg.npz")
    start = 1017 + draw * n_calib
    if start + n_calib > len(jpeg["x"]):
        raise ValueError(f"CIFAR-10 has no calibration draw {draw} of {n_calib} images")
    calib = _cifar(jpeg["x"][start : start + n_calib])
    CALIB_LABELS["cifar"] = jpeg["y"][start : start + n_calib]
    return calib, _cifar(lossless["x"][:n_eval]), lossless["y"][:n_eval]


def imagenet(size, n_eval=100):
    folder = DATA / "imagenet" / "images"
    synsets = (DATA / "imagenet" / "synsets.txt").read_text().split()
    files = sorted(folder.glob("*.JPEG"))
    pre = Preprocess(
        size=(size, size), resize=round(size / 0.875), scale=1.0, mean=(128.0,), std=(128.0,)
    )
    x = np.stack([pre(f) for f in files])
    y = np.array([synsets.index(f.name.split("_")[0]) + 1 for f in files])
    CALIB_LABELS[f"imagenet{size}"] = y[:100]
    return x[:100], x[100 : 100 + n_eval], y[100 : 100 + n_eval]


def mnist(scale_lenet, n_calib=1000, n_eval=9000):
    with gzip.open(DATA / "mnist" / "t10k-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(DATA / "mnist" / "t10k-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    x = x.astype(np.float32)
    x = (x / 255 - 0.1307) / 0.3081 if scale_lenet else x
    CALIB_LABELS["mnist"] = y[:n_calib]
    return x[:n_calib], x[n_calib : n_calib + n_eval], y[n_calib : n_calib + n_eval]


def cifar_draws(n_calib):
    """How many disjoint draws of `n_calib` calibration images CIFAR-10 has."""
    return (10000 - 1017) // n_calib


def models(n_eval=None, cifar_calib=256, cifar_draw=0, cifar_only=False):
    """(name, model path, input name, batch, calibration, eval inputs, eval labels) per model."""
    kw = {} if n_eval is None else {"n_eval": n_eval}
    c_cal, c_x, c_y = cifar(n_calib=cifar_calib, draw=cifar_draw, **kw)
    rows = [
        (f"ResNet-{d}", DATA / "cifar10" / f"resnet{d}.onnx", "input", 64, c_cal, c_x, c_y)
        for d in (20, 32, 44)
    ]
    if cifar_only:
        return rows
    for name, size in (("MobileNet-v1 0.25", 128), ("MobileNet-v1 0.5", 160)):
        cal, x, y = imagenet(size, **kw)
        tag = name.split()[-1]
        rows.append(
            (name, DATA / "imagenet" / f"mnv1_{tag}_{size}_fp32.onnx", "input", 25, cal, x, y)
        )
    cal, x, y = mnist(True, **kw)
    rows.append(("LeNet-5", DATA / "mnist" / "lenet5.onnx", "input_0", 10, cal, x, y))
    cal, x, y = mnist(False, **kw)
    rows.append(("MNIST-8 (zoo)", DATA / "mnist" / "mnist-8.onnx", "Input3", 1, cal, x, y))
    return rows
