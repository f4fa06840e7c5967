"""Retrieval: the index (chunks, BM25 search, incremental add, complete-or-absent after a kill,
one normalisation for text and queries), retriever plugins, and the passages given to the model
by `generate`, `serve` and `finetune` (the same prompt format for all three)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import kimbho
from kimbho.config import KimbhoConfig, RunConfig
from kimbho.errors import KimbhoError
from kimbho.retrieval import open_retriever
from kimbho.retrieval.augment import Augmenter, with_passages
from kimbho.retrieval.index import INDEX_FILE, Chunker, Index, add_to_index, build_index, normalise
from tests.conftest import REPO, run_cli, running_server, tiny_run_config

FACTS = {
    "zorblat.txt": "Zorblat Quenfield was born in Varnholm.\n\nHe kept bees and wrote about rivers.\n",
    "mirela.txt": "Mirela Stavros founded the Ostrava glassworks in 1821.\n",
    "tokyo.txt": "東京は日本の首都です。\n\n大阪は商業の町です。\n",
    "accents.txt": "The Ｃａｆé Ärger sells crème brûlée.\n",
}


@pytest.fixture(scope="module")
def long_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `tiny` run with a context of 256 tokens: room for passages before a question."""
    out = tmp_path_factory.mktemp("runs") / "long"
    config = tiny_run_config(max_steps=2, eval_every=0, save_every=0, sample_tokens=0)
    config = RunConfig(KimbhoConfig.from_preset("tiny", max_seq_len=256), config.train)
    kimbho.Trainer(config, data_dir, out, progress_bar=False).fit()
    return out


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in FACTS.items():
        (folder / name).write_text(text)
    return folder


def test_chunks_follow_paragraphs_and_lines_and_map_back_to_the_text() -> None:
    paragraph = "word " * 10 + "\n"  # 51 bytes: two lines of it do not fit one chunk
    text = paragraph * 2 + "\n" + paragraph + "\n\n" + ("x" * 30 + " ") * 40 + "\n" + "tail\n"
    chunker = Chunker(chunk_tokens=16, bytes_per_token=4.0)  # 64 bytes a chunk
    spans = list(chunker.chunks(text))
    assert all(text[a:b].strip() for a, b in spans)
    assert all(len(text[a:b].encode()) <= 64 or len(text[a:b].split()) == 1 for a, b in spans)
    assert [a for a, _ in spans] == sorted(a for a, _ in spans)
    covered = "".join(text[a:b] for a, b in spans)
    assert covered.split() == text.split()  # nothing lost, nothing repeated
    # Whole paragraphs where they fit: the single-line paragraph is one chunk of its own.
    assert any(text[a:b].strip() == paragraph.strip() for a, b in spans)


def test_build_and_search(docs: Path, tmp_path: Path, tokenizer: kimbho.Tokenizer) -> None:
    found = build_index([str(docs)], tmp_path / "idx", tokenizer, chunk_tokens=64)
    assert found["documents"] == 4 and found["chunks"] >= 4
    index = Index(tmp_path / "idx")
    [best, *_] = index.search("Where was Zorblat Quenfield born?", 2)
    assert best.source.endswith("zorblat.txt") and "Varnholm" in best.text
    text = FACTS["zorblat.txt"]
    assert text[best.start : best.end] == best.text and best.score > 0
    # One normalisation for text and queries: case, NFKC (full-width letters), accents, and CJK,
    # which is written without spaces, found by a word inside a sentence.
    assert index.search("ZORBLAT", 1)[0].source.endswith("zorblat.txt")
    for query in ("café", "CAFE", "arger", "creme brulee"):
        assert index.search(query, 1)[0].source.endswith("accents.txt"), query
    assert index.search("日本", 1)[0].source.endswith("tokyo.txt")
    assert normalise("Ｃａｆé") == "café"
    # Text that is FTS5 syntax is searched as words; a query that matches nothing finds nothing.
    for query in ['"Varnholm', "bees AND NEAR(", "rivers*", "-", ""]:
        index.search(query, 3)
    assert index.search("nothing matches this xyzzy", 3) == []


