"""supcon_loss / SupConLoss (docs/method.md §3.8) against a straightforward loop over anchors and positives
written here, and against the Khosla-style reference in amgsn/ops/reference.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from amgsn.losses import SupConLoss
from amgsn.ops import reference as ref
from amgsn.ops.supcon import supcon_loss


def loop_supcon(features, labels, temperature=0.07, base_temperature=0.07, class_weights=None) -> float:
    """Definition by hand: anchors = every (sample, view); positives = other (sample, view) with the
    same label; denominator = every other (sample, view); anchors without positives skipped."""
    B, V, _ = features.shape
    z = features.double()
    items = [(b, v) for b in range(B) for v in range(V)]
    num = den = 0.0
    for a in items:
        others = [k for k in items if k != a]
        logits = {k: float(z[a[0], a[1]] @ z[k[0], k[1]]) / temperature for k in others}
        log_denom = math.log(sum(math.exp(s) for s in logits.values()))
        positives = [k for k in others if labels[k[0]] == labels[a[0]]]
        if not positives:
            continue
        mean_log_prob = sum(logits[p] - log_denom for p in positives) / len(positives)
        weight = 1.0 if class_weights is None else float(class_weights[labels[a[0]]])
        num += weight * -(temperature / base_temperature) * mean_log_prob
        den += weight
    return num / den if den > 0 else 0.0


def _batch(B, V, D, C, gen, dtype=torch.float32):
    z = F.normalize(torch.randn(B, V, D, generator=gen, dtype=torch.float64), dim=-1).to(dtype)
    y = torch.randint(0, C, (B,), generator=gen)
    return z, y


@pytest.mark.parametrize("V", [1, 2, 3])
@pytest.mark.parametrize("B,D,C", [(2, 3, 1), (5, 8, 3), (9, 17, 4), (12, 32, 12)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("temps", [(0.07, 0.07), (0.5, 0.07), (0.1, 1.0)])
def test_matches_loop_and_reference(seed, V, B, D, C, weighted, temps):
    gen = torch.Generator().manual_seed(seed)
    z, y = _batch(B, V, D, C, gen, torch.float64)
    w = torch.rand(C, generator=gen, dtype=torch.float64) + 0.1 if weighted else None
    t, bt = temps
    want = loop_supcon(z, y.tolist(), t, bt, w)
    got = supcon_loss(z, y, t, bt, class_weights=w)
    assert got.dtype == torch.float64 and got.shape == ()
    assert math.isclose(got.item(), want, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(ref.supcon_loss(z, y, t, bt, class_weights=w).item(), want, rel_tol=1e-9, abs_tol=1e-12)
    # float32 path
    got32 = supcon_loss(z.float(), y, t, bt, class_weights=None if w is None else w.float())
    assert got32.dtype == torch.float32
    assert math.isclose(got32.item(), want, rel_tol=1e-4, abs_tol=1e-5)


def test_anchors_without_positives_are_excluded(seed):
    gen = torch.Generator().manual_seed(seed)
    z, _ = _batch(6, 1, 10, 1, gen, torch.float64)
    y = torch.tensor([0, 0, 1, 2, 2, 3])  # classes 1 and 3 have a single sample, V = 1
    got = supcon_loss(z, y)
    assert math.isclose(got.item(), loop_supcon(z, y.tolist()), rel_tol=1e-9)
    # Khosla's original averages a 0 for those anchors instead; excluding them changes the value.
    kept = loop_supcon(z, y.tolist()) * 4 / 6
    assert not math.isclose(got.item(), kept, rel_tol=1e-6)
    # With two views every anchor has a positive (its other view).
    z2, _ = _batch(6, 2, 10, 1, gen, torch.float64)
    assert math.isclose(supcon_loss(z2, y).item(), loop_supcon(z2, y.tolist()), rel_tol=1e-9)


def test_no_positive_at_all_gives_zero_and_zero_grad(seed):
    gen = torch.Generator().manual_seed(seed)
    for B, V in ((4, 1), (1, 1)):
        z, _ = _batch(B, V, 5, 1, gen, torch.float64)
        z.requires_grad_()
        loss = supcon_loss(z, torch.arange(B))
        loss.backward()
        assert loss.item() == 0.0
        assert torch.isfinite(z.grad).all() and torch.count_nonzero(z.grad) == 0


def test_gradcheck(seed):
    gen = torch.Generator().manual_seed(seed)
    z, y = _batch(5, 2, 4, 2, gen, torch.float64)
    w = torch.rand(2, generator=gen, dtype=torch.float64) + 0.5
    z.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: supcon_loss(x, y, 0.3, 0.07, class_weights=w), (z,))


def test_half_inputs_are_computed_in_float32(seed):
    gen = torch.Generator().manual_seed(seed)
    z, y = _batch(16, 2, 32, 4, gen)
    zb = z.to(torch.bfloat16)
    got = supcon_loss(zb, y)
    assert got.dtype == torch.float32
    assert math.isclose(got.item(), loop_supcon(zb.float(), y.tolist()), rel_tol=1e-4)


def test_module(seed):
    gen = torch.Generator().manual_seed(seed)
    z, y = _batch(8, 2, 16, 3, gen, torch.float64)
    w = [0.5, 2.0, 1.0]
    m = SupConLoss(temperature=0.2, class_weights=w)
    assert "class_weights" in m.state_dict()
    assert math.isclose(m(z, y).item(), loop_supcon(z, y.tolist(), 0.2, 0.07, w), rel_tol=1e-6)
    assert math.isclose(SupConLoss()(z, y).item(), loop_supcon(z, y.tolist()), rel_tol=1e-9)
    with pytest.raises(ValueError, match="temperature"):
        SupConLoss(temperature=0.0)
    with pytest.raises(ValueError, match="class_weights"):
        SupConLoss(class_weights=[1.0, -1.0])


def test_bad_input():
    z = F.normalize(torch.randn(4, 2, 8), dim=-1)
    y = torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="features"):
        supcon_loss(z[:, 0], y)
    with pytest.raises(TypeError, match="features"):
        supcon_loss(z.long(), y)
    with pytest.raises(ValueError, match="labels"):
        supcon_loss(z, y[:3])
    with pytest.raises(TypeError, match="labels"):
        supcon_loss(z, y.float())
    for t in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature"):
            supcon_loss(z, y, temperature=t)
    with pytest.raises(ValueError, match="base_temperature"):
        supcon_loss(z, y, base_temperature=0.0)
    with pytest.raises(ValueError, match="class_weights"):
        supcon_loss(z, y, class_weights=torch.ones(2, 2))
    with pytest.raises(ValueError, match="same device"):
        supcon_loss(z, y.to("meta"))


@pytest.mark.cuda
@pytest.mark.parametrize("V", [1, 2])
def test_cuda_matches_loop(seed, V):
    gen = torch.Generator().manual_seed(seed)
    z, y = _batch(10, V, 16, 3, gen)
    w = torch.rand(3, generator=gen) + 0.1
    zc = z.cuda().requires_grad_()
    got = supcon_loss(zc, y.cuda(), class_weights=w.cuda())
    got.backward()
    assert math.isclose(got.item(), loop_supcon(z, y.tolist(), class_weights=w), rel_tol=1e-4)
    zr = z.clone().requires_grad_()
    supcon_loss(zr, y, class_weights=w).backward()
    torch.testing.assert_close(zc.grad.cpu(), zr.grad, rtol=1e-4, atol=1e-5)
