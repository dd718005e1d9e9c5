"""Compact PyTorch definitions of the common image classifiers, for fixtures and benchmarks.

Written from the papers' descriptions with shared building blocks (no torchvision). Every
constructor takes a width multiplier `w` and per-stage depths, so that a tiny version with the
same structure (downsample shortcuts, groups, squeeze-excitation, concatenation, channel
shuffle, LayerNorm, ...) exists beside the full one. `ARCHS[name]` gives
`(constructor, full kwargs, tiny kwargs, full input size, tiny input size)`; `build(name, tiny)`
returns `(model, input size)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


def ch(c: float, w: float = 1.0, div: int = 1) -> int:
    """`c * w` rounded to a multiple of `div`, at least `div`."""
    return max(div, int(c * w + div / 2) // div * div)


def _pad(k):
    return tuple(x // 2 for x in k) if isinstance(k, tuple) else k // 2


class CBA(nn.Sequential):
    """Conv (no bias) - BatchNorm - activation."""

    def __init__(self, cin, cout, k=3, s=1, g=1, act=nn.ReLU, p=None):
        layers = [nn.Conv2d(cin, cout, k, s, _pad(k) if p is None else p, groups=g, bias=False)]
        layers.append(nn.BatchNorm2d(cout))
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class SE(nn.Module):
    """Squeeze-excitation: pooled branch -> 1x1 conv -> act -> 1x1 conv -> gate -> Mul."""

    def __init__(self, c, squeeze, act=nn.ReLU, gate=nn.Sigmoid):
        super().__init__()
        self.fc1, self.act = nn.Conv2d(c, squeeze, 1), act()
        self.fc2, self.gate = nn.Conv2d(squeeze, c, 1), gate()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class Head(nn.Sequential):
    """Global average pool, flatten, optional hidden layers, linear classifier."""

    def __init__(self, cin, classes, hidden=(), act=nn.ReLU, dropout=0.2):
        layers = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        for h in hidden:
            layers += [nn.Linear(cin, h), act(), nn.Dropout(dropout)]
            cin = h
        layers.append(nn.Linear(cin, classes))
        super().__init__(*layers)


def _shortcut(cin, cout, s):
    return nn.Identity() if s == 1 and cin == cout else CBA(cin, cout, 1, s, act=None)


# --- ResNet family -----------------------------------------------------------------------


class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, s, groups=1, wpg=64):
        super().__init__()
        self.body = nn.Sequential(CBA(cin, planes, 3, s), CBA(planes, planes, 3, act=None))
        self.short = _shortcut(cin, planes, s)

    def forward(self, x):
        return F.relu(self.body(x) + self.short(x))


class Bottleneck(Basic):
    expansion = 4

    def __init__(self, cin, planes, s, groups=1, wpg=64):
        nn.Module.__init__(self)
        mid, out = int(planes * wpg / 64) * groups, planes * 4
        self.body = nn.Sequential(
            CBA(cin, mid, 1), CBA(mid, mid, 3, s, g=groups), CBA(mid, out, 1, act=None)
        )
        self.short = _shortcut(cin, out, s)


class ResNet(nn.Module):
    """ResNet / ResNeXt / Wide ResNet: `groups` and `wpg` (width per group) set the middle
    width of the bottleneck, as in the ResNeXt paper."""

    def __init__(self, block, depths, w=1.0, groups=1, wpg=64, classes=1000):
        super().__init__()
        c = ch(64, w)
        layers = [CBA(3, c, 7, 2), nn.MaxPool2d(3, 2, 1)]
        for i, n in enumerate(depths):
            planes = ch(64 * 2**i, w)
            for j in range(n):
                layers.append(block(c, planes, 2 if i and not j else 1, groups, wpg))
                c = planes * block.expansion
        self.features = nn.Sequential(*layers)
        self.head = Head(c, classes, dropout=0)

    def forward(self, x):
        return self.head(self.features(x))


# --- inverted residuals: MobileNetV2/V3, EfficientNet, MnasNet ---------------------------


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, optional SE, linear 1x1 project."""

    def __init__(self, cin, cout, k, s, exp, act=nn.ReLU6, se=0, se_act=nn.ReLU, gate=None):
        super().__init__()
        layers = [] if exp == cin else [CBA(cin, exp, 1, act=act)]
        layers.append(CBA(exp, exp, k, s, g=exp, act=act))
        if se:
            layers.append(SE(exp, se, se_act, gate or nn.Sigmoid))
        layers.append(CBA(exp, cout, 1, act=None))
        self.body = nn.Sequential(*layers)
        self.residual = s == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


