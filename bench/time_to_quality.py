"""Time to quality: validation bits per byte reached within a wall-clock budget.

Kimbho's default recipe (`TrainConfig()` as shipped: optimizer, learning rate, warm-up, schedule,
batch) against Hugging Face `LlamaForCausalLM` with a standard recipe (AdamW as the HF Trainer
sets it up by default: fused kernel, betas 0.9/0.999, no weight decay, gradient clipping at 1.0;
cosine decay from lr 3e-4 without warm-up), on the same model (`small` preset), the same
tokenizer and data, the same batch size and sequence length, the same validation set, in fp32
(bf16 is emulated and ~60x slower on a CPU without AMX; see docs/performance.md). The clock counts training
only: it stops while the validation set is scored (every `--eval-every` seconds), for both.

`--which hf-strong` is the fair peer: the same model with the recipe users tune it with
(nanoGPT's: fused AdamW lr 1e-3, betas (0.9, 0.95), weight decay 0.1 on matrices, 50 warm-up
steps, cosine to 10%, clipping at 1.0), in bf16 autocast where the CPU has native bf16 (Kimbho's
`precision=auto` picks the same), 10 minutes.

Both recipes decay their learning rate over the whole budget: after 10 steps each measures its
speed and sets its run length to what the rest of the budget holds, then re-estimates it after
every step from the speed so far until 90% of the run is done: a shared machine's speed drifts by
~10% over 20 minutes, and a run sized once either stops before its decay ends or ends its decay
with budget left over.

One leg per invocation, so each fits a ~10-minute CPU lock; a leg longer than `--chunk-minutes`
stops there, saving its state, and the same command continues it:

    flock /tmp/kimbho-cpu.lock python bench/time_to_quality.py --which kimbho --minutes 10
    flock /tmp/kimbho-cpu.lock python bench/time_to_quality.py --which hf --minutes 20   # part 1
    flock /tmp/kimbho-cpu.lock python bench/time_to_quality.py --which hf --minutes 20   # part 2
    python bench/time_to_quality.py --report        # both curves, the comparison, the PNG

`--set train.lr=3e-3` (repeatable) trains Kimbho with overridden defaults, under its own label:
how the defaults were tuned.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import (
    BUILTIN_CORPUS,
    CACHE,
    DEFAULT_CORPUS,
    RESULTS,
    SEQ_LEN,
    STRONG_LR,
    best_precision,
    bits_per_byte,
    hf_model,
    hf_train_step,
    load_results,
    model_config,
    prepared_data,
    save_results,
    strong_hf_lr,
    strong_hf_optimizer,
    validation_windows,
)

from kimbho.config import RunConfig, TrainConfig, parse_override
from kimbho.data.shards import RandomWindowSampler, TokenStream, dataset_fingerprint, load_meta
from kimbho.training.trainer import Trainer

# The run length is set from the speed of steps 3..CALIBRATION_STEPS: the first two include
# compilation and allocator warm-up (and the second sometimes a recompilation).
CALIBRATION_STEPS = 10
HF_LR = 3e-4
# The legs the report compares and plots (others, such as `--set` variants, are listed only).
LEGS = {
    "kimbho": "Kimbho, default recipe",
    "kimbho[5min]": "Kimbho, default recipe, 5-minute run",
    "hf": f"HF LlamaForCausalLM + AdamW (cosine, lr {HF_LR:g})",
    "hf-strong": f"HF LlamaForCausalLM, strong recipe (AdamW lr {STRONG_LR:g}, wd 0.1, warm-up, cosine)",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--which", choices=("kimbho", "hf", "hf-strong"))
    parser.add_argument(
        "--minutes", type=float, default=None, help="training budget (kimbho 10, hf 20, hf-strong 10)"
    )
    parser.add_argument("--chunk-minutes", type=float, default=10.0, help="stop after this much, resumably")
    parser.add_argument("--eval-every", type=float, default=60.0, help="seconds of training between evals")
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_CORPUS, help=f"text corpus (tinyshakespeare) or {BUILTIN_CORPUS}"
    )
    parser.add_argument("--set", action="append", default=[], help="kimbho: override a train.* default")
    parser.add_argument("--restart", action="store_true", help="discard a saved partial leg")
    parser.add_argument("--report", action="store_true", help="print the comparison and write the PNG")
    args = parser.parse_args()
    results_file, png = result_paths(args.data)
    if args.report:
        report(load_results(results_file), results_file, png, args.data.stem)
        return
    if args.which is None:
        parser.error("pass --which kimbho|hf|hf-strong, or --report")
    if args.set and args.which != "kimbho":
        parser.error("--set applies to kimbho's recipe only")
    default_minutes = 20.0 if args.which == "hf" else 10.0
    minutes = args.minutes or default_minutes
    # A leg of another length is its own result: e.g. `kimbho[5min]`, whose schedule ends at 5.
    label = args.which + "".join(f"[{item}]" for item in args.set)
    label += f"[{minutes:g}min]" if minutes != default_minutes else ""
    torch.manual_seed(0)
    data_dir = prepared_data(args.data)
    leg = (
        KimbhoLeg(data_dir, args.set)
        if args.which == "kimbho"
        else HFLeg(data_dir, args.which == "hf-strong")
    )
    run_leg(
        leg,
        label,
        minutes * 60,
        args.chunk_minutes * 60,
        args.eval_every,
        data_dir,
        args.restart,
        results_file,
    )


def result_paths(corpus: Path) -> tuple[Path, Path]:
    """The results file and PNG of a corpus: tinyshakespeare's keep their historical names."""
    suffix = "" if corpus.stem == "tinyshakespeare" else f"-{corpus.stem}"
    return RESULTS / f"time_to_quality{suffix}.json", RESULTS / f"time_to_quality{suffix}.png"


