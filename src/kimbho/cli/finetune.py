"""`kimbho finetune`: instruction tuning of a model on conversations, with the trainer of `train`."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from ..errors import KimbhoError
from .common import add_retriever_options

log = logging.getLogger("kimbho")

# Fine-tuning's recipe where it differs from pretraining's, before the user's own settings:
# AdamW at a tenth of pretraining's rate (the weights are already good: large steps undo them),
# no weight decay toward zero, a short warm-up, and no unprompted samples (a chat model is
# prompted).
FINETUNE_DEFAULTS = (
    "train.optimizer=adamw",
    "train.lr=3e-4",
    "train.schedule=cosine",
    "train.warmup_steps=10",
    "train.weight_decay=0.0",
    "train.eval_every=50",
    "train.save_every=200",
    "train.sample_tokens=0",
)
# LoRA's updates are rank-limited and start from zero: it takes larger steps than full fine-tuning.
LORA_DEFAULTS = ("train.lr=1e-3",)
EPOCHS = 3  # passes over the conversations when train.max_steps is not given


def cmd_finetune(args: argparse.Namespace) -> int:
    from ..config import resolve_run_config
    from ..data.chat_data import FORMAT, prepare_chat
    from ..data.shards import load_meta
    from ..device import pick_device
    from ..inference.chat import ChatFormat
    from ..loading import load, resolve_checkpoint
    from ..storage.checkpoints import list_checkpoints
    from ..training import distributed
    from ..training.trainer import Trainer

    flags = {"train.max_steps": args.max_steps, "lora.rank": args.lora_rank, "lora.alpha": args.lora_alpha}
    user = list(args.overrides) + [f"{key}={value}" for key, value in flags.items() if value is not None]
    given, explicit = resolve_run_config(args.config, None, user)
    defaults = [*FINETUNE_DEFAULTS, *(LORA_DEFAULTS if given.lora.rank else ())]
    run, _ = resolve_run_config(args.config, None, [*defaults, *user])
    if args.nproc is not None:
        from ..training.distributed import launch, split_batch
        from .train import without_option

        if args.nproc >= 1:  # what can be checked before starting the processes
            split_batch(run.train.batch_size, run.train.micro_batch_size, args.nproc)
        return launch(args.nproc, without_option(args.argv, "--nproc"))
    out = Path(args.out)
    has_checkpoints = out.is_dir() and bool(list_checkpoints(out))
    if has_checkpoints and not args.resume:
        raise KimbhoError(
            f"{out} already holds checkpoints; pass --resume to continue it or choose a new --out"
        )
    model, tokenizer = load(args.model)
    chat = ChatFormat.for_model(tokenizer, resolve_checkpoint(args.model))
    if chat is None:
        raise KimbhoError(
            f"{args.model} has no chat format (its tokenizer lacks the role tokens and it has no chat_template)"
        )
    seq_len = run.train.seq_len or model.config.max_seq_len
    del model  # the trainer loads its own copy
    augmenter = None
    if args.index is not None or args.retriever != "bm25":
        from ..retrieval import open_retriever
        from ..retrieval.augment import Augmenter

        augmenter = Augmenter(open_retriever(args.index, args.retriever), args.k, tokenizer, chat, seq_len)
    # Under torchrun the first process prepares the data and the others wait for it.
    world = distributed.setup(pick_device(run.train.device), run.train.dist_timeout)
    data_dir = out / "data"
    with world.together():
        if world.is_main:
            if args.resume and (data_dir / "meta.json").is_file():
                _check_same_inputs(data_dir, args.data)
            else:
                prepare_chat(
                    args.data,
                    tokenizer,
                    chat,
                    data_dir,
                    seq_len,
                    args.val_fraction,
                    force=True,
                    augmenter=augmenter,
                )
    meta = load_meta(data_dir, (FORMAT,))
    train_info = meta["splits"]["train"]
    if world.is_main:
        log.info(
            f"fine-tuning data: {train_info['conversations']:,} conversations in {train_info['rows']:,} rows of "
            f"{seq_len} tokens ({train_info['padding_fraction']:.1%} padding), {train_info['targets']:,} reply tokens; "
            f"{meta['splits']['val']['conversations']:,} held out"
        )
    if "train.max_steps" not in explicit:
        run.train.max_steps = max(1, math.ceil(EPOCHS * train_info["rows"] / run.train.batch_size))
    trainer = Trainer(
        run,
        data_dir,
        out,
        resume=args.resume,
        explicit_keys=explicit,
        init_from=args.model,
        chat_template=chat.template,
    )
    if not world.is_main:
        trainer.fit()  # rank 0 reports
        return 0
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    what = (
        f"LoRA adapters of rank {run.lora.rank} ({trained / 1e6:.2f}M parameters, {trained / total:.2%} of the model)"
        if run.lora.rank
        else f"{trained / 1e6:.2f}M parameters"
    )
    processes = f" x {world.size} processes ({trainer.cfg.parallel})" if world.size > 1 else ""
    log.info(
        f"fine-tuning {what} on {trainer.device}{processes} "
        f"({str(trainer.dtype).removeprefix('torch.')}), {trainer.cfg.max_steps} steps of "
        f"{trainer.cfg.batch_size} x {trainer.seq_len} tokens"
    )
    last = trainer.fit()
    summary = ", ".join(
        f"{k} {v:.4f}"
        for k, v in {**last.get("train", {}), **last.get("eval", {})}.items()
        if k in ("loss", "val_loss")
    )
    state = (
        f"stopped {out} at step {trainer.progress.step} ({last['stopped_by']})"
        if "stopped_by" in last
        else f"finished {out}"
    )
    print(f"{state}: {summary}")
    return 0


def _check_same_inputs(data_dir: Path, inputs: list[str]) -> None:
    """A resumed run trains on the data it began with: the files must be those it was prepared from."""
    from ..data.chat_data import FORMAT
    from ..data.shards import load_meta
    from ..storage.files import sha256_of_file

    meta = load_meta(data_dir, (FORMAT,))
    given = [
        {"path": str(p), "sha256": sha256_of_file(Path(p)) if Path(p).is_file() else None} for p in inputs
    ]
    if [g["sha256"] for g in given] != [m["sha256"] for m in meta["inputs"]]:
        raise KimbhoError(
            f"--data differs from the files this run was prepared from ({', '.join(m['path'] for m in meta['inputs'])}); "
            f"resume with those, or fine-tune into a new --out"
        )


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..config import config_help

    ft = sub.add_parser(
        "finetune",
        allow_abbrev=False,  # --nproc is passed on to torchrun's processes less itself, exactly
        help="fine-tune a model on conversations (loss on the assistant's replies)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="fine-tuning defaults: "
        + " ".join(FINETUNE_DEFAULTS)
        + f"; with --lora-rank also {' '.join(LORA_DEFAULTS)}"
        + f"; train.max_steps: {EPOCHS} passes over the data\n\nconfig keys:\n"
        + config_help(),
    )
    ft.add_argument(
        "model", metavar="MODEL", help="run directory, checkpoint directory or Hugging Face directory"
    )
    ft.add_argument(
        "--data",
        required=True,
        nargs="+",
        action="extend",
        metavar="CHAT.jsonl",
        help="JSONL conversations: OpenAI messages, prompt/completion, Alpaca or ShareGPT",
    )
    ft.add_argument("--out", required=True, metavar="RUN_DIR")
    ft.add_argument("--config", type=Path, metavar="FILE.yaml")
    ft.add_argument("--max-steps", type=int, metavar="N", help="shorthand for train.max_steps=N")
    ft.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        metavar="F",
        help="share of the conversations held out for validation (default 0.05)",
    )
    ft.add_argument(
        "--lora-rank",
        type=int,
        metavar="R",
        help="train LoRA adapters of rank R over the frozen model instead of every weight (lora.rank)",
    )
    ft.add_argument(
        "--lora-alpha", type=float, metavar="A", help="LoRA scale numerator (lora.alpha; scale = A / R)"
    )
    ft.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="fine-tune on N processes of this machine (DDP, or FSDP2 with train.parallel=fsdp), as train --nproc",
    )
    ft.add_argument(
        "--resume", action="store_true", help="continue from the newest complete checkpoint in RUN_DIR"
    )
    add_retriever_options(
        ft,
        "train to answer from retrieved passages: each conversation's last user message gets the passages "
        "found for it in this index, as `serve --index` gives them",
    )
    ft.add_argument("overrides", nargs="*", metavar="key=value")
    ft.set_defaults(func=cmd_finetune)
