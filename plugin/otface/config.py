"""Load and validate training configs the arcface_torch way.

``configs/base.py`` holds every default in an EasyDict ``config``; a job config
``configs/NAME.py`` updates it (nested sections such as ``otface`` and ``sampler`` are merged key
by key); ``output`` defaults to ``work_dirs/NAME``. Every key is then checked: an unknown or
misspelt key, a wrong type or an out-of-range value raises :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import difflib
import importlib.machinery
import importlib.util
import math
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

from easydict import EasyDict as edict

__all__ = [
    "ConfigError",
    "config_name",
    "cuda_graph_config_conflict",
    "load_config",
    "validate_config",
]


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class _Spec:
    types: tuple[type, ...]
    choices: Sequence[Any] | None = None
    check: Callable[[Any], bool] | None = None
    need: str = ""  # human description of the valid range, for messages
    nullable: bool = False


def _num(need: str, check: Callable[[float], bool]) -> _Spec:
    return _Spec((int, float), check=check, need=need)


def _int(need: str, check: Callable[[int], bool]) -> _Spec:
    return _Spec((int,), check=check, need=need)


_BOOL = _Spec((bool,))
_STR = _Spec((str,))
_POS = _num("> 0", lambda v: v > 0)
_NONNEG = _num(">= 0", lambda v: v >= 0)
_POS_INT = _int("an integer >= 1", lambda v: v >= 1)
_NONNEG_INT = _int("an integer >= 0", lambda v: v >= 0)


def _margin_list_ok(v: Any) -> bool:
    return (
        len(v) == 3
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        and v[0] > 0
        and v[1] >= 0
        and v[2] >= 0
    )


_SCHEMA: dict[str, _Spec] = {
    "margin_list": _Spec(
        (tuple, list), check=_margin_list_ok, need="(m1, m2, m3) with m1 > 0, m2 >= 0, m3 >= 0"
    ),
    "margin_exact_grad": _BOOL,
    "head": _Spec((str,), choices=("combined", "adaface", "curricularface")),
    "adaface.m": _num("in [0, pi) (radians)", lambda v: 0 <= v < math.pi),
    "adaface.h": _POS,
    "adaface.t_alpha": _num("in (0, 1]", lambda v: 0 < v <= 1),
    "curricularface.m": _num("in [0, pi) (radians)", lambda v: 0 <= v < math.pi),
    "curricularface.alpha": _num("in (0, 1]", lambda v: 0 < v <= 1),
    "network": _STR,
    "resume": _BOOL,
    "save_all_states": _BOOL,
    "output": _Spec((str,), nullable=True),
    "embedding_size": _POS_INT,
    "sample_rate": _num("in (0, 1]", lambda v: 0 < v <= 1),
    "interclass_filtering_threshold": _num("in [0, 1)", lambda v: 0 <= v < 1),
    "fp16": _BOOL,
    "channels_last": _Spec((str, bool), choices=("auto", True, False)),
    "compile": _Spec(
        (str, bool),
        choices=(
            False,
            True,
            "default",
            "reduce-overhead",
            "max-autotune",
            "max-autotune-no-cudagraphs",
        ),
    ),
    "compile_scope": _Spec((str,), choices=("blocks", "network")),
    "fused_bn_prelu": _Spec((str,), choices=("off", "auto", "triton")),
    "cuda_graph": _Spec((str,), choices=("off", "auto", "on")),
    "batch_size": _POS_INT,
    "optimizer": _Spec((str,), choices=("sgd", "adamw")),
    "lr": _POS,
    "momentum": _num("in [0, 1)", lambda v: 0 <= v < 1),
    "weight_decay": _NONNEG,
    "verbose": _POS_INT,
    "frequent": _POS_INT,
    "rec": _STR,
    "demo_occlusion_p": _Spec(
        (float, int), nullable=True, check=lambda v: 0 <= v <= 1, need="None or a number in [0, 1]"
    ),
    "num_classes": _Spec(
        (int, str),
        check=lambda v: v == "auto" or (isinstance(v, int) and v >= 2),
        need="an integer >= 2 or 'auto' (read from the data)",
    ),
    "num_image": _Spec(
        (int, str),
        check=lambda v: v == "auto" or (isinstance(v, int) and v >= 1),
        need="an integer >= 1 or 'auto' (read from the data)",
    ),
    "init_backbone": _Spec((str,), nullable=True),
    "init_centres": _Spec((str,), nullable=True),
    "freeze_steps": _num(
        "an integer >= 0 (steps) or a fraction of the run's steps in (0, 1)",
        lambda v: (isinstance(v, int) and v >= 0) or 0 < v < 1,
    ),
    "freeze_stages": _Spec(
        (str, int),
        check=lambda v: v == "all" or (isinstance(v, int) and v >= 0),
        need="'all' or an integer >= 0 (the stem and the first k residual stages)",
    ),
    "freeze_bn": _BOOL,
    "backbone_lr_mult": _NONNEG,
    "num_epoch": _POS_INT,
    "warmup_epoch": _num(">= 0", lambda v: v >= 0),
    "val_targets": _Spec(
        (list, tuple), check=lambda v: all(isinstance(x, str) for x in v), need="a list of names"
    ),
    "dali": _Spec((bool,), choices=(False,)),
    "dali_aug": _BOOL,
    "gradient_acc": _POS_INT,
    "seed": _NONNEG_INT,
    "num_workers": _NONNEG_INT,
    "save_every_steps": _NONNEG_INT,
    "max_consecutive_skips": _NONNEG_INT,
    "max_skipped_fraction": _num("in (0, 1]", lambda v: 0 < v <= 1),
    "max_bad_image_fraction": _num("in [0, 1]", lambda v: 0 <= v <= 1),
    "collective_timeout_s": _POS,
    "loss": _STR,  # checked against the LOSSES registry at build time
    "augment.occlusion_p": _num("in [0, 1]", lambda v: 0 <= v <= 1),
    "augment.occluders": _Spec(
        (list, tuple),
        check=lambda v: len(v) > 0 and all(k in ("mask", "bar", "patch", "hand") for k in v),
        need="a non-empty list of 'mask', 'bar', 'patch', 'hand'",
    ),
    "sampler.type": _Spec((str,), choices=("pk", "uniform")),
    "sampler.k": _int("an integer >= 2", lambda v: v >= 2),
    "otface.lambda_ot": _NONNEG,
    "otface.warmup_steps": _NONNEG_INT,
    "otface.mode": _Spec((str,), choices=("spatial", "group")),
    "otface.variant": _Spec((str,), choices=("hinge", "pull")),
    "otface.ot_margin": _NONNEG,
    "otface.mining_margin": _num("in [-2, 2]", lambda v: -2 <= v <= 2),
    "otface.max_triplets": _NONNEG_INT,
    "otface.epsilon": _POS,
    "otface.max_iter": _POS_INT,
    "otface.tol": _POS,
    "otface.eps_scaling": _num("in [0, 1) (0: off)", lambda v: 0 <= v < 1),
    "otface.relaxation": _num("in [1, 2) (1: off)", lambda v: 1 <= v < 2),
    "otface.layer": _STR,
    "otface.solver": _Spec((str,), choices=("auto", "torch", "pot")),
    "otface.kernel": _Spec((str,), choices=("auto", "torch", "matmul", "triton")),
    "otface.distance": _Spec((str,), choices=("divergence", "entropic", "transport")),
    "otface.fixed_shapes": _Spec((str, bool), choices=("auto", True, False)),
    "using_wandb": _BOOL,
    "wandb_key": _STR,
    "suffix_run_name": _Spec((str,), nullable=True),
    "wandb_entity": _STR,
    "wandb_project": _STR,
    "wandb_log_all": _BOOL,
    "save_artifacts": _BOOL,
    "wandb_resume": _BOOL,
    "notes": _STR,
}

_REFUSED = {
    "dali": "NVIDIA DALI is not supported; the built-in DataLoader reads .rec files",
}


def config_name(path: str) -> str:
    """``configs/ms1mv3_r100_otface`` (with or without ``.py``) → ``ms1mv3_r100_otface``."""
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def _resolve_path(path: str) -> str:
    candidates = [path] if path.endswith(".py") else [path + ".py", path]
    for cand in candidates:
        if os.path.isfile(cand):
            return cand
    raise ConfigError(
        f"config {path!r} not found (looked for {', '.join(map(repr, candidates))}); "
        "pass it as configs/NAME, as in `python train.py configs/demo_otface`"
    )


@contextmanager
def _own_config_package(file: str) -> Iterator[None]:
    """Let the job config import its neighbours as arcface_torch names them.

    Inside, ``configs.NAME`` (the job's folder name, then a file of that folder) is a fresh
    import from the job's own folder, whichever ``configs`` package the process imported before
    (an OTFace twin imports its ArcFace config this way), and no bytecode is written beside the
    configs. Afterwards ``sys.modules`` holds what it held before.
    """
    folder = os.path.dirname(os.path.abspath(file))
    package = os.path.basename(folder)
    if not package.isidentifier():
        yield
        return

    def owned(name: str) -> bool:
        return name == package or name.startswith(package + ".")

    saved = {name: module for name, module in sys.modules.items() if owned(name)}
    write_bytecode = sys.dont_write_bytecode
    try:
        for name in saved:
            del sys.modules[name]
        finder = sys.path_importer_cache.get(folder)
        if finder is not None:  # a file written since it last listed the folder
            finder.invalidate_caches()
        sys.dont_write_bytecode = True
        init = os.path.join(folder, "__init__.py")
        if os.path.isfile(init):
            spec = importlib.util.spec_from_file_location(
                package, init, submodule_search_locations=[folder]
            )
        else:
            spec = importlib.machinery.ModuleSpec(package, None, is_package=True)
            spec.submodule_search_locations = [folder]
        module = importlib.util.module_from_spec(spec)
        sys.modules[package] = module
        if spec.loader is not None:
            spec.loader.exec_module(module)
        yield
    finally:
        sys.dont_write_bytecode = write_bytecode
        for name in [name for name in sys.modules if owned(name)]:
            del sys.modules[name]
        sys.modules.update(saved)


def _exec_config(file: str) -> edict:
    spec = importlib.util.spec_from_file_location(f"_otface_config_{config_name(file)}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        with _own_config_package(file):
            spec.loader.exec_module(module)
    except Exception as err:  # a user's file: report it as a config error, with its cause
        raise ConfigError(f"{file}: cannot be executed: {type(err).__name__}: {err}") from err
    cfg = getattr(module, "config", None)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{file}: defines no `config` dict (expected `config = edict()`)")
    return cfg


def _merge(base: dict, job: dict, file: str, prefix: str = "") -> None:
    for key, value in job.items():
        full = prefix + key
        if key in base and isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{file}: key '{full}' must be a section (edict), got {value!r}")
            _merge(base[key], value, file, full + ".")
        else:
            base[key] = value


def _flat_keys(cfg: dict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in cfg.items():
        full = prefix + str(key)
        if isinstance(value, dict):
            yield from _flat_keys(value, full + ".")
        else:
            yield full, value


def _closest(key: str, valid: Sequence[str]) -> str:
    leaf = key.rsplit(".", 1)[-1]
    by_full = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    by_leaf = [
        v
        for v in valid
        if difflib.SequenceMatcher(None, leaf, v.rsplit(".", 1)[-1]).ratio() >= 0.75
    ]
    close = list(dict.fromkeys(by_full + by_leaf))[:3]
    return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else "no close match"


def validate_config(cfg: dict, *, source: str = "config") -> None:
    """Check every key of a merged config against the schema.

    Raises:
        ConfigError: naming the first offending key, the value received and what is valid.
    """
    valid = sorted(_SCHEMA)
    for key, value in _flat_keys(cfg):
        spec = _SCHEMA.get(key)
        if spec is None:
            raise ConfigError(f"{source}: unknown key '{key}' ({_closest(key, valid)})")
        if value is None and spec.nullable:
            continue
        ok_type = isinstance(value, spec.types) and not (
            isinstance(value, bool) and bool not in spec.types
        )
        if isinstance(value, float) and not math.isfinite(value):
            ok_type = False
        if not ok_type:
            names = "/".join(t.__name__ for t in spec.types)
            raise ConfigError(
                f"{source}: key '{key}' must be {names}"
                f"{' or None' if spec.nullable else ''}, got {value!r}"
            )
        if spec.choices is not None and value not in spec.choices:
            why = f" ({_REFUSED[key]})" if key in _REFUSED else ""
            raise ConfigError(
                f"{source}: key '{key}' = {value!r} is not valid{why}; "
                f"choices: {', '.join(map(repr, spec.choices))}"
            )
        if spec.check is not None and not spec.check(value):
            raise ConfigError(
                f"{source}: key '{key}' = {value!r} is out of range; need {spec.need}"
            )
    for key in _SCHEMA:
        head = key.split(".")[0]
        if head not in cfg:
            raise ConfigError(f"{source}: key '{key}' is missing (is configs/base.py complete?)")
    if cfg["compile"] is not False and cfg["fused_bn_prelu"] != "off":
        raise ConfigError(
            f"{source}: keys 'compile' = {cfg['compile']!r} and 'fused_bn_prelu' = "
            f"{cfg['fused_bn_prelu']!r} exclude each other: torch.compile fuses BatchNorm + PReLU "
            "itself and does not trace the fused op's kernels; set one of them off"
        )
    if cfg["head"] != "combined" and cfg["interclass_filtering_threshold"] > 0:
        raise ConfigError(
            f"{source}: key 'interclass_filtering_threshold' = "
            f"{cfg['interclass_filtering_threshold']!r} belongs to head 'combined' "
            f"(arcface_torch's margins); head = {cfg['head']!r} does not filter: set it to 0.0"
        )
    if cfg["cuda_graph"] == "on":
        why = cuda_graph_config_conflict(cfg)
        if why:
            raise ConfigError(f"{source}: key 'cuda_graph' = 'on' cannot be used: {why}")
    if cfg["rec"] == "synthetic":
        for key in ("num_classes", "num_image"):
            if cfg[key] == "auto":
                raise ConfigError(
                    f"{source}: key '{key}' = 'auto' reads the size from the data, but rec = "
                    "'synthetic' has none: give the number"
                )
    if cfg["init_centres"] is not None and cfg["resume"]:
        raise ConfigError(
            f"{source}: keys 'init_centres' and 'resume' = True exclude each other: a resumed "
            "run takes its class centres from its own checkpoints"
        )
    if cfg["using_wandb"] and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            f"{source}: key 'using_wandb' = True needs the wandb package, which is not "
            "installed: pip install -e .[wandb] (or pip install wandb), or set it False"
        )
    if cfg["sampler"]["type"] == "pk" and cfg["batch_size"] % cfg["sampler"]["k"] != 0:
        raise ConfigError(
            f"{source}: key 'batch_size' = {cfg['batch_size']} is not a multiple of key "
            f"'sampler.k' = {cfg['sampler']['k']} (a P x K batch holds P identities x K images)"
        )


def cuda_graph_config_conflict(cfg) -> str:
    """Why the config keys rule out recording the step as a CUDA graph (``cuda_graph``), or
    ``""``. The device and the number of processes are checked when training starts."""
    if cfg["compile"] is not False:
        return (
            f"key 'compile' = {cfg['compile']!r} is on (torch.compile's \"reduce-overhead\" "
            "mode is its own CUDA graphs); set one of them off"
        )
    if cfg["gradient_acc"] != 1:
        return (
            f"key 'gradient_acc' = {cfg['gradient_acc']} (the recorded step is one batch's "
            "forward and backward; accumulation is not recorded)"
        )
    if cfg["freeze_steps"] > 0:
        return (
            f"key 'freeze_steps' = {cfg['freeze_steps']} (the recorded step would keep "
            "updating the frozen parameters' gradients; freezing is applied eagerly)"
        )
    if cfg.get("head", "combined") != "combined":
        return (
            f"key 'head' = {cfg['head']!r} keeps running statistics that the recording's "
            "warm-up passes would update as extra steps"
        )
    if cfg["sample_rate"] < 1:
        return (
            f"key 'sample_rate' = {cfg['sample_rate']} (Partial FC's sampling of class centres "
            "has a data-dependent shape, which a CUDA graph cannot hold)"
        )
    return ""


def load_config(path: str, *, base: str | None = None) -> edict:
    """Load ``configs/NAME`` over ``configs/base.py`` and validate it.

    Args:
        path: the job config, ``configs/NAME`` or a path to a ``.py`` file.
        base: the defaults file; by default ``base.py`` beside the job config, else
            ``configs/base.py`` under the current directory.

    Returns:
        The merged, validated config (``output`` filled in).

    Raises:
        ConfigError: missing file, unknown key, wrong type or value.
    """
    file = _resolve_path(path)
    if base is None:
        beside = os.path.join(os.path.dirname(os.path.abspath(file)), "base.py")
        base = beside if os.path.isfile(beside) else os.path.join("configs", "base.py")
    if not os.path.isfile(base):
        raise ConfigError(f"defaults file {base!r} not found (it holds every key's default)")
    cfg = edict(_exec_config(base))
    if os.path.abspath(base) != os.path.abspath(file):
        job = _exec_config(file)
        _merge(cfg, job, file)
    cfg = edict(cfg)
    validate_config(cfg, source=file)
    if cfg.output is None:
        cfg.output = os.path.join("work_dirs", config_name(file))
    return cfg
