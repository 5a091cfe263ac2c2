"""The shipped job configs: the WebFace recipes of arcface_torch and the ``*_otface`` twins.

Cheap checks, no training: every config loads and validates wherever it is run from; an ArcFace
recipe states its own values and a config derives from at most one other; a twin is its ArcFace
config plus the OT term and nothing else; loading or importing a twin leaves the
ArcFace config object as it was; the values are upstream's (facts copied from arcface_torch's
``configs/*.py`` at commit ab27f4d6).
"""

import ast
import copy
import importlib
import os
import re
import shutil
import sys

import pytest
from _spawn import run_train

from otface.config import load_config
from otface.patch import overlay_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
JOBS = sorted(
    name[:-3]
    for name in os.listdir(CONFIGS)
    if name.endswith(".py") and name not in ("__init__.py", "base.py")
)
TWINS = [
    name[: -len("_otface")]
    for name in JOBS
    if name.endswith("_otface") and f"{name[: -len('_otface')]}_arcface" in JOBS
]
# Configs with another margin head (config.head) and their *_otface twins: NAME_otface is NAME
# plus the OT term, as X_otface is X_arcface plus it.
HEADS = ("adaface", "curricularface")
HEAD_JOBS = [name for name in JOBS if name.endswith(tuple(f"_{h}" for h in HEADS))]


# The keys a twin may set differently from its ArcFace config (output: work_dirs/<own name>).
TWIN_KEYS = {"loss", "sampler", "otface", "output"}

# arcface_torch's WebFace configs (wf42m_pfc0008_32gpu_r100, sample_rate 0, is left out: a rate
# of 0 samples no class centre, and our loader refuses it).
WEBFACE = [
    *("wf4m_mbf", "wf4m_r50", "wf4m_r100"),
    *("wf12m_mbf", "wf12m_r50", "wf12m_r100", "wf12m_pfc02_r100"),
    *("wf12m_flip_r50", "wf12m_flip_pfc01_filter04_r50"),
    *("wf12m_conflict_r50", "wf12m_conflict_r50_pfc03_filter04"),
    *("wf42m_pfc02_r100", "wf42m_pfc02_r100_16gpus", "wf42m_pfc02_r100_32gpus"),
    *("wf42m_pfc02_16gpus_r100", "wf42m_pfc02_16gpus_mbf_bs8k", "wf42m_pfc02_16gpus_r50_bs8k"),
    *("wf42m_pfc02_8gpus_r50_bs4k", "wf42m_pfc02_32gpus_r50_bs4k", "wf42m_pfc02_vit_h"),
    *(f"wf42m_pfc03_32gpu_{net}" for net in ("r18", "r50", "r100", "r200")),
    *(f"wf42m_pfc03_40epoch_64gpu_vit_{size}" for size in "tsbl"),
    *("wf42m_pfc03_40epoch_8gpu_vit_t", "wf42m_pfc03_40epoch_8gpu_vit_b"),
]
# No twin where the OT term works against the experiment: on label-noise sets a hard positive is
# mostly a flipped label and a hard negative the same person under a second label.
NO_TWIN = {name for name in WEBFACE if "_flip" in name or "_conflict" in name}

# (rec, num_classes, num_image) of upstream's data sets; the longest matching prefix applies.
DATA = {
    "wf4m_": ("/train_tmp/WebFace4M", 205990, 4235242),
    "wf12m_": ("/train_tmp/WebFace12M", 617970, 12720066),
    "wf12m_flip": ("/train_tmp/WebFace12M_FLIP40", 617970, 12720066),
    "wf12m_conflict": ("/train_tmp/WebFace12M_Conflict", 1017970, 12720066),
    "wf42m_": ("/train_tmp/WebFace42M", 2059906, 42474557),
}
RECIPE = ("network", "sample_rate", "optimizer", "lr", "weight_decay", "batch_size")
SCHEDULE = ("num_epoch", "warmup_epoch", "gradient_acc", "verbose", "val_targets")


def _load(name: str):
    return load_config(os.path.join(CONFIGS, name))


@pytest.fixture()
def configs_package(monkeypatch):
    """``configs`` importable as arcface_torch imports it; ``sys.modules`` restored after."""
    saved = {k: v for k, v in sys.modules.items() if k == "configs" or k.startswith("configs.")}
    for key in saved:
        del sys.modules[key]
    monkeypatch.syspath_prepend(ROOT)
    yield
    for key in [k for k in sys.modules if k == "configs" or k.startswith("configs.")]:
        del sys.modules[key]
    sys.modules.update(saved)


def _imports(name: str) -> list[str]:
    with open(os.path.join(CONFIGS, f"{name}.py")) as f:
        tree = ast.parse(f.read())
    modules = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules.append(node.module)
    return modules


