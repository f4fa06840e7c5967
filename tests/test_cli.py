import json
from pathlib import Path

import pytest

from tests.conftest import run_cli, run_subprocess

COMMANDS = [["tokenizer", "train"], ["prepare"], ["train"], ["generate"], ["eval"], ["demo"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_answers_help(command: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*command, "--help")
    assert exit_info.value.code == 0
    assert "usage: kimbho" in capsys.readouterr().out


def test_train_help_lists_config_keys(capsys) -> None:
    with pytest.raises(SystemExit):
        run_cli("train", "--help")
    out = capsys.readouterr().out
    for key in ("train.batch_size", "train.precision", "model.group_size", "model.rope_base"):
        assert key in out


def test_pipeline_as_a_user_runs_it(tmp_path: Path) -> None:
    """tokenizer train -> prepare -> train -> generate -> eval, each as its own process."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(10):
        (corpus / f"{i}.txt").write_text(
            f"Chapter {i}. " + "It was the best of times, it was the worst of times. " * 30
        )
    r = run_subprocess(
        "tokenizer", "train", "--input", corpus, "--vocab-size", 300, "--out", tmp_path / "tok.json"
    )
    assert r.returncode == 0, r.stderr
    r = run_subprocess(
        "prepare", "--input", corpus, "--tokenizer", tmp_path / "tok.json", "--out", tmp_path / "data"
    )
    assert r.returncode == 0, r.stderr
    assert "train" in r.stdout and (tmp_path / "data" / "meta.json").is_file()
    r = run_subprocess(
        "train",
        "--preset",
        "tiny",
        "--data",
        tmp_path / "data",
        "--out",
        tmp_path / "run",
        "--max-steps",
        30,
        "train.batch_size=4",
        "train.seq_len=32",
        "train.eval_every=15",
    )
    assert r.returncode == 0, r.stderr
    assert "finished" in r.stdout
    r = run_subprocess(
        "generate", tmp_path / "run", "--prompt", "It was", "--max-new-tokens", 10, "--seed", 1
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("It was")
    r = run_subprocess("eval", tmp_path / "run", "--data", tmp_path / "data")
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)) == {"loss", "perplexity", "bits_per_byte", "tokens", "bytes"}


def test_stream_and_interactive_generation(trained_run: Path, capsys, monkeypatch) -> None:
    assert (
        run_cli("generate", trained_run, "--prompt", "The", "--max-new-tokens", 8, "--seed", 0, "--stream")
        == 0
    )
    streamed = capsys.readouterr().out
    assert run_cli("generate", trained_run, "--prompt", "The", "--max-new-tokens", 8, "--seed", 0) == 0
    assert capsys.readouterr().out == streamed
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("The first\n\nThe second\n"))
    assert run_cli("generate", trained_run, "--max-new-tokens", 4, "--temperature", 0) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("The ")]
    assert lines[0].startswith("The first") and any(line.startswith("The second") for line in lines)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["prepare", "--input", "/no/such/dir", "--vocab-size", "300", "--out", "{tmp}/out"],
            "does not exist",
        ),
        (["train", "--data", "{tmp}", "--out", "{tmp}/run"], "no meta.json"),
        (["train", "--preset", "giant", "--data", "{data}", "--out", "{tmp}/run"], "unknown preset 'giant'"),
        (
            ["train", "--data", "{data}", "--out", "{tmp}/run", "model.num_heads=6"],
            "not divisible by model.group_size",
        ),
        (
            ["train", "--data", "{data}", "--out", "{tmp}/run", "model.vocab_size=1000"],
            "tokenizer has 512 tokens",
        ),
        (
            ["train", "--data", "{data}", "--out", "{tmp}/run", "train.seq_len=64"],
            "longer than model.max_seq_len=32",
        ),
        (["train", "--data", "{data}", "--out", "{tmp}/run", "train.lr=fast"], "train.lr expects float"),
        (["generate", "{tmp}/nothing", "--prompt", "x"], "does not exist"),
        (["generate", "{run}", "--prompt", "x", "--max-new-tokens", "500"], "exceeds the model's context"),
        (["generate", "{run}", "--prompt", "x", "--top-p", "2"], "top_p must be in (0, 1]"),
        (["generate", "{run}", "--prompt", "x", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["generate", "{run}", "--prompt", "x", "--top-k", "-1"], "top_k must be >= 0"),
        (["generate", "{run}", "--prompt", "x", "--temperature", "-1"], "temperature must be >= 0"),
        (["generate", "{run}", "--prompt", "x", "--num-beams", "0"], "num_beams must be >= 1"),
        (["generate", "{run}", "--prompt", "x", "--max-new-tokens", "-1"], "max_new_tokens must be >= 0"),
        (
            ["generate", "{run}", "--prompt", "x " * 300, "--max-new-tokens", "1"],
            "exceeds the model's context of 64",
        ),
        (["generate", "{run}", "--prompt", "x", "--stream", "--min-p", "3"], "min_p must be in [0, 1]"),
        (["eval", "{run}", "--data", "{tmp}/missing.txt"], "does not exist"),
        (["demo", "--minutes", "0"], "--minutes must be positive"),
    ],
)
def test_user_mistakes_are_one_line_errors(args, message, tmp_path, data_dir, trained_run, capsys) -> None:
    filled = [a.format(tmp=tmp_path, data=data_dir, run=trained_run) for a in args]
    assert run_cli(*filled) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kimbho: error: ") and message in err[0], err
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def test_generate_flags(trained_run: Path, capsys, monkeypatch) -> None:
    """Every sampling flag is accepted and does what it says; an empty prompt starts a new document."""
    common = ["generate", trained_run, "--max-new-tokens", 12, "--temperature", 0]
    assert run_cli(*common, "--prompt", "The", "--num-beams", 3) == 0
    beam = capsys.readouterr().out
    assert run_cli(*common, "--prompt", "The", "--num-beams", 3, "--stream") == 0
    assert capsys.readouterr().out == beam and beam.startswith("The")
    args = ["--temperature", 0.9, "--top-k", 20, "--top-p", 0.9, "--min-p", 0.05, "--repetition-penalty", 1.2]
    assert run_cli(*common, "--prompt", "The", *args, "--presence-penalty", 0.5, "--seed", 3) == 0
    assert capsys.readouterr().out.startswith("The")
    assert run_cli(*common, "--prompt", "") == 0  # from the end-of-text token
    assert len(capsys.readouterr().out) > 1
    assert run_cli(*common, "--prompt", "The") == 0
    free = capsys.readouterr().out.rstrip("\n")
    stop = free[8:10]
    assert run_cli(*common, "--prompt", "The", "--stop", stop) == 0
    assert capsys.readouterr().out.rstrip("\n") == free[: free.index(stop, 3)]
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("The first\n" + "x " * 300 + "\nThe third\n"))
    assert run_cli("generate", trained_run, "--max-new-tokens", 4, "--temperature", 0) == 1
    out, err = capsys.readouterr()
    assert "The first" in out and "The third" in out  # the session went on after the bad prompt
    assert [line.startswith("kimbho: error: ") for line in err.strip().splitlines()] == [True, True]
    assert "exceeds the model's context" in err


@pytest.mark.slow
def test_compiled_generation_gives_the_same_text(trained_run: Path, capsys, monkeypatch) -> None:
    """`--compile` (one graph for the whole context, reused by every prompt of a session)
    prints what the eager engine prints."""
    import io

    prompts = "The first\nThe second one\n"
    common = ["generate", trained_run, "--max-new-tokens", 12, "--temperature", 0]
    monkeypatch.setattr("sys.stdin", io.StringIO(prompts))
    assert run_cli(*common) == 0
    eager = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO(prompts))
    assert run_cli(*common, "--compile") == 0
    assert capsys.readouterr().out == eager and eager.count("The ") == 2


def test_console_script_and_module_agree() -> None:
    r = run_subprocess("--version")
    assert r.returncode == 0 and r.stdout.startswith("kimbho ")


def test_help_does_not_import_torch() -> None:
    """Every command's parser is built without PyTorch (over a second to import), so `kimbho
    --help` and `kimbho COMMAND --help` answer at once."""
    import subprocess
    import sys

    code = "import sys; from kimbho.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
