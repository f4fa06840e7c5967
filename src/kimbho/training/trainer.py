"""The training loop: warm-up then cosine (or WSD) learning rate, gradient clipping and
accumulation, periodic validation, samples and checkpoints. The optimizers live in `optim.py`,
the loss in the model's forward (`model/loss.py`), precision choice in `device.py`.

Batch `step` is a pure function of (seed, step) (see `RandomWindowSampler`), and every random
state is saved with each checkpoint, so a resumed run continues exactly where it stopped: same
per-step losses, bit-identical weights. Steps with a NaN/Inf loss or gradient norm are skipped
(`step_guard.py`); SIGTERM/SIGINT stop the run after the current step with a checkpoint
(`signals.py`).
Under torchrun the same loop runs on every process, with DDP or FSDP2 (`distributed.py`).
"""

from __future__ import annotations

import logging
import math
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from ..config import RunConfig
from ..data import chat_data
from ..data.shards import (
    TOKENS_FORMAT,
    Batch,
    RandomWindowSampler,
    TokenStream,
    dataset_fingerprint,
    load_meta,
    window_batches,
)
from ..data.sources import SourceSpan, mixture, poor_fits, source_spans
from ..data.tokenizer import Tokenizer
from ..device import autocast, peak_flops, pick_device, pick_precision
from ..errors import KimbhoError
from ..evaluation import source_windows, sum_loss, summarize_sources
from ..inference.defaults import DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from ..inference.generation import generate
from ..loading import base_identity, load
from ..model import KimbhoV1Model, lora
from ..storage import checkpoints as checkpoint
from . import distributed
from .metrics import DiscardedMetrics, MetricsLog
from .optim import build_optimizer
from .progress import Clock, Progress, due, finite_or_none
from .resume import Found, find_checkpoint
from .rng import process_seed, rng_state, set_rng_state
from .schedule import lr_at
from .signals import GracefulStop
from .step_guard import StepGuard

log = logging.getLogger("kimbho")

# train.verify_data=auto hashes a split when it is smaller than this (SHA-256 streams at about
# 1 GB/s on one core: a couple of seconds at most).
VERIFY_HASH_BELOW = 2 * 10**9


