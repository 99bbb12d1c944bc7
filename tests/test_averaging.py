import torch

from toolkit.averaging import UPDATE_EVERY_STEPS, WeightAverage


def test_average_follows_the_weights_with_a_warm_up():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    average = WeightAverage(model, decay_per_step=0.999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    average.update(model, step=1)  # between updates: nothing happens
    assert float(average.module.weight) == 0.0
    average.update(model, step=UPDATE_EVERY_STEPS)
    # first update: decay min(0.999^4, 2/11): mostly the new weights, so the random start fades at once
    assert float(average.module.weight) == torch.tensor(1 - 2 / 11).item()
    for step in range(2 * UPDATE_EVERY_STEPS, 400 * UPDATE_EVERY_STEPS, UPDATE_EVERY_STEPS):
        average.update(model, step)
    assert 0.999 < float(average.module.weight) <= 1.0
    assert average.updates == 399
    assert not average.module.weight.requires_grad and not average.module.training
