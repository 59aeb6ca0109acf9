"""The learning-rate schedule of a resumed run, by Megatron-LM's convention.

A checkpoint stores its scheduler's settings. On a resume:

- `--use-checkpoint-opt-param-scheduler`: the checkpoint's settings, whatever the command line says;
- `--override-opt-param-scheduler`: the command line's settings;
- neither: the two must agree, and a difference is refused, naming both values.

`--lr-decay-iters` left unset means "decay until --train-iters" on every run, resumes included: so
extending a run (`TRAIN_ITERS=40` after 20 steps) stretches its decay to the new end, instead of
keeping the old one and running the extra steps at --min-lr. Give --lr-decay-iters to fix it.
"""

from __future__ import annotations

import argparse

# train.py argument -> its key in Megatron's OptimizerParamScheduler state
SCHEDULE = {
    "lr": "max_lr",
    "min_lr": "min_lr",
    "lr_warmup_iters": "lr_warmup_steps",
    "lr_decay_iters": "lr_decay_steps",
    "lr_decay_style": "lr_decay_style",
    "weight_decay": "start_wd",
}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    choice = group.add_mutually_exclusive_group()
    choice.add_argument("--override-opt-param-scheduler", action="store_true",
                        help="on a resume, take the learning-rate schedule from the command line")
    choice.add_argument("--use-checkpoint-opt-param-scheduler", action="store_true",
                        help="on a resume, keep the checkpoint's learning-rate schedule")


def decay_iters(args: argparse.Namespace) -> int:
    """The decay length in effect: --lr-decay-iters, or --train-iters when it is unset."""
    return args.train_iters if args.lr_decay_iters is None else args.lr_decay_iters


def resolve_schedule(args: argparse.Namespace, saved: dict, folder) -> str | None:
    """Set the schedule arguments of `args` for a resume from `folder`, whose scheduler state is
    `saved`; SystemExit naming both values where they differ and neither flag chooses. Returns a
    note to log when an unset --lr-decay-iters moves the end of the decay."""
    if args.use_checkpoint_opt_param_scheduler:
        for name, key in SCHEDULE.items():
            setattr(args, name, saved[key])
        return None
    note = None
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
        if saved["lr_decay_steps"] != args.train_iters and args.lr_decay_style != "constant":
            note = (f"the learning rate now decays until step {args.train_iters} (the checkpoint's: "
                    f"{saved['lr_decay_steps']}), following --train-iters")
        saved = {**saved, "lr_decay_steps": args.lr_decay_iters}
    if args.override_opt_param_scheduler:
        return note
    differ = [(name, getattr(args, name), saved[key]) for name, key in SCHEDULE.items() if getattr(args, name) != saved[key]]
    if differ:
        listed = "; ".join(f"--{name.replace('_', '-')} {now} here, {then} in the checkpoint" for name, now, then in differ)
        raise SystemExit(f"{folder} was trained with another learning-rate schedule ({listed}): pass "
                         f"--override-opt-param-scheduler to use this command line's, or "
                         f"--use-checkpoint-opt-param-scheduler to keep the checkpoint's")
    return note


def set_group_lrs(optimizer, max_lr: float, min_lr: float) -> None:
    """Megatron's optimizer keys its parameter groups by their max_lr / min_lr when it loads a
    checkpoint, and its scheduler reads them: set them on every group."""
    for group in optimizer.param_groups:
        group["max_lr"], group["min_lr"] = max_lr, min_lr
