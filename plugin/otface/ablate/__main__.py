"""Train every config × seed on the same data, evaluate each model, and compare the configs.

    python -m otface.ablate configs/demo_arcface configs/demo_otface --seeds 3
    python -m otface.ablate configs/demo_otface configs/demo_otface \\
        --set 2:otface.distance=entropic --seeds 2 --epochs 2
    python -m otface.ablate configs/ms1mv3_r100_arcface configs/ms1mv3_r100_otface \\
        --seeds 3 --launcher "torchrun --nproc_per_node=8" --ijb /data/IJBC --ijb-target IJBC

Prints one table (mean ± std over seeds per config; paired difference to the first config with
a 95% t-interval; accuracy on each ``.bin`` set; TAR at FAR 1e-4 / 1e-3 / 1e-2 on the IJB set)
and writes ``ablation.{txt,json,csv,png}`` into ``--output``. Re-running the same command skips
finished runs, so a killed ablation continues where it stopped.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from otface.evaluation.cli import positive_int
    from otface.evaluation.metrics import TAR_METHODS

    p = argparse.ArgumentParser(
        prog="python -m otface.ablate",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("configs", nargs="+", help="configs to compare; the first is the reference")
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds per config (default 3)")
    p.add_argument(
        "--first-seed",
        type=int,
        default=None,
        help="seeds are FIRST, FIRST+1, ... (default: the first config's seed)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="[N:]KEY=VALUE",
        help="config override for every config, or with N: for the N-th only (repeatable)",
    )
    p.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help="shortened schedule: train this many epochs (num_epoch; warm-up capped below it)",
    )
    p.add_argument("--output", default="work_dirs/ablation", help="result folder")
    p.add_argument(
        "--val-targets",
        default=None,
        help="comma-separated .bin sets of the data folder (default: every .bin in it)",
    )
    p.add_argument(
        "--ijb",
        default="auto",
        help="IJB folder (InsightFace layout), 'none', or 'auto': the demo data's ijb/ when "
        "rec = 'demo', else none",
    )
    p.add_argument("--ijb-target", default=None, help="IJBB or IJBC (default IJBC; demo: demo)")
    p.add_argument("--tar-method", choices=TAR_METHODS, default=TAR_METHODS[0])
    p.add_argument(
        "--launcher",
        default="",
        help="how to start each training, e.g. 'torchrun --nproc_per_node=8' (default: python)",
    )
    p.add_argument("--device", default=None, help="torch device for evaluation")
    return p


def _eval_spec(args, rec: str):
    from otface.ablate.runner import EvalSpec
    from otface.evaluation.bin_io import list_bin_sets

    folder = Path(rec) if rec != "synthetic" else None
    available = list_bin_sets(folder) if folder is not None else []
    if args.val_targets is None:
        names = available
    else:
        names = [n.strip() for n in args.val_targets.split(",") if n.strip()]
        missing = [n for n in names if n not in available]
        if missing:
            raise FileNotFoundError(
                f"--val-targets {', '.join(missing)}: no such .bin in {folder} "
                f"(there: {', '.join(available) or 'none'})"
            )
    bin_sets = tuple((n, str(folder / f"{n}.bin")) for n in names)
    ijb = None
    if args.ijb == "auto":
        if folder is not None and (folder / "ijb" / "meta").is_dir():
            ijb = (str(folder / "ijb"), args.ijb_target or "demo")
    elif args.ijb != "none":
        from otface.evaluation.ijb_meta import ijb_layout

        target = args.ijb_target or "IJBC"
        ijb_layout(Path(args.ijb), target)  # fails now, naming the missing file
        ijb = (args.ijb, target)
    return EvalSpec(bin_sets, ijb, tar_method=args.tar_method, device=args.device)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import logging
    import warnings

    from otface.ablate.plan import make_arms, parse_override, plan_runs
    from otface.ablate.report import build_report, format_table, write_outputs
    from otface.ablate.runner import AblationError, run_all, train_subprocess
    from otface.config import ConfigError, load_config
    from otface.console_log import cli_logging
    from otface.data.loader import prepare_rec

    args = _parser().parse_args(argv)
    cli_logging(logging.WARNING)
    # insightface's alignment calls a scikit-image API that warns on every call.
    warnings.filterwarnings("ignore", category=FutureWarning, module="insightface")
    output = Path(args.output)
    launcher = shlex.split(args.launcher)
    try:
        overrides = [parse_override(t) for t in args.overrides]
        arms = make_arms(args.configs, overrides)
        first = args.first_seed
        if first is None:
            first = int(load_config(arms[0].config_path).seed)
        seeds = list(range(first, first + args.seeds))
        shared = [o for o in overrides if o.arm is None]
        runs = plan_runs(arms, seeds, output, shared=shared, epochs=args.epochs)
        recs = {str(r.cfg.rec) for r in runs}
        if len(recs) > 1:
            raise ConfigError(
                f"the configs train on different data (rec = {', '.join(sorted(recs))}); "
                "an ablation compares them on the same data (--set rec=...)"
            )
        occlusion = {r.cfg.get("demo_occlusion_p") for r in runs}
        if len(occlusion) > 1:
            raise ConfigError(
                "the configs train on different demo data (demo_occlusion_p = "
                f"{', '.join(map(repr, sorted(occlusion, key=repr)))}); set one for all "
                "(--set demo_occlusion_p=...)"
            )
        # The demo data is generated here, once.
        rec = prepare_rec(recs.pop(), demo_occlusion_p=occlusion.pop())
        spec = _eval_spec(args, rec)
        results = run_all(
            runs,
            spec,
            train=lambda run, resume: train_subprocess(run, launcher=launcher, resume=resume),
            progress=lambda line: print(line, flush=True),
        )
    except KeyboardInterrupt:
        print(
            "interrupted: finished runs are kept; run the same command again to continue",
            file=sys.stderr,
        )
        return 130
    except (ConfigError, AblationError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, (ConfigError, ValueError)) else 1
    report = build_report(results, [a.label for a in arms], seeds, args.tar_method)
    folders = {(r.arm.label, r.seed): r.folder for r in runs}
    written = write_outputs(output, report, results, folders)
    print(format_table(report))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    from otface.openmp import configure_openmp

    configure_openmp()  # this process and the trainings it starts
    sys.exit(main())
