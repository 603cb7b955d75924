import math

import pytest
import torch
from torch import nn

from megadistill.methods import EMA, ModelBundle, RoleError, RoleHandle


def _linear(values):
    lin = nn.Linear(len(values), 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([values], dtype=torch.float32))
    return lin


def test_ema_copies_before_start_then_averages():
    lin = _linear([1.0])
    ema = EMA(lin, decay=0.9, start_step=2)
    for step, value in ((0, 1.0), (1, 3.0)):
        with torch.no_grad():
            lin.weight.fill_(value)
        ema.update(step)
        assert ema.shadow["weight"].item() == value  # plain copy before start_step
    with torch.no_grad():
        lin.weight.fill_(5.0)
    ema.update(2)
    assert ema.shadow["weight"].item() == pytest.approx(0.9 * 3.0 + 0.1 * 5.0)
    ema.update(3)
    assert ema.shadow["weight"].item() == pytest.approx(0.9 * 3.2 + 0.1 * 5.0)


def test_ema_float32_shadow_state_dict_roundtrip_and_copy_to():
    lin = _linear([1.0, 2.0]).to(torch.bfloat16)
    ema = EMA(lin, decay=0.5)
    assert ema.shadow["weight"].dtype == torch.float32
    with torch.no_grad():
        lin.weight.fill_(3.0)
    ema.update(0)
    state = ema.state_dict()
    assert torch.equal(state["weight"], torch.tensor([[2.0, 2.5]]))
    other = EMA(_linear([0.0, 0.0]), decay=0.5)
    other.load_state_dict(state)
    target = _linear([0.0, 0.0])
    other.copy_to(target)
    assert torch.equal(target.weight, torch.tensor([[2.0, 2.5]]))
    with pytest.raises(RoleError, match="missing"):
        other.load_state_dict({})
    with pytest.raises(RoleError, match="shape"):
        other.load_state_dict({"weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="decay"):
        EMA(lin, decay=1.0)


def test_plain_step_clips_steps_scheduler_and_zeroes_grads():
    lin = _linear([0.0, 0.0])
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    handle = RoleHandle("student", lin, True, optimizer=opt, lr_scheduler=sched, grad_clip=1.0)
    loss = lin(torch.tensor([[3.0, 4.0]])).sum()  # d loss / d w = [3, 4], norm 5
    handle.backward(loss)
    assert handle.step() == pytest.approx(5.0)
    assert torch.allclose(lin.weight, torch.tensor([[-0.6, -0.8]]))  # clipped to norm 1, lr 1
    assert lin.weight.grad is None
    assert opt.param_groups[0]["lr"] == 0.5


def test_nonfinite_grad_skips_the_update():
    lin = _linear([1.0, 1.0])
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    handle = RoleHandle("critic", lin, True, optimizer=opt)
    handle.backward(lin(torch.tensor([[float("inf"), 1.0]])).sum())
    assert not math.isfinite(handle.step())
    assert torch.equal(lin.weight, torch.tensor([[1.0, 1.0]]))
    assert lin.weight.grad is None


def test_step_updates_ema_with_global_step():
    lin = _linear([0.0])
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    handle = RoleHandle("student", lin, True, optimizer=opt, ema=EMA(lin, 0.5, start_step=0))
    handle.backward(lin(torch.tensor([[-2.0]])).sum())  # grad -2 -> weight 2
    handle.step(global_step=0)
    assert handle.ema.shadow["weight"].item() == pytest.approx(1.0)
    handle.backward(lin(torch.tensor([[-2.0]])).sum())
    with pytest.raises(RoleError, match="global_step"):
        handle.step()


def test_frozen_role_refuses_updates():
    lin = _linear([1.0])
    handle = RoleHandle("teacher", lin, False)
    assert not any(p.requires_grad for p in lin.parameters())
    with pytest.raises(RoleError, match="frozen"):
        handle.backward(torch.zeros((), requires_grad=True))
    with pytest.raises(RoleError, match="frozen"):
        RoleHandle("teacher", _linear([1.0]), False, optimizer=torch.optim.SGD(_linear([1.0]).parameters(), lr=1))


class _FakeEngine(nn.Module):
    """Stands in for a DeepSpeed engine: wraps a module, records backward/step."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.log = []

    def forward(self, *args):
        self.log.append("forward")
        return self.module(*args)

    def backward(self, loss):
        self.log.append("backward")
        loss.backward()

    def step(self):
        self.log.append("step")

    def get_global_grad_norm(self):
        return 7.0


def test_engine_handle_delegates_forward_backward_and_step():
    lin = _linear([1.0, 2.0])
    engine = _FakeEngine(lin)
    handle = RoleHandle("student", None, True, engine=engine)
    assert handle.module is lin
    handle.backward(handle(torch.ones(1, 2)).sum())
    assert handle.step() == 7.0
    assert engine.log == ["forward", "backward", "step"]
    with pytest.raises(RoleError, match="engine"):
        RoleHandle("student", None, True, engine=_FakeEngine(_linear([1.0])),
                   optimizer=torch.optim.SGD(lin.parameters(), lr=1))


def test_bundle_require_roles_names_what_is_missing():
    bundle = ModelBundle({"student": RoleHandle("student", _linear([1.0]), True,
                                                optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1))})
    bundle.require_roles(["student"])
    with pytest.raises(RoleError, match=r"models\.teacher, models\.critic"):
        bundle.require_roles(["student", "teacher", "critic"], method="method 'dmd2'")
    with pytest.raises(RoleError, match="must be frozen"):
        bundle.require_roles(["student"], trainable={"student": False})
    with pytest.raises(RoleError, match="holds a handle named"):
        ModelBundle({"critic": bundle["student"]})
    with pytest.raises(RoleError, match="no role"):
        bundle["critic"]
