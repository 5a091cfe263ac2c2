"""How well the OT term's Sinkhorn solves converge on real training batches, per solver setting.

The problems are the ones training solves: P x K batches of the config's data, the backbone's
hooked feature map, the hard triplets mined from its embeddings, and the divergence's
self-problems, all through :func:`otface.loss.hard_triplet_ot_loss` (so the same code path,
kernel choice and mining as in a training step). For each setting the table gives the share of
problems that stopped at ``max_iter`` above ``tol`` (``sinkhorn_unconverged``, the largest and
the mean over the batches), the iterations the batched solve ran, and the forward + backward
time of the OT term.

    python benchmarks/ot_convergence.py configs/demo_otface                       # fresh net
    python benchmarks/ot_convergence.py configs/demo_otface \\
        --model work_dirs/demo_otface/model.pt --batches 8 \\
        --setting eps=0.05,max_iter=50 --setting eps=0.05,max_iter=100,eps_scaling=0.5

A setting is ``key=value`` pairs of ``eps``, ``max_iter``, ``tol``, ``eps_scaling`` and
``relaxation``; the rest comes from the config's ``otface`` section.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from otface.config import load_config
from otface.loss import _fixed_shapes, hard_triplet_ot_loss
from otface.registry import HOOKS
from otface.train.data import build_loader, prepare_data
from otface.train.distributed import DistEnv
from otface.train.model import build_backbone

_KEYS = {"eps": float, "max_iter": int, "tol": float, "eps_scaling": float, "relaxation": float}


def parse_setting(text: str) -> dict:
    out = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in _KEYS:
            raise argparse.ArgumentTypeError(f"unknown key {key!r}; valid: {', '.join(_KEYS)}")
        out[key] = _KEYS[key](value)
    return out


def collect(cfg, model_path: str | None, batches: int, device: torch.device):
    """``(features, embeddings, labels)`` of the first ``batches`` training batches."""
    torch.manual_seed(cfg.seed)
    net = build_backbone(cfg, device)
    if model_path:
        net.load_state_dict(torch.load(model_path, map_location=device, weights_only=True))
    net.train()  # batch statistics, as in training
    capture = HOOKS.build("hard_triplet", net, layer=cfg.otface.layer)
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=device)
    loader = build_loader(cfg, env, prepare_data(cfg))
    loader.batch_sampler.set_epoch(0, start_batch=0)
    out = []
    with torch.no_grad():
        for img, labels in loader:
            img = img.to(device)
            if img.dtype == torch.uint8:
                img = img.float().div_(127.5).sub_(1.0)
            emb = net(img)
            out.append((capture.pop(), emb, labels.to(device)))
            if len(out) == batches:
                break
    capture.remove()
    return out


def run_setting(data, cfg, setting: dict, device: torch.device):
    o = dict(cfg.otface)
    kw = dict(
        mode=o["mode"],
        variant=o["variant"],
        ot_margin=o["ot_margin"],
        mining_margin=o["mining_margin"],
        max_triplets=o["max_triplets"],
        eps=setting.get("eps", o["epsilon"]),
        max_iter=setting.get("max_iter", o["max_iter"]),
        tol=setting.get("tol", o["tol"]),
        solver=o["solver"],
        distance=o["distance"],
        kernel=o.get("kernel", "auto"),
        fixed_shapes=_fixed_shapes(o.get("fixed_shapes", "auto"), device),
        eps_scaling=setting.get("eps_scaling", o.get("eps_scaling", 0.0)),
        relaxation=setting.get("relaxation", o.get("relaxation", 1.0)),
    )
    unconverged, iters, secs = [], [], []
    for features, emb, labels in data:
        f = features.detach().clone().requires_grad_(True)
        t0 = time.perf_counter()
        res = hard_triplet_ot_loss(f, emb, labels, **kw)
        res.loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        secs.append(time.perf_counter() - t0)
        unconverged.append(float(res.metrics["sinkhorn_unconverged"]))
        iters.append(float(res.metrics["sinkhorn_iters"]))
    return unconverged, iters, secs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="the training config, e.g. configs/demo_otface")
    parser.add_argument("--model", default=None, help="backbone weights (model.pt); default fresh")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch default)")
    parser.add_argument("--setting", action="append", type=parse_setting, default=[])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(args.config)
    data = collect(cfg, args.model, args.batches, device)
    settings = args.setting or [{}]
    o = cfg.otface
    print(
        f"{args.config}, {'model ' + args.model if args.model else 'fresh backbone'}, "
        f"{len(data)} batches of {cfg.batch_size} on {device} ({torch.get_num_threads()} "
        f"threads); defaults eps={o.epsilon} max_iter={o.max_iter} tol={o.tol} "
        f"eps_scaling={o.get('eps_scaling', 0.0)}"
    )
    print(
        f"{'setting':44s} {'unconv max':>10s} {'unconv mean':>11s} {'iters max':>9s} "
        f"{'iters mean':>10s} {'ms (median)':>11s}"
    )
    for setting in settings:
        unconverged, iters, secs = run_setting(data, cfg, setting, device)
        label = ",".join(f"{k}={v}" for k, v in setting.items()) or "(config)"
        print(
            f"{label:44s} {max(unconverged):10.4f} {statistics.mean(unconverged):11.4f} "
            f"{max(iters):9.0f} {statistics.mean(iters):10.1f} "
            f"{1e3 * statistics.median(secs):11.1f}"
        )


if __name__ == "__main__":
    main()
