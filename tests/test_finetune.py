"""Fine-tuning: init_backbone from every accepted kind of file, init_centres resharded,
freezing that holds weights and BatchNorm statistics bit for bit, backbone_lr_mult."""

import os
import types

import pytest
import torch
from _jobs import TINY_RUN, write_job
from test_backbones import UPSTREAM_FACTS, _fingerprint

from otface.config import ConfigError, load_config
from otface.full_state import merge
from otface.partial_fc import shard_range
from otface.train import loop
from otface.train.distributed import DistEnv
from otface.train.finetune import load_init_backbone, load_init_centres
from otface.train.model import build_backbone
from otface.train.optim import build_optimizer


def _config(folder, name, *, num_image=32, extra=""):
    out = str(folder / "work_dirs" / name)
    keys = {
        **TINY_RUN,
        "embedding_size": 32,
        "num_classes": 10,
        "num_image": num_image,
        "num_epoch": 1,
        "save_all_states": True,
        "sampler": {"type": "uniform"},
        "output": out,
    }
    return write_job(folder, name, keys, extra=extra), out


def _env():
    return DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A finished tiny run: model.pt, checkpoint_gpu_0.pt and a merged full_state.pt."""
    folder = tmp_path_factory.mktemp("source")
    path, out = _config(folder, "source")
    os.makedirs(out)
    loop.fit(load_config(path), _env())
    merge(out)
    return folder, out


def _same_tensors(a, b):
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key].cpu(), b[key].cpu()), key


@pytest.mark.parametrize("kind", ["model.pt", "checkpoint", "full_state", "ddp_prefixed"])
def test_each_kind_of_file_loads(source_run, tmp_path, kind):
    folder, out = source_run
    reference = torch.load(os.path.join(out, "model.pt"), weights_only=True)
    file = {
        "model.pt": os.path.join(out, "model.pt"),
        "checkpoint": os.path.join(out, "checkpoint_gpu_0.pt"),
        "full_state": os.path.join(out, "full_state.pt"),
        "ddp_prefixed": str(tmp_path / "backbone.pth"),
    }[kind]
    if kind == "ddp_prefixed":
        torch.save({f"module.{k}": v for k, v in reference.items()}, file)
    path, _ = _config(tmp_path, "ft", extra=f"config.init_backbone = {file!r}")
    cfg = load_config(path)
    net = build_backbone(cfg, torch.device("cpu"))
    note = load_init_backbone(cfg, net)
    assert file in note and "start fresh" in note
    # The end-of-epoch checkpoint and full_state hold the backbone model.pt holds.
    _same_tensors(net.state_dict(), reference)


def _arcface_torch_r18_layout(num_features=512):
    """arcface_torch's iresnet18 state_dict layout, written out from its published structure
    (checked below against the fingerprint measured on arcface_torch itself)."""
    shapes = {}

    def bn(prefix, c):
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{leaf}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["conv1.weight"] = (64, 3, 3, 3)
    bn("bn1", 64)
    shapes["prelu.weight"] = (64,)
    inplanes = 64
    for stage, planes in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"layer{stage}.{block}"
            bn(f"{p}.bn1", inplanes)
            shapes[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
            bn(f"{p}.bn2", planes)
            shapes[f"{p}.prelu.weight"] = (planes,)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn3", planes)
            if block == 0:
                shapes[f"{p}.downsample.0.weight"] = (planes, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes)
            inplanes = planes
    bn("bn2", 512)
    shapes["fc.weight"] = (num_features, 512 * 7 * 7)
    shapes["fc.bias"] = (num_features,)
    bn("features", num_features)
    return shapes


def test_arcface_torch_layout_loads_strictly(tmp_path):
    shapes = _arcface_torch_r18_layout()
    gen = torch.Generator().manual_seed(1)
    state = {
        k: (
            torch.randint(0, 9, s, generator=gen)
            if k.endswith("num_batches_tracked")
            else torch.rand(s, generator=gen) + 0.1
        )
        for k, s in shapes.items()
    }
    count, numel, fingerprint = UPSTREAM_FACTS["r18"]
    assert (len(state), sum(t.numel() for t in state.values())) == (count, numel)
    assert _fingerprint(state) == fingerprint
    file = tmp_path / "backbone.pth"  # a model-zoo file: a bare state_dict
    torch.save(state, file)
    path, _ = _config(
        tmp_path,
        "ft",
        extra=f"config.network = 'r18'\nconfig.embedding_size = 512\n"
        f"config.init_backbone = {str(file)!r}",
    )
    cfg = load_config(path)
    net = build_backbone(cfg, torch.device("cpu"))
    load_init_backbone(cfg, net)
    _same_tensors(net.state_dict(), state)


@pytest.mark.slow
def test_wrong_network_is_one_error_line(source_run, tmp_path, capsys):
    from otface.train import main

    _, out = source_run
    file = os.path.join(out, "model.pt")
    path, _ = _config(
        tmp_path,
        "ft",
        extra=f"config.network = 'r18'\nconfig.embedding_size = 32\n"
        f"config.init_backbone = {file!r}",
    )
    assert main(path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    line = err[0]
    assert file in line
    assert "looks like network 'r18_lite'" in line
    # r18 (arcface_torch's) has a 64-channel stem; r18_lite a 16-channel one.
    assert (
        "first difference: 'conv1.weight' is (16, 3, 3, 3) in the file, (64, 3, 3, 3) in the "
        "network" in line
    )


def test_not_a_backbone_and_missing_file(tmp_path):
    path, _ = _config(tmp_path, "ft", extra="config.init_backbone = 'nowhere.pt'")
    cfg = load_config(path)
    net = build_backbone(cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match="'nowhere.pt': no such file"):
        load_init_backbone(cfg, net)
    torch.save({"epoch": 3}, tmp_path / "odd.pt")
    cfg.init_backbone = str(tmp_path / "odd.pt")
    with pytest.raises(ConfigError, match="entry 'epoch' is not a tensor"):
        load_init_backbone(cfg, net)


def test_init_backbone_starts_a_fresh_schedule(source_run, tmp_path, monkeypatch, caplog):
    _, out = source_run
    file = os.path.join(out, "checkpoint_gpu_0.pt")
    path, new_out = _config(tmp_path, "ft", extra=f"config.init_backbone = {file!r}")
    cfg = load_config(path)
    os.makedirs(new_out)
    seen = []
    original = loop.Trainer.train_step

    def wrapped(self, img, labels):
        seen.append((self.global_step + 1, self.lr))
        return original(self, img, labels)

    monkeypatch.setattr(loop.Trainer, "train_step", wrapped)
    with caplog.at_level("INFO"):
        loop.fit(cfg, _env())
    # 32 images, batch 8: steps 1..4 of a new schedule (no warm-up: polynomial decay from lr).
    assert [s for s, _ in seen] == [1, 2, 3, 4]
    assert seen[0][1] == pytest.approx(0.05)
    log = caplog.text
    assert (
        f"init_backbone: r18_lite weights from {file} (training checkpoint at global step 4)" in log
    )


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("stages", ["all", 1])
def test_freezing_holds_weights_and_statistics_then_releases(tmp_path, monkeypatch, caplog, stages):
    n = 3
    stages_text = repr(stages)
    path, out = _config(
        tmp_path,
        "frozen",
        num_image=48,
        extra=f"config.freeze_steps = {n}\nconfig.freeze_stages = {stages_text}",
    )
    cfg = load_config(path)
    os.makedirs(out)
    after = []
    original = loop.Trainer.train_step

    def wrapped(self, img, labels):
        if not after:
            after.append(_snapshot(self.backbone))  # before step 1
        result = original(self, img, labels)
        after.append(_snapshot(self.backbone))
        return result

    monkeypatch.setattr(loop.Trainer, "train_step", wrapped)
    with caplog.at_level("INFO"):
        loop.fit(cfg, _env())
    assert len(after) == 7  # the start and 6 steps

    def frozen(key):
        if stages == "all":
            return True
        return key.split(".")[0] in ("conv1", "bn1", "prelu", "layer1")

    keys = [k for k in after[0] if frozen(k)]
    moving = [k for k in after[0] if not frozen(k) and after[0][k].is_floating_point()]
    assert any("running_mean" in k for k in keys) and any("conv" in k for k in keys)
    for step in range(1, n + 1):
        for k in keys:
            assert torch.equal(after[step][k], after[0][k]), (step, k)
        if moving:  # the rest of the network trains meanwhile
            assert any(not torch.equal(after[step][k], after[0][k]) for k in moving)
    # After step n the frozen part moves: its weights and its BatchNorm statistics.
    changed = [k for k in keys if not torch.equal(after[n + 1][k], after[n][k])]
    assert any(k.endswith("conv1.weight") for k in changed)
    assert any(k.endswith("running_mean") for k in changed)
    log = caplog.text
    assert f"held fixed for steps 1..{n}" in log
    assert f"step {n + 1}: freeze_steps = {n} ended" in log


def test_freeze_stages_needs_stages(tmp_path):
    path, _ = _config(tmp_path, "ft", extra="config.freeze_steps = 2\nconfig.freeze_stages = 5")
    cfg = load_config(path)
    with pytest.raises(ConfigError, match="'freeze_stages' = 5 is out of range"):
        loop.Trainer(cfg, _env())


def test_backbone_lr_mult(tmp_path):
    path, _ = _config(tmp_path, "ft", extra="config.backbone_lr_mult = 0.1")
    cfg = load_config(path)
    net = build_backbone(cfg, torch.device("cpu"))
    head = torch.nn.Linear(2, 2)
    opt = build_optimizer(cfg, net, head)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.005), 0.05]
    cfg.backbone_lr_mult = 1.0  # the default: one lr for both groups, as before
    opt = build_optimizer(cfg, net, head)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.05]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_init_centres_resharded(source_run, tmp_path, world_size):
    _, out = source_run
    file = os.path.join(out, "full_state.pt")
    full = torch.load(file, weights_only=False)["state_dict_softmax_fc"]["weight"]
    assert full.shape == (10, 32)
    path, _ = _config(tmp_path, "ft", extra=f"config.init_centres = {file!r}")
    cfg = load_config(path)
    rows = []
    for rank in range(world_size):
        start, count = shard_range(10, rank=rank, world_size=world_size)
        fc = types.SimpleNamespace(weight=torch.nn.Parameter(torch.zeros(count, 32)))
        load_init_centres(cfg, fc, rank=rank, world_size=world_size)
        rows.append(fc.weight.detach())
    assert torch.equal(torch.cat(rows), full)


def test_init_centres_needs_the_same_classes(source_run, tmp_path):
    _, out = source_run
    file = os.path.join(out, "full_state.pt")
    path, _ = _config(
        tmp_path, "ft", extra=f"config.init_centres = {file!r}\nconfig.num_classes = 12"
    )
    cfg = load_config(path)
    fc = types.SimpleNamespace(weight=torch.nn.Parameter(torch.zeros(12, 32)))
    with pytest.raises(ConfigError, match="holds 10 class centres, but num_classes = 12"):
        load_init_centres(cfg, fc, rank=0, world_size=1)
    cfg.init_centres = os.path.join(out, "model.pt")
    with pytest.raises(ConfigError, match="holds no class centres"):
        load_init_centres(cfg, fc, rank=0, world_size=1)


@pytest.mark.parametrize("value, steps", [(0.25, 2), (0.01, 1), (3, 3)])
def test_freeze_steps_below_one_is_a_fraction_of_the_run(tmp_path, value, steps):
    path, _ = _config(tmp_path, "ft", num_image=64, extra=f"config.freeze_steps = {value}\n")
    trainer = loop.Trainer(load_config(path), _env())
    total = trainer.total_step
    assert trainer.freezer.steps == steps
    assert trainer.freezer.describe().endswith(
        f"1..{steps} ({value:g} of {total})" if value < 1 else f"1..{steps}"
    )


@pytest.mark.parametrize("value", [1.5, -1, "a quarter"])
def test_freeze_steps_must_be_whole_steps_or_a_fraction(tmp_path, value):
    path, _ = _config(tmp_path, "ft", extra=f"config.freeze_steps = {value!r}\n")
    with pytest.raises(ConfigError, match="freeze_steps"):
        load_config(path)
