"""Combined margin logits: hand-computed values, gradient policies, filtering, bad input."""

import math

import pytest
import torch

from otface.margin import CombinedMarginLoss, margin_logits

COS = torch.tensor(
    [
        [0.6, 0.8, -0.2],
        [0.0, 0.5, 1.0],
        [-0.3, 0.1, 0.7],
    ],
    dtype=torch.float64,
)
LABELS = torch.tensor([0, 2, -1])


def _expected(target_fn, s=64.0):
    """s·cos everywhere, s·target_fn(cos) at (0, 0) and (1, 2); row 2 has no target."""
    out = [[s * c for c in row] for row in COS.tolist()]
    out[0][0] = s * target_fn(0.6)
    out[1][2] = s * target_fn(1.0)
    return torch.tensor(out, dtype=torch.float64)


def test_arcface_values():
    m = 0.5
    # cos(θ + m) = cos θ cos m − sin θ sin m, sin θ = sqrt(1 − cos²θ)
    expected = _expected(lambda c: c * math.cos(m) - math.sqrt(1 - c * c) * math.sin(m))
    got = margin_logits(COS, LABELS, scale=64.0, m1=1.0, m2=m, m3=0.0)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-10)
    assert got[0, 0].item() == pytest.approx(64 * (0.6 * math.cos(0.5) - 0.8 * math.sin(0.5)))
    assert got[1, 2].item() == pytest.approx(64 * math.cos(0.5))


def test_cosface_values_exact():
    expected = _expected(lambda c: c - 0.4)
    got = margin_logits(COS, LABELS, scale=64.0, m1=1.0, m2=0.0, m3=0.4)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_multiplicative_margin_chebyshev():
    # cos(2θ) = 2cos²θ − 1 (SphereFace-style m1 = 2), with m3 on top.
    expected = _expected(lambda c: 2 * c * c - 1 - 0.1, s=30.0)
    got = margin_logits(COS, LABELS, scale=30.0, m1=2.0, m2=0.0, m3=0.1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-10)


def test_combined_margin_uses_all_three_terms():
    # arcface_torch ignores m1, m2 when m3 > 0; the general formula must not.
    m1, m2, m3 = 0.9, 0.4, 0.15
    expected = _expected(lambda c: math.cos(m1 * math.acos(c) + m2) - m3)
    module = CombinedMarginLoss(64.0, m1, m2, m3)
    got = module(COS, LABELS.view(-1, 1))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-10)
    # cos(0.9·acos 0.6 + 0.4) − 0.15, computed by hand: acos 0.6 = 0.927295...
    assert got[0, 0].item() / 64 == pytest.approx(math.cos(0.9 * 0.9272952180 + 0.4) - 0.15)


def test_input_not_modified():
    cos = COS.clone()
    margin_logits(
        cos, LABELS, scale=64.0, m1=1.0, m2=0.5, m3=0.0, interclass_filtering_threshold=0.2
    )
    assert torch.equal(cos, COS)


@pytest.mark.parametrize("margins", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4), (0.9, 0.3, 0.1)])
def test_default_gradient_is_straight_through(margins):
    m1, m2, m3 = margins
    cos = COS.clamp(-0.99, 0.99).clone().requires_grad_(True)
    upstream = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = margin_logits(cos, LABELS, scale=64.0, m1=m1, m2=m2, m3=m3)
    (out * upstream).sum().backward()
    # Plain s·cos has gradient s·upstream everywhere, the target columns included.
    torch.testing.assert_close(cos.grad, 64.0 * upstream, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "margins", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4), (0.9, 0.3, 0.1), (2.0, 0.0, 0.0)]
)
def test_exact_grad_passes_gradcheck(margins):
    m1, m2, m3 = margins
    gen = torch.Generator().manual_seed(1)
    cos = (torch.rand(5, 4, dtype=torch.float64, generator=gen) * 1.8 - 0.9).requires_grad_(True)
    labels = torch.tensor([0, 3, -1, 1, 2])

    def f(c):
        return margin_logits(
            c,
            labels,
            scale=10.0,
            m1=m1,
            m2=m2,
            m3=m3,
            exact_grad=True,
            interclass_filtering_threshold=0.5,
        )

    assert torch.autograd.gradcheck(f, (cos,), eps=1e-6, atol=1e-6)


