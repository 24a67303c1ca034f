"""backends.optim: the optimiser step every learner composes, on a hand-built two-weight model."""

import pytest
import torch

from asyncopd.objective import ObjectiveConfig
from backends import optim


def model_with_grad(grad):
    m = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[1.0, -1.0]]))
    m.weight.grad = torch.tensor([grad])
    return m


def test_apply_gradients_clips_scales_lr_and_steps():
    m = model_with_grad([3.0, 4.0])                          # norm 5, clipped to 1: grad (0.6, 0.8)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    out = optim.apply_gradients(m, opt, torch.tensor(2.5), {"ess_frac": 0.5}, lr=0.1, grad_clip=1.0, vcpo_lr=True,
                                version=3, n_tokens=7)
    assert out == {"loss": 2.5, "grad_norm": 5.0, "lr": 0.05, "n_tokens": 7, "ess_frac": 0.5}
    assert torch.allclose(m.weight, torch.tensor([[1 - 0.05 * 0.6, -1 - 0.05 * 0.8]]))
    out = optim.apply_gradients(m, opt, torch.tensor(1.0), {"ess_frac": 0.5}, lr=0.1, grad_clip=1.0, vcpo_lr=False,
                                version=4, n_tokens=7)
    assert out["lr"] == 0.1 and opt.param_groups[0]["lr"] == 0.1


def test_lr_warms_up_linearly_from_the_batch_version_then_holds():
    """lr_v = lr · min(1, (v + 1) / warmup): from the version, so a resumed run continues the same schedule; VCPO's
    ESS scaling multiplies on top."""
    lrs = []
    for version in (0, 1, 3, 4, 9):
        m = model_with_grad([0.3, 0.4])
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        out = optim.apply_gradients(m, opt, torch.tensor(1.0), {}, lr=0.2, grad_clip=1.0, vcpo_lr=False,
                                    version=version, n_tokens=1, warmup_steps=4)
        lrs.append(out["lr"])
        assert torch.allclose(m.weight, torch.tensor([[1 - out["lr"] * 0.3, -1 - out["lr"] * 0.4]]))
    assert lrs == pytest.approx([0.05, 0.1, 0.2, 0.2, 0.2])
    m = model_with_grad([0.3, 0.4])
    out = optim.apply_gradients(m, torch.optim.SGD(m.parameters(), lr=1.0), torch.tensor(1.0), {"ess_frac": 0.5},
                                lr=0.2, grad_clip=1.0, vcpo_lr=True, version=1, n_tokens=1, warmup_steps=4)
    assert out["lr"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="warmup_steps >= 0"):
        optim.check_hyperparameters("L", lr=0.1, grad_clip=1.0, weight_decay=0.0, warmup_steps=-1)


@pytest.mark.parametrize("loss, grad", [(float("nan"), [1.0, 0.0]), (1.0, [float("inf"), 0.0])])
def test_nonfinite_loss_or_gradient_raises_before_the_step(loss, grad):
    m = model_with_grad(grad)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    with pytest.raises(FloatingPointError, match="at learner version 9"):
        optim.apply_gradients(m, opt, torch.tensor(loss), {}, lr=0.1, grad_clip=1.0, vcpo_lr=False, version=9,
                              n_tokens=1)
    assert torch.equal(m.weight.detach(), torch.tensor([[1.0, -1.0]]))


def test_reference_state_dict_and_hyperparameters():
    m = model_with_grad([0.0, 0.0])
    assert optim.frozen_reference(m, ObjectiveConfig("forward_kl_topk", topk=2)) is None
    ref = optim.frozen_reference(m, ObjectiveConfig("forward_kl_topk", topk=2, ref_kl_coef=0.1))
    assert ref is not m and not ref.training and not ref.weight.requires_grad
    assert torch.equal(ref.weight, m.weight)
    sd = optim.full_state_dict(m)
    assert torch.equal(sd["weight"], m.weight) and sd["weight"].data_ptr() != m.weight.data_ptr()
    with pytest.raises(ValueError, match="FSDPLearner needs lr > 0"):
        optim.check_hyperparameters("FSDPLearner", lr=0.0, grad_clip=1.0, weight_decay=0.0)