class KimbhoLeg:
    """Kimbho's trainer with its default recipe (plus `--set` overrides)."""

    def __init__(self, data_dir: Path, overrides: list[str]) -> None:
        values: dict[str, Any] = {"save_every": 0, "eval_every": 0, "sample_tokens": 0}
        for item in overrides:
            section, key, value = parse_override(item)
            if section != "train":
                raise SystemExit(f"--set takes train.* keys, got {item}")
            values[key] = value
        self._tmp = tempfile.TemporaryDirectory()
        run = RunConfig(model_config(), TrainConfig(**values))
        self.trainer = Trainer(run, data_dir, Path(self._tmp.name), progress_bar=False)
        self.model = self.trainer.model
        self.batch_size = self.trainer.cfg.batch_size
        self.recipe = {k: getattr(self.trainer.cfg, k) for k in vars(TrainConfig())}
        self.recipe["compiled"] = self.trainer.compiled

    def set_total_steps(self, steps: int) -> None:
        self.trainer.cfg.max_steps = steps  # the schedule (lr_at) reads it every step
        self.recipe["max_steps"] = steps

    def step(self, step: int) -> float:
        return self.trainer.train_step(step)[0]

    def loss_sum(self, model: torch.nn.Module, batch: torch.Tensor) -> float:
        return model(batch[:, :-1], targets=batch[:, 1:], reduction="sum").item()

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.trainer.optimizer.state_dict()}

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.trainer.optimizer.load_state_dict(state["optimizer"])


class HFLeg:
    """`LlamaForCausalLM` with the HF Trainer's default AdamW and a cosine schedule at lr 3e-4
    in fp32, or (`strong`) the strong recipe (`_common.strong_hf_optimizer`: lr 1e-3, betas
    (0.9, 0.95), weight decay 0.1 on matrices, 50 warm-up steps, cosine to 10%) in this CPU's
    best precision."""

    def __init__(self, data_dir: Path, strong: bool = False) -> None:
        self.batch_size = TrainConfig().batch_size  # the same batch as Kimbho's default recipe
        self.model = hf_model(model_config())
        self.model.train()
        self.total_steps = 0
        self.dtype = torch.bfloat16 if strong and best_precision() == "bf16" else torch.float32
        if strong:
            self.optimizer = strong_hf_optimizer(self.model)
            multiplier = lambda step: strong_hf_lr(step, self.total_steps or 10**9)  # noqa: E731
        else:
            self.optimizer = torch.optim.AdamW(
                self.model.parameters(), lr=HF_LR, weight_decay=0.0, fused=True
            )
            # transformers' get_cosine_schedule_with_warmup without warm-up, written out so that
            # the run length can be re-estimated during the run (see `run_leg`).
            multiplier = lambda step: (  # noqa: E731
                0.5 * (1 + math.cos(math.pi * min(1.0, step / self.total_steps))) if self.total_steps else 1.0
            )
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, multiplier)
        self.sampler = RandomWindowSampler(TokenStream(data_dir, "train"), SEQ_LEN, self.batch_size, seed=0)
        self.recipe = {
            "optimizer": (
                "torch AdamW (fused), betas (0.9, 0.95), weight_decay 0.1 on matrices"
                if strong
                else "torch AdamW (fused), betas (0.9, 0.999), weight_decay 0"
            ),
            "lr": STRONG_LR if strong else HF_LR,
            "schedule": (
                "50 warm-up steps, cosine to 10%"
                if strong
                else "cosine to 0, no warm-up (as transformers.get_cosine_schedule_with_warmup)"
            ),
            "grad_clip": 1.0,
            "precision": str(self.dtype).removeprefix("torch."),
            "batch_size": self.batch_size,
            "seq_len": SEQ_LEN,
        }

    def set_total_steps(self, steps: int) -> None:
        self.total_steps = self.recipe["max_steps"] = steps

    def step(self, step: int) -> float:
        batch = self.sampler.batch(step)
        loss = hf_train_step(self.model, self.optimizer, batch.inputs, batch.targets, dtype=self.dtype)
        self.schedule.step()
        return loss

    def loss_sum(self, model: torch.nn.Module, batch: torch.Tensor) -> float:
        logits = model(input_ids=batch[:, :-1]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
        }

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])