def test_terms_in_most_chunks_do_not_decide_the_ranking(tmp_path: Path) -> None:
    """A word in more than half of the chunks is left out of the query (BM25 gives it no weight
    there); a query of such words alone is still answered."""
    folder = tmp_path / "docs"
    folder.mkdir()
    for n in range(10):
        (folder / f"{n}.txt").write_text(
            f"common words here, note {n}" + (" zorblat" if n == 7 else "") + "\n"
        )
    build_index([str(folder)], tmp_path / "idx")
    index = Index(tmp_path / "idx")
    assert index.search("common zorblat", 1)[0].source.endswith("7.txt")
    assert len(index.search("common words", 3)) == 3


def test_two_stage_ranking_equals_bm25_on_the_whole_query(tmp_path: Path) -> None:
    """Candidates by the query's rare terms, then the common terms' share added: the same order
    and scores FTS5 gives scoring every chunk on the whole query."""
    import random

    from kimbho.retrieval.index import query_terms

    rng = random.Random(0)
    common, rare = ["alpha", "beta", "gamma"], [f"w{n}" for n in range(400)]
    folder = tmp_path / "docs"
    folder.mkdir()
    for n in range(60):
        paragraphs = [
            " ".join(rng.choice(common if rng.random() < 0.3 else rare) for _ in range(12)) for _ in range(5)
        ]
        (folder / f"{n}.txt").write_text("\n\n".join(paragraphs))
    build_index([str(folder)], tmp_path / "idx", chunk_tokens=12)
    index = Index(tmp_path / "idx")
    for _ in range(30):
        query = " ".join([rng.choice(common), *rng.sample(rare, 2)])
        whole = index._ranked(
            [t for t in query_terms(query) if index._chunks_with(t) * 2 <= index.info.chunks], 4
        )
        mine = index.search(query, 4)
        assert [(p.source, p.start) for p in mine] == [(p.source, p.start) for p in whole]
        assert [p.score for p in mine] == pytest.approx([p.score for p in whole], abs=1e-9)


def test_add_makes_a_document_searchable_without_rebuilding(docs: Path, tmp_path: Path) -> None:
    build_index([str(docs)], tmp_path / "idx")
    before = Index(tmp_path / "idx").info.chunks
    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"text": "Quillon Abernathy invented the steam kite."}) + "\n{bad\n")
    assert run_cli("index", "add", tmp_path / "idx", "--input", new) == 0
    index = Index(tmp_path / "idx")
    [hit] = index.search("who invented the steam kite", 1)
    assert hit.source == f"{new.resolve()}:1" and index.info.chunks == before + 1
    assert add_to_index(tmp_path / "idx", [str(new)])["chunks"] == 0  # a source indexed once


def _big_corpus(folder: Path, files: int = 40) -> Path:
    folder.mkdir()
    line = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor\n"
    for i in range(files):
        (folder / f"{i}.txt").write_text((f"document {i}\n\n" + line * 20 + "\n") * 600)
    return folder


