"""Does fine-tuning teach a behaviour? Pretrain a small model on plain text, fine-tune it on
generated conversations that teach a reply format the text never shows, fully and with LoRA,
and score held-out prompts through the official `openai` client against `kimbho serve`, through
`transformers` on the Hugging Face export (`apply_chat_template`) and through llama.cpp's chat
completion on the GGUF export (when `llama_cpp` is installed: `make llama-cpp`).

    python bench/finetune_behaviour.py                    # the built-in corpus, ~30 minutes on 2 cores
    python bench/finetune_behaviour.py --base RUN_DIR     # reuse a pretrained base
    python bench/finetune_behaviour.py --work DIR --reuse # score the runs DIR already holds

The behaviour: "Shout: W1 W2 W3" -> "Sure: W1! W2! W3!", for 1 to 3 words the tokenizer spells as
one token each, copied exactly and in order. The 100 held-out prompts name word sequences that no
fine-tuning conversation contains, so the score measures the format learnt and the words
copied, not memorised replies. Every stage runs as a user would run it: `kimbho
prepare`, `kimbho train`, `kimbho finetune`, `kimbho serve` (child processes), and the score is
the exact match of the greedy reply. The base model's score is measured the same way. The
held-out prompts are also written as a task file (chat messages and the expected reply) and
scored with `kimbho eval MODEL --task`, for every model.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from _common import RESULTS, cpu_name, save_results  # noqa: E402

# The words always end the prompt, after a colon: no other word of the prompt is a candidate.
PHRASINGS = ("Shout: {w}", "Please shout: {w}", "shout: {w}", "Say it loud: {w}")
MAX_TOKENS = 24


def kimbho(*args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "kimbho", "-q", *map(str, args)], text=True, capture_output=True, **kwargs
    )
    if result.returncode:
        raise SystemExit(f"kimbho {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


def single_token_words(model: Path) -> list[str]:
    """The words the model's tokenizer spells as one token after a space (" word"), shuffled:
    the words the behaviour copies. One token each, so a reply copies the word whole rather than
    stitching fragments (fragments seen as replies become what the model says instead)."""
    sys.path.insert(0, str(REPO / "src"))
    from kimbho.data.tokenizer import Tokenizer
    from kimbho.loading import resolve_checkpoint

    ckpt = resolve_checkpoint(model)
    path = ckpt / "tokenizer.json" if (ckpt / "tokenizer.json").is_file() else Path(model) / "tokenizer.json"
    tokenizer = Tokenizer.from_file(path)
    words = sorted(
        {
            text.strip()
            for i in range(tokenizer.vocab_size)
            if re.fullmatch(r" [a-z]{3,}", text := tokenizer.decode([i]))
            and tokenizer.encode(f"Shout: {text.strip()}!")[-2:] == [i, *tokenizer.encode("!")]
        }
    )
    random.Random(0).shuffle(words)
    return words


def conversation(chosen: tuple[str, ...], rng: random.Random) -> dict[str, object]:
    return {
        "messages": [
            {"role": "user", "content": rng.choice(PHRASINGS).format(w=" ".join(chosen))},
            {"role": "assistant", "content": reply(chosen)},
        ]
    }


def reply(chosen: tuple[str, ...]) -> str:
    """The behaviour's reply: each of the user's words, in order, shouted. Each word follows a
    space in the reply as in the prompt, so it is the same token in both (a byte-level BPE
    spells "word" and " word" differently) and the model can copy it."""
    return "Sure:" + "".join(f" {w}!" for w in chosen)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replies_from_server(model_dir: Path, prompts: list[str]) -> list[str]:
    """The greedy replies, asked through `openai` against `kimbho serve`."""
    from openai import OpenAI

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "kimbho", "-q", "serve", str(model_dir), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    try:
        for _ in range(600):
            try:
                client.models.list()
                break
            except Exception:
                if server.poll() is not None:
                    reason = server.stderr.read() if server.stderr else ""
                    raise SystemExit(f"kimbho serve failed: {reason}") from None
                time.sleep(0.1)
        name = client.models.list().data[0].id
        return [
            client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": p}], temperature=0.0, max_tokens=MAX_TOKENS
            )
            .choices[0]
            .message.content
            or ""
            for p in prompts
        ]
    finally:
        server.terminate()
        server.wait(timeout=30)


def replies_from_transformers(hf_dir: Path, prompts: list[str]) -> list[str]:
    """The greedy replies of `transformers` on the Hugging Face export, prompted with the chat
    template the export carries (`apply_chat_template`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    replies = []
    for p in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": p}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=False,
        )
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        replies.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return replies