def _parents(name: str) -> list[str]:
    return [m[len("configs.") :] for m in _imports(name) if m.startswith("configs.")]


@pytest.mark.parametrize("name", JOBS)
def test_a_run_reads_in_at_most_two_files(name):
    # One way to derive a config, arcface_torch's import of configs.NAME (no loading by path),
    # and one level of it: an ArcFace recipe states its values, an upstream recipe's twin imports
    # it (demo_otface stands alone: the quick start's file shows the whole run).
    assert {m for m in _imports(name) if not m.startswith("configs.")} <= {"copy", "easydict"}
    parents = _parents(name)
    assert len(parents) <= 1 and not any(_parents(parent) for parent in parents)
    if name.endswith("_arcface"):
        assert parents == []
    elif name in HEAD_JOBS or name[: -len("_otface")] in HEAD_JOBS:
        # Another head: its ArcFace config with the head set (and the OT term for a twin;
        # demo_adaface_otface takes demo_otface, which stands alone).
        stem = name.replace("_adaface", "").replace("_curricularface", "")
        demo_twin = stem == "demo_otface"
        assert parents == [stem if demo_twin else f"{stem.removesuffix('_otface')}_arcface"]
    elif name.endswith("_otface") and name.startswith(("wf", "ms1mv3", "glint360k")):
        assert parents == [f"{name[: -len('_otface')]}_arcface"]