def run_leg(
    leg: KimbhoLeg | HFLeg,
    label: str,
    budget: float,
    chunk: float,
    eval_every: float,
    data_dir: Path,
    restart: bool,
    results_file: Path,
) -> None:
    windows, predicted_bytes = validation_windows(data_dir)
    state_file = CACHE / f"{results_file.stem}-{label}.pt"
    results = load_results(results_file)
    progress: dict[str, Any] = {"step": 0, "train_sec": 0.0, "total_steps": 0, "curve": [], "losses": []}
    settings = {
        "budget": budget,
        "batch_size": leg.batch_size,
        "data": dataset_fingerprint(load_meta(data_dir)),
    }
    if state_file.exists() and not restart:
        saved = torch.load(state_file, weights_only=True)
        if saved["settings"] != settings:
            raise SystemExit(
                f"{state_file} holds a partial leg with other settings ({saved['settings']}); pass --restart"
            )
        progress = saved["progress"]
        if progress["total_steps"]:
            leg.set_total_steps(progress["total_steps"])
        leg.load(saved["state"])
        print(f"{label}: continuing at step {progress['step']}, {progress['train_sec'] / 60:.1f} min trained")
    else:
        progress["curve"].append([0.0, bits_per_byte(leg.loss_sum, leg.model, windows, predicted_bytes)])
    chunk_end = min(budget, progress["train_sec"] + chunk)
    next_eval = (math.floor(progress["train_sec"] / eval_every) + 1) * eval_every
    while progress["train_sec"] < chunk_end and (
        not progress["total_steps"] or progress["step"] < progress["total_steps"]
    ):
        start = time.perf_counter()
        loss = leg.step(progress["step"])
        progress["train_sec"] += time.perf_counter() - start
        progress["step"] += 1
        progress["losses"].append([progress["train_sec"], loss])
        calibrating = progress["step"] == CALIBRATION_STEPS and not progress["total_steps"]
        if calibrating or CALIBRATION_STEPS < progress["step"] < 0.9 * progress["total_steps"]:
            # Steps 1 and 2 include compilation and allocator warm-up: time from the end of step 2.
            after_warmup = progress["losses"][1][0]
            per_step = (progress["train_sec"] - after_warmup) / (progress["step"] - 2)
            progress["total_steps"] = progress["step"] + int((budget - progress["train_sec"]) / per_step)
            leg.set_total_steps(progress["total_steps"])
            if calibrating:
                print(
                    f"{label}: {per_step:.2f} s/step, {progress['total_steps']} steps fit {budget / 60:.0f} min"
                )
        finished = progress["step"] == progress["total_steps"] or progress["train_sec"] >= budget
        if progress["train_sec"] >= next_eval or finished:
            bpb = bits_per_byte(leg.loss_sum, leg.model, windows, predicted_bytes)
            progress["curve"].append([progress["train_sec"], bpb])
            next_eval += eval_every
            print(
                f"{label}: {progress['train_sec'] / 60:5.1f} min, step {progress['step']}, loss {loss:.3f}, val bpb {bpb:.4f}",
                flush=True,
            )
    done = progress["step"] == progress["total_steps"] or progress["train_sec"] >= budget
    results[label] = {
        "budget_min": budget / 60,
        "done": done,
        "steps": progress["step"],
        "tokens": progress["step"] * leg.batch_size * SEQ_LEN,
        "curve": progress["curve"],
        "train_losses": progress["losses"],
        "recipe": {k: str(v) if not isinstance(v, (int, float, bool)) else v for k, v in leg.recipe.items()},
    }
    save_results(results_file, results)
    if done:
        state_file.unlink(missing_ok=True)
        print(f"{label}: done, best val bpb {min(b for _, b in progress['curve']):.4f} -> {results_file}")
    else:
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save({"settings": settings, "progress": progress, "state": leg.state()}, state_file)
        print(f"{label}: stopped at {progress['train_sec'] / 60:.1f} min; run the same command to continue")


