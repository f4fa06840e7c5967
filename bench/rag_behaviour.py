"""Does the model answer from documents it was never trained on? A knowledge base of fictional
people (facts no pretraining text holds), indexed with `kimbho index build`; a small pretrained
model fine-tuned with `kimbho finetune --index` on questions about 80% of them; then questions
about the other 20%, asked through the official `openai` client against `kimbho serve --index`,
with retrieval and without (`"retrieve": false`).

    python bench/rag_behaviour.py --base RUN_DIR     # a pretrained base (bench/finetune_behaviour.py makes one); ~40 min
    python bench/rag_behaviour.py                    # pretrain one first (~7 more minutes on 2 cores)

Each person has a document of three facts, a paragraph each ("NAME was born in W1.", "NAME works
as a W2.", "NAME keeps a pet called W3."), W1-W3 drawn from words the tokenizer spells as one
token, so an answer is copied, not spelled; the questions ask for one fact, the reply is the
word. There are many people (5,000) so that a small model cannot learn the facts by heart and
must read them. Exact match of the
greedy reply; `citations` is right when the person's own document is among them; recall@k is
the retriever's alone (the person's document among the k passages `kimbho index search` finds
for the question).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from _common import RESULTS, cpu_name, save_results  # noqa: E402
from finetune_behaviour import free_port, kimbho, pretrain, single_token_words  # noqa: E402

SYLLABLES = "ka zo ri mel tan vor qui sel dra bo nix fen gal thu pry wen sor lak mi dun hes ar ob yl".split()
QUESTIONS = {
    "born": ("Where was {name} born?", "In which town was {name} born?"),
    "work": ("What does {name} work as?", "What is the job of {name}?"),
    "pet": ("What is the name of {name}'s pet?", "What is {name}'s pet called?"),
}


def person(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = " ".join("".join(rng.sample(SYLLABLES, rng.randint(2, 3))).capitalize() for _ in range(2))
        if name not in taken:
            taken.add(name)
            return name


def document(name: str, facts: dict[str, str]) -> str:
    """One paragraph a fact: each its own chunk at the bench's chunk size, so the passage found
    for a question is the fact it asks for."""
    return (
        f"{name} was born in {facts['born']}.\n\n{name} works as a {facts['work']}.\n\n"
        f"{name} keeps a pet called {facts['pet']}.\n"
    )


def ask(port: int, questions: list[tuple[str, str, str]], retrieve: bool) -> list[dict]:
    """Greedy replies (and their citations) through `openai` against `kimbho serve --index`."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    name = client.models.list().data[0].id
    out = []
    for question, _, _ in questions:
        response = client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": question}],
            temperature=0.0,
            max_tokens=8,
            extra_body={"retrieve": retrieve},
        )
        out.append(
            {
                "reply": response.choices[0].message.content or "",
                "citations": response.to_dict().get("citations", []),
            }
        )
    return out


