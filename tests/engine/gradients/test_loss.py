"""token_nll against torch's cross-entropy: values and gradients, any chunking, any dtype."""

import pytest
import torch
import torch.nn.functional as F

from attribution_assets.engine.gradients import loss


@pytest.mark.parametrize("chunk_floats", [1 << 24, 7 * 11])  # one chunk; ragged chunks of 7 rows
def test_values_and_gradients_equal_cross_entropy(monkeypatch, chunk_floats):
    monkeypatch.setattr(loss, "_CHUNK_FLOATS", chunk_floats)
    torch.manual_seed(0)
    logits = (torch.randn(30, 11, dtype=torch.float64) * 4).requires_grad_(True)
    targets = torch.randint(0, 11, (30,))
    weights = torch.randn(30, dtype=torch.float64)
    ours = loss.token_nll(logits, targets)
    (ours.double() * weights).sum().backward()
    ours_grad = logits.grad.clone()
    logits.grad = None
    reference = F.cross_entropy(logits, targets, reduction="none")
    (reference * weights).sum().backward()
    torch.testing.assert_close(ours.double(), reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_grad, logits.grad, rtol=1e-6, atol=1e-6)


def test_low_precision_logits_reduce_in_float32():
    torch.manual_seed(1)
    full = torch.randn(16, 50) * 3
    half = full.bfloat16().requires_grad_(True)
    targets = torch.randint(0, 50, (16,))
    ours = loss.token_nll(half, targets)
    assert ours.dtype == torch.float32
    reference = F.cross_entropy(half.detach().float(), targets, reduction="none")
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    ours.sum().backward()
    assert half.grad.dtype == torch.bfloat16
    expected = torch.softmax(half.detach().float(), -1) - F.one_hot(targets, 50)
    torch.testing.assert_close(half.grad.float(), expected, rtol=0, atol=1e-2)


def test_shape_errors_name_the_expected_shapes():
    with pytest.raises(ValueError, match=r"logits \[N, V\] and targets \[N\]"):
        loss.token_nll(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))
