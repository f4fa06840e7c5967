"""What the training benchmarks share: the corpus, its prepared data, the Hugging Face peer and
the validation set both sides are scored on."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import os
import platform
import resource
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import kimbho  # noqa: E402
from kimbho.config import KimbhoConfig  # noqa: E402
from kimbho.data.shards import TokenStream, eval_windows  # noqa: E402
from kimbho.device import autocast  # noqa: E402
from kimbho.interop.gguf import export_gguf  # noqa: E402

RESULTS = REPO / "bench" / "results"
CACHE = REPO / "bench" / ".cache"
# tinyshakespeare (Karpathy's char-rnn corpus, 1.1 MB); pass --data to use another text. Looked
# for relative to the checkout (bench/data/, or a shared/data/ folder beside the repository),
# unless $KIMBHO_BENCH_CORPUS names it.
_CORPUS_PLACES = [REPO / "bench" / "data", REPO.parent / "shared" / "data"]
DEFAULT_CORPUS = Path(
    os.environ.get("KIMBHO_BENCH_CORPUS")
    or next(
        (str(d / "tinyshakespeare.txt") for d in _CORPUS_PLACES if (d / "tinyshakespeare.txt").is_file()),
        str(_CORPUS_PLACES[0] / "tinyshakespeare.txt"),
    )
)
PRESET = "small"
VOCAB = 8192  # the `small` preset's vocabulary
BATCH, SEQ_LEN = 16, 256


# `--data python-docs`: the built-in corpus (CPython's help topics, 0.76 MB of technical prose),
# the second corpus the recipe is tuned on.
BUILTIN_CORPUS = "python-docs"


def prepared_data(corpus: Path, vocab_size: int = VOCAB) -> Path:
    """`corpus` (a text file, or `BUILTIN_CORPUS`) tokenized with a `vocab_size` BPE trained on
    it, prepared once and cached."""
    if str(corpus) == BUILTIN_CORPUS:
        from pydoc_data.topics import topics

        content, inputs = "".join(topics[name] for name in sorted(topics)).encode(), None
    elif corpus.is_file():
        content, inputs = corpus.read_bytes(), [str(corpus)]
    else:
        sys.exit(
            f"corpus {corpus} not found; pass --data PATH or --data {BUILTIN_CORPUS} (tinyshakespeare: "
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt)"
        )
    # Keyed by content, not path or mtime: a touched or copied corpus reuses its prepared data.
    key = hashlib.sha256(content).hexdigest()[:10]
    out = CACHE / f"{corpus.stem}-{vocab_size}-{key}"
    if not (out / "meta.json").exists():
        kimbho.prepare(inputs, out, vocab_size=vocab_size, force=True)
    return out


def model_config(vocab_size: int = VOCAB) -> KimbhoConfig:
    return KimbhoConfig.from_preset(PRESET, vocab_size=vocab_size)


def hf_model(cfg: KimbhoConfig) -> torch.nn.Module:
    """`LlamaForCausalLM` with the same architecture and initialisation scale as `cfg`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kimbho.interop.hf import config_to_hf

    return LlamaForCausalLM(LlamaConfig(**config_to_hf(cfg)))


def hf_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy the way transformers computes it (fp32 logits)."""
    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def hf_train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> float:
    """One training step of the Hugging Face peer as the HF Trainer runs it by default: the loss
    (under autocast when `dtype` is bf16), backward, gradient clipping at 1.0, the optimizer."""
    with autocast(torch.device("cpu"), dtype):
        loss = hf_loss(model, inputs, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


# The strong Hugging Face recipe (nanoGPT's, as users run LlamaForCausalLM when they tune it):
# fused AdamW lr 1e-3, betas (0.9, 0.95), weight decay 0.1 on matrices only, 50 warm-up steps,
# cosine to 10%, gradient clipping at 1.0 (`hf_train_step`), bf16 autocast where the CPU has it.
STRONG_LR, STRONG_WARMUP, STRONG_MIN_RATIO = 1e-3, 50, 0.1


def strong_hf_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    """The strong recipe's AdamW: decay on the weight matrices (and embeddings), none on norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=STRONG_LR, betas=(0.9, 0.95), fused=True)


