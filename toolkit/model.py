"""AlexNet for MNIST: the reference tutorial's network, layer for layer.

`python -m toolkit.model [--image-size 224]` prints a summary: each layer's output shape, the parameter
count and the FLOPs per image for a forward pass and for a training step.
"""

from __future__ import annotations

import argparse
import functools

import torch
from torch import nn

from toolkit import devices

NUM_CLASSES = 10
IN_CHANNELS = 1
# The last max-pool leaves 256 x 5 x 5 = 6400 features at 224 px; the classifier is sized for that grid.
POOLED_GRID = 5
INIT_SCHEMES = ("kaiming", "default")


class AlexNet(nn.Module):
    """The reference network, with an adaptive pool before the classifier so it takes any input size the
    convolutions can (see `pool`).

    Parameter names map one to one onto the reference's single `model` Sequential:
    reference `model.{i}` is `features.{i}` for i <= 12 and `classifier.{i - 13}` after that
    (see `from_reference_state_dict`).
    """

    def __init__(self, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(IN_CHANNELS, 96, kernel_size=11, stride=4, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(96, 256, kernel_size=5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(256, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(POOLED_GRID)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(256 * POOLED_GRID * POOLED_GRID, 4096), nn.ReLU(inplace=True), nn.Dropout(p=dropout),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(p=dropout),
            nn.Linear(4096, NUM_CLASSES),
        )
        self.min_input_size = smallest_input_size(self.features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, 1, H, W) -> features (N, 256, h, w) -> pooled (N, 256, 5, 5) -> logits (N, 10)
        if x.shape[-1] < self.min_input_size or x.shape[-2] < self.min_input_size:
            raise ValueError(
                f"AlexNet needs inputs of at least {self.min_input_size}x{self.min_input_size} pixels, "
                f"got {x.shape[-2]}x{x.shape[-1]}"
            )
        return self.classifier(self.pool(self.features(x)))

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """(N, 256, h, w) -> (N, 256, 5, 5). At 224 px the features are 5x5 already and the pool, an identity,
        is skipped. Where the device's own adaptive pool cannot run (on MPS at most sizes, on CUDA under
        deterministic algorithms: `devices.adaptive_pool_is_native`), two small matrix products compute the same
        averages."""
        grid = (features.shape[-2], features.shape[-1])
        if grid == (POOLED_GRID, POOLED_GRID):
            return features
        if devices.adaptive_pool_is_native(features.device, grid, (POOLED_GRID, POOLED_GRID)):
            return self.avgpool(features)
        return adaptive_avg_pool_by_matmul(features, POOLED_GRID)


def adaptive_avg_pool_matrix(in_size: int, out_size: int, device: torch.device | str | None = None,
                             dtype: torch.dtype | None = None) -> torch.Tensor:
    """(out_size, in_size): row i averages the inputs AdaptiveAvgPool gives output i,
    [floor(i * in / out), ceil((i + 1) * in / out)). Built on `device`: no host-to-device copy per step."""
    i = torch.arange(out_size, device=device)[:, None]
    start, stop = i * in_size // out_size, -(-(i + 1) * in_size // out_size)
    j = torch.arange(in_size, device=device)
    return ((j >= start) & (j < stop)).to(dtype or torch.get_default_dtype()) / (stop - start)


def adaptive_avg_pool_by_matmul(x: torch.Tensor, out_size: int) -> torch.Tensor:
    """`F.adaptive_avg_pool2d(x, out_size)` as rows @ x @ cols^T: (N, C, h, w) -> (N, C, out, out)."""
    rows = adaptive_avg_pool_matrix(x.shape[-2], out_size, x.device, x.dtype)
    cols = adaptive_avg_pool_matrix(x.shape[-1], out_size, x.device, x.dtype)
    return rows @ x @ cols.T


def feature_grid(features: nn.Sequential, size: int) -> int:
    """The side of the feature map `features` makes of a square input of `size` pixels (0 if nothing is left)."""
    for layer in features:
        if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
            kernel, stride, padding = (_first(getattr(layer, a)) for a in ("kernel_size", "stride", "padding"))
            size = (size + 2 * padding - kernel) // stride + 1
            if size < 1:
                return 0
    return size


def smallest_input_size(features: nn.Sequential) -> int:
    """The smallest square input that leaves at least one pixel after every convolution and pooling."""
    size = 1
    while feature_grid(features, size) < 1:
        size += 1
    return size


def _first(value: int | tuple[int, ...]) -> int:
    return value[0] if isinstance(value, tuple) else value


def init_weights(model: AlexNet, scheme: str) -> None:
    """`default` keeps PyTorch's initialisation (the reference's). `kaiming` uses He-normal weights and zero
    biases, with a small last layer: with the default, this 8-layer ReLU network without normalisation sits
    at chance for hundreds of SGD steps before it starts to learn."""
    if scheme == "default":
        return
    if scheme != "kaiming":
        raise ValueError(f"unknown init scheme {scheme!r}; choose one of {', '.join(INIT_SCHEMES)}")
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    # Zero logits at the start: the loss begins at ln(10) instead of a random guess held with confidence.
    nn.init.zeros_(model.classifier[-1].weight)


def build_model(init: str = "kaiming", dropout: float = 0.5) -> AlexNet:
    model = AlexNet(dropout=dropout)
    init_weights(model, init)
    return model


def from_reference_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a reference state_dict (`model.{i}.weight`) to this module's names."""
    renamed = {}
    first_classifier = len(AlexNet().features)  # 13: the reference's Flatten
    for key, value in state_dict.items():
        prefix, index, rest = key.split(".", 2)
        if prefix != "model":
            raise KeyError(f"not a reference AlexNet key: {key}")
        index = int(index)
        if index < first_classifier:
            renamed[f"features.{index}.{rest}"] = value
        else:
            renamed[f"classifier.{index - first_classifier}.{rest}"] = value
    return renamed


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, image_size: int) -> tuple[int, int]:
    """FLOPs per image for a forward pass and for a training step (forward + backward), counted by
    `torch.utils.flop_counter` on a batch of one on the CPU."""
    # imported here: it imports triton where it is installed, a quarter of a second every command would pay
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    x = torch.zeros(1, IN_CHANNELS, image_size, image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model(x)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return forward, counter.get_total_flops()


@functools.lru_cache(maxsize=8)
def flops_per_image(image_size: int) -> tuple[int, int]:
    """`count_flops` of this network at `image_size`, counted on the meta device: shapes only, no arithmetic, so
    milliseconds at any size (a real pass at 4096 px takes a CPU minutes)."""
    with torch.device("meta"):
        model = AlexNet()
    return count_flops(model, image_size)


def layer_shapes(model: AlexNet, image_size: int) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(name, layer, output shape, parameters) for each leaf layer, from one forward pass."""
    rows = []
    hooks = []
    for name, module in model.named_modules():
        if len(list(module.children())) == 0:
            params = sum(p.numel() for p in module.parameters())
            hooks.append(module.register_forward_hook(
                lambda m, _inp, out, name=name, params=params: rows.append(
                    (name, m.__class__.__name__, tuple(out.shape[1:]), params))))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, IN_CHANNELS, image_size, image_size))
    finally:
        for hook in hooks:
            hook.remove()
    return rows


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from toolkit.errors import UsageError, exit_on_user_error

    parser = argparse.ArgumentParser(prog="python -m toolkit.model", description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224, help="input size in pixels (default 224)")
    args = parser.parse_args(argv)
    model = build_model()
    console = Console()
    with exit_on_user_error("toolkit.model"):
        if args.image_size < model.min_input_size:
            raise UsageError(f"--image-size must be at least {model.min_input_size} for this network, got "
                             f"{args.image_size}")

    table = Table(title=f"AlexNet on {args.image_size}x{args.image_size} MNIST", title_justify="left")
    for column in ("layer", "type", "output shape"):
        table.add_column(column)
    table.add_column("parameters", justify="right")
    for name, kind, shape, params in layer_shapes(model, args.image_size):
        table.add_row(name, kind, " x ".join(map(str, shape)), f"{params:,}" if params else "")
    console.print(table)
    forward, step = count_flops(model, args.image_size)
    console.print(f"parameters: {count_parameters(model):,}")
    console.print(f"smallest input: {model.min_input_size}x{model.min_input_size}")
    console.print(f"GFLOP per image: forward {forward / 1e9:.3f}, training step {step / 1e9:.3f}")


if __name__ == "__main__":
    main()