def _repeat(n, depth):
    return max(1, math.ceil(n * depth))


class MobileNetV2(nn.Module):
    ROWS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1)]
    ROWS += [(6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, w=1.0, depth=1.0, classes=1000, last=1280):
        super().__init__()
        c = ch(32, w, 8 if w >= 1 else 4)
        layers = [CBA(3, c, 3, 2, act=nn.ReLU6)]
        for t, out, n, s in self.ROWS:
            out = ch(out, w, 8 if w >= 1 else 4)
            for j in range(_repeat(n, depth)):
                layers.append(MBConv(c, out, 3, s if j == 0 else 1, c * t))
                c = out
        last = ch(last, min(w, 1.0), 8)
        layers.append(CBA(c, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.head = Head(last, classes)

    def forward(self, x):
        return self.head(self.features(x))


class MobileNetV3(nn.Module):
    """MobileNetV3-Large: (kernel, expansion, out, SE, hard-swish, stride) per block."""

    ROWS = [(3, 16, 16, 0, 0, 1), (3, 64, 24, 0, 0, 2), (3, 72, 24, 0, 0, 1)]
    ROWS += [(5, 72, 40, 1, 0, 2), (5, 120, 40, 1, 0, 1), (5, 120, 40, 1, 0, 1)]
    ROWS += [(3, 240, 80, 0, 1, 2), (3, 200, 80, 0, 1, 1), (3, 184, 80, 0, 1, 1)]
    ROWS += [(3, 184, 80, 0, 1, 1), (3, 480, 112, 1, 1, 1), (3, 672, 112, 1, 1, 1)]
    ROWS += [(5, 672, 160, 1, 1, 2), (5, 960, 160, 1, 1, 1), (5, 960, 160, 1, 1, 1)]

    def __init__(self, w=1.0, depth=1.0, classes=1000, hidden=1280):
        super().__init__()
        div = 8 if w >= 1 else 4
        c = ch(16, w, div)
        layers = [CBA(3, c, 3, 2, act=nn.Hardswish)]
        for i, (k, e, out, se, hs, s) in enumerate(self.ROWS):
            first = i == 0 or self.ROWS[i - 1][2] != out
            run = sum(r[2] == out for r in self.ROWS)
            index = i - next(j for j, r in enumerate(self.ROWS) if r[2] == out)
            if not first and index >= _repeat(run, depth):
                continue
            e, out = ch(e, w, div), ch(out, w, div)
            act = nn.Hardswish if hs else nn.ReLU
            squeeze = ch(e // 4, 1, div) if se else 0
            layers.append(MBConv(c, out, k, s, e, act, squeeze, nn.ReLU, nn.Hardsigmoid))
            c = out
        last = ch(960, w, div)
        layers.append(CBA(c, last, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.head = Head(last, classes, (ch(hidden, w, div),), nn.Hardswish)

    def forward(self, x):
        return self.head(self.features(x))


class EfficientNetB0(nn.Module):
    """EfficientNet-B0: MBConv with SiLU and SE (squeeze = block input / 4)."""

    ROWS = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3)]
    ROWS += [(6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]

    def __init__(self, w=1.0, depth=1.0, classes=1000):
        super().__init__()
        div = 8 if w >= 1 else 4
        c = ch(32, w, div)
        layers = [CBA(3, c, 3, 2, act=nn.SiLU)]
        for t, k, s, out, n in self.ROWS:
            out = ch(out, w, div)
            for j in range(_repeat(n, depth)):
                se = max(1, c // 4)
                layers.append(MBConv(c, out, k, s if j == 0 else 1, c * t, nn.SiLU, se, nn.SiLU))
                c = out
        last = ch(1280, w, div)
        layers.append(CBA(c, last, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.head = Head(last, classes)

    def forward(self, x):
        return self.head(self.features(x))


class MnasNet(nn.Module):
    """MnasNet-B1 (no SE): separable stem, then inverted residual stacks with ReLU."""

    ROWS = [(3, 3, 2, 24, 3), (3, 5, 2, 40, 3), (6, 5, 2, 80, 3), (6, 3, 1, 96, 2)]
    ROWS += [(6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]

    def __init__(self, w=1.0, depth=1.0, classes=1000):
        super().__init__()
        div = 8 if w >= 1 else 4
        c32, c = ch(32, w, div), ch(16, w, div)
        layers = [CBA(3, c32, 3, 2), CBA(c32, c32, 3, g=c32), CBA(c32, c, 1, act=None)]
        for t, k, s, out, n in self.ROWS:
            out = ch(out, w, div)
            for j in range(_repeat(n, depth)):
                layers.append(MBConv(c, out, k, s if j == 0 else 1, c * t, nn.ReLU))
                c = out
        layers.append(CBA(c, 1280 if w >= 1 else ch(1280, w, div), 1))
        self.features = nn.Sequential(*layers)
        self.head = Head(layers[-1][0].out_channels, classes)

    def forward(self, x):
        return self.head(self.features(x))


# --- RegNet ------------------------------------------------------------------------------


class RegNetBlock(Basic):
    """X/Y block: 1x1, grouped 3x3 with a fixed group width, SE (Y), 1x1, projection."""

    def __init__(self, cin, cout, s, gw, se):
        nn.Module.__init__(self)
        layers = [CBA(cin, cout, 1), CBA(cout, cout, 3, s, g=cout // gw)]
        if se:
            layers.append(SE(cout, max(1, int(round(cin * se)))))
        layers.append(CBA(cout, cout, 1, act=None))
        self.body = nn.Sequential(*layers)
        self.short = _shortcut(cin, cout, s)


class RegNet(nn.Module):
    """RegNetY-400MF by default: widths [48, 104, 208, 440], depths [1, 3, 6, 6], group
    width 8, SE 0.25 (se=0 gives the X variant)."""

    def __init__(
        self, widths=(48, 104, 208, 440), depths=(1, 3, 6, 6), gw=8, se=0.25, stem=32, classes=1000
    ):
        super().__init__()
        layers, c = [CBA(3, stem, 3, 2)], stem
        for width, n in zip(widths, depths):
            for j in range(n):
                layers.append(RegNetBlock(c, width, 2 if j == 0 else 1, gw, se))
                c = width
        self.features = nn.Sequential(*layers)
        self.head = Head(c, classes, dropout=0)

    def forward(self, x):
        return self.head(self.features(x))


# --- DenseNet ----------------------------------------------------------------------------


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv-BN-ReLU-3x3 conv on the concatenation of all earlier features."""

    def __init__(self, cin, growth, bn_size):
        super().__init__()
        mid = bn_size * growth
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, mid, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(mid), nn.Conv2d(mid, growth, 3, 1, 1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        x = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(x)))


class DenseBlock(nn.ModuleList):
    def forward(self, x):
        features = [x]
        for layer in self:
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    def __init__(self, growth=32, blocks=(6, 12, 24, 16), init=64, bn_size=4, classes=1000):
        super().__init__()
        layers, c = [CBA(3, init, 7, 2), nn.MaxPool2d(3, 2, 1)], init
        for i, n in enumerate(blocks):
            layers.append(
                DenseBlock([DenseLayer(c + j * growth, growth, bn_size) for j in range(n)])
            )
            c += n * growth
            if i < len(blocks) - 1:
                layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False)]
                layers.append(nn.AvgPool2d(2, 2))
                c //= 2
        layers += [nn.BatchNorm2d(c), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = Head(c, classes, dropout=0)

    def forward(self, x):
        return self.head(self.features(x))


# --- multi-branch: GoogLeNet, Inception-v3, SqueezeNet ------------------------------------


class Branches(nn.Module):
    """Parallel branches concatenated on channels."""

    def __init__(self, *branches):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.out = sum(_out(b) for b in branches)

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], 1)


def _out(m):
    if hasattr(m, "out"):
        return m.out
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    return convs[-1].out_channels


def _seq(cin, *specs):
    """A chain of CBA from (cout, k, s, p) specs (s, p optional)."""
    layers = []
    for spec in specs:
        cout, k, *rest = spec
        layers.append(CBA(cin, cout, k, *rest[:1], p=rest[1] if len(rest) > 1 else None))
        cin = cout
    return nn.Sequential(*layers)


class _BN3(CBA):
    """GoogLeNet / Inception BasicConv2d: BN eps 0.001."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self[1].eps = 1e-3


class GoogLeNet(nn.Module):
    MODULES = {
        "3": [(64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64)],
        "4": [(192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64)]
        + [(128, 128, 256, 24, 64, 64), (112, 144, 288, 32, 64, 64)]
        + [(256, 160, 320, 32, 128, 128)],
        "5": [(256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128)],
    }

    def __init__(self, w=1.0, depth=(2, 5, 2), classes=1000):
        super().__init__()
        s = lambda c: ch(c, w)  # noqa: E731
        layers = [_BN3(3, s(64), 7, 2), nn.MaxPool2d(3, 2, ceil_mode=True)]
        layers += [_BN3(s(64), s(64), 1), _BN3(s(64), s(192), 3)]
        layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
        c = s(192)
        for i, (stage, n) in enumerate(zip("345", depth)):
            for spec in self.MODULES[stage][:n]:
                b1, r3, b3, r5, b5, pp = (s(v) for v in spec)
                m = Branches(
                    _BN3(c, b1, 1),
                    nn.Sequential(_BN3(c, r3, 1), _BN3(r3, b3, 3)),
                    nn.Sequential(_BN3(c, r5, 1), _BN3(r5, b5, 3)),
                    nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), _BN3(c, pp, 1)),
                )
                layers.append(m)
                c = m.out
            if i < 2:
                layers.append(nn.MaxPool2d(3 if i == 0 else 2, 2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        self.head = Head(c, classes)

    def forward(self, x):
        return self.head(self.features(x))


def _inception_a(c, s, pool):
    return Branches(
        _seq(c, (s(64), 1)),
        _seq(c, (s(48), 1), (s(64), 5)),
        _seq(c, (s(64), 1), (s(96), 3), (s(96), 3)),
        nn.Sequential(nn.AvgPool2d(3, 1, 1), CBA(c, s(pool), 1)),
    )


def _inception_b(c, s):
    return Branches(
        _seq(c, (s(384), 3, 2, 0)),
        _seq(c, (s(64), 1), (s(96), 3), (s(96), 3, 2, 0)),
        _PoolOut(nn.MaxPool2d(3, 2), c),
    )


def _inception_c(c, s, c7):
    return Branches(
        _seq(c, (s(192), 1)),
        _seq(c, (s(c7), 1), (s(c7), (1, 7)), (s(192), (7, 1))),
        _seq(c, (s(c7), 1), (s(c7), (7, 1)), (s(c7), (1, 7)), (s(c7), (7, 1)), (s(192), (1, 7))),
        nn.Sequential(nn.AvgPool2d(3, 1, 1), CBA(c, s(192), 1)),
    )


def _inception_d(c, s):
    return Branches(
        _seq(c, (s(192), 1), (s(320), 3, 2, 0)),
        _seq(c, (s(192), 1), (s(192), (1, 7)), (s(192), (7, 1)), (s(192), 3, 2, 0)),
        _PoolOut(nn.MaxPool2d(3, 2), c),
    )


class _PoolOut(nn.Sequential):
    def __init__(self, pool, c):
        super().__init__(pool)
        self.out = c


class _Fork(nn.Module):
    """A stem followed by a 1x3 and a 3x1 conv whose outputs are concatenated."""

    def __init__(self, stem, cin, cout):
        super().__init__()
        self.stem, self.a, self.b = stem, CBA(cin, cout, (1, 3)), CBA(cin, cout, (3, 1))
        self.out = 2 * cout

    def forward(self, x):
        x = self.stem(x)
        return torch.cat([self.a(x), self.b(x)], 1)


def _inception_e(c, s):
    return Branches(
        _seq(c, (s(320), 1)),
        _Fork(_seq(c, (s(384), 1)), s(384), s(384)),
        _Fork(_seq(c, (s(448), 1), (s(384), 3)), s(384), s(384)),
        nn.Sequential(nn.AvgPool2d(3, 1, 1), CBA(c, s(192), 1)),
    )


class InceptionV3(nn.Module):
    """Inception-v3 (no auxiliary head): `depth` = number of A, C and E modules."""

    def __init__(self, w=1.0, depth=(3, 4, 2), classes=1000):
        super().__init__()
        s = lambda c: ch(c, w)  # noqa: E731
        layers = [_seq(3, (s(32), 3, 2, 0), (s(32), 3, 1, 0), (s(64), 3))]
        layers += [nn.MaxPool2d(3, 2), _seq(s(64), (s(80), 1), (s(192), 3, 1, 0))]
        layers.append(nn.MaxPool2d(3, 2))
        c = s(192)
        for i in range(depth[0]):
            layers.append(_inception_a(c, s, 32 if i == 0 else 64))
            c = layers[-1].out
        layers.append(_inception_b(c, s))
        c = layers[-1].out
        for i in range(depth[1]):
            layers.append(_inception_c(c, s, [128, 160, 160, 192][i]))
            c = layers[-1].out
        layers.append(_inception_d(c, s))
        c = layers[-1].out
        for _ in range(depth[2]):
            layers.append(_inception_e(c, s))
            c = layers[-1].out
        self.features = nn.Sequential(*layers)
        self.head = Head(c, classes, dropout=0.5)

    def forward(self, x):
        return self.head(self.features(x))


class Fire(Branches):
    """SqueezeNet fire module: 1x1 squeeze, then 1x1 and 3x3 expands concatenated."""

    def __init__(self, cin, sq, ex):
        nn.Module.__init__(self)
        self.squeeze = nn.Sequential(nn.Conv2d(cin, sq, 1), nn.ReLU())
        self.branches = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(sq, ex, 1), nn.ReLU())]
            + [nn.Sequential(nn.Conv2d(sq, ex, 3, 1, 1), nn.ReLU())]
        )
        self.out = 2 * ex

    def forward(self, x):
        return super().forward(self.squeeze(x))


class SqueezeNet(nn.Module):
    """SqueezeNet 1.1; the classifier is a 1x1 conv before global pooling."""

    def __init__(self, w=1.0, classes=1000):
        super().__init__()
        s = lambda c: ch(c, w)  # noqa: E731
        pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
        layers, c = [nn.Conv2d(3, s(64), 3, 2), nn.ReLU(), pool()], s(64)
        for i, (sq, ex) in enumerate([(16, 64), (16, 64), (32, 128), (32, 128)]):
            layers.append(Fire(c, s(sq), s(ex)))
            c = layers[-1].out
            if i in (1, 3):
                layers.append(pool())
        for sq, ex in [(48, 192), (48, 192), (64, 256), (64, 256)]:
            layers.append(Fire(c, s(sq), s(ex)))
            c = layers[-1].out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Dropout(0.5),
            nn.Conv2d(c, classes, 1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x):
        return self.head(self.features(x))


# --- ShuffleNetV2 ------------------------------------------------------------------------


def shuffle(x, groups=2):
    n, c, h, w = x.shape
    x = x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin, cout, s):
        super().__init__()
        half = cout // 2
        c2 = cin if s > 1 else half
        self.s = s
        if s > 1:
            self.branch1 = nn.Sequential(CBA(cin, cin, 3, s, g=cin, act=None), CBA(cin, half, 1))
        self.branch2 = nn.Sequential(
            CBA(c2, half, 1), CBA(half, half, 3, s, g=half, act=None), CBA(half, half, 1)
        )

    def forward(self, x):
        if self.s == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat([x1, self.branch2(x2)], 1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], 1)
        return shuffle(out)


class ShuffleNetV2(nn.Module):
    def __init__(self, widths=(24, 116, 232, 464, 1024), repeats=(4, 8, 4), classes=1000):
        super().__init__()
        layers, c = [CBA(3, widths[0], 3, 2), nn.MaxPool2d(3, 2, 1)], widths[0]
        for out, n in zip(widths[1:4], repeats):
            for j in range(n):
                layers.append(ShuffleUnit(c, out, 2 if j == 0 else 1))
                c = out
        layers.append(CBA(c, widths[4], 1))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[4], classes)

    def forward(self, x):
        return self.fc(self.features(x).mean([2, 3]))


# --- plain: VGG, AlexNet -----------------------------------------------------------------


class Plain(nn.Module):
    """Conv features, adaptive pooling to `pool`, Flatten into a large Gemm, MLP classifier."""

    def __init__(self, features, c, pool, hidden, classes):
        super().__init__()
        self.features, self.pool = features, nn.AdaptiveAvgPool2d(pool)
        layers, cin = [], c * pool[0] * pool[1]
        for h in hidden:
            layers += [nn.Dropout(0.5), nn.Linear(cin, h), nn.ReLU()]
            cin = h
        self.classifier = nn.Sequential(*layers, nn.Linear(cin, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def vgg11_bn(w=1.0, pool=(7, 7), hidden=4096, classes=1000):
    layers, c = [], 3
    for v in [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers.append(CBA(c, ch(v, w), 3))
            c = ch(v, w)
    return Plain(nn.Sequential(*layers), c, pool, (hidden, hidden), classes)


def alexnet(w=1.0, pool=(6, 6), hidden=4096, classes=1000):
    s = lambda c: ch(c, w)  # noqa: E731
    layers = [nn.Conv2d(3, s(64), 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2)]
    layers += [nn.Conv2d(s(64), s(192), 5, 1, 2), nn.ReLU(), nn.MaxPool2d(3, 2)]
    c = s(192)
    for v in [384, 256, 256]:
        layers += [nn.Conv2d(c, s(v), 3, 1, 1), nn.ReLU()]
        c = s(v)
    layers.append(nn.MaxPool2d(3, 2))
    return Plain(nn.Sequential(*layers), c, pool, (hidden, hidden), classes)


# --- ConvNeXt, ViT -----------------------------------------------------------------------


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (permute, normalise, permute back)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, 1, 3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))
        self.gamma = nn.Parameter(torch.full((c,), 1e-6))

    def forward(self, x):
        y = self.mlp(self.norm(self.dw(x).permute(0, 2, 3, 1)))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, dims=(96, 192, 384, 768), depths=(3, 3, 9, 3), classes=1000):
        super().__init__()
        layers = [nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6)]
        for i, (d, n) in enumerate(zip(dims, depths)):
            if i:
                layers += [LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], d, 2, 2)]
            layers += [ConvNeXtBlock(d) for _ in range(n)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten()
        )
        self.fc = nn.Linear(dims[-1], classes)

    def forward(self, x):
        return self.fc(self.head(self.features(x)))


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.scale = heads, (d // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        n, length, d = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(n, length, d))


class EncoderBlock(nn.Module):
    def __init__(self, d, heads, mlp):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d, eps=1e-6), Attention(d, heads)
        self.ln2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, mlp), nn.GELU(), nn.Linear(mlp, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """ViT-B/16 by default: patch embedding conv, class token, pre-norm encoder blocks."""

    def __init__(self, image=224, patch=16, d=768, depth=12, heads=12, mlp=3072, classes=1000):
        super().__init__()
        self.embed = nn.Conv2d(3, d, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d) * 0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(d, heads, mlp) for _ in range(depth)])
        self.ln, self.fc = nn.LayerNorm(d, eps=1e-6), nn.Linear(d, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.fc(self.ln(self.blocks(x))[:, 0])


# --- the catalogue -----------------------------------------------------------------------


def _spec(make, full, tiny, res=224, tiny_res=32):
    return make, full, {**tiny, "classes": 10}, res, tiny_res


B, BN = dict(block=Basic), dict(block=Bottleneck)
ARCHS = {
    "resnet18": _spec(
        ResNet, {**B, "depths": (2, 2, 2, 2)}, {**B, "depths": (1,) * 4, "w": 1 / 16}
    ),
    "resnet50": _spec(
        ResNet, {**BN, "depths": (3, 4, 6, 3)}, {**BN, "depths": (2, 1, 1, 1), "w": 1 / 18}
    ),
    "resnext50": _spec(
        ResNet,
        {**BN, "depths": (3, 4, 6, 3), "groups": 32, "wpg": 4},
        {**BN, "depths": (2, 1, 1, 1), "w": 1 / 20, "groups": 4, "wpg": 32},
    ),
    "wide_resnet50": _spec(
        ResNet,
        {**BN, "depths": (3, 4, 6, 3), "wpg": 128},
        {**BN, "depths": (2, 1, 1, 1), "w": 1 / 28, "wpg": 128},
    ),
    "mobilenet_v2": _spec(MobileNetV2, {}, dict(w=0.1, depth=0.5)),
    "mobilenet_v3": _spec(MobileNetV3, {}, dict(w=0.08, depth=0.5)),
    "efficientnet_b0": _spec(EfficientNetB0, {}, dict(w=0.06, depth=0.5)),
    "mnasnet": _spec(MnasNet, {}, dict(w=0.08, depth=0.5)),
    "regnet_y_400mf": _spec(
        RegNet, {}, dict(widths=(8, 16, 24, 32), depths=(1, 2, 1, 1), gw=4, stem=8)
    ),
    "densenet121": _spec(DenseNet, {}, dict(growth=4, blocks=(2, 2, 2, 2), init=8, bn_size=2)),
    "googlenet": _spec(GoogLeNet, {}, dict(w=1 / 16, depth=(2, 1, 1)), tiny_res=64),
    "inception_v3": _spec(InceptionV3, {}, dict(w=1 / 22, depth=(1, 1, 1)), 299, 75),
    "squeezenet": _spec(SqueezeNet, {}, dict(w=1 / 8), tiny_res=64),
    "shufflenet_v2": _spec(ShuffleNetV2, {}, dict(widths=(8, 16, 32, 64, 64), repeats=(2, 2, 2))),
    "vgg11_bn": _spec(vgg11_bn, {}, dict(w=1 / 20, pool=(2, 2), hidden=16), tiny_res=64),
    "alexnet": _spec(alexnet, {}, dict(w=1 / 16, pool=(2, 2), hidden=32), tiny_res=96),
    "convnext_t": _spec(ConvNeXt, {}, dict(dims=(8, 12, 16, 24), depths=(1, 1, 2, 1)), tiny_res=64),
    "vit_b_16": _spec(ViT, {}, dict(image=32, patch=8, d=16, depth=2, heads=2, mlp=32)),
}
CNN = [name for name in ARCHS if name != "vit_b_16"]


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Eval mode with random normalisation statistics and scales (so BatchNorm, LayerNorm and
    layer scale are not identities); returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                n = m.weight.shape
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if isinstance(m, ConvNeXtBlock):
                m.gamma.copy_(torch.rand(m.gamma.shape, generator=g) + 0.5)
            if isinstance(m, ViT):
                m.cls.copy_(torch.randn(m.cls.shape, generator=g))
    return model.eval()


def build(name: str, tiny: bool = False, seed: int = 0) -> tuple[nn.Module, int]:
    """(randomized eval-mode model, input resolution) of one architecture."""
    make, full, small, res, tiny_res = ARCHS[name]
    torch.manual_seed(seed)
    return randomize(make(**(small if tiny else full)), seed), tiny_res if tiny else res