@pytest.mark.parametrize("name", JOBS)
def test_config_loads_from_any_directory(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the twins' `from configs.X import` must not need the cwd
    cfg = _load(name)
    assert cfg.output == os.path.join("work_dirs", name)


def test_every_webface_recipe_is_shipped_with_its_twins():
    assert {f"{name}_arcface" for name in WEBFACE} <= set(JOBS)
    assert {name for name in TWINS if name.startswith("wf")} == set(WEBFACE) - NO_TWIN
    assert not NO_TWIN & {name[: -len("_otface")] for name in JOBS if name.endswith("_otface")}


@pytest.mark.parametrize("name", TWINS)
def test_twin_is_its_arcface_config_plus_the_ot_term(name):
    arcface, twin = _load(f"{name}_arcface"), _load(f"{name}_otface")
    assert set(twin) == set(arcface)
    differ = {key for key in twin if twin[key] != arcface[key]}
    assert differ <= TWIN_KEYS, differ - TWIN_KEYS
    assert twin.loss == "otface" and twin.sampler.type == "pk"
    if name.startswith(("wf", "ms1mv3", "glint360k")):
        reference = _load("ms1mv3_r100_otface")
        assert arcface.loss == "arcface" and arcface.sampler.type == "uniform"
        assert twin.sampler == reference.sampler and twin.otface == reference.otface
        assert (twin.otface.layer, twin.otface.mode) == ("auto", "spatial")


@pytest.mark.parametrize("name", HEAD_JOBS)
def test_head_config_is_its_arcface_config_with_another_head(name):
    head = name.rsplit("_", 1)[1]
    stem = name[: -len(head) - 1]
    cfg, arcface = _load(name), _load(f"{stem}_arcface")
    twin = _load(f"{name}_otface")
    assert cfg.head == head and arcface.head == "combined"
    differ = {key for key in cfg if cfg[key] != arcface[key]}
    # margin_list: the combined head's, unused by this one.
    assert differ <= {"head", "margin_list", "output"}, differ
    assert cfg[head] == load_config(os.path.join(CONFIGS, "base"))[head]  # the papers' values
    differ = {key for key in twin if twin[key] != cfg[key]}
    assert differ <= TWIN_KEYS and twin.loss == "otface" and twin.sampler.type == "pk", differ
    reference = _load(f"{stem}_otface")
    assert (twin.otface, twin.sampler) == (reference.otface, reference.sampler)


@pytest.mark.parametrize("name", WEBFACE)
def test_webface_recipe_has_upstream_data_and_margin(name):
    cfg = _load(f"{name}_arcface")
    family = max((prefix for prefix in DATA if name.startswith(prefix)), key=len)
    assert (cfg.rec, cfg.num_classes, cfg.num_image) == DATA[family]
    assert tuple(cfg.margin_list) == (1.0, 0.0, 0.4)  # CosFace, as upstream for WebFace
    assert cfg.fp16 and cfg.momentum == 0.9 and cfg.embedding_size == 512
    assert cfg.dali is False and cfg.dali_aug is False


@pytest.mark.parametrize(
    "name, recipe",
    [
        ("wf42m_pfc03_40epoch_64gpu_vit_b", ("vit_b_dp005_mask_005", 0.3, "adamw", 1e-3, 0.1, 384)),
        ("wf42m_pfc03_40epoch_8gpu_vit_t", ("vit_t_dp005_mask0", 0.3, "adamw", 1e-3, 0.1, 512)),
        ("wf42m_pfc02_vit_h", ("vit_h", 0.5, "adamw", 1e-3, 0.1, 768)),
        ("wf42m_pfc02_16gpus_mbf_bs8k", ("mbf", 0.2, "sgd", 0.4, 1e-4, 512)),
        ("wf12m_pfc02_r100", ("r100", 0.2, "sgd", 0.1, 5e-4, 128)),
    ],
)
def test_webface_recipe_values_are_upstreams(name, recipe):
    cfg = _load(f"{name}_arcface")
    assert tuple(cfg[key] for key in RECIPE) == recipe


def test_webface_schedules_are_upstreams():
    vit_b = _load("wf42m_pfc03_40epoch_8gpu_vit_b_arcface")
    # 8 GPUs x 256 x 12 accumulated: the 64-GPU run's 64 x 384 images per optimiser step.
    assert tuple(vit_b[key] for key in SCHEDULE) == (40, 4, 12, 2000, [])
    assert vit_b.batch_size * 8 * vit_b.gradient_acc == 64 * 384
    vit_h = _load("wf42m_pfc02_vit_h_arcface")
    assert tuple(vit_h[key] for key in SCHEDULE) == (16, 2, 1, 2000, [])
    r50 = _load("wf42m_pfc02_16gpus_r50_bs8k_arcface")
    assert tuple(r50[key] for key in SCHEDULE) == (20, 4, 1, 10000, ["lfw", "cfp_fp", "agedb_30"])
    flip = _load("wf12m_flip_pfc01_filter04_r50_arcface")
    assert (flip.sample_rate, flip.interclass_filtering_threshold, flip.warmup_epoch) == (
        0.1,
        0.4,
        2,
    )
    assert _load("wf4m_mbf_arcface").weight_decay == 1e-4


def test_importing_a_twin_leaves_its_arcface_config_alone(configs_package):
    # arcface_torch's get_config imports configs.NAME: the twin must copy, not edit, its parent.
    parent = importlib.import_module("configs.wf42m_pfc03_40epoch_64gpu_vit_b_arcface").config
    before = copy.deepcopy(parent)
    twin = importlib.import_module("configs.wf42m_pfc03_40epoch_64gpu_vit_b_otface").config
    assert parent == before and parent.loss == "arcface"
    twin.val_targets.append("lfw")
    twin.margin_list = (1.0, 0.5, 0.0)
    assert parent == before  # no section or list is shared


def test_loading_a_twin_leaves_imported_configs_alone(configs_package):
    parent = importlib.import_module("configs.wf4m_r100_arcface")
    before = copy.deepcopy(parent.config)
    package = sys.modules["configs"]
    assert _load("wf4m_r100_otface").loss == "otface"
    assert parent.config == before
    assert sys.modules["configs"] is package and sys.modules["configs.wf4m_r100_arcface"] is parent
    assert "configs.wf4m_r100_otface" not in sys.modules


def test_twin_reads_its_own_folder_not_an_imported_configs(tmp_path, configs_package):
    importlib.import_module("configs.ms1mv3_r50_arcface")  # this checkout's, already imported
    folder = tmp_path / "configs"
    folder.mkdir()
    for name in ("__init__.py", "base.py", "ms1mv3_r50_arcface.py", "ms1mv3_r50_otface.py"):
        shutil.copy(os.path.join(CONFIGS, name), folder / name)
    with open(folder / "ms1mv3_r50_arcface.py", "a") as f:
        f.write("config.lr = 0.05\n")
    assert load_config(str(folder / "ms1mv3_r50_otface")).lr == 0.05
    assert not list(tmp_path.rglob("__pycache__"))  # no bytecode written beside the configs


def test_overlay_ships_what_its_twins_import(tmp_path):
    shipped = overlay_files()
    folder = tmp_path / "configs"
    folder.mkdir()
    shutil.copy(os.path.join(CONFIGS, "base.py"), folder / "base.py")
    for rel, data in shipped.items():
        if not rel.startswith("configs/"):
            continue
        for parent in re.findall(rb"^from configs\.(\w+) import", data, flags=re.M):
            assert f"configs/{parent.decode()}.py" in shipped, (rel, parent)
        (tmp_path / rel).write_bytes(data)
    for rel in shipped:
        if rel.startswith("configs/") and rel.endswith("_otface.py"):
            assert load_config(str(tmp_path / rel)).loss == "otface"


def test_train_py_takes_a_twin_from_the_repo_root():
    proc = run_train("configs/wf42m_pfc03_40epoch_8gpu_vit_b_otface", cwd=ROOT, timeout=120)
    # The config loaded and validated; the run stops where the data should be.
    assert proc.returncode != 0
    assert "/train_tmp/WebFace42M" in proc.stderr and "Traceback" not in proc.stderr
