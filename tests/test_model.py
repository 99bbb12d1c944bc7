import importlib.util

import pytest
import torch
from conftest import REFERENCE_SEED, run_module

from toolkit import devices
from toolkit.model import (
    AlexNet,
    build_model,
    count_flops,
    count_parameters,
    feature_grid,
    flops_per_image,
    from_reference_state_dict,
    init_weights,
)

# The reference network's parameters, in order: (name in the reference's `model` Sequential, shape).
REFERENCE_PARAMETERS = [
    ("model.0.weight", (96, 1, 11, 11)), ("model.0.bias", (96,)),
    ("model.3.weight", (256, 96, 5, 5)), ("model.3.bias", (256,)),
    ("model.6.weight", (384, 256, 3, 3)), ("model.6.bias", (384,)),
    ("model.8.weight", (384, 384, 3, 3)), ("model.8.bias", (384,)),
    ("model.10.weight", (256, 384, 3, 3)), ("model.10.bias", (256,)),
    ("model.14.weight", (4096, 6400)), ("model.14.bias", (4096,)),
    ("model.17.weight", (4096, 4096)), ("model.17.bias", (4096,)),
    ("model.20.weight", (10, 4096)), ("model.20.bias", (10,)),
]


def test_parameter_count_matches_reference():
    assert count_parameters(AlexNet()) == 46_764_746


def test_parameters_map_one_to_one_onto_the_reference():
    reference = {name: torch.zeros(shape) for name, shape in REFERENCE_PARAMETERS}
    renamed = from_reference_state_dict(reference)
    ours = AlexNet().state_dict()
    assert list(renamed) == list(ours)
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {k: tuple(v.shape) for k, v in ours.items()}


def test_layers_in_reference_order():
    model = AlexNet()
    kinds = [type(m).__name__ for m in [*model.features, model.avgpool, *model.classifier]]
    assert kinds == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "Conv2d",
                     "ReLU", "Conv2d", "ReLU", "MaxPool2d", "AdaptiveAvgPool2d", "Flatten", "Linear", "ReLU",
                     "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    conv = model.features[0]
    assert (conv.kernel_size, conv.stride, conv.padding) == ((11, 11), (4, 4), (1, 1))
    assert [m.p for m in model.classifier if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]


@pytest.mark.skipif(not (REFERENCE_SEED / "model.py").is_file(),
                    reason="the reference program (../shared/reference/seed/model.py) is not beside this checkout")
def test_reference_weights_give_identical_outputs_at_224():
    spec = importlib.util.spec_from_file_location("reference_model", REFERENCE_SEED / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    reference = module.AlexNet().eval()
    ours = AlexNet().eval()
    ours.load_state_dict(from_reference_state_dict(reference.state_dict()))
    x = torch.rand(2, 1, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)


def test_any_size_the_convolutions_take():
    model = build_model().eval()
    with torch.no_grad():
        for size in (65, 96, 224, 300):
            assert model(torch.zeros(2, 1, size, size)).shape == (2, 10)


def test_too_small_input_names_the_smallest_size():
    model = AlexNet()
    assert model.min_input_size == 65
    with pytest.raises(ValueError, match="at least 65x65"):
        model(torch.zeros(1, 1, 28, 28))
    with pytest.raises(ValueError, match="at least 65x65"):
        model(torch.zeros(1, 1, 64, 64))


def test_flops_per_image_match_the_reference_figures():
    forward, step = count_flops(AlexNet(), 224)
    assert round(forward / 1e9, 3) == 1.876
    assert round(step / 1e9, 2) == 5.56
    # counted on the meta device (no arithmetic), the same figures, at any size in milliseconds
    assert flops_per_image(224) == (forward, step)
    assert flops_per_image(4096)[1] > 300 * step


def test_kaiming_init_zero_biases_and_default_init_untouched():
    torch.manual_seed(0)
    default = AlexNet()
    torch.manual_seed(0)
    untouched = AlexNet()
    init_weights(untouched, "default")
    pairs = zip(default.state_dict().values(), untouched.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    kaiming = build_model("kaiming")
    assert all(not m.bias.detach().any() for m in kaiming.modules() if getattr(m, "bias", None) is not None)
    std = float(kaiming.features[0].weight.detach().std())
    assert abs(std - (2 / 121) ** 0.5) < 0.02  # He-normal: sqrt(2 / fan_in), fan_in = 1 x 11 x 11


@pytest.mark.slow
def test_summary_command_prints_shapes_parameters_and_flops():
    result = run_module("toolkit.model", "--image-size", "224")
    assert result.returncode == 0, result.stderr
    assert "46,764,746" in result.stdout
    assert "256 x 5 x 5" in result.stdout
    assert "forward 1.876" in result.stdout and "training step 5.561" in result.stdout
    small = run_module("toolkit.model", "--image-size", "28")
    assert small.returncode == 2 and small.stdout == ""
    assert small.stderr.splitlines() == ["toolkit.model: error: --image-size must be at least 65 for this network, "
                                         "got 28"]


def _pool_calls(model: AlexNet, size: int) -> int:
    calls = []
    hook = model.avgpool.register_forward_hook(lambda *_: calls.append(1))
    try:
        model(torch.rand(2, 1, size, size)).sum().backward()
    finally:
        hook.remove()
    return len(calls)


def test_pool_is_skipped_where_it_would_be_an_identity():
    # At 224 px the features are 5x5 already. Skipping the pool there keeps deterministic CUDA training
    # possible: AdaptiveAvgPool2d's CUDA backward raises under torch.use_deterministic_algorithms.
    model = build_model()
    assert _pool_calls(model, 224) == 0
    assert _pool_calls(model, 96) == 1
    assert "avgpool" in dict(model.named_children())  # the module stays, for names and the reference mapping


@pytest.mark.parametrize("in_size", [1, 2, 3, 4, 5, 6, 7, 8, 13])
def test_matmul_pool_equals_adaptive_avg_pool_with_its_gradient(in_size):
    from toolkit.model import adaptive_avg_pool_by_matmul

    x = torch.randn(3, 4, in_size, in_size + 2, requires_grad=True)
    expected = torch.nn.functional.adaptive_avg_pool2d(x, 5)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    pooled = adaptive_avg_pool_by_matmul(x, 5)
    (grad,) = torch.autograd.grad(pooled.square().sum(), x)
    # equal up to the order of float additions
    torch.testing.assert_close(pooled, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-6)


def test_deterministic_cuda_pools_by_matmul(monkeypatch):
    model = build_model().eval()
    x = torch.rand(2, 1, 96, 96)
    with torch.no_grad():
        native = model(x)
    # as on CUDA under deterministic algorithms, where the pool's backward raises
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    real = devices.adaptive_pool_is_native
    monkeypatch.setattr(devices, "adaptive_pool_is_native", lambda device, grid, out: real("cuda", grid, out))
    assert _pool_calls(model, 96) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), native, rtol=0, atol=1e-6)