def best_so_far(curve: list[list[float]]) -> list[tuple[float, float]]:
    best, out = math.inf, []
    for seconds, bpb in curve:
        best = min(best, bpb)
        out.append((seconds, best))
    return out


def time_to_reach(curve: list[list[float]], target: float) -> float | None:
    """Training seconds at which the validation curve first reaches `target` (interpolated)."""
    for (t0, b0), (t1, b1) in zip(curve, curve[1:], strict=False):
        if b1 <= target:
            return t0 + (t1 - t0) * (b0 - target) / (b0 - b1) if b0 > target else t0
    return None


def bpb_at(curve: list[list[float]], seconds: float) -> float | None:
    """Validation bpb after `seconds` of training, interpolated between evaluations; None past
    the end of the curve (3% of slack: the last step may end just short of the budget)."""
    for (t0, b0), (t1, b1) in zip(curve, curve[1:], strict=False):
        if t0 <= seconds <= t1:
            return b0 + (b1 - b0) * (seconds - t0) / (t1 - t0)
    # A leg sized from its measured step time ends within a few seconds of its budget.
    return curve[-1][1] if curve and seconds <= curve[-1][0] * 1.03 else None


def report(results: dict[str, Any], results_file: Path, png: Path, corpus: str) -> None:
    if not results:
        raise SystemExit(f"no results in {results_file}; run the legs first")
    for label, r in results.items():
        state = "" if r["done"] else "  (unfinished)"
        print(f"\n{label}: {r['steps']} steps, {r['tokens']:,} tokens in {r['budget_min']:.0f} min{state}")
        print("  " + ", ".join(f"{k}={v}" for k, v in r["recipe"].items()))
        print("  train min   val bpb   best so far")
        for (seconds, bpb), (_, best) in zip(r["curve"], best_so_far(r["curve"]), strict=True):
            print(f"  {seconds / 60:9.1f}   {bpb:7.4f}   {best:7.4f}")
    present = [p for p in ("hf", "hf-strong") if p in results]
    legs = [k for k in ("kimbho", "kimbho[5min]") if k in results]
    if not (present and legs):
        plot(results, png, corpus)
        return
    columns = [*legs, *present]
    print("\n| training minutes | " + " | ".join(LEGS[c] for c in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for minutes in (2.5, 5, 10, 20):
        cells = [bpb_at(results[c]["curve"], minutes * 60) for c in columns]
        print(f"| {minutes:g} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    for peer in present:
        hf = results[peer]
        hf_best = min(b for _, b in hf["curve"])
        hf_reach = time_to_reach(hf["curve"], hf_best)
        print(
            f"\n{LEGS[peer]}, {hf['budget_min']:.0f} min: best val bpb {hf_best:.4f} (at {hf_reach / 60:.1f} min)"
        )
        if "kimbho" in results:
            reach = time_to_reach(results["kimbho"]["curve"], hf_best)
            if reach is not None:
                print(
                    f"Kimbho's {results['kimbho']['budget_min']:.0f}-minute run reaches it in {reach / 60:.1f} min: {hf_reach / reach:.2f}x sooner"
                )
            else:
                print("Kimbho's run does not reach it within its budget")
        if "kimbho[5min]" in results:
            # The longer leg is still at its peak rate at 5 minutes; this one has decayed by then.
            end = results["kimbho[5min]"]["curve"][-1][1]
            verdict = "reaches it" if end <= hf_best else "does not reach it"
            print(
                f"Kimbho's 5-minute run ends at {end:.4f}: it {verdict} in 5 minutes ({hf_best - end:+.4f})"
            )
    plot(results, png, corpus)


def plot(results: dict[str, Any], png: Path, corpus: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, r in results.items():
        if label not in LEGS:
            continue
        minutes = [s / 60 for s, _ in r["curve"]]
        ax.plot(minutes, [b for _, b in r["curve"]], marker="o", markersize=3, label=LEGS[label])
    ax.set_xlabel("training time (minutes, 2 CPU cores)")
    ax.set_ylabel("validation bits per byte")
    batch = results.get("kimbho", next(iter(results.values())))["recipe"]["batch_size"]
    ax.set_title(f"small preset on {corpus}, batch {batch} x {SEQ_LEN}")
    ax.set_ylim(top=min(ax.get_ylim()[1], 4.0))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    print(f"\nwrote {png}")


if __name__ == "__main__":
    main()