def strong_hf_lr(step: int, total_steps: int) -> float:
    """The strong recipe's learning-rate multiplier at `step`: linear warm-up, cosine to 10%."""
    if step < STRONG_WARMUP:
        return (step + 1) / STRONG_WARMUP
    progress = min(1.0, (step - STRONG_WARMUP) / max(1, total_steps - STRONG_WARMUP))
    return STRONG_MIN_RATIO + (1 - STRONG_MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


def best_precision() -> str:
    """bf16 where this CPU computes it natively, fp32 elsewhere: each side's best here."""
    from kimbho.device import pick_precision

    return "bf16" if pick_precision("auto", torch.device("cpu")) == torch.bfloat16 else "fp32"


def validation_windows(data_dir: Path) -> tuple[list[torch.Tensor], int]:
    """The whole validation split as windows of SEQ_LEN + 1 tokens, and the UTF-8 bytes of the
    tokens they predict (every token after the first): bits per byte's denominator, as Kimbho's."""
    val = TokenStream(data_dir, "val")
    tokenizer = kimbho.Tokenizer.from_file(Path(data_dir) / "tokenizer.json")
    predicted_bytes = tokenizer.count_bytes(val.window(1, len(val) - 1))
    return list(eval_windows(val.window, len(val), SEQ_LEN, None)), predicted_bytes


@torch.no_grad()
def bits_per_byte(
    loss_sum: Any, model: torch.nn.Module, windows: list[torch.Tensor], predicted_bytes: int
) -> float:
    """Validation bits per byte of `model`, given `loss_sum(model, batch) -> summed nats`."""
    model.eval()
    total = 0.0
    full = [w for w in windows if len(w) == SEQ_LEN + 1]
    rest = [w for w in windows if len(w) != SEQ_LEN + 1]
    batches = [torch.stack(full[i : i + BATCH]) for i in range(0, len(full), BATCH)]
    batches += [w[None] for w in rest]
    for batch in batches:
        total += loss_sum(model, batch)
    model.train()
    return total / math.log(2) / predicted_bytes


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def save_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


def cpu_name() -> str:
    """The CPU's model name and the matrix extensions that decide `precision=auto`: numbers are
    reported next to it, since the machines differ between runs."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), ""
    )
    flags = set(
        next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    )
    extensions = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags]
    return f"{name or platform.machine()} ({extensions[0] if extensions else 'no AVX2'})"


def llama_cpp_available() -> bool:
    """Whether llama.cpp's Python bindings are installed: they are optional (`make llama-cpp`
    compiles them for half an hour), so its columns are too."""
    return importlib.util.find_spec("llama_cpp") is not None


@functools.cache
def _gguf_tokenizer(vocab_size: int) -> kimbho.Tokenizer:
    """A byte-level BPE of at most `vocab_size` tokens, trained in about a second on CPython's own
    help text (no download): `export_gguf` needs a tokenizer whose ids fit the model's vocabulary
    and the bench models have none. The prompts are ids, so what it learns does not matter."""
    from pydoc_data.topics import topics

    return kimbho.Tokenizer.train(topics.values(), vocab_size)


def gguf_twin(model: kimbho.KimbhoV1Model, dtype: str, directory: Path) -> Path:
    """`model` as the GGUF file Kimbho exports (`dtype` f32 or q8_0 for the matrices) in
    `directory`: llama.cpp then runs exactly the weights Kimbho does, through the export users get."""
    out = Path(directory) / f"{dtype}.gguf"
    return export_gguf(model, _gguf_tokenizer(model.config.vocab_size), out, dtype=dtype, force=True)


def llama_cpp_run(path: Path, prompts: torch.Tensor, new: int, threads: int) -> Callable[[], list[list[int]]]:
    """llama.cpp's greedy continuation of each row of `prompts`, `new` tokens each, as a runner like
    `kimbho_run` (the new ids per prompt). Rows run one after another at batch 1, the cache cleared
    between, on the bindings' defaults: an f16 key/value cache (llama.cpp's own default) and no
    flash attention (whose f16 query rounding moves greedy f32 tokens off Kimbho's within a
    hundred). The file is loaded here, outside the timed call, with the file's context (the
    model's `max_seq_len`). Greedy is an argmax over a view of the last position's logits:
    cheaper than llama.cpp's greedy sampler once the vocabulary is in the thousands (it copies
    the logits into a candidate array first). No end-of-text stops a row early."""
    import llama_cpp
    import numpy as np

    rows = prompts.tolist()
    llm = llama_cpp.Llama(
        str(path),
        n_ctx=0,  # the file's context length
        n_batch=prompts.shape[1],  # the whole prompt in one decode
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    vocab = llm.n_vocab()

    def last_argmax() -> int:
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(vocab,)).argmax())

    def run() -> list[list[int]]:
        out: list[list[int]] = []
        for row in rows:
            llm.reset()  # the next eval drops the cache past position 0
            llm.eval(row)
            tokens = [last_argmax()]
            for _ in range(new - 1):  # the last token is not fed back: neither peer does
                llm.eval(tokens[-1:])
                tokens.append(last_argmax())
            out.append(tokens)
        return out

    # Freed while the interpreter still can: at exit, `Llama.__del__` raises from a torn-down module.
    weakref.finalize(run, llm.close)
    return run
