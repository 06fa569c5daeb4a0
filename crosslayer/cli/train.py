"""`crosslayer train`: train, resume or uptrain a CLA model from a YAML recipe (python or torchrun)."""

from __future__ import annotations

import argparse

from . import add_progress_flag


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a CLA model from a YAML recipe (python or torchrun)",
        description="Train (or resume, or uptrain with --init) a CLA model. Run the same command under "
        "`torchrun --nproc_per_node N` for DDP or FSDP2 (parallel: fsdp). A run folder resumes where it stopped, "
        "also with a different number of processes.",
    )
    p.add_argument("config", help="YAML recipe (see configs/)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (repeatable); model.FIELD=VALUE overrides a model field")
    p.add_argument("--init", default=None, metavar="DIR", help="start from the weights of this crosslayer model folder")
    p.add_argument("--out", default=None, metavar="DIR", help="run folder (overrides the recipe's out)")
    add_progress_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from ..train import load_train_config, train

    overrides = {"out": args.out, "init": args.init}
    if args.no_progress:
        overrides["progress"] = False
    cfg = load_train_config(args.config, args.sets, **overrides)
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
