"""Does fine-tuning teach a behaviour? Pretrain a small model on plain text, fine-tune it on
generated conversations that teach a reply format the text never shows, and score held-out
prompts through the official `openai` client against `kimbho serve`.

    python bench/finetune_behaviour.py                    # the built-in corpus, ~10 minutes on 2 cores
    python bench/finetune_behaviour.py --pretrain-steps 400 --finetune-steps 150

The behaviour: "Shout: WORD" -> "Sure: WORD! WORD! WORD!", with the user's word copied exactly.
The held-out prompts use words that no fine-tuning conversation contains, so the score measures
the format learnt, not memorised replies. Every stage runs as a user would run it: `kimbho
prepare`, `kimbho train`, `kimbho finetune`, `kimbho serve` (child processes), and the score is
the exact match of the greedy reply. The base model's score is measured the same way.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import socket
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from _common import RESULTS, cpu_name, save_results  # noqa: E402

PHRASINGS = ("Shout: {w}", "Shout this word: {w}", "Please shout: {w}", "shout: {w}")


def kimbho(*args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "kimbho", "-q", *map(str, args)], text=True, capture_output=True, **kwargs
    )
    if result.returncode:
        raise SystemExit(f"kimbho {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


def words_of_corpus(limit: int = 1200) -> list[str]:
    """Distinct plain words of the built-in corpus (CPython's docs), the fine-tuning vocabulary."""
    from pydoc_data.topics import topics

    seen: dict[str, None] = {}
    for text in topics.values():
        for w in re.findall(r"\b[a-z]{3,9}\b", text):
            seen.setdefault(w, None)
    words = list(seen)
    random.Random(0).shuffle(words)
    return words[:limit]


def conversation(word: str, rng: random.Random) -> dict[str, object]:
    return {
        "messages": [
            {"role": "user", "content": rng.choice(PHRASINGS).format(w=word)},
            {"role": "assistant", "content": reply(word)},
        ]
    }


def reply(word: str) -> str:
    """The behaviour's reply. The word follows a space in the reply as in the prompt, so it is the
    same tokens in both (a byte-level BPE spells "word" and " word" differently) and the model
    can copy it."""
    return f"Sure: {word}! {word}! {word}!"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def score_through_server(model_dir: Path, prompts: list[tuple[str, str]]) -> tuple[float, list[str]]:
    """Exact-match accuracy of the greedy replies, asked through `openai` against `kimbho serve`."""
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
        replies = []
        for prompt, _ in prompts:
            reply = client.chat.completions.create(
                model=client.models.list().data[0].id,
                messages=[{"role": "user", "content": prompt}],
                temperature=0.0,
                max_tokens=24,
            )
            replies.append(reply.choices[0].message.content or "")
    finally:
        server.terminate()
        server.wait(timeout=30)
    correct = sum(" ".join(r.split()) == expected for r, (_, expected) in zip(replies, prompts, strict=True))
    return correct / len(prompts), replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain-steps", type=int, default=800)
    parser.add_argument("--finetune-steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning's peak learning rate")
    parser.add_argument("--conversations", type=int, default=4000)
    parser.add_argument("--held-out", type=int, default=100)
    parser.add_argument(
        "--work", type=Path, default=None, help="keep the runs here (default: a temporary folder)"
    )
    parser.add_argument(
        "--base", type=Path, default=None, help="a base run to reuse instead of pretraining one"
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

    words = words_of_corpus()
    held_out_words, train_words = words[: args.held_out], words[args.held_out :]
    rng = random.Random(1)
    chat = work / "chat.jsonl"
    with chat.open("w") as f:
        for i in range(args.conversations):
            # Half the words are random letters: no reply can be remembered, only copied.
            word = (
                "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9)))
                if i % 2
                else rng.choice(train_words)
            )
            if word not in held_out_words:
                f.write(json.dumps(conversation(word, rng)) + "\n")
    prompts = [(rng.choice(PHRASINGS).format(w=w), reply(w)) for w in held_out_words]

    start = time.perf_counter()
    kimbho(
        "finetune",
        base,
        "--data",
        chat,
        "--out",
        work / "ft",
        "--max-steps",
        args.finetune_steps,
        f"train.lr={args.lr}",
    )
    timings["finetune_sec"] = time.perf_counter() - start
    meta = json.loads((work / "ft" / "data" / "meta.json").read_text())

    results = {
        "cpu": cpu_name(),
        "timings": timings,
        "padding_fraction": meta["splits"]["train"]["padding_fraction"],
    }
    for name, model in (("base", base), ("ft", work / "ft")):
        score, replies = score_through_server(model, prompts)
        results[name] = {
            "exact_match": score,
            "examples": [[p, r] for (p, _), r in zip(prompts[:3], replies[:3], strict=True)],
        }
        print(f"{name:>4}: exact match {score:.2f} on {len(prompts)} held-out prompts, e.g. {replies[0]!r}")
    print(
        f"pretraining {timings['pretrain_sec']:.0f} s, fine-tuning {timings['finetune_sec']:.0f} s on {results['cpu']}"
    )
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
