"""otface.patch (the arcface_torch overlay) and otface.patch_train (training in that tree).

Most tests use a small stand-in checkout written here: the module names arcface_torch's
``train_v2.py`` layout uses, a ``backbones.get_model`` serving one tiny network with a ``bn2``
module, and an EasyDict ``configs/base.py``. One test runs against a real arcface_torch
checkout when ``OTFACE_ARCFACE_TORCH`` points to one.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _jobs import job_source
from torch import nn

from otface.config import ConfigError
from otface.patch import (
    MANIFEST,
    PatchError,
    apply_overlay,
    check_overlay,
    main,
    overlay_files,
    revert_overlay,
)
from otface.patch_train import load_tree_config, resolve_tree_layer

ROOT = Path(__file__).resolve().parents[1]

_FAKE_BACKBONES = """
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_features=512):
        super().__init__()
        self.fake_stem = nn.Conv2d(3, 8, kernel_size=16, stride=16)  # 112 -> 7
        self.bn2 = nn.BatchNorm2d(8)
        self.fake_fc = nn.Linear(8 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features)

    def forward(self, x):
        x = self.bn2(self.fake_stem(x))
        return self.features(self.fake_fc(torch.flatten(x, 1)))


def get_model(name, **kwargs):
    if name != "fake_tiny":
        raise ValueError(name)
    return TinyNet(num_features=kwargs.get("num_features", 512))
"""

_FAKE_BASE = """
from easydict import EasyDict as edict

