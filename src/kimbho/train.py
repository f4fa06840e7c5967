"""The training loop: warm-up then cosine (or WSD) learning rate, gradient clipping and
accumulation, periodic validation, samples and checkpoints. The optimizers live in `optim.py`,
the fused output-projection-and-loss in `loss.py`, precision choice in `device.py`.

Batch `step` is a pure function of (seed, step) (see `RandomWindowSampler`), and every random
state is saved with each checkpoint, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint
from .config import RunConfig, TrainConfig
from .data import RandomWindowSampler, TokenStream, eval_windows, load_meta
from .device import autocast, peak_flops, pick_device, pick_precision
from .errors import KimbhoError
from .evaluation import sum_loss, summarize
from .generation import generate
from .loss import linear_cross_entropy
from .metrics import MetricsLog
from .model import KimbhoV1Model
from .optim import build_optimizer
from .tokenizer import Tokenizer

log = logging.getLogger("kimbho")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up to `lr`, then cosine decay
    to `lr * min_lr_ratio` at `max_steps`; or, for `wsd`, hold `lr` and decay linearly over the
    last `decay_fraction` of the run."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_start = max(cfg.warmup_steps, int(cfg.max_steps * (1 - cfg.decay_fraction)))
        if step < decay_start:
            return cfg.lr
        progress = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return cfg.lr - (cfg.lr - floor) * min(1.0, progress)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Progress:
    """How far the run has come; saved with every checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    elapsed_sec: float = 0.0


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
    ) -> None:
        self.run, self.cfg = run, run.train
        self.data_dir, self.out = Path(data_dir), Path(out_dir)
        self.progress_bar = progress_bar
        meta = load_meta(self.data_dir)
        self.tokenizer = Tokenizer.from_file(self.data_dir / "tokenizer.json")
        if self.tokenizer.sha256 != meta["tokenizer_sha256"]:
            raise KimbhoError(
                f"{self.data_dir}/tokenizer.json is not the tokenizer its shards were made with"
            )
        self._resolve_vocab(meta["vocab_size"], "model.vocab_size" in explicit_keys)
        self.seq_len = self.cfg.seq_len or run.model.max_seq_len
        if self.seq_len > run.model.max_seq_len:
            raise KimbhoError(
                f"train.seq_len={self.seq_len} is longer than model.max_seq_len={run.model.max_seq_len}; "
                f"lower train.seq_len or raise model.max_seq_len"
            )
        self.cfg.seq_len = self.seq_len
        self.micro_batch = self.cfg.micro_batch_size or self.cfg.batch_size
        if self.cfg.batch_size % self.micro_batch:
            raise KimbhoError(
                f"train.batch_size={self.cfg.batch_size} is not a multiple of train.micro_batch_size={self.micro_batch}"
            )
        self.accum_steps = self.cfg.batch_size // self.micro_batch

        self.device = pick_device(self.cfg.device)
        self.dtype = pick_precision(self.cfg.precision, self.device)
        torch.manual_seed(self.cfg.seed)
        self.model = KimbhoV1Model(run.model).to(self.device)
        self.optimizer = build_optimizer(self.model, self.cfg, self.device)
        self.model.checkpoint_activations = self.cfg.activation_checkpointing
        self.features = self._maybe_compile(self.model)

        self.train_data = RandomWindowSampler(
            TokenStream(self.data_dir, "train"), self.seq_len, self.cfg.batch_size, self.cfg.seed
        )
        self.val_stream = TokenStream(self.data_dir, "val") if meta["splits"]["val"]["tokens"] > 1 else None
        self.progress = Progress()
        self._prepare_run_dir(resume)

    # --- set-up -----------------------------------------------------------------------------

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

    def _maybe_compile(self, model: KimbhoV1Model) -> Callable[[torch.Tensor], torch.Tensor]:
        """`model.features`, compiled when `train.compile` asks for it. Only the model's body is
        compiled: the fused loss computes its own gradients, and `self.model` stays the bare
        module, so checkpoints hold its plain key names."""
        wanted = self.cfg.compile == "true" or (self.cfg.compile == "auto" and self._compile_pays())
        return torch.compile(model.features) if wanted else model.features

    def _compile_pays(self) -> bool:
        """`train.compile=auto`: always on CUDA. On a CPU, measured for `small` on 2 cores,
        compiling costs ~20 s once (~5 s from Inductor's cache) and makes each step ~15% faster,
        so it pays for runs longer than ~2.5 minutes: compile when the run's FLOPs at the device's
        measured peak take 3 minutes or more (4-5 minutes at a realistic utilisation)."""
        if self.device.type == "cuda":
            return True
        if self.device.type != "cpu":
            return False
        tokens = self.cfg.max_steps * self.cfg.batch_size * self.seq_len
        seconds_at_peak = (
            tokens * self.model.flops_per_token(self.seq_len) / peak_flops(self.device, self.dtype)
        )
        return seconds_at_peak >= 180

    def _prepare_run_dir(self, resume: bool) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        checkpoint.clean_stale_temporaries(self.out)
        existing = checkpoint.list_checkpoints(self.out)
        if existing and not resume:
            raise KimbhoError(
                f"run directory {self.out} already holds checkpoints; pass --resume to continue it or choose a new --out"
            )
        if resume and existing:
            self._restore(existing[-1])
        elif resume:
            log.warning(f"--resume: {self.out} has no checkpoint yet, starting from step 0")
        self.run.save(self.out / "config.yaml")
        self.tokenizer.save(self.out / "tokenizer.json")
        self.metrics = MetricsLog(self.out, append=self.progress.step > 0)

    def _restore(self, ckpt: Path) -> None:
        checkpoint.verify(ckpt)
        saved = checkpoint.read_model_config(ckpt)
        if saved != self.run.model:
            diff = {
                k: (v, getattr(self.run.model, k))
                for k, v in saved.to_dict().items()
                if getattr(self.run.model, k) != v
            }
            raise KimbhoError(
                f"cannot resume {ckpt}: the model config differs from the checkpoint's (saved, now): {diff}"
            )
        checkpoint.load_weights(self.model, ckpt)
        state = checkpoint.load_trainer_state(ckpt)
        self.optimizer.load_state_dict(state["optimizer"])
        self.progress = Progress(**state["progress"])
        _set_rng_state(state["rng"])
        log.info(f"resumed from {ckpt} at step {self.progress.step}")

    # --- the loop -----------------------------------------------------------------------------

    def train_step(self, step: int) -> tuple[float, float]:
        """One optimizer step on batch `step`: (mean loss, gradient norm before clipping)."""
        lr = lr_at(step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = self.train_data.batch(step)
        total = torch.zeros((), device=self.device)
        for micro in range(self.accum_steps):
            rows = slice(micro * self.micro_batch, (micro + 1) * self.micro_batch)
            x, y = inputs[rows].to(self.device), targets[rows].to(self.device)
            with autocast(self.device, self.dtype):
                # The head's product is fused into the loss: the (B, T, vocab) logits never exist.
                loss = linear_cross_entropy(self.features(x), self.model.head.weight, y) / self.accum_steps
            loss.backward()
            total += loss.detach()
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total.item(), grad_norm.item()

    def mfu(self, tokens_per_sec: float) -> float:
        """Model FLOPs utilisation: the model's training FLOPs at this speed over the device's
        measured peak in the precision in use (see `device.peak_flops`)."""
        flops = tokens_per_sec * self.model.flops_per_token(self.seq_len)
        return flops / peak_flops(self.device, self.dtype)

    def evaluate(self) -> dict[str, float | int] | None:
        """Validation loss, perplexity and bits per byte on a fixed set of windows."""
        if self.val_stream is None:
            return None
        windows = eval_windows(
            self.val_stream.window, len(self.val_stream), self.seq_len, self.cfg.eval_tokens
        )
        total, count = sum_loss(self.model, windows, batch_size=self.micro_batch, dtype=self.dtype)
        return summarize(total, count, count * self.val_stream.bytes_per_token)

    def sample_text(self) -> str:
        """A short continuation of the end-of-text token: what the model writes unprompted."""
        start = torch.tensor([[self.tokenizer.eot_id]])
        new = min(self.cfg.sample_tokens, self.run.model.max_seq_len - 1)
        ids = generate(
            self.model,
            start,
            new,
            temperature=0.8,
            top_k=50,
            seed=self.cfg.seed,
            eos_token_id=self.tokenizer.eot_id,
        )
        self.model.train()
        return self.tokenizer.decode(ids[0, 1:].tolist(), skip_special_tokens=True)

    def save(self) -> Path:
        state = {
            "optimizer": self.optimizer.state_dict(),
            "progress": vars(self.progress).copy(),
            "rng": _rng_state(),
        }
        return checkpoint.save_checkpoint(
            self.out, self.progress.step, self.model, state, self.run, self.tokenizer, self.cfg.keep_last
        )

    def fit(self) -> dict[str, Any]:
        """Train to `max_steps`; returns the last train and eval records."""
        cfg = self.cfg
        tokens_per_step = cfg.batch_size * self.seq_len
        self.model.train()
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.progress.step,
            desc="training",
            unit="step",
            disable=not self.progress_bar or None,
            dynamic_ncols=True,
        )
        interval_losses: list[float] = []
        interval_start, interval_steps = time.perf_counter(), 0
        session_start, elapsed_before = time.perf_counter(), self.progress.elapsed_sec
        last: dict[str, Any] = {}
        try:
            while self.progress.step < cfg.max_steps:
                step = self.progress.step
                loss, grad_norm = self.train_step(step)
                self.progress.step += 1
                self.progress.tokens_seen += tokens_per_step
                self.progress.elapsed_sec = elapsed_before + time.perf_counter() - session_start
                interval_losses.append(loss)
                interval_steps += 1
                bar.update(1)
                done = self.progress.step
                if done % cfg.log_every == 0 or done == cfg.max_steps:
                    seconds = time.perf_counter() - interval_start
                    tokens_per_sec = interval_steps * tokens_per_step / max(seconds, 1e-9)
                    record = {
                        "loss": sum(interval_losses) / len(interval_losses),
                        "lr": lr_at(step, cfg),
                        "grad_norm": grad_norm,
                        "tokens_seen": self.progress.tokens_seen,
                        "tokens_per_sec": tokens_per_sec,
                        "mfu": self.mfu(tokens_per_sec),
                        "elapsed_sec": self.progress.elapsed_sec,
                    }
                    self.metrics.write("train", done, **record)
                    last["train"] = record
                    bar.set_postfix(
                        loss=f"{record['loss']:.3f}",
                        tok_s=f"{tokens_per_sec:.0f}",
                        mfu=f"{record['mfu']:.0%}",
                    )
                    interval_losses, interval_start, interval_steps = [], time.perf_counter(), 0
                eval_due = (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.max_steps
                if eval_due and (result := self.evaluate()) is not None:
                    record = {
                        "val_loss": result["loss"],
                        "val_ppl": result["perplexity"],
                        "val_bpb": result["bits_per_byte"],
                    }
                    self.metrics.write("eval", done, **record)
                    last["eval"] = record
                    bar.write(
                        f"step {done}: val loss {record['val_loss']:.4f}, val bpb {record['val_bpb']:.4f}"
                    )
                # Samples come with each validation unless sample_every sets their own rhythm.
                sample_due = done % cfg.sample_every == 0 if cfg.sample_every else eval_due
                if sample_due and cfg.sample_tokens:
                    self.metrics.write("sample", done, text=self.sample_text())
                if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.max_steps:
                    self.save()
        finally:
            bar.close()
            self.metrics.close()
        return last


def _rng_state() -> dict[str, Any]:
    """Every random generator's state as tensors and plain lists (loadable with weights_only=True)."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
