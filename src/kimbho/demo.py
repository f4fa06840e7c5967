"""`kimbho demo`: the whole pipeline on the built-in corpus in a few minutes.

Tokenizer -> data -> a model sized to the machine -> training for the time budget -> samples, the
validation curve, and the validation bits per byte next to a unigram model's (the model must
learn more than word frequencies to beat it).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

from .config import KimbhoConfig, RunConfig, TrainConfig
from .data.prepare import prepare
from .data.tokenizer import Tokenizer
from .errors import KimbhoError
from .evaluation import unigram_bpb
from .inference.defaults import DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from .inference.generation import stream
from .model import KimbhoV1Model
from .training.metrics import read_metrics
from .training.trainer import Trainer

_MARKER = ".kimbho-demo"
DEMO_VOCAB = 2048
DEMO_SEQ_LEN = 128
DEMO_BATCH = 16
PROMPTS = ("The assert statement", "A class definition", "When an exception")
# Candidate widths/depths, smallest first; the demo takes the largest the time budget can feed
# enough tokens (see `_pick_model`).
LADDER = ((128, 4, 2, 3), (192, 6, 3, 4), (256, 4, 2, 4), (384, 6, 3, 6), (512, 8, 4, 8))
_FINAL_SECONDS = 5.0  # the closing samples and report
_EVAL_STEPS = 30
TOKENS_PER_PARAM = 0.4  # measured on the demo corpus: below this a smaller model reaches a lower bpb


def run_demo(minutes: float = 3.0, out: Path = Path("runs/demo")) -> dict[str, float]:
    """Run the demo into `out` (replacing an earlier demo there); returns the final numbers."""
    if minutes <= 0:
        raise KimbhoError(f"--minutes must be positive, got {minutes}")
    if out.exists():
        if not (out / _MARKER).exists():
            raise KimbhoError(f"{out} exists and is not a demo run; choose another --out")
        shutil.rmtree(out)
    started = time.perf_counter()
    print(f"== 1/4 tokenizer and data: the built-in corpus (CPython's documentation), {DEMO_VOCAB}-token BPE")
    data_dir = out.parent / f"{out.name}-data"
    meta = prepare(None, data_dir, vocab_size=DEMO_VOCAB, force=True)
    print(
        f"   {meta['splits']['train']['tokens']:,} training and {meta['splits']['val']['tokens']:,} validation tokens"
    )

    print("== 2/4 sizing the model to this machine")
    model_cfg, sec_per_step = _pick_model(
        meta["vocab_size"], data_dir, minutes * 60 - (time.perf_counter() - started)
    )
    seconds = minutes * 60 - (time.perf_counter() - started) - _FINAL_SECONDS
    # Ten validation passes of 16k tokens cost about as much as EVAL_STEPS training steps.
    steps = max(20, int(seconds / sec_per_step) - _EVAL_STEPS)
    run = RunConfig(model_cfg, _train_config(steps))
    trainer = Trainer(run, data_dir, out)
    (out / _MARKER).write_text("made by `kimbho demo`; the next demo replaces this directory\n")
    print(
        f"   {trainer.model.num_params() / 1e6:.2f}M parameters (emb {model_cfg.emb_dim}, {model_cfg.num_blocks} blocks, "
        f"{model_cfg.num_heads} heads sharing {model_cfg.num_kv_heads} K/V heads), {steps} steps of "
        f"{DEMO_BATCH} x {DEMO_SEQ_LEN} tokens, ~{sec_per_step * 1000:.0f} ms per step"
    )

    print(f"== 3/4 training for about {seconds / 60:.1f} minutes")
    trainer.fit()

    print("== 4/4 results")
    final_bpb, unigram = _report(out, data_dir, trainer.model.eval(), trainer.tokenizer)
    print(
        f'done in {(time.perf_counter() - started) / 60:.1f} minutes; try: kimbho generate {out} --prompt "The with statement"'
    )
    return {"val_bpb": final_bpb, "unigram_bpb": unigram, "steps": steps}


def _train_config(steps: int) -> TrainConfig:
    """The demo's recipe for a run of `steps` steps."""
    return TrainConfig(
        batch_size=DEMO_BATCH,
        seq_len=DEMO_SEQ_LEN,
        # Tuned on this corpus with AdamW and cosine: at the demo's sizes (2-10M parameters) Muon's
        # per-matrix Newton-Schulz costs 40-60% more time per step (measured), more than it gains.
        optimizer="adamw",
        schedule="cosine",
        compile="false",  # the sizing above timed eager steps; compiling would eat ~20 s of the budget
        lr=2e-3,
        warmup_steps=max(1, steps // 20),
        max_steps=steps,
        log_every=max(1, steps // 50),
        eval_every=max(1, steps // 10),
        eval_tokens=16384,
        save_every=0,
        keep_last=1,
        seed=0,
    )


def _report(out: Path, data_dir: Path, model: KimbhoV1Model, tokenizer: Tokenizer) -> tuple[float, float]:
    """Print the validation curve, the unigram baseline and samples; returns (final bpb, unigram bpb)."""
    curve = [(r["step"], r["val_bpb"]) for r in read_metrics(out, "eval")]
    final_bpb = curve[-1][1]
    unigram = unigram_bpb(data_dir)
    print("   validation bits per byte:")
    top = max(b for _, b in curve)
    for step, bpb in curve:
        print(f"   step {step:>6}  {bpb:6.3f}  {'#' * int(40 * bpb / top)}")
    print(
        f"   final val bpb {final_bpb:.3f} vs unigram model {unigram:.3f} ({unigram / final_bpb:.2f}x better)"
    )
    print(f"   samples (temperature {DEFAULT_TEMPERATURE}, top-p {DEFAULT_TOP_P}):")
    for prompt in PROMPTS:
        text = "".join(
            stream(
                model,
                tokenizer,
                prompt,
                60,
                temperature=DEFAULT_TEMPERATURE,
                top_p=DEFAULT_TOP_P,
                seed=0,
                compile=False,  # three short samples: not worth a build that outlives the demo
            )
        )
        print(f"   > {prompt}{text}".replace("\n", "\n     "))
    return final_bpb, unigram


def _pick_model(vocab: int, data_dir: Path, seconds: float) -> tuple[KimbhoConfig, float]:
    """The largest ladder model that the budget feeds at least TOKENS_PER_PARAM tokens per
    parameter, judged from the measured speed of a probe, and its measured seconds per step."""
    probe = _config(LADDER[0], vocab)
    probe_time = _seconds_per_step(probe, data_dir)
    chosen, chosen_time = probe, probe_time
    for rung in LADDER[1:]:
        cfg = _config(rung, vocab)
        # Step time scales with FLOPs per token for models this size.
        estimate = probe_time * _flops(cfg) / _flops(probe)
        tokens = seconds / estimate * DEMO_BATCH * DEMO_SEQ_LEN
        if tokens < TOKENS_PER_PARAM * _params(cfg):
            break
        chosen, chosen_time = cfg, estimate
    if chosen is not probe:
        chosen_time = _seconds_per_step(chosen, data_dir)
    return chosen, chosen_time


def _config(rung: tuple[int, int, int, int], vocab: int) -> KimbhoConfig:
    emb, heads, group, blocks = rung
    return KimbhoConfig(
        vocab_size=vocab,
        emb_dim=emb,
        num_heads=heads,
        group_size=group,
        num_blocks=blocks,
        max_seq_len=DEMO_SEQ_LEN,
        tie_embeddings=True,
    )


def _params(cfg: KimbhoConfig) -> int:
    return KimbhoV1Model(cfg).num_params()


def _flops(cfg: KimbhoConfig) -> float:
    return KimbhoV1Model(cfg).flops_per_token(DEMO_SEQ_LEN)


def _seconds_per_step(cfg: KimbhoConfig, data_dir: Path) -> float:
    """Seconds per training step of `cfg`, timed on real steps in a throwaway directory."""
    with tempfile.TemporaryDirectory() as tmp:
        train = TrainConfig(
            batch_size=DEMO_BATCH,
            seq_len=DEMO_SEQ_LEN,
            max_steps=8,
            save_every=0,
            eval_every=0,
            optimizer="adamw",
            compile="false",
        )
        trainer = Trainer(RunConfig(cfg, train), data_dir, Path(tmp), progress_bar=False)
        times = []
        for step in range(8):
            start = time.perf_counter()
            trainer.train_step(step)
            times.append(time.perf_counter() - start)
        trainer.metrics.close()
        return statistics.median(times[2:])  # after warm-up; the median shrugs off a busy moment
