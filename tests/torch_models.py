"""PyTorch models built in the tests (no hub), named as ``tests.torch_models:FUNCTION`` (edgeq's
``module:function`` contract: return ``(nn.Module, batch-1 example input)``)."""

from __future__ import annotations

import numpy as np

from edgeq.torch_convert import keep_triton_out

keep_triton_out()  # before torch: triton segfaults on import once TensorFlow is loaded (see there)

import torch  # noqa: E402
from torch import nn  # noqa: E402


def digits_split() -> dict[str, np.ndarray]:
    """scikit-learn's digits as NCHW float32 images in [0, 1], split 70/30 like tests/conftest.py's."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype("float32") / 16.0)[:, None]
    y = d.target.astype("int64")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    n = int(len(x) * 0.7)
    return {"x_train": x[:n], "y_train": y[:n], "x_test": x[n:], "y_test": y[n:]}


class DigitsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(image)))
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


_TRAINED: dict[str, nn.Module] = {}


def digits_cnn() -> tuple[nn.Module, torch.Tensor]:
    """The small CNN trained on digits for a few seconds (seeded; trained once per process)."""
    data = digits_split()
    if "digits" not in _TRAINED:
        torch.manual_seed(0)
        model = DigitsNet()
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        x, y = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
        for _ in range(8):
            perm = torch.randperm(len(x))
            for i in range(0, len(x), 64):
                idx = perm[i:i + 64]
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        _TRAINED["digits"] = model.eval()
    return _TRAINED["digits"], torch.from_numpy(data["x_train"][:1])


class _ConvBNReLU6(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [] if expand == 1 else [_ConvBNReLU6(cin, hidden, 1)]
        layers += [_ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 as torchvision.models.mobilenet_v2 builds it (width 1.0): built here because
    PyPI's torchvision wheels do not load with the CPU-only torch wheel ("torchvision::nms does not exist")."""

    # expansion t, channels c, repeats n, stride s (Sandler et al., 2018, table 2)
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [_ConvBNReLU6(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_ConvBNReLU6(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2() -> tuple[nn.Module, torch.Tensor]:
    """MobileNetV2 (random weights, BatchNorm statistics from a few random batches, 10 classes) at 64x64."""
    torch.manual_seed(0)
    model = MobileNetV2(10)
    model.train()
    with torch.no_grad():  # realistic BatchNorm statistics instead of the (0, 1) defaults
        for _ in range(4):
            model(torch.rand(8, 3, 64, 64))
    return model.eval(), torch.rand(1, 3, 64, 64)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.meta_fc = nn.Linear(4, 8)
        self.head = nn.Linear(16, 5)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv(image)).mean((2, 3))
        b = torch.relu(self.meta_fc(meta))
        return self.head(torch.cat([a, b], 1))


def two_inputs() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    return TwoInputs().eval(), (torch.rand(1, 3, 16, 16), torch.rand(1, 4))


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # Python branching on a tensor value: torch.export cannot trace it
            return x * 2
        return x


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.fc(x))


def gated() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Gated().eval(), torch.rand(1, 4)


class Wave(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x)


class SineNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.wave = Wave()
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.wave(self.fc(x)))


def sine_net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return SineNet().eval(), torch.rand(1, 4)