config = edict()
config.network = "fake_tiny"
config.frequent = 7
config.output = "fake_output"
config.batch_size = 64
"""

# A tiny OTFace run; the tests add its network and output.
_TINY_JOB = {
    "loss": "otface",
    "rec": "synthetic",
    "num_classes": 6,  # 24 images: 4 per identity, one P x K draw each
    "num_image": 24,
    "batch_size": 8,
    "num_epoch": 1,
    "frequent": 1,
    "verbose": 1000,
    "num_workers": 0,
    "val_targets": [],
    "sampler": {"type": "pk", "k": 4},
    # every anchor counts as hard, so the OT term (on the hooked feature map) is exercised
    "otface": {"mining_margin": 2.0},
}


def _fake_tree(root: Path) -> Path:
    tree = root / "arcface_torch"
    (tree / "backbones").mkdir(parents=True)
    (tree / "configs").mkdir()
    (tree / "train_v2.py").write_text("# stand-in for the upstream training script\n")
    (tree / "partial_fc_v2.py").write_text("# stand-in\n")
    (tree / "backbones" / "__init__.py").write_text(_FAKE_BACKBONES)
    (tree / "configs" / "__init__.py").write_text("")
    (tree / "configs" / "base.py").write_text(_FAKE_BASE)
    return tree


def _snapshot(tree: Path) -> dict:
    return {
        str(p.relative_to(tree)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(tree.rglob("*"))
        if p.is_file()
    }


@pytest.fixture()
def tree(tmp_path):
    return _fake_tree(tmp_path)


def test_apply_check_revert_restores_tree_exactly(tree, capsys):
    before = _snapshot(tree)
    assert main(["check", str(tree)]) == 1  # not applied yet
    assert main(["apply", str(tree)]) == 0
    shipped = overlay_files()
    for rel, data in shipped.items():
        assert (tree / rel).read_bytes() == data
    assert "train_otface.py" in shipped
    assert {"configs/ms1mv3_r100_otface.py", "configs/ms1mv3_r50_otface.py"} <= set(shipped)
    assert "configs/glint360k_r100_otface.py" in shipped
    assert {
        "configs/ms1mv3_r100_adaface_otface.py",
        "configs/ms1mv3_r100_curricularface.py",
    } <= set(shipped)
    assert (tree / MANIFEST).is_file()
    assert main(["check", str(tree)]) == 0
    res = check_overlay(tree)
    assert res.ok and res.applied and not res.upstream_match  # the stand-in is not upstream
    assert main(["revert", str(tree)]) == 0
    assert _snapshot(tree) == before
    assert main(["check", str(tree)]) == 1


def test_apply_twice_is_idempotent(tree):
    first = apply_overlay(tree)
    after_first = _snapshot(tree)
    second = apply_overlay(tree)
    assert second.written == [] and sorted(second.unchanged) == sorted(first.written)
    assert _snapshot(tree) == after_first


def test_revert_refuses_edited_file_unless_forced(tree, capsys):
    before = _snapshot(tree)
    apply_overlay(tree)
    edited = tree / "configs" / "ms1mv3_r50_otface.py"
    edited.write_text(edited.read_text() + "config.lr = 0.2\n")
    assert not check_overlay(tree).ok
    assert main(["check", str(tree)]) == 1
    assert "modified" in capsys.readouterr().out
    with pytest.raises(PatchError, match="ms1mv3_r50_otface.py"):
        revert_overlay(tree)
    assert edited.is_file() and (tree / "train_otface.py").is_file()  # nothing removed
    assert main(["revert", str(tree)]) == 1
    assert main(["revert", str(tree), "--force"]) == 0
    assert _snapshot(tree) == before


def test_apply_refuses_foreign_file_and_force_keeps_it(tree):
    foreign = tree / "train_otface.py"
    foreign.write_text("print('mine')\n")
    before = _snapshot(tree)
    with pytest.raises(PatchError, match="train_otface.py"):
        apply_overlay(tree)
    assert _snapshot(tree) == before  # refused before writing anything
    res = apply_overlay(tree, force=True)
    assert res.backed_up == ["train_otface.py"]
    assert foreign.read_bytes() == overlay_files()["train_otface.py"]
    assert check_overlay(tree).ok
    revert_overlay(tree)
    assert _snapshot(tree) == before
    assert foreign.read_text() == "print('mine')\n"


@pytest.mark.parametrize(
    "missing", ["train_v2.py", "partial_fc_v2.py", "configs/base.py", "backbones/__init__.py"]
)
def test_not_an_arcface_torch_tree_names_missing_file(tree, missing):
    (tree / missing).unlink()
    with pytest.raises(PatchError, match=missing.replace(".", r"\.")):
        apply_overlay(tree)
    assert not (tree / MANIFEST).exists()
    res = check_overlay(tree)
    assert not res.ok and missing in res.messages[0]


def test_revert_without_apply_is_an_error(tree, capsys):
    assert main(["revert", str(tree)]) == 1
    assert MANIFEST in capsys.readouterr().err


def test_tree_config_layers_ours_theirs_job(tree, tmp_path):
    job = tree / "configs" / "job.py"
    job.write_text(job_source({"batch_size": 32, "output": None, "otface": {"epsilon": 0.1}}))
    cfg = load_tree_config(str(job), tree=tree)
    assert cfg.frequent == 7  # their base over our default (10)
    assert cfg.batch_size == 32  # the job over their base (64)
    assert cfg.network == "fake_tiny"
    # keys their base lacks take our defaults (configs/base.py: tol 3e-4, P x K with K = 4)
    assert cfg.otface.epsilon == 0.1 and cfg.otface.tol == 3e-4
    assert cfg.sampler.type == "pk" and cfg.sampler.k == 4 and cfg.loss == "arcface"
    assert cfg.output == os.path.join("work_dirs", "job")
    job.write_text("from easydict import EasyDict as edict\nconfig = edict(lamda_ot=1.0)\n")
    with pytest.raises(ConfigError, match="lamda_ot"):
        load_tree_config(str(job), tree=tree)
    # A key only their (customised) base has is ignored with a warning.
    (tree / "configs" / "base.py").write_text(_FAKE_BASE + "config.my_key = 3\n")
    job.write_text(job_source())
    with pytest.warns(UserWarning, match="my_key"):
        cfg = load_tree_config(str(job), tree=tree)
    assert "my_key" not in cfg
    # The margin heads: keys their base lacks, checked as ours.
    (tree / "configs" / "base.py").write_text(_FAKE_BASE)
    job.write_text(job_source({"head": "curricularface", "curricularface": {"m": 0.4}}))
    cfg = load_tree_config(str(job), tree=tree)
    assert cfg.head == "curricularface" and dict(cfg.curricularface) == {"m": 0.4, "alpha": 0.01}
    job.write_text(job_source({"head": "adaface", "adaface": {"t_alfa": 0.1}}))
    with pytest.raises(ConfigError, match="adaface.t_alpha"):
        load_tree_config(str(job), tree=tree)


def test_auto_layer_for_their_networks():
    class MobileLike(nn.Module):  # module names of arcface_torch's MobileFaceNet
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Conv2d(3, 4, 3)])
            self.conv_sep = nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8))
            self.features = nn.Sequential(nn.Conv2d(8, 8, 7, groups=8), nn.Flatten())

    class ResLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3)
            self.bn2 = nn.BatchNorm2d(4)

    assert resolve_tree_layer(MobileLike(), "auto") == "conv_sep"
    assert resolve_tree_layer(ResLike(), "auto") == "bn2"
    assert resolve_tree_layer(MobileLike(), "layers.0") == "layers.0"


def _run_train(tree: Path, config: str, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "plugin"), env.get("PYTHONPATH", "")])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, "train_otface.py", config],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_train_otface_in_fake_tree_uses_their_get_model(tree, tmp_path):
    apply_overlay(tree)
    out = tmp_path / "out"
    (tree / "configs" / "tiny.py").write_text(
        job_source({**_TINY_JOB, "network": "fake_tiny", "output": str(out), "head": "adaface"})
    )
    proc = _run_train(tree, "configs/tiny", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert {"fake_stem.weight", "bn2.weight", "fake_fc.weight"} <= set(state)
    log = (out / "training.log").read_text()
    assert "'layer': 'bn2'" in log
    assert "Global Step: 3" in log  # 24 images // batch 8
    # OT term active on the fake's bn2 map: lines report a non-zero n_hard
    assert any("n_hard 8" in line for line in log.splitlines())
    assert "head_norm_mean" in log and "head_norm_std" in log  # the AdaFace head's statistics
    (tree / "configs" / "bad.py").write_text(
        job_source({**_TINY_JOB, "network": "nope", "output": str(tmp_path / "out_bad")})
    )
    proc = _run_train(tree, "configs/bad", timeout=240)
    assert proc.returncode == 2 and "'nope'" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("OTFACE_ARCFACE_TORCH"), reason="OTFACE_ARCFACE_TORCH is not set"
)
def test_real_arcface_torch_checkout(tmp_path):
    src = Path(os.environ["OTFACE_ARCFACE_TORCH"])
    real = tmp_path / "arcface_torch"
    shutil.copytree(src, real, ignore=shutil.ignore_patterns("__pycache__", "work_dirs"))
    before = _snapshot(real)
    assert main(["apply", str(real)]) == 0
    res = check_overlay(real)
    assert res.ok and res.upstream_match, res.messages
    # Their shipped OTFace configs load over their base.py.
    cfg = load_tree_config("configs/ms1mv3_r100_otface", tree=real)
    assert (cfg.network, cfg.num_classes, cfg.loss) == ("r100", 93431, "otface")
    sys.path.insert(0, str(real))
    try:
        from backbones import get_model

        from otface.hooks import FeatureCapture

        mbf = get_model("mbf", dropout=0.0, fp16=False, num_features=512).eval()
        with FeatureCapture(mbf, resolve_tree_layer(mbf, "auto")) as cap:
            with torch.no_grad():
                mbf(torch.zeros(1, 3, 112, 112))
            assert cap.layer == "conv_sep" and tuple(cap.features.shape) == (1, 512, 7, 7)
    finally:
        sys.path.remove(str(real))
        sys.modules.pop("backbones", None)
    out = tmp_path / "out"
    job = real / "configs" / "tiny_otface_test.py"
    job.write_text(job_source({**_TINY_JOB, "network": "r18", "output": str(out)}))
    proc = _run_train(real, "configs/tiny_otface_test", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job.unlink()
    state = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert "bn2.weight" in state and "layer4.1.conv2.weight" in state
    assert "'layer': 'bn2'" in (out / "training.log").read_text()
    assert main(["revert", str(real)]) == 0
    assert _snapshot(real) == before