def test_exact_grad_arcface_derivative_by_hand():
    m = 0.5
    c = torch.tensor([[0.3, -0.6]], dtype=torch.float64, requires_grad=True)
    margin_logits(
        c, torch.tensor([0]), scale=2.0, m1=1.0, m2=m, m3=0.0, exact_grad=True
    ).sum().backward()
    # d/dc [c cos m − sqrt(1 − c²) sin m] = cos m + c sin m / sqrt(1 − c²)
    expected0 = 2.0 * (math.cos(m) + 0.3 * math.sin(m) / math.sqrt(1 - 0.09))
    torch.testing.assert_close(c.grad, torch.tensor([[expected0, 2.0]], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("margins", [(1.0, 0.5, 0.0), (2.0, 0.0, 0.0), (0.9, 0.3, 0.1)])
def test_exact_grad_finite_at_plus_minus_one(dtype, margins):
    m1, m2, m3 = margins
    cos = torch.tensor([[1.0, 0.2], [0.3, -1.0]], dtype=dtype, requires_grad=True)
    out = margin_logits(cos, torch.tensor([0, 1]), scale=64.0, m1=m1, m2=m2, m3=m3, exact_grad=True)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(cos.grad).all()
    # value stays exact at the end points: cos(m1·0 + m2) and cos(m1·π + m2)
    assert out[0, 0].item() == pytest.approx(64 * (math.cos(m2) - m3), rel=1e-5)
    assert out[1, 1].item() == pytest.approx(64 * (math.cos(m1 * math.pi + m2) - m3), abs=1e-3)
    if (m1, m2) == (2.0, 0.0):
        # d/dc (2c² − 1) = 4c: the removable singularity is handled near its limit ±4.
        assert cos.grad[0, 0].item() == pytest.approx(64 * 4.0, rel=1e-3)
        assert cos.grad[1, 1].item() == pytest.approx(64 * -4.0, rel=1e-3)


def test_interclass_filtering_hand_case():
    cos = torch.tensor(
        [[0.5, 0.4, 0.2], [0.35, 0.1, -0.5], [0.9, 0.31, 0.3]], dtype=torch.float64
    ).requires_grad_(True)
    labels = torch.tensor([0, -1, 0])
    out = margin_logits(
        cos, labels, scale=2.0, m1=1.0, m2=0.0, m3=0.1, interclass_filtering_threshold=0.3
    )
    # negatives above 0.3 become 0; targets (even above 0.3) and the rest are kept
    expected = 2.0 * torch.tensor(
        [[0.5 - 0.1, 0.0, 0.2], [0.0, 0.1, -0.5], [0.9 - 0.1, 0.0, 0.3]], dtype=torch.float64
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    out.sum().backward()
    grad_mask = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(cos.grad, 2.0 * grad_mask, rtol=0, atol=0)


def test_threshold_zero_disables_filtering():
    out = margin_logits(COS, LABELS, scale=1.0, m1=1.0, m2=0.0, m3=0.0)
    torch.testing.assert_close(out, COS)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"m1": 0.0}, "m1"),
        ({"m1": -1.0}, "m1"),
        ({"m2": -0.1}, "m2"),
        ({"m2": 3.5}, "m2"),
        ({"m3": -0.2}, "m3"),
        ({"s": 0.0}, "scale"),
        ({"m2": float("nan")}, "m2"),
        ({"interclass_filtering_threshold": 1.5}, "interclass_filtering_threshold"),
        ({"interclass_filtering_threshold": -0.1}, "interclass_filtering_threshold"),
        ({"m1": "1"}, "m1"),
    ],
)
def test_bad_parameters_raise_naming_them(kwargs, name):
    params = {"s": 64.0, "m1": 1.0, "m2": 0.5, "m3": 0.0}
    params.update(kwargs)
    threshold = params.pop("interclass_filtering_threshold", 0.0)
    with pytest.raises(ValueError, match=name):
        CombinedMarginLoss(
            params["s"],
            params["m1"],
            params["m2"],
            params["m3"],
            interclass_filtering_threshold=threshold,
        )
    with pytest.raises(ValueError, match=name):
        margin_logits(
            COS,
            LABELS,
            scale=params["s"],
            m1=params["m1"],
            m2=params["m2"],
            m3=params["m3"],
            interclass_filtering_threshold=threshold,
        )


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="labels"):
        margin_logits(COS, torch.tensor([0, 1]), scale=64.0, m1=1.0, m2=0.5, m3=0.0)
    with pytest.raises(ValueError, match="cos"):
        margin_logits(COS[0], LABELS, scale=64.0, m1=1.0, m2=0.5, m3=0.0)


@pytest.mark.parametrize("exact_grad", [False, True])
def test_rows_of_other_ranks_pass_through_with_finite_gradients(exact_grad):
    # Rows labelled -1 (class held by another rank) must come out as s*cos with gradient s,
    # even where column 0 sits at cos = +-1 (acos has an infinite slope there).
    cos = torch.tensor(
        [[1.0, 0.2, -0.1], [-1.0, 0.5, 0.3], [0.1, 0.7, 0.4]], dtype=torch.float64
    ).requires_grad_()
    labels = torch.tensor([-1, -1, 1])
    out = margin_logits(cos, labels, scale=2.0, m1=1.0, m2=0.5, m3=0.0, exact_grad=exact_grad)
    theta = math.acos(0.7)
    expected = 2.0 * cos.detach().clone()
    expected[2, 1] = 2.0 * math.cos(theta + 0.5)
    assert torch.allclose(out.detach(), expected, atol=1e-12)
    out.sum().backward()
    assert torch.isfinite(cos.grad).all()
    assert torch.equal(cos.grad[:2], torch.full((2, 3), 2.0, dtype=torch.float64))
