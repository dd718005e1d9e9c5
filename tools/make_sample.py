"""Build the bundled sample: a small residual CNN trained on scikit-learn's handwritten digits.

Writes models/digits_resnet.onnx (TorchScript exporter, dynamic batch) and its calibration
images, the held-out test digits, as 16x16 PNGs in class subfolders models/digits_calib/<d>/.
Needs torch and scikit-learn (not runtime dependencies):
    pip install torch==2.13.0 scikit-learn onnx && python tools/make_sample.py
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn

ROOT = Path(__file__).resolve().parent.parent / "models"
SIZE = 16


def images() -> tuple[np.ndarray, np.ndarray]:
    """Digits as 16x16 uint8 images (upsampled the way the PNGs are stored)."""
    d = load_digits()
    x = [
        Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR)
        for im in d.images
    ]
    return np.stack([np.asarray(im) for im in x]), d.target


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class DigitsResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.stage1 = nn.Sequential(Block(16), Block(16))
        self.down = nn.Sequential(
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU()
        )
        self.stage2 = nn.Sequential(Block(32), Block(32))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def main():
    torch.manual_seed(0)
    x, y = images()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    test, train = order[:360], order[360:]
    xt = torch.tensor(x[:, None] / 255.0, dtype=torch.float32)
    yt = torch.tensor(y)
    model = DigitsResNet()
    opt = torch.optim.Adam(model.parameters(), 3e-3, weight_decay=1e-4)
    for _epoch in range(40):
        model.train()
        for idx in np.array_split(rng.permutation(train), len(train) // 64):
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xt[test]).argmax(1) == yt[test]).float().mean().item()
    print(f"held-out accuracy: {100 * acc:.2f}% on {len(test)} images")
    ROOT.mkdir(exist_ok=True)
    torch.onnx.export(
        model,
        xt[:1],
        ROOT / "digits_resnet.onnx",
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        opset_version=17,
        dynamo=False,
    )
    for i in test:
        folder = ROOT / "digits_calib" / str(y[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(folder / f"{i:04d}.png")


if __name__ == "__main__":
    main()
