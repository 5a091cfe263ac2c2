import pytest
import torch

from otface.train.lr import ScheduleMap, build_lr_scheduler, lr_factor


def test_factor_hand_values():
    # warm-up 4 steps, 10 in total, linear decay
    got = [lr_factor(s, warmup_steps=4, total_steps=10) for s in range(11)]
    want = [0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0]
    assert got == pytest.approx(want)


def test_factor_no_warmup_power_two():
    assert lr_factor(0, warmup_steps=0, total_steps=4, power=2.0) == 1.0
    assert lr_factor(2, warmup_steps=0, total_steps=4, power=2.0) == pytest.approx(0.25)
    assert lr_factor(9, warmup_steps=0, total_steps=4, power=2.0) == 0.0


def _opt():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


def test_scheduler_resume_equals_uninterrupted():
    opt = _opt()
    sched = build_lr_scheduler(opt, warmup_steps=3, total_steps=20)
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = _opt()
    sched2 = build_lr_scheduler(opt2, warmup_steps=3, total_steps=20)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    assert sched.get_last_lr()[0] == pytest.approx(0.1 * (1 - (7 - 3) / 17))


def test_schedule_map_reanchoring_keeps_the_rate_and_reaches_the_end():
    identity = ScheduleMap(warmup_steps=10, total_steps=100)
    assert identity.position(37) == 37 and identity.end_step() == 100
    # At step 40 of 100, 90 steps are left under a smaller global batch: 60 schedule steps
    # spread over them.
    stretched = identity.reanchored(40, 90)
    assert stretched.position(40) == 40 and stretched.end_step() == 130
    assert stretched.position(130) == pytest.approx(100)
    assert stretched.position(85) == pytest.approx(70)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_lr_scheduler(opt, warmup_steps=0, total_steps=0, schedule=stretched)
    factor = sched.lr_lambdas[0]
    assert factor(40) == lr_factor(40, warmup_steps=10, total_steps=100)
    assert factor(130) == 0.0 and factor(129) > 0.0