NATIVE_POOL = torch.nn.functional.adaptive_avg_pool2d

# Issue 18, on a Mac: these image sizes crashed in the pool (training, evaluation, prediction, bench); 65-96,
# 193-224 and 353-384 px ran.
MPS_CRASHED = set(range(97, 193)) | set(range(225, 353)) | set(range(385, 513))


def mps_kernel_pool(x: torch.Tensor, output_size) -> torch.Tensor:
    """F.adaptive_avg_pool2d with the checks MPS's kernel makes first (`set_kernel_params` in
    aten/src/ATen/native/mps/operations/AdaptivePooling.mm), standing in for MPS on the CPU."""
    (in_h, in_w), (out_h, out_w) = x.shape[-2:], torch.nn.modules.utils._pair(output_size)
    if not ((in_h >= out_h and in_w >= out_w) or (in_h <= out_h and in_w <= out_w)):
        raise NotImplementedError("Adaptive pool MPS: Input height and width must both be greater than, ...")
    if in_h >= out_h and (in_h % out_h or in_w % out_w):
        raise NotImplementedError("Adaptive pool MPS: input sizes must be divisible by output sizes. ...")
    if in_h < out_h and (out_h % in_h or out_w % in_w):
        raise NotImplementedError("Adaptive pool MPS: output sizes must be divisible by input sizes. ...")
    return NATIVE_POOL(x, output_size)


@pytest.fixture(scope="module")
def network() -> AlexNet:
    """One network for the tests that only read it (building one takes about half a second)."""
    return AlexNet().eval()


@pytest.fixture
def as_on_mps(monkeypatch):
    """The model's device decisions made for MPS, and the pool failing where MPS's does."""
    real = devices.adaptive_pool_is_native
    monkeypatch.setattr(devices, "adaptive_pool_is_native", lambda device, grid, out: real("mps", grid, out))
    monkeypatch.setattr(torch.nn.functional, "adaptive_avg_pool2d", mps_kernel_pool)


def test_mps_pools_natively_exactly_at_the_sizes_that_ran(network):
    for size in range(65, 513):
        grid = feature_grid(network.features, size)
        assert devices.adaptive_pool_is_native("mps", (grid, grid), (5, 5)) is (size not in MPS_CRASHED), size
        assert devices.adaptive_pool_is_native("cpu", (grid, grid), (5, 5))


def _pooled_with_gradient(pool, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    pooled = pool(x)
    (grad,) = torch.autograd.grad(pooled.square().sum(), x)
    return pooled.detach(), grad


def test_every_size_pools_on_mps_as_the_native_pool_does_on_the_cpu(network, as_on_mps):
    grids = {feature_grid(network.features, size) for size in range(65, 513)}
    assert grids == set(range(1, 15))
    for grid in sorted(grids):
        x = torch.randn(2, 3, grid, grid)
        if grid not in (1, 5, 10):
            with pytest.raises(NotImplementedError):
                mps_kernel_pool(x, 5)  # the stand-in refuses where MPS does
        pooled, grad = _pooled_with_gradient(network.pool, x)
        expected, expected_grad = _pooled_with_gradient(lambda t: NATIVE_POOL(t, 5), x)
        torch.testing.assert_close(pooled, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-6)


def test_the_model_runs_on_mps_at_a_size_that_crashed(network, as_on_mps):
    # the pool's backward at every size is checked above; here, that the forward pass goes through it
    x = torch.rand(1, 1, 112, 112)  # 3x3 features: MPS's own pool refuses 3 -> 5
    with torch.no_grad():
        features = network.features(x)
        torch.testing.assert_close(network(x), network.classifier(NATIVE_POOL(features, 5)), rtol=1e-5, atol=1e-6)