def _kill_midway(args: list[str], folder: Path, marker: str) -> None:
    """Run `kimbho ARGS` and SIGKILL it once it is writing (a file matching `marker` in `folder`:
    the staged index, or the journal of a transaction)."""
    process = subprocess.Popen([sys.executable, "-m", "kimbho", *args], cwd=REPO, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        if any(folder.glob(marker)):
            time.sleep(0.3)
            break
        time.sleep(0.02)
    assert process.poll() is None, "the command ended before it could be killed: give it more to do"
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_a_killed_build_or_add_leaves_no_index_or_the_old_one(docs: Path, tmp_path: Path) -> None:
    big = _big_corpus(tmp_path / "big")
    out = tmp_path / "idx"
    _kill_midway(
        ["index", "build", "--input", str(big), "--out", str(out)], tmp_path, ".idx.tmp-*/index.sqlite"
    )
    with pytest.raises(KimbhoError, match="does not exist"):
        Index(out)  # the staged directory never became the index
    build_index([str(docs)], out)  # and a new build is not disturbed by what the kill left
    before = [p.text for p in Index(out).search("Zorblat", 3)]
    _kill_midway(["index", "add", str(out), "--input", str(big)], out, f"{INDEX_FILE}-journal")
    # The journal is rolled back when the index is next opened for writing: it is what it was.
    add_to_index(out, [str(docs)])  # (every source there already: adds nothing)
    index = Index(out)
    assert index.search("lorem ipsum", 1) == []
    assert [p.text for p in index.search("Zorblat", 3)] == before
    db = sqlite3.connect(out / INDEX_FILE)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_bad_indexes_are_one_clear_error(
    docs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("index", "search", tmp_path / "none", "--query", "x") == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run_cli("index", "search", tmp_path / "empty", "--query", "x") == 1
    assert "is not an index" in capsys.readouterr().err
    build_index([str(docs)], tmp_path / "idx")
    (tmp_path / "idx" / INDEX_FILE).write_bytes(b"not a database at all" * 100)
    assert run_cli("index", "search", tmp_path / "idx", "--query", "x") == 1
    err = capsys.readouterr().err
    assert "is corrupt" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "blank.txt").write_text("   \n\n")
    assert run_cli("index", "build", "--input", tmp_path / "blank.txt", "--out", tmp_path / "idx2") == 1
    assert "no text to index" in capsys.readouterr().err and not (tmp_path / "idx2").exists()
    with pytest.raises(KimbhoError, match="no retriever named 'nope'"):
        open_retriever(str(tmp_path / "idx"), "nope")


def test_an_index_for_another_tokenizer_is_refused(docs: Path, tmp_path: Path, trained_run: Path) -> None:
    model, tokenizer = kimbho.load(trained_run)
    other = kimbho.Tokenizer.train(["some other text entirely, for another vocabulary"] * 50, 300)
    build_index([str(docs)], tmp_path / "idx", other)
    with pytest.raises(KimbhoError, match="another tokenizer than the model's"):
        Augmenter(Index(tmp_path / "idx"), 2, tokenizer, None, model.config.max_seq_len)


PLUGIN = '''
from kimbho.retrieval.index import Passage


class Echo:
    """Finds one passage: the query itself, reversed (so a test can tell it ran)."""

    def __init__(self, index):
        self.index = index

    def search(self, query, k):
        return [Passage(query[::-1], f"echo:{self.index}", 0, len(query), 1.0)][:k]
'''


def test_a_retriever_plugin_is_found_through_its_entry_point(tmp_path: Path) -> None:
    """A real package, installed with pip (into a folder put on the path), registering a
    retriever under `kimbho.retrievers`."""
    package = tmp_path / "plugin"
    (package / "echo_retriever").mkdir(parents=True)
    (package / "echo_retriever" / "__init__.py").write_text(PLUGIN)
    (package / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "echo-retriever"\nversion = "0.1"\n'
        '[project.entry-points."kimbho.retrievers"]\necho = "echo_retriever:Echo"\n'
    )
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            site,
            package,
        ],
        check=True,
        capture_output=True,
    )
    env = {"PYTHONPATH": f"{site}:{REPO / 'src'}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kimbho",
            "index",
            "search",
            "somewhere",
            "--query",
            "abc",
            "--retriever",
            "echo",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "score": 1.0,
        "source": "echo:somewhere",
        "start": 0,
        "end": 3,
        "text": "cba",
    }
    listed = subprocess.run(
        [sys.executable, "-c", "from kimbho.retrieval import available_retrievers as a; print(a())"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert listed.stdout.strip() == "['bm25', 'echo']"


def test_the_prompt_format_is_the_same_for_serving_and_training(
    docs: Path, tmp_path: Path, long_run: Path
) -> None:
    from kimbho.inference.chat import ChatFormat

    model, tokenizer = kimbho.load(long_run)
    chat = ChatFormat(tokenizer)
    build_index([str(docs)], tmp_path / "idx", tokenizer, chunk_tokens=32)
    augmenter = Augmenter(Index(tmp_path / "idx"), 2, tokenizer, chat, model.config.max_seq_len)
    question = [{"role": "user", "content": "Where was Zorblat born?"}]
    served, passages = augmenter.messages(question, 8)
    trained, same = augmenter.conversation(
        [*question, {"role": "assistant", "content": "Varnholm"}], [False, True]
    )
    assert passages == same and passages[0].source.endswith("zorblat.txt")
    assert served == trained[:1]
    assert served[0]["content"] == with_passages("Where was Zorblat born?", passages)
    assert served[0]["content"].startswith("Passages:\n[1] Zorblat Quenfield was born in Varnholm.")
    # The passages leave the reply its budget: a larger one takes passages away, not the question.
    fewer = augmenter.messages(question, model.config.max_seq_len - 20)[1]
    assert len(fewer) < len(passages) or not fewer
    nothing = augmenter.messages([{"role": "user", "content": "xyzzy plugh"}], 8)
    assert nothing == ([{"role": "user", "content": "xyzzy plugh"}], [])


def test_serve_with_an_index_returns_citations(docs: Path, tmp_path: Path, long_run: Path) -> None:
    from kimbho.inference.chat import ChatFormat
    from kimbho.serve.app import ServerOptions, create_app

    model, tokenizer = kimbho.load(long_run)
    build_index([str(docs)], tmp_path / "idx", tokenizer, chunk_tokens=32)
    app = create_app(
        model, tokenizer, ServerOptions(model_name="m", k=2), ChatFormat(tokenizer), Index(tmp_path / "idx")
    )
    ask = {
        "messages": [{"role": "user", "content": "Where was Zorblat born?"}],
        "max_tokens": 4,
        "temperature": 0,
    }
    with running_server(app) as url:
        out = httpx.post(url + "/v1/chat/completions", json=ask).json()
        assert out["citations"][0]["source"].endswith("zorblat.txt")
        assert set(out["citations"][0]) == {"source", "start", "end", "text", "score"}
        # The model was given the passages: more prompt tokens than the question alone.
        plain = httpx.post(url + "/v1/chat/completions", json={**ask, "retrieve": False}).json()
        assert plain["citations"] == [] and plain["usage"]["prompt_tokens"] < out["usage"]["prompt_tokens"]
        missing = {**ask, "messages": [{"role": "user", "content": "xyzzy plugh"}]}
        answered = httpx.post(url + "/v1/chat/completions", json=missing).json()
        assert answered["citations"] == [] and answered["choices"][0]["message"]["content"] is not None
        completion = {"prompt": "Zorblat Quenfield was born in", "max_tokens": 3, "temperature": 0}
        text = httpx.post(url + "/v1/completions", json=completion).json()
        assert text["citations"][0]["source"].endswith("zorblat.txt")
        ids = httpx.post(url + "/v1/completions", json={**completion, "prompt": [5, 6]}).json()
        assert ids["citations"] == []  # token ids are sent as they are
        with httpx.stream("POST", url + "/v1/chat/completions", json={**ask, "stream": True}) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert chunks[0]["citations"] == out["citations"] and all("citations" not in c for c in chunks[1:])


def test_generate_with_an_index(
    docs: Path, tmp_path: Path, long_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_index([str(docs)], tmp_path / "idx")
    args = [
        "generate",
        long_run,
        "--prompt",
        "Zorblat Quenfield",
        "--max-new-tokens",
        4,
        "--temperature",
        0,
    ]
    assert run_cli(*args, "--index", tmp_path / "idx", "--k", 1) == 0
    out = capsys.readouterr()
    assert (
        out.out.startswith("Zorblat Quenfield") and "sources: [1] " in out.err and "zorblat.txt:0-" in out.err
    )
    assert run_cli(*args, "--index", tmp_path / "nowhere") == 1
    assert "does not exist" in capsys.readouterr().err


def test_finetune_with_an_index_trains_on_the_served_prompts(
    docs: Path, tmp_path: Path, long_run: Path
) -> None:
    from kimbho.data.chat_data import load_rows

    model, tokenizer = kimbho.load(long_run)
    build_index([str(docs)], tmp_path / "idx", tokenizer, chunk_tokens=32)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": "Where was Zorblat born?", "completion": "Varnholm"}) + "\n")
    out = tmp_path / "ft"
    assert (
        run_cli(
            "finetune",
            long_run,
            "--data",
            data,
            "--out",
            out,
            "--max-steps",
            1,
            "--index",
            tmp_path / "idx",
            "--k",
            1,
            "train.eval_every=0",
        )
        == 0
    )
    meta = json.loads((out / "data" / "meta.json").read_text())
    rows = load_rows(out / "data", "train", meta)
    text = tokenizer.decode([int(t) for t in rows[0, 0] if t != 0])
    assert (
        "Passages:\n[1] Zorblat Quenfield was born in Varnholm." in text
        and "Question: Where was Zorblat born?" in text
    )
