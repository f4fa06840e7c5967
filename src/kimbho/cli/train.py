"""`kimbho train` (and `--nproc N`, which runs torchrun for you)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import KimbhoError

log = logging.getLogger("kimbho")


def cmd_train(args: argparse.Namespace) -> int:
    from ..config import resolve_run_config

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.init is not None and args.preset is not None:
        raise KimbhoError("--init takes the model config from MODEL; drop --preset")
    run, explicit = resolve_run_config(args.config, args.preset, overrides)
    if args.nproc is not None:
        from ..training.distributed import launch, split_batch

        if args.nproc >= 1:  # what can be checked before starting the processes
            split_batch(run.train.batch_size, run.train.micro_batch_size, args.nproc)
        return launch(args.nproc, without_option(args.argv, "--nproc"))

    from ..training.trainer import Trainer

    trainer = Trainer(
        run,
        args.data,
        args.out,
        resume=args.resume,
        explicit_keys=explicit,
        init_from=args.init,
        force_resume=args.force_resume,
    )
    if not trainer.world.is_main:
        trainer.fit()  # rank 0 reports
        return 0
    params = trainer.model.num_params()
    processes = (
        f" x {trainer.world.size} processes ({trainer.cfg.parallel})" if trainer.world.size > 1 else ""
    )
    log.info(
        f"training {params / 1e6:.2f}M parameters on {trainer.device}{processes} "
        f"({str(trainer.dtype).removeprefix('torch.')}), "
        f"{trainer.cfg.max_steps} steps of {trainer.cfg.batch_size} x {trainer.seq_len} tokens"
    )
    last = trainer.fit()
    summary = ", ".join(
        f"{k} {v:.4f}"
        for k, v in {**last.get("train", {}), **last.get("eval", {})}.items()
        if k in ("loss", "val_loss", "val_bpb")
    )
    if "stopped_by" in last:
        print(f"stopped {args.out} at step {trainer.progress.step} ({last['stopped_by']}): {summary}")
    else:
        print(f"finished {args.out}: {summary}")
    return 0


def without_option(argv: list[str], option: str) -> list[str]:
    """`argv` less `option VALUE` / `option=VALUE` (the train parser takes no abbreviations)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..config import config_help

    train = sub.add_parser(
        "train",
        help="train a model",
        allow_abbrev=False,  # --nproc is passed on to torchrun's processes less itself, exactly
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (YAML sections model:, train:, lora: and data:, or key=value on the command line):\n"
        + config_help(),
    )
    train.add_argument("--config", type=Path, metavar="FILE.yaml")
    train.add_argument("--preset", metavar="NAME", help="seed, tiny, small, base or 1b")
    train.add_argument("--data", required=True, metavar="DATA_DIR")
    train.add_argument("--out", required=True, metavar="RUN_DIR")
    train.add_argument("--max-steps", type=int, metavar="N", help="shorthand for train.max_steps=N")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in RUN_DIR (bit-identical to an uninterrupted run)",
    )
    train.add_argument(
        "--force-resume",
        action="store_true",
        help="resume even if the model config, tokenizer or dataset differ from the checkpoint's",
    )
    train.add_argument(
        "--init",
        metavar="MODEL",
        help="start from MODEL's weights, config and tokenizer (a run, checkpoint or Hugging Face "
        "directory); DATA_DIR must be prepared with MODEL's tokenizer.json",
    )
    train.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train on N processes of this machine (one per GPU, or CPU processes) with DDP, or FSDP2 "
        "with train.parallel=fsdp: runs torchrun --standalone --nproc-per-node N for you; for several "
        "machines start torchrun yourself (see docs/scaling.md)",
    )
    train.add_argument("overrides", nargs="*", metavar="key=value")
    train.set_defaults(func=cmd_train)