class Trainer:
    """Trains `run.model` on a prepared data directory, writing a run directory (see INTERFACE.md)."""

    def __init__(
        self,
        run: RunConfig,
        data_dir: str | os.PathLike[str],
        out_dir: str | os.PathLike[str],
        resume: bool = False,
        explicit_keys: set[str] | frozenset[str] = frozenset(),
        progress_bar: bool = True,
        init_from: str | os.PathLike[str] | None = None,
        force_resume: bool = False,
        chat_template: str | None = None,
    ) -> None:
        """`resume`: continue from the newest usable checkpoint in `out_dir`. It refuses a checkpoint
        made with another model config, tokenizer or dataset unless `force_resume` is set.

        Under torchrun it joins the process group first; every process constructs a Trainer.
        Set-up, in order: the data (checked before anything is written), the model and how it is
        wrapped, the optimizer, then the run directory (and the checkpoint to resume from)."""
        self.run, self.cfg = run, run.train
        self.data_dir, self.out = Path(data_dir), Path(out_dir)
        self.progress_bar = progress_bar
        # A Jinja chat template the model was fine-tuned in, saved with its checkpoints (None:
        # Kimbho's role-token format, which the tokenizer implies).
        self.chat_template = chat_template
        self.world = distributed.setup(pick_device(self.cfg.device), self.cfg.dist_timeout)
        self.device = self.world.device
        with self.world.together():
            meta = self._set_up_data(init_from, explicit_keys)
        self._set_up_model()
        self.optimizer = build_optimizer(self.model, self.cfg, self.device)  # after sharding
        if self.world.size > 1:
            # Each process draws its own dropout masks.
            torch.manual_seed(process_seed(self.cfg.seed, self.world.rank))
        self.progress = Progress()
        self.guard = StepGuard(self.cfg.skip_spikes)
        self.fingerprint = {"tokenizer_sha256": self.tokenizer.sha256, "dataset": dataset_fingerprint(meta)}
        if self.adapter is not None:
            self.fingerprint["lora"] = self.adapter
        self._prepare_run_dir(resume or force_resume, force_resume)

    # --- set-up -----------------------------------------------------------------------------

    def _set_up_data(
        self, init_from: str | os.PathLike[str] | None, explicit_keys: set[str] | frozenset[str]
    ) -> dict[str, Any]:
        """The tokenizer, the model config it implies (or `--init`'s), sequence and batch sizes,
        the samplers, and the shards checked; returns the data's meta.json."""
        run, cfg = self.run, self.cfg
        meta = load_meta(self.data_dir, (TOKENS_FORMAT, chat_data.FORMAT))
        self.tokenizer = Tokenizer.from_file(self.data_dir / "tokenizer.json")
        if self.tokenizer.sha256 != meta["tokenizer_sha256"]:
            raise KimbhoError(
                f"{self.data_dir}/tokenizer.json is not the tokenizer its shards were made with"
            )
        self.init = self._load_init(init_from, explicit_keys) if init_from is not None else None
        # A LoRA run's adapters and the base they adapt (checked on resume, saved with each checkpoint).
        self.adapter: dict[str, Any] | None = None
        if run.lora.rank:
            if init_from is None:
                raise KimbhoError(
                    "lora.rank > 0 trains adapters over an existing model: give it with "
                    "`kimbho finetune MODEL` (or `kimbho train --init MODEL`)"
                )
            self.adapter = {"rank": run.lora.rank, "alpha": run.lora.alpha, "base": base_identity(init_from)}
        if self.init is None:
            self._resolve_vocab(meta["vocab_size"], "model.vocab_size" in explicit_keys)
        self.seq_len = cfg.seq_len or meta.get("seq_len") or run.model.max_seq_len
        if self.seq_len > run.model.max_seq_len:
            raise KimbhoError(
                f"train.seq_len={self.seq_len} is longer than model.max_seq_len={run.model.max_seq_len}; "
                f"lower train.seq_len or raise model.max_seq_len"
            )
        if meta.get("seq_len", self.seq_len) != self.seq_len:
            raise KimbhoError(
                f"{self.data_dir} holds rows of {meta['seq_len']} tokens, not train.seq_len={self.seq_len}; "
                f"drop train.seq_len or prepare the data at that length"
            )
        cfg.seq_len = self.seq_len
        self.rows, self.micro_batch = distributed.split_batch(
            cfg.batch_size, cfg.micro_batch_size, self.world.size
        )
        self.accum_steps = self.rows // self.micro_batch
        self.dtype = pick_precision(cfg.precision, self.device)
        check = self.world.is_main and cfg.verify_data != "false"  # before the run directory exists
        if meta["format"] == chat_data.FORMAT:
            self._set_up_chat_data(meta, check)
        else:
            self._set_up_token_data(meta, check)
        return meta

    def _set_up_token_data(self, meta: dict[str, Any], check: bool) -> None:
        """Pretraining: random windows of the token shards; validation on consecutive windows."""
        train = RandomWindowSampler(
            TokenStream(self.data_dir, "train"),
            self.seq_len,
            self.cfg.batch_size,
            self.cfg.seed,
            mixture=self._mixture(meta),
        )
        spans = source_spans(meta, "train")
        if self.world.is_main and self.init is not None and spans is not None:
            # Continued pretraining on a source the model's tokenizer never saw.
            for warning in poor_fits({name: (span.bytes, span.tokens) for name, span in spans.items()}):
                log.warning(warning)
        self.train_data: RandomWindowSampler | chat_data.PackedSampler = train
        val = TokenStream(self.data_dir, "val") if meta["splits"]["val"]["tokens"] > 1 else None
        for stream in (train.stream, val):
            if check and stream is not None:
                check_hash = self.cfg.verify_data == "true" or stream.nbytes < VERIFY_HASH_BELOW
                stream.verify(meta["vocab_size"], check_hash)
        val_spans = source_spans(meta, "val")

        def sets() -> dict[str, Iterator[Batch]]:
            assert val is not None
            windows = source_windows(val, val_spans, self.seq_len, self.cfg.eval_tokens)
            return {name: window_batches(w, self.micro_batch) for name, w in windows.items()}

        self.val_sets: Callable[[], dict[str, Iterator[Batch]]] | None = sets if val is not None else None

    def _mixture(self, meta: dict[str, Any]) -> list[tuple[SourceSpan, float]] | None:
        """`data.mix` and `data.mix_temperature` as each source's span and probability (None: rows
        drawn uniformly over all tokens, as without named sources)."""
        spans = source_spans(meta, "train")
        data = self.run.data
        if not data.mixed:
            return None
        if spans is None:
            raise KimbhoError(
                f"{self.data_dir} was prepared before sources were named, so data.mix cannot pick "
                f"between them; prepare it again (`kimbho prepare --input NAME=PATH ...`)"
            )
        probs = mixture(spans, data.weights, data.mix_temperature, self.seq_len)
        if self.world.is_main:
            log.info("mixture: " + ", ".join(f"{name} {p:.1%}" for name, p in probs.items()))
        return [(spans[name], p) for name, p in probs.items()]

    def _set_up_chat_data(self, meta: dict[str, Any], check: bool) -> None:
        """Fine-tuning: packed conversations in a fresh order each epoch; validation on the
        held-out conversations' replies."""
        rows = {split: chat_data.load_rows(self.data_dir, split, meta) for split in ("train", "val")}
        if check:
            for split, array in rows.items():
                info = meta["splits"][split]
                check_hash = self.cfg.verify_data == "true" or array.nbytes < VERIFY_HASH_BELOW
                chat_data.verify_rows(
                    array, self.data_dir / f"{split}.npy", meta["vocab_size"], info["sha256"], check_hash
                )
        self.train_data = chat_data.PackedSampler(rows["train"], self.cfg.batch_size, self.cfg.seed)
        val = rows["val"]
        self.val_sets = (
            (lambda: {"": chat_data.val_batches(val, self.micro_batch, self.cfg.eval_tokens)})
            if len(val)
            else None
        )

    def _set_up_model(self) -> None:
        """The model (the same initial weights on every process, or `--init`'s), wrapped for the
        processes (DDP around the loss, or FSDP2 shards) and compiled when it pays."""
        torch.manual_seed(self.cfg.seed)  # the same initial weights and adapters on every process
        if self.init is not None:
            self.model, self.init = self.init.to(self.device).train(), None
        else:
            self.model = KimbhoV1Model(self.run.model).to(self.device)
        if self.adapter is not None:
            # The frozen projections are only read, in bf16 under autocast when training is bf16:
            # stored so, they take half the memory.
            frozen = torch.bfloat16 if self.dtype == torch.bfloat16 else None
            lora.add_adapters(self.model, self.run.lora.rank, self.run.lora.alpha, frozen_dtype=frozen)
        if self.cfg.optimizer == "muon" and self.cfg.parallel == "fsdp" and self.world.size > 1:
            # Muon orthogonalises whole matrices; FSDP leaves each process a slice of each.
            raise self.world.error(
                "train.optimizer=muon needs whole weight matrices, which train.parallel=fsdp shards "
                "over processes; use train.parallel=ddp, or train.optimizer=adamw with fsdp"
            )
        self.model.checkpoint_activations = self.cfg.activation_checkpointing
        # Under torchrun DDP wraps the model, or FSDP2 shards it (see distributed.py).
        self.train_model = distributed.parallelize(self.model, self.world, self.cfg.parallel)
        # Compiled after sharding (FSDP2 and DDP are compiled over, not wrapped around a compiled
        # module), in place: `self.model` keeps its plain key names for checkpoints.
        self.compiled = self._compile_wanted()
        if self.compiled:
            self.model.compile()

    def _resolve_vocab(self, data_vocab: int, user_set: bool) -> None:
        model_cfg = self.run.model
        if not user_set:
            if model_cfg.vocab_size != data_vocab:
                model_cfg.vocab_size = data_vocab
                model_cfg.__post_init__()  # re-check invariants (pad_idx < vocab_size)
        elif model_cfg.vocab_size != data_vocab:
            raise KimbhoError(
                f"tokenizer has {data_vocab} tokens but the model was built for {model_cfg.vocab_size} "
                f"(model.vocab_size); drop model.vocab_size to follow the tokenizer"
            )

    def _load_init(
        self, model_path: str | os.PathLike[str], explicit_keys: set[str] | frozenset[str]
    ) -> KimbhoV1Model:
        """`--init MODEL`: continue training MODEL (a run, checkpoint or Hugging Face directory).
        Its config replaces `run.model`, and the data must have been made with its tokenizer."""
        model_keys = sorted(k for k in explicit_keys if k.startswith("model."))
        if model_keys:
            raise KimbhoError(
                f"--init takes the model config from {model_path}; drop {', '.join(model_keys)}"
            )
        model, tokenizer = load(model_path, dtype="fp32")  # fp32 weights to train
        if tokenizer.sha256 != self.tokenizer.sha256:
            raise KimbhoError(
                f"{self.data_dir} was prepared with a different tokenizer than {model_path}; "
                f"run `kimbho prepare --tokenizer` with the tokenizer.json of {model_path}"
            )
        self.run.model = model.config
        log.info(f"starting from the weights of {model_path}")
        return model

    def _compile_wanted(self) -> bool:
        """Whether `train.compile` compiles the training forward pass (the fused loss inside it
        stays eager: `model/loss.py`)."""
        # The payoff is timed: rank 0 alone measures it and decides for all processes.
        wanted = self.world.broadcast(
            self.cfg.compile == "true" or (self.cfg.compile == "auto" and self._compile_pays())
            if self.world.is_main
            else None
        )
        return bool(wanted)

    def _compile_pays(self) -> bool:
        """`train.compile=auto`: always on CUDA. On a CPU compiling costs a fixed time once and
        makes each step somewhat faster (docs/performance.md), so it pays for long runs only:
        compile when the run's FLOPs at the device's measured peak take 3 minutes or more."""
        if self.device.type == "cuda":
            return True
        if self.device.type != "cpu":
            return False
        tokens = self.cfg.max_steps * self.cfg.batch_size * self.seq_len
        seconds_at_peak = (
            tokens * self.model.flops_per_token(self.seq_len) / peak_flops(self.device, self.dtype)
        )
        return seconds_at_peak >= 180

    def _prepare_run_dir(self, resume: bool, force: bool) -> None:
        """Rank 0 sets up the run directory and picks the checkpoint to resume from; then every
        process loads that checkpoint's state, which rank 0 alone reads."""
        found: Found | None = None
        with self.world.together():
            if self.world.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                checkpoint.clean_stale_temporaries(self.out)
                existing = checkpoint.list_checkpoints(self.out)
                if existing and not resume:
                    raise KimbhoError(
                        f"run directory {self.out} already holds checkpoints; pass --resume to continue it or choose a new --out"
                    )
                found = (
                    find_checkpoint(self.out, existing, force, self.run, self.fingerprint, self.model)
                    if resume
                    else None
                )
                self._warn_if_config_file_differs(resume)
                self.run.save(self.out / "config.yaml")
                self.tokenizer.save(self.out / "tokenizer.json")
        if self.world.broadcast(found is not None):
            self._restore(found)
        self.metrics: MetricsLog | DiscardedMetrics = (
            MetricsLog(self.out, resume_step=self.progress.step if resume else None)
            if self.world.is_main
            else DiscardedMetrics()
        )

    def _warn_if_config_file_differs(self, resume: bool) -> None:
        """RUN_DIR/config.yaml records the config in use; training never reads it. A resumed run
        whose file says otherwise (a user edited it, expecting it to count) is told so."""
        path = self.out / "config.yaml"
        if not (resume and path.is_file()):
            return
        try:
            recorded = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            recorded = None
        if recorded != self.run.to_dict():
            log.warning(
                f"{path} differs from this run's config, and training does not read it (settings come from "
                f"--config, --preset and key=value; each checkpoint's run.yaml holds those it was made with): "
                f"it now records the config in use"
            )

    def _restore(self, found: Found | None) -> None:
        """Load the checkpoint rank 0 has read (`found`; None on the other processes)."""
        ckpt, state, weights = found or (None, {}, {})
        with_optimizer = self.world.broadcast(state.get("optimizer") is not None)
        distributed.load_full_state(
            self.model,
            self.optimizer,
            weights,
            state.get("optimizer") or {},
            self.world,
            with_optimizer,
            strict=self.adapter is None,  # a LoRA checkpoint holds the adapters only
        )
        shared: dict[str, Any] = self.world.broadcast(
            {key: state.get(key) for key in ("progress", "guard", "rng", "rng_by_rank")}
        )
        self.progress.load_state_dict(shared["progress"])  # every trainer.pt has one
        if shared["guard"] is not None:
            self.guard.load_state_dict(shared["guard"])
        saved_rng = shared["rng_by_rank"] or [shared["rng"]]  # one state per process of the saved run
        if len(saved_rng) == self.world.size:
            set_rng_state(saved_rng[self.world.rank])
        else:
            # The data re-shards by itself (a batch is a function of the step alone), but the
            # saved processes' random streams do not map onto the new ones: start fresh ones.
            torch.manual_seed(process_seed(self.cfg.seed, self.world.rank, self.progress.step))
            if self.world.is_main and self.run.model.dropout > 0:
                log.warning(
                    f"resuming a checkpoint of {len(saved_rng)} process(es) on {self.world.size}: the "
                    f"dropout masks from here on differ from those of an uninterrupted run"
                )
        if self.world.is_main:
            log.info(f"resumed from {ckpt} at step {self.progress.step}")

    # --- the loop -----------------------------------------------------------------------------

    def train_step(self, step: int) -> tuple[float, float]:
        """One optimizer step on batch `step`: (mean loss, gradient norm before clipping), both
        over the whole global batch, whatever the number of processes."""
        lr = lr_at(step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.train_data.batch(step, self.world.rows(self.cfg.batch_size))
        # The loss is the mean over every target of the global batch: each micro-step's sum over
        # the number of them, so accumulation and process count do not change the update (and
        # fine-tuning's rows, which hold different numbers of targets, each count per target).
        # Times the process count, which DDP and FSDP average gradients over.
        scale = self.world.size / max(1, self.train_data.num_targets(step))
        total = torch.zeros((), device=self.device)
        for micro in range(self.accum_steps):
            rows = slice(micro * self.micro_batch, (micro + 1) * self.micro_batch)
            with distributed.gradient_sync(self.train_model, enabled=micro == self.accum_steps - 1):
                with autocast(self.device, self.dtype):
                    loss = batch.rows(rows).to(self.device).loss(self.train_model, reduction="sum") * scale
                loss.backward()
            total += loss.detach()
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = distributed.clip_grad_norm_(self.model.parameters(), clip)
        # Averaged over processes, so the guard decides the same on all of them.
        loss_value, norm_value = self.world.mean(total, grad_norm)
        if self.guard.allows(loss_value, norm_value):  # else weights and optimizer state stay as they were
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, norm_value

    def mfu(self, tokens_per_sec: float) -> float:
        """Model FLOPs utilisation: the model's training FLOPs at this speed over the device's
        measured peak in the precision in use (see `device.peak_flops`)."""
        flops = tokens_per_sec * self.model.flops_per_token(self.seq_len)
        return flops / peak_flops(self.device, self.dtype)

    def evaluate(self) -> dict[str, Any] | None:
        """Validation loss, perplexity and bits per byte on a fixed set of rows (fine-tuning: on
        the replies of the held-out conversations), and each named source's (`by_source`). Every
        process evaluates all of them (FSDP needs all processes in each forward pass)."""
        if self.val_sets is None:
            return None
        return summarize_sources(
            {
                name: sum_loss(self.model, batches, self.tokenizer, dtype=self.dtype)
                for name, batches in self.val_sets().items()
            }
        )

    def sample_text(self) -> str:
        """A short continuation of the end-of-text token: what the model writes unprompted."""
        start = torch.tensor([[self.tokenizer.eot_id]])
        new = min(self.cfg.sample_tokens, self.run.model.max_seq_len - 1)
        ids = generate(
            self.model,
            start,
            new,
            temperature=DEFAULT_TEMPERATURE,
            top_p=DEFAULT_TOP_P,
            seed=self.cfg.seed,
            eos_token_id=self.tokenizer.eot_id,
            compile=False,  # a few tokens from weights that change every step: no build in the background
        )
        self.model.train()
        return self.tokenizer.decode(ids[0, 1:].tolist(), skip_special_tokens=True)

    def save(self) -> Path:
        """Checkpoint the whole training state at the current step (see `storage/checkpoints.py`). Every
        process takes part (the state is gathered from all of them); rank 0 writes it."""
        weights = self._weights()
        optimizer = distributed.full_optimizer_state(self.model, self.optimizer)
        rng = self.world.gather(rng_state())
        state: dict[str, Any] = {
            "optimizer": optimizer,
            "progress": self.progress.state_dict(),
            "data": self.train_data.state_dict(self.progress.step),
            "rng": rng[0] if rng else None,
            "guard": self.guard.state_dict(),
            "fingerprint": self.fingerprint,
        }
        if self.world.size > 1:
            state["rng_by_rank"] = rng
        with self.world.together():
            if self.world.is_main:
                checkpoint.save_checkpoint(
                    self.out,
                    self.progress.step,
                    weights,
                    state,
                    self.run,
                    self.tokenizer,
                    self.cfg.keep_last,
                    chat_template=self.chat_template,
                    adapter=self.adapter,
                )
        return self.out / checkpoint.CHECKPOINTS / checkpoint.step_dir_name(self.progress.step)

    def _weights(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of the model: all of it, or a LoRA run's adapters (the base is
        the file it came from)."""
        weights = distributed.full_weights(self.model)
        return lora.adapter_weights(weights) if self.adapter is not None else weights

    def _save_best(self, val_loss: float) -> None:
        """Keep the weights of the lowest validation loss so far in checkpoints/best/."""
        best = self.progress.best_val_loss
        if not self.cfg.keep_best or not math.isfinite(val_loss) or (best is not None and val_loss >= best):
            return
        self.progress.best_val_loss = val_loss
        weights = self._weights()
        with self.world.together():
            if self.world.is_main:
                checkpoint.save_checkpoint(
                    self.out,
                    self.progress.step,
                    weights,
                    None,
                    self.run,
                    self.tokenizer,
                    self.cfg.keep_last,
                    name=checkpoint.BEST,
                    chat_template=self.chat_template,
                    adapter=self.adapter,
                    val_loss=val_loss,
                )

    def fit(self) -> dict[str, Any]:
        """Train to `max_steps`; returns the last train and eval records, plus `stopped_by` (the
        signal's name) when SIGTERM/SIGINT ended the run early, after saving a checkpoint.

        Each step: train, then whatever is due at the step just done, in this order: a train
        record, validation, a sample text, a checkpoint; a signal stops the run after the step."""
        cfg = self.cfg
        self.model.train()
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.progress.step,
            desc="training",
            unit="step",
            disable=not (self.progress_bar and self.world.is_main) or None,
            dynamic_ncols=True,
        )
        clock = Clock(self.progress.elapsed_sec)
        last: dict[str, Any] = {}
        try:
            with GracefulStop() as stop:
                while self.progress.step < cfg.max_steps:
                    step = self.progress.step
                    loss, grad_norm = self.train_step(step)
                    done = self._count_step(loss, grad_norm, clock)
                    bar.update(1)
                    if due(done, cfg.log_every, cfg.max_steps):
                        last["train"] = self._log(step, grad_norm, clock, bar)
                    eval_due = due(done, cfg.eval_every, cfg.max_steps)
                    if eval_due and (record := self._validate(done, bar)) is not None:
                        last["eval"] = record
                    # Samples come with each validation unless sample_every sets their own rhythm.
                    sample_due = done % cfg.sample_every == 0 if cfg.sample_every else eval_due
                    if sample_due and cfg.sample_tokens:
                        self.metrics.write("sample", done, text=self.sample_text())
                    # A signal seen by any process stops all of them after this same step.
                    signum = self.world.max(signal.Signals[stop.signal_name].value if stop.signal_name else 0)
                    if due(done, cfg.save_every, cfg.max_steps) or signum:
                        saved = self.save()
                    if signum:
                        last["stopped_by"] = signal.Signals(signum).name
                        log.warning(
                            f"stopped by {last['stopped_by']} after step {done}: saved {saved}; continue with --resume"
                        )
                        break
        except RuntimeError as e:
            if self.world.size == 1 or not distributed.lost_contact(e):
                raise
            raise KimbhoError(
                f"process {self.world.rank} lost contact with the others ({str(e).splitlines()[0][:200]}); "
                f"if one of them failed, its own message says why. Continue with --resume"
            ) from None
        finally:
            bar.close()
            self.metrics.close()
        return last

    def _count_step(self, loss: float, grad_norm: float, clock: Clock) -> int:
        """Advance the progress counters past the step just trained; returns its number."""
        self.progress.step += 1
        self.progress.tokens_seen += self.cfg.batch_size * self.seq_len
        self.progress.elapsed_sec = clock.elapsed()
        clock.steps += 1
        if self.guard.last_reason is None:
            self.progress.interval_losses.append(loss)
        else:
            self._record_skip(self.progress.step, loss, grad_norm)
        return self.progress.step

    def _log(self, step: int, grad_norm: float, clock: Clock, bar: tqdm) -> dict[str, Any]:
        """The train record of the steps since the last one (the loss: their mean)."""
        losses = self.progress.interval_losses
        tokens_per_sec = clock.steps * self.cfg.batch_size * self.seq_len / max(clock.interval(), 1e-9)
        record: dict[str, Any] = {
            "loss": sum(losses) / len(losses) if losses else None,
            "lr": lr_at(step, self.cfg),
            "grad_norm": finite_or_none(grad_norm),
            "tokens_seen": self.progress.tokens_seen,
            "tokens_per_sec": tokens_per_sec,
            # Only rank 0 writes records: the others skip timing the peak.
            "mfu": self.mfu(tokens_per_sec) if self.world.is_main else None,
            "elapsed_sec": self.progress.elapsed_sec,
            "skipped_steps": self.progress.skipped_steps,
        }
        self.metrics.write("train", self.progress.step, **record)
        if record["loss"] is not None and self.world.is_main:
            bar.set_postfix(
                loss=f"{record['loss']:.3f}", tok_s=f"{tokens_per_sec:.0f}", mfu=f"{record['mfu']:.0%}"
            )
        losses.clear()
        clock.restart_interval()
        return record

    def _validate(self, done: int, bar: tqdm) -> dict[str, Any] | None:
        """The eval record at step `done` (None without a validation split); keeps the best."""
        result = self.evaluate()
        if result is None:
            return None
        record = {
            "val_loss": result["loss"],
            "val_ppl": result["perplexity"],
            "val_bpb": result["bits_per_byte"],
        }
        if "by_source" in result:
            record["by_source"] = result["by_source"]
        self.metrics.write("eval", done, **record)
        if self.world.is_main:
            line = f"step {done}: val loss {record['val_loss']:.4f}, val bpb {record['val_bpb']:.4f}"
            if "by_source" in result:
                line += (
                    " (" + ", ".join(f"{n} {v['val_bpb']:.4f}" for n, v in result["by_source"].items()) + ")"
                )
            bar.write(line)
        self._save_best(record["val_loss"])
        return record

    def _record_skip(self, done: int, loss: float, grad_norm: float) -> None:
        """Count a step the guard refused; stop the run when too many come in a row."""
        reason = self.guard.last_reason
        self.progress.skipped_steps += 1
        self.metrics.write(
            "skip", done, reason=reason, loss=finite_or_none(loss), grad_norm=finite_or_none(grad_norm)
        )
        log.warning(f"step {done}: skipped the optimizer step: {reason}")
        if self.guard.consecutive >= self.cfg.max_skipped_steps:
            kept = checkpoint.list_checkpoints(self.out)
            raise self.world.error(
                f"stopping: the last {self.guard.consecutive} steps (up to step {done}) were all skipped, "
                f"the last for a {reason}; "
                + (f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was saved yet")
                + ". Lower train.lr or check the data, then continue with --resume"
            )
