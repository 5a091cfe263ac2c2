import glob
import os

import pytest
from _jobs import write_job
from _spawn import run_train

from otface.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not p.endswith("__init__.py")
)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_validate(name):
    cfg = load_config(os.path.join(ROOT, "configs", name))
    assert cfg.output == os.path.join("work_dirs", name)


def test_upstream_dataset_sizes():
    ms1 = load_config(os.path.join(ROOT, "configs", "ms1mv3_r100_arcface"))
    glint = load_config(os.path.join(ROOT, "configs", "glint360k_r100_arcface"))
    assert (ms1.num_classes, ms1.num_image) == (93431, 5179510)
    assert (glint.num_classes, glint.num_image) == (360232, 17091657)


def test_job_overlays_base_and_merges_sections(tmp_path):
    cfg = load_config(write_job(tmp_path, "job", {"batch_size": 64, "otface": {"lambda_ot": 0.5}}))
    assert cfg.batch_size == 64
    assert cfg.otface.lambda_ot == 0.5
    assert cfg.otface.epsilon == 0.05  # the rest of the section keeps its defaults
    assert cfg.lr == 0.1
    assert cfg.output == os.path.join("work_dirs", "job")


@pytest.mark.parametrize(
    "body, must_name",
    [
        ("config.lamda_ot = 1.0\n", ["'lamda_ot'", "otface.lambda_ot"]),
        ("config.batchsize = 64\n", ["'batchsize'", "batch_size"]),
        ("config.otface = edict(epsilom=0.1)\n", ["otface.epsilom", "otface.epsilon"]),
        ("config.adaface = edict(t_alfa=0.1)\n", ["adaface.t_alfa", "adaface.t_alpha"]),
        ("config.curricularface = edict(alfa=0.1)\n", ["alfa", "curricularface.alpha"]),
        ("config.haed = 'adaface'\n", ["'haed'", "head"]),
    ],
)
def test_misspelt_key_names_closest(tmp_path, body, must_name):
    with pytest.raises(ConfigError) as info:
        load_config(write_job(tmp_path, "job", extra=body))
    for text in must_name:
        assert text in str(info.value)


@pytest.mark.parametrize(
    "body, key",
    [
        ("config.batch_size = '64'\n", "batch_size"),
        ("config.batch_size = 0\n", "batch_size"),
        ("config.fp16 = 1\n", "fp16"),
        ("config.sample_rate = 1.5\n", "sample_rate"),
        ("config.optimizer = 'adam'\n", "optimizer"),
        ("config.margin_list = (1.0, 0.5)\n", "margin_list"),
        ("config.otface = edict(mode='pixels')\n", "otface.mode"),
        ("config.otface = edict(epsilon=float('nan'))\n", "otface.epsilon"),
        ("config.sampler = edict(k=3)\n", "sampler.k"),
        ("config.dali = True\n", "dali"),
        ("config.otface = 3\n", "otface"),
        ("config.head = 'arcface'\n", "head"),
        ("config.head = 'AdaFace'\n", "head"),
        ("config.adaface = edict(m=-0.1)\n", "adaface.m"),
        ("config.adaface = edict(h=0)\n", "adaface.h"),
        ("config.adaface = edict(t_alpha=0.0)\n", "adaface.t_alpha"),
        ("config.adaface = edict(t_alpha='0.01')\n", "adaface.t_alpha"),
        ("config.curricularface = edict(m=3.5)\n", "curricularface.m"),
        ("config.curricularface = edict(alpha=1.01)\n", "curricularface.alpha"),
        (
            "config.head = 'adaface'\nconfig.interclass_filtering_threshold = 0.3\n",
            "interclass_filtering_threshold",
        ),
    ],
)
def test_bad_value_names_key(tmp_path, body, key):
    with pytest.raises(ConfigError) as info:
        load_config(write_job(tmp_path, "job", extra=body))
    assert f"'{key}'" in str(info.value)


def test_head_defaults_are_the_papers_and_sections_merge(tmp_path):
    cfg = load_config(write_job(tmp_path, "job", extra="config.adaface = edict(m=0.5)\n"))
    assert cfg.head == "combined"
    assert dict(cfg.adaface) == {"m": 0.5, "h": 0.333, "t_alpha": 0.01}
    assert dict(cfg.curricularface) == {"m": 0.5, "alpha": 0.01}


def test_a_head_with_statistics_is_not_recorded_as_a_cuda_graph(tmp_path):
    # The recording's warm-up passes would update the running statistics as extra steps.
    body = "config.head = 'curricularface'\nconfig.cuda_graph = 'on'\n"
    with pytest.raises(ConfigError, match="'cuda_graph' = 'on' cannot be used: key 'head'"):
        load_config(write_job(tmp_path, "job", extra=body))


def test_choice_error_lists_choices(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write_job(tmp_path, "job", extra="config.optimizer = 'adam'\n"))
    assert "'sgd'" in str(info.value) and "'adamw'" in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "configs" / "nope"))


def test_broken_python_in_config_names_file(tmp_path):
    path = write_job(tmp_path, "job", extra="config.lr = 0.1 +\n")
    with pytest.raises(ConfigError, match="job.py"):
        load_config(path)


def test_train_py_misspelt_key_is_one_line(tmp_path):
    path = write_job(tmp_path, "job", extra="config.lamda_ot = 1.0\n")
    proc = run_train(path, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "lamda_ot" in lines[0] and "otface.lambda_ot" in lines[0]
