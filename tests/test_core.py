import torch
from torch import nn

from fedleak.core import Batch, ServerView, Task


def tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Sigmoid(), nn.Linear(8, 3))
    batch = Batch(torch.randn(2, 1, 4, 4), torch.tensor([0, 2]))
    return model, batch, Task("image", (1, 4, 4), 3)


def test_gradient_of_a_local_step_equals_autograd():
    model, batch, task = tiny()
    view = ServerView.from_local_step(model, batch, task, lr=0.3)
    model.zero_grad()
    nn.functional.cross_entropy(model(batch.inputs), batch.labels).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(view.gradient()[name], p.grad, rtol=1e-4, atol=1e-6)
    assert view.num_examples == 2 and view.local_steps == 1


def test_view_model_is_a_fresh_copy_of_what_was_sent():
    model, batch, task = tiny()
    view = ServerView.from_local_step(model, batch, task)
    fresh = view.model()
    assert fresh is not model
    with torch.no_grad():
        fresh[1].weight.add_(1.0)
    torch.testing.assert_close(view.model()[1].weight, view.sent["1.weight"])


def test_to_pixels_undoes_normalisation():
    task = Task("image", (1, 2, 2), 2, mean=(0.5,), std=(0.25,))
    pixels = torch.rand(3, 1, 2, 2)
    torch.testing.assert_close(task.to_pixels((pixels - 0.5) / 0.25), pixels)
