"""lm-evaluation-harness on Kimbho, offline: the `kimbho` model type in process, `local-completions`
against `kimbho serve`, and lm-eval's own `hf` model on the Hugging Face export give the same
log-likelihoods, rolling log-likelihoods and greedy replies on local task files, with the network
disabled for Python."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import kimbho
from tests import no_network
from tests.conftest import REPO, run_cli, running_server

pytest.importorskip("lm_eval")

TASKS = ("kimbho_mc", "kimbho_rolling", "kimbho_gen")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    no_network.install()
    yield
    no_network.uninstall()


def _items() -> list[dict[str, Any]]:
    """Multiple-choice items from the built-in corpus: a sentence's next words against the same
    letters scrambled. `text` (twelve words) is short enough to be one window of any model here."""
    from pydoc_data.topics import topics

    sentences = [s.strip() for t in list(topics.values())[:40] for s in t.split(". ") if len(s.split()) > 12]
    rng = random.Random(1)
    items = []
    for i, sentence in enumerate(sentences[:16]):
        words = sentence.split()
        true = " ".join(words[5:8])
        scrambled = " ".join("".join(rng.sample(w, len(w))) for w in words[5:8])
        choices = [true, scrambled] if i % 2 == 0 else [scrambled, true]
        items.append(
            {"query": " ".join(words[:5]), "choices": choices, "gold": i % 2, "text": " ".join(words[:12])}
        )
    return items


def _write_tasks(folder: Path, items: list[dict[str, Any]]) -> Path:
    """lm-eval task YAML over a local JSONL file (`dataset_path: json`: nothing to download)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in items))
    source = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        f"task: kimbho_mc\n{source}output_type: multiple_choice\n"
        'doc_to_text: "{{query}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (folder / "rolling.yaml").write_text(
        f"task: kimbho_rolling\n{source}output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: bits_per_byte\n'
    )
    (folder / "gen.yaml").write_text(
        f"task: kimbho_gen\n{source}output_type: generate_until\n"
        'doc_to_text: "{{query}}"\ndoc_to_target: "{{text}}"\n'
        'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 12\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    return folder


def _evaluate(model: Any, folder: Path, **kwargs: Any) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(folder), include_defaults=False)
    return lm_eval.simple_evaluate(
        model=model, tasks=list(TASKS), task_manager=manager, log_samples=True, bootstrap_iters=0, **kwargs
    )


def _responses(results: dict[str, Any], task: str) -> list[Any]:
    return [s["filtered_resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_in_process_server_and_hf_export_agree(trained_run: Path, tmp_path: Path) -> None:
    from kimbho.evaluation.harness import KimbhoLM
    from kimbho.inference.chat import ChatFormat
    from kimbho.serve.app import ServerOptions, create_app

    folder = _write_tasks(tmp_path / "tasks", _items())
    assert run_cli("export", "hf", trained_run, tmp_path / "hf") == 0
    model, tokenizer = kimbho.load(trained_run)
    context = model.config.max_seq_len

    ours = _evaluate(KimbhoLM(pretrained=str(trained_run)), folder)
    hf = _evaluate("hf", folder, model_args=f"pretrained={tmp_path / 'hf'},dtype=float32", device="cpu")
    app = create_app(model, tokenizer, ServerOptions(model_name="kimbho"), ChatFormat(tokenizer))
    with running_server(app) as url:
        # local-completions asks for one generated token after every scored prompt: its
        # max_length leaves room for it.
        served = _evaluate(
            "local-completions",
            folder,
            model_args=f"model=kimbho,base_url={url}/v1/completions,tokenizer_backend=remote,"
            f"max_length={context - 1},num_concurrent=1,max_retries=1",
        )

    for task in ("kimbho_mc", "kimbho_rolling"):
        reference = _responses(ours, task)
        for other in (hf, served):
            for mine, theirs in zip(reference, _responses(other, task), strict=True):
                if task == "kimbho_rolling":
                    assert theirs == pytest.approx(mine, abs=1e-3)
                else:
                    assert [ll for ll, _ in theirs] == pytest.approx([ll for ll, _ in mine], abs=1e-3)
                    assert [g for _, g in theirs] == [g for _, g in mine]
    assert _responses(ours, "kimbho_gen") == _responses(hf, "kimbho_gen") == _responses(served, "kimbho_gen")
    assert ours["results"]["kimbho_mc"]["acc_norm,none"] >= 0.75  # the real continuation, not the scramble

    # lm-eval's acc_norm is `kimbho eval --task`'s score: the same items, the same normalisation.
    from kimbho.evaluation.tasks import MultipleChoice, score_multiple_choice

    items = [
        MultipleChoice(i["query"], tuple(" " + c for c in i["choices"]), i["gold"], "") for i in _items()
    ]
    ours_mc = score_multiple_choice(model, tokenizer, items)
    assert ours_mc["score"] == pytest.approx(ours["results"]["kimbho_mc"]["acc_norm,none"])


def test_the_kimbho_lm_eval_command(trained_run: Path, tmp_path: Path) -> None:
    """lm-eval's command line with `--model kimbho`, as a user runs it, in a process without a network."""
    folder = _write_tasks(tmp_path / "tasks", _items())
    code = (
        "import sys; from tests import no_network; no_network.install(); "
        "from kimbho.evaluation.harness import main; sys.argv[0] = 'kimbho-lm-eval'; main()"
    )
    args = ["run", "--model", "kimbho", "--model_args", f"pretrained={trained_run}", "--include_path", folder]
    args += ["--tasks", "kimbho_mc", "--output_path", tmp_path / "out", "--limit", "8"]
    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    [written] = (tmp_path / "out").rglob("results_*.json")
    result = json.loads(written.read_text())["results"]["kimbho_mc"]
    assert result["acc_norm,none"] >= 0.75 and "kimbho_mc" in done.stdout


def test_the_network_really_is_off() -> None:
    import socket

    with pytest.raises(no_network.NetworkDisabled):
        socket.create_connection(("203.0.113.1", 443), timeout=1)  # TEST-NET-3: never routable
    with pytest.raises(no_network.NetworkDisabled):
        socket.getaddrinfo("huggingface.co", 443)
