"""Small PyTorch models exported to ONNX for the target, input-form and runtime tests, and the autograd
reference they are checked against."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class SmallNet(nn.Module):
    """conv-bn-relu, maxpool, conv-relu, global pool, linear; optional softmax head and second output."""

    def __init__(self, classes: int = 10, softmax: bool = False, two_heads: bool = False, nhwc: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, classes)
        self.fc2 = nn.Linear(16, 5) if two_heads else None
        self.softmax, self.nhwc = softmax, nhwc
        with torch.no_grad():
            self.bn1.running_mean.uniform_(-0.2, 0.2)
            self.bn1.running_var.uniform_(0.5, 2.0)
        self.eval()

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.nhwc:
            x = x.permute(0, 3, 1, 2)
        a1 = F.relu(self.bn1(self.conv1(x)))
        a2 = torch.relu(self.conv2(F.max_pool2d(a1, 2)))
        return a1, a2

    def forward(self, x: torch.Tensor):
        _, a2 = self.features(x)
        pooled = a2.mean(dim=(2, 3))
        logits = self.fc(pooled)
        out = torch.softmax(logits, dim=1) if self.softmax else logits
        if self.fc2 is not None:
            return out, self.fc2(pooled)
        return out


def export(model: nn.Module, path: Path, example: torch.Tensor, opset: int | None = None, dynamo: bool = False,
           dynamic_batch: bool = True, dynamic_spatial: bool = False, input_names=("image",), extra=()) -> Path:
    args = (example, *extra)
    axes = {}
    if dynamic_batch:
        axes = {0: "N"}
    if dynamic_spatial:
        axes.update({2: "H", 3: "W"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = dict(input_names=list(input_names), dynamo=dynamo)
        if opset is not None:
            kwargs["opset_version"] = opset
        if dynamo:
            if axes:
                dims = {k: torch.export.Dim(v, min=2 if v != "N" else 1, max=4096) for k, v in axes.items()}
                kwargs["dynamic_shapes"] = (dims,) + tuple(None for _ in extra)
        else:
            kwargs["dynamic_axes"] = {input_names[0]: axes} if axes else None
        torch.onnx.export(model, args, str(path), **kwargs)
    return path


def autograd_map(fn, x: np.ndarray) -> np.ndarray:
    """Gradient of sum(fn(x)) with respect to x, in float64."""
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    fn(xt).sum().backward()
    return xt.grad.numpy()


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