def serve(model_dir: Path, index: Path, k: int) -> tuple[subprocess.Popen, int]:
    from openai import OpenAI

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kimbho",
            "-q",
            "serve",
            str(model_dir),
            "--port",
            str(port),
            "--index",
            str(index),
            "--k",
            str(k),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    for _ in range(600):
        try:
            client.models.list()
            return server, port
        except Exception:
            if server.poll() is not None:
                raise SystemExit(
                    f"kimbho serve failed: {server.stderr.read() if server.stderr else ''}"
                ) from None
            time.sleep(0.1)
    raise SystemExit("kimbho serve did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--base", type=Path, default=None, help="a pretrained base run (default: pretrain one)"
    )
    parser.add_argument("--people", type=int, default=5000)
    parser.add_argument(
        "--held-out", type=float, default=0.2, help="share of the people no training question is about"
    )
    parser.add_argument(
        "--k", type=int, default=3, help="passages retrieved per question: a person's three facts"
    )
    parser.add_argument("--chunk-tokens", type=int, default=32, help="tokens per chunk: one fact each")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--questions", type=int, default=200, help="held-out questions asked")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--reuse", action="store_true", help="keep a fine-tuned run already in --work")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kimbho-rag-"))
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    base = args.base or work / "base"
    if args.base is None and not (base / "checkpoints").is_dir():
        start = time.perf_counter()
        pretrain(work, 2000)
        timings["pretrain_sec"] = time.perf_counter() - start

    rng = random.Random(0)
    words = single_token_words(base)
    taken: set[str] = set()
    people = {person(rng, taken): {r: rng.choice(words) for r in QUESTIONS} for _ in range(args.people)}
    kb = work / "kb"
    kb.mkdir(exist_ok=True)
    for n, (name, facts) in enumerate(people.items()):
        (kb / f"person-{n:04d}.txt").write_text(document(name, facts))
    source_of = {name: str((kb / f"person-{n:04d}.txt").resolve()) for n, name in enumerate(people)}
    names = list(people)
    held = set(rng.sample(names, int(len(names) * args.held_out)))

    index = work / "index"
    start = time.perf_counter()
    kimbho(
        "index",
        "build",
        "--input",
        kb,
        "--out",
        index,
        "--tokenizer",
        base,
        "--chunk-tokens",
        args.chunk_tokens,
        "--force",
    )
    timings["index_sec"] = time.perf_counter() - start

    def questions(about: list[str], count: int | None = None) -> list[tuple[str, str, str]]:
        qs = [(rng.choice(QUESTIONS[r]).format(name=n), people[n][r], n) for n in about for r in QUESTIONS]
        rng.shuffle(qs)
        return qs[:count] if count else qs

    train = [n for n in names if n not in held]
    data = work / "train.jsonl"
    with data.open("w") as f:
        for q, a, _ in questions(train):  # each fact asked once, in one of its two phrasings
            message = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": message}) + "\n")
    test = questions(sorted(held), args.questions)

    # The retriever alone: the person's document among the k passages found for the question.
    from kimbho.retrieval.index import Index

    searcher = Index(index)
    recall = sum(source_of[n] in {p.source for p in searcher.search(q, args.k)} for q, _, n in test) / len(
        test
    )

    ft = work / "ft"
    if not (args.reuse and (ft / "checkpoints").is_dir()):
        start = time.perf_counter()
        kimbho(
            "finetune", base, "--data", data, "--out", ft, "--index", index, "--k", args.k,
            "--max-steps", args.steps, f"train.lr={args.lr}", "train.eval_every=100",
        )  # fmt: skip
        timings["finetune_sec"] = time.perf_counter() - start

    results: dict[str, object] = {
        "cpu": cpu_name(),
        "people": len(people),
        "held_out_people": len(held),
        "questions": len(test),
        "k": args.k,
        f"recall_at_{args.k}": recall,
    }
    server, port = serve(ft, index, args.k)
    try:
        for name, retrieve in (("with_retrieval", True), ("without_retrieval", False)):
            answers = ask(port, test, retrieve)
            exact = sum(
                " ".join(a["reply"].split()).casefold() == w.casefold()
                for a, (_, w, _) in zip(answers, test, strict=True)
            )
            cited = sum(
                any(c["source"] == source_of[n] for c in a["citations"])
                for a, (_, _, n) in zip(answers, test, strict=True)
            )
            results[name] = {
                "exact_match": exact / len(test),
                "right_source_cited": cited / len(test),
                "examples": [
                    [q, a["reply"], w] for a, (q, w, _) in list(zip(answers, test, strict=True))[:4]
                ],
            }
        # People added with `index add` while the server runs: answerable without a rebuild or a restart.
        late = {person(rng, taken): {r: rng.choice(words) for r in QUESTIONS} for _ in range(20)}
        extra = work / "kb-added"
        extra.mkdir(exist_ok=True)
        for n, (name, facts) in enumerate(late.items()):
            (extra / f"added-{n:04d}.txt").write_text(document(name, facts))
            source_of[name] = str((extra / f"added-{n:04d}.txt").resolve())
        people.update(late)
        kimbho("index", "add", index, "--input", extra)
        added = questions(list(late))
        answers = ask(port, added, True)
        results["added_with_index_add"] = {
            "questions": len(added),
            "exact_match": sum(
                " ".join(a["reply"].split()).casefold() == w.casefold()
                for a, (_, w, _) in zip(answers, added, strict=True)
            )
            / len(added),
            "right_source_cited": sum(
                any(c["source"] == source_of[n] for c in a["citations"])
                for a, (_, _, n) in zip(answers, added, strict=True)
            )
            / len(added),
        }
    finally:
        server.terminate()
        server.wait(timeout=30)
    results["timings"] = timings
    w, wo = results["with_retrieval"], results["without_retrieval"]
    print(
        f"{len(test)} questions about {len(held)} people never trained on: exact match {w['exact_match']:.2f} with retrieval "  # type: ignore[index]
        f"(right source cited {w['right_source_cited']:.2f}), {wo['exact_match']:.2f} without; "  # type: ignore[index]
        f"retriever recall@{args.k} {recall:.2f}; people added with `index add` while serving: exact match "
        f"{results['added_with_index_add']['exact_match']:.2f}; on {results['cpu']}"  # type: ignore[index]
    )
    save_results(RESULTS / "rag_behaviour.json", results)


if __name__ == "__main__":
    main()