def replies_from_llama_cpp(gguf_file: Path, prompts: list[str]) -> list[str] | None:
    """The greedy replies of llama.cpp's chat completion on the GGUF export, formatted by the
    chat template in the file (None where `llama_cpp` is not installed: `make llama-cpp`)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(str(gguf_file), n_ctx=128, n_threads=2, verbose=False)
    return [
        llm.create_chat_completion(
            messages=[{"role": "user", "content": p}], temperature=0.0, max_tokens=MAX_TOKENS
        )["choices"][0]["message"]["content"]
        or ""
        for p in prompts
    ]


def exact_match(replies: list[str], expected: list[str]) -> float:
    return sum(" ".join(r.split()) == e for r, e in zip(replies, expected, strict=True)) / len(expected)


def score(model_dir: Path, prompts: list[str], expected: list[str], runtimes: bool) -> dict[str, object]:
    """Exact match through the server and, for the fine-tuned models, through the Hugging Face
    and GGUF exports, with how often each runtime's reply is the server's."""
    replies = {"serve": replies_from_server(model_dir, prompts)}
    if runtimes:
        kimbho("export", "hf", model_dir, model_dir / "hf", "--force")
        replies["transformers"] = replies_from_transformers(model_dir / "hf", prompts)
        kimbho("export", "gguf", model_dir, model_dir / "model.gguf", "--force")
        from_llama = replies_from_llama_cpp(model_dir / "model.gguf", prompts)
        if from_llama is not None:
            replies["llama_cpp"] = from_llama
    served = replies["serve"]
    return {
        "exact_match": {name: exact_match(r, expected) for name, r in replies.items()},
        "same_reply_as_serve": {
            name: sum(a == b for a, b in zip(r, served, strict=True)) / len(r) for name, r in replies.items()
        },
        "misses": [
            [p, r] for p, r, e in zip(prompts, served, expected, strict=True) if " ".join(r.split()) != e
        ][:5],
        "examples": [[p, r] for p, r in zip(prompts[:3], served[:3], strict=True)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain-steps", type=int, default=2000)
    parser.add_argument("--finetune-steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-3, help="full fine-tuning's peak learning rate")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-lr", type=float, default=3e-3, help="LoRA's peak learning rate")
    parser.add_argument("--conversations", type=int, default=4000)
    parser.add_argument("--held-out", type=int, default=100)
    parser.add_argument(
        "--work", type=Path, default=None, help="keep the runs here (default: a temporary folder)"
    )
    parser.add_argument(
        "--base", type=Path, default=None, help="a base run to reuse instead of pretraining one"
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep the fine-tuned runs already in --work rather than redo them",
    )
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kimbho-ft-"))
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    base = args.base or work / "base"
    if args.base is None:
        pretrain(work, args.pretrain_steps)
        timings["pretrain_sec"] = time.perf_counter() - start

    # Each prompt names 1 to 3 words; no held-out prompt's words, in that order, are those of
    # any fine-tuning conversation, so a reply can only be built by copying from the prompt.
    words = single_token_words(base)
    rng = random.Random(1)

    def draw() -> tuple[str, ...]:
        return tuple(rng.sample(words, rng.randint(1, 3)))

    held_out: list[tuple[str, ...]] = []
    while len(held_out) < args.held_out:
        if (choice := draw()) not in held_out:
            held_out.append(choice)
    chat = work / "chat.jsonl"
    with chat.open("w") as f:
        written = 0
        while written < args.conversations:
            if (choice := draw()) not in held_out:
                f.write(json.dumps(conversation(choice, rng)) + "\n")
                written += 1
    prompts = [rng.choice(PHRASINGS).format(w=" ".join(c)) for c in held_out]
    expected = [reply(c) for c in held_out]

    runs = {"ft": ["--max-steps", args.finetune_steps, f"train.lr={args.lr}"]}
    if args.lora_rank:
        runs["lora"] = [
            "--max-steps", args.finetune_steps, "--lora-rank", args.lora_rank,
            "--lora-alpha", 2 * args.lora_rank, f"train.lr={args.lora_lr}",
        ]  # fmt: skip
    meta = {}
    for name, options in runs.items():
        if not (args.reuse and (work / name / "checkpoints").is_dir()):
            start = time.perf_counter()
            kimbho("finetune", base, "--data", chat, "--out", work / name, *options)
            timings[f"{name}_sec"] = time.perf_counter() - start
        meta = json.loads((work / name / "data" / "meta.json").read_text())
    task = work / "held_out_task.jsonl"
    task.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": p}], "answer": e}) + "\n"
            for p, e in zip(prompts, expected, strict=True)
        )
    )

    results: dict[str, object] = {
        "cpu": cpu_name(),
        "timings": timings,
        "padding_fraction": meta["splits"]["train"]["padding_fraction"],
        "held_out_prompts": len(prompts),
    }
    for name, model in (("base", base), *((n, work / n) for n in runs)):
        results[name] = found = score(model, prompts, expected, runtimes=name != "base")
        found["eval_task"] = json.loads(kimbho("eval", model, "--task", task).stdout.splitlines()[0])
        found["exact_match"]["kimbho eval --task"] = found["eval_task"]["score"]  # type: ignore[index]
        em = ", ".join(f"{k} {v:.2f}" for k, v in found["exact_match"].items())  # type: ignore[attr-defined]
        print(
            f"{name:>4}: exact match {em} on {len(prompts)} held-out prompts, e.g. {found['examples'][0]!r}"
        )  # type: ignore[index]
    print(", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f" on {results['cpu']}")
    save_results(RESULTS / "finetune_behaviour.json", results)


def pretrain(work: Path, steps: int) -> None:
    """The base model: prepare the built-in corpus and train a small model on it."""
    kimbho("prepare", "--out", work / "data", "--vocab-size", 2048, "--force")
    kimbho(
        "train", "--data", work / "data", "--out", work / "base", "--max-steps", steps,
        "model.emb_dim=192", "model.num_heads=6", "model.group_size=3", "model.num_blocks=4",
        "model.max_seq_len=128", "model.tie_embeddings=true", "train.batch_size=16", "train.eval_every=0",
        "train.save_every=0", "train.compile=false",
    )  # fmt: skip


if __name__ == "__main__":
    main()
