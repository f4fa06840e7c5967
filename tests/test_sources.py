"""Named sources: prepare records them, mixtures sample them (resume and two processes exact),
validation reports each, tokenizers balance and report them, continued pretraining warns."""

from __future__ import annotations

import json
import logging
import random
import signal
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import kimbho
from kimbho.config import DataConfig, RunConfig
from kimbho.data.shards import TokenStream
from kimbho.data.sources import CorpusSource, mixture, source_spans, tokenizer_report
from kimbho.errors import KimbhoError
from kimbho.training.metrics import read_metrics
from tests.conftest import run_cli, tiny_run_config, without_wall_clock

DRIVER = Path(__file__).with_name("crash_driver.py")
# A fixed letter substitution: the second "language" has English's statistics and no English words.
_CIPHER = str.maketrans(
    string.ascii_lowercase + string.ascii_uppercase,
    "qwertyuiopasdfghjklzxcvbnm" + "qwertyuiopasdfghjklzxcvbnm".upper(),
)


def write_bilingual(root: Path, ratio: int = 10) -> tuple[Path, Path]:
    """English (CPython's doc topics) and a minority 'language' (other topics, letter-substituted),
    `ratio`:1 in size, each a .jsonl of ~2 KB documents (paragraphs of the topics)."""
    from pydoc_data.topics import topics

    documents, pending = [], ""
    for name in sorted(topics):
        for paragraph in topics[name].split("\n\n"):
            pending += paragraph + "\n\n"
            if len(pending) > 2000:
                documents.append(pending)
                pending = ""
    random.Random(0).shuffle(documents)
    english, other = root / "en.jsonl", root / "xx.jsonl"
    total = sum(map(len, documents))
    with english.open("w") as en, other.open("w") as xx:
        size = 0
        for text in documents:
            if size < total / (ratio + 1):
                xx.write(json.dumps({"text": text.translate(_CIPHER)}) + "\n")
                size += len(text)
            else:
                en.write(json.dumps({"text": text}) + "\n")
    return english, other


@pytest.fixture(scope="module")
def bilingual(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two languages prepared as named sources `en` and `xx` with a balanced 512-token tokenizer."""
    root = tmp_path_factory.mktemp("bilingual")
    english, other = write_bilingual(root)
    out = root / "data"
    kimbho.prepare([f"en={english}", f"xx={other}"], out, vocab_size=512, val_fraction=0.2)
    return out


def test_prepare_records_each_source_and_gives_each_its_share_of_validation(bilingual: Path) -> None:
    meta = json.loads((bilingual / "meta.json").read_text())
    assert list(meta["sources"]) == ["en", "xx"]
    for split in ("train", "val"):
        spans = source_spans(meta, split)
        assert spans is not None
        info = meta["splits"][split]
        for key in ("tokens", "bytes", "documents"):
            assert sum(getattr(s, key) for s in spans.values()) == info[key]
        # Contiguous runs, one after the other: the sampler and evaluation read them as spans.
        assert spans["en"].start == 0 and spans["xx"].start == spans["en"].tokens
    for name, info in meta["sources"].items():
        share = info["val"]["bytes"] / (info["val"]["bytes"] + info["train"]["bytes"])
        assert 0.17 < share < 0.23, (name, share)  # about val_fraction=0.2 of each, whole documents
        assert info["inputs"] and info["train"]["documents"] > 0 and info["val"]["documents"] > 0
    ratio = meta["sources"]["en"]["train"]["bytes"] / meta["sources"]["xx"]["train"]["bytes"]
    assert 7 < ratio < 14


def test_sources_are_named_after_their_path_and_merge_by_name(tmp_path: Path) -> None:
    (tmp_path / "legal").mkdir()
    (tmp_path / "legal" / "a.txt").write_text("the party of the first part\n" * 50)
    (tmp_path / "notes.txt").write_text("remember the milk\n" * 50)
    (tmp_path / "more.txt").write_text("and the eggs\n" * 50)
    meta = kimbho.prepare(
        [str(tmp_path / "legal"), str(tmp_path / "notes.txt"), f"legal={tmp_path / 'more.txt'}"],
        tmp_path / "data",
        vocab_size=300,
        val_fraction=0,
    )
    assert list(meta["sources"]) == ["legal", "notes"]
    assert [Path(p).name for p in meta["sources"]["legal"]["inputs"]] == ["a.txt", "more.txt"]
    assert meta["sources"]["legal"]["train"]["documents"] == 2


def test_bad_source_specs_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.txt").write_text("text\n")
    out = tmp_path / "data"
    assert (
        run_cli("prepare", "--input", f"web={tmp_path / 'missing'}", "--vocab-size", 300, "--out", out) == 1
    )
    assert "input path" in capsys.readouterr().err and not out.exists()
    twice = [f"a={tmp_path / 'a.txt'}", f"b={tmp_path / 'a.txt'}"]
    assert run_cli("prepare", "--input", *twice, "--vocab-size", 300, "--out", out) == 1
    assert "is in two sources, 'a' and 'b'" in capsys.readouterr().err and not out.exists()


def test_mixture_weights_and_temperature() -> None:
    spans = {"en": _span(0, 100_000), "xx": _span(100_000, 10_000)}
    natural = mixture(spans, {}, 1.0, 64)
    assert natural == pytest.approx({"en": 10 / 11, "xx": 1 / 11})
    flat = mixture(spans, {}, 0.5, 64)  # sqrt of the token shares, normalised
    assert flat["xx"] == pytest.approx(1 / (1 + 10**0.5))
    assert mixture(spans, {"en": 1, "xx": 1}, 1.0, 64) == {"en": 0.5, "xx": 0.5}
    assert mixture(spans, {"en": 3, "xx": 0}, 0.3, 64) == {"en": 1.0, "xx": 0.0}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            ["data.mix=en:0.7,web:0.3"],
            "data.mix names 'web', which the data does not have; its sources are en, xx",
        ),
        (["data.mix=en:1"], "data.mix gives no weight to 'xx'"),
        (["data.mix=en=0.7,xx:0.3"], "is not NAME:WEIGHT"),
        (["data.mix=en:-1,xx:1"], "is not NAME:WEIGHT"),
        (["data.mix=en:0,xx:0"], "gives every source weight 0"),
        (["data.mix_temperature=0"], "data.mix_temperature must be a positive number"),
        (["data.mix=en:1,xx:1", "train.seq_len=64", "--max-steps", "1"], None),
    ],
)
def test_bad_mixtures_are_one_clear_line(
    bilingual: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    settings: list[str],
    message: str | None,
) -> None:
    out = tmp_path / "run"
    code = run_cli("-q", "train", "--preset", "tiny", "--data", bilingual, "--out", out, *settings)
    if message is None:
        assert code == 0
        return
    assert code == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_source_too_small_for_a_sequence_must_be_weighted_zero(tmp_path: Path) -> None:
    (tmp_path / "big.txt").write_text("many words of text here\n" * 2000)
    (tmp_path / "tiny.txt").write_text("hi\n")
    kimbho.prepare(
        [str(tmp_path / "big.txt"), str(tmp_path / "tiny.txt")],
        tmp_path / "d",
        vocab_size=300,
        val_fraction=0,
    )
    run = tiny_run_config(seq_len=32)
    run.data = DataConfig(mix="big:1,tiny:1")
    with pytest.raises(
        KimbhoError, match="source 'tiny' has 3 training tokens, fewer than one sequence of 33"
    ):
        kimbho.Trainer(run, tmp_path / "d", tmp_path / "run", progress_bar=False)
    run.data = DataConfig(mix="big:1,tiny:0")
    kimbho.Trainer(run, tmp_path / "d", tmp_path / "run", progress_bar=False)


def test_the_sampled_share_of_each_source_is_the_requested_mixture(bilingual: Path, tmp_path: Path) -> None:
    run = tiny_run_config(seq_len=64, batch_size=16, compile="false")
    run.data = DataConfig(mix="en:0.6,xx:0.4")
    trainer = kimbho.Trainer(run, bilingual, tmp_path / "run", progress_bar=False)
    spans = source_spans(json.loads((bilingual / "meta.json").read_text()), "train")
    assert spans is not None
    starts = np.concatenate([trainer.train_data.offsets(step) for step in range(1000)])  # type: ignore[union-attr]
    in_xx = (starts >= spans["xx"].start) & (starts + 64 < spans["xx"].start + spans["xx"].tokens)
    in_en = starts + 64 < spans["en"].tokens
    assert in_xx.sum() + in_en.sum() == len(starts)  # every window inside one source
    assert abs(in_xx.mean() - 0.4) < 0.02
    # A pure function of (seed, step): the same batches from a second trainer; rows split between
    # processes are rows of the same batch.
    again = kimbho.Trainer(run, bilingual, tmp_path / "run2", progress_bar=False)
    assert np.array_equal(again.train_data.offsets(17), trainer.train_data.offsets(17))  # type: ignore[union-attr]
    whole = trainer.train_data.batch(17)
    halves = [trainer.train_data.batch(17, slice(r * 8, (r + 1) * 8)) for r in range(2)]
    assert torch.equal(torch.cat([h.inputs for h in halves]), whole.inputs)


def test_validation_reports_each_source(
    bilingual: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["--preset", "tiny", "--data", bilingual, "--out", out, "--max-steps", "30", "train.seq_len=64"]
    assert (
        run_cli("train", *args, "train.eval_every=30", "train.eval_tokens=4096", "data.mix_temperature=0.5")
        == 0
    )
    assert "(en " in capsys.readouterr().out  # the progress line shows each source's bpb
    record = read_metrics(out, "eval")[-1]
    by_source = record["by_source"]
    assert set(by_source) == {"en", "xx"}
    assert sum(s["tokens"] for s in by_source.values()) == 4096  # the budget split between sources
    assert by_source["en"]["tokens"] == by_source["xx"]["tokens"] == 2048
    # The overall loss is the token-weighted mean of the sources'.
    mean = sum(s["val_loss"] * s["tokens"] for s in by_source.values()) / 4096
    assert record["val_loss"] == pytest.approx(mean, rel=1e-6)
    # TensorBoard has a curve per source.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"eval/val_bpb/en", "eval/val_bpb/xx"} <= set(events.Tags()["scalars"])
    # `kimbho eval --data DATA_DIR` prints the same object over the whole validation split.
    assert run_cli("eval", out, "--data", bilingual) == 0
    result = json.loads(capsys.readouterr().out)
    meta = json.loads((bilingual / "meta.json").read_text())
    assert set(result["by_source"]) == {"en", "xx"}
    for name, score in result["by_source"].items():
        assert score["tokens"] == meta["sources"][name]["val"]["tokens"] - 1
        assert set(score) == {"val_loss", "val_bpb", "tokens"}
    assert result["tokens"] == sum(s["tokens"] for s in result["by_source"].values())


@pytest.mark.slow
@pytest.mark.precision
def test_a_killed_mixture_run_resumes_bit_identically(bilingual: Path, tmp_path: Path) -> None:
    run = tiny_run_config(
        batch_size=4,
        seq_len=32,
        max_steps=8,
        log_every=2,
        eval_every=4,
        eval_tokens=512,
        save_every=4,
        compile="false",
    )
    run.data = DataConfig(mix="en:0.5,xx:0.5", mix_temperature=0.7)
    config = tmp_path / "run.json"
    config.write_text(json.dumps(run.to_dict()))
    assert RunConfig.from_dict(json.loads(config.read_text())).data == run.data

    def drive(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, str(DRIVER), str(config), str(bilingual), str(out), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    assert drive(tmp_path / "reference").returncode == 0
    killed = drive(tmp_path / "run", "--at", "before:kimbho.training.trainer.Trainer.train_step:6")
    assert killed.returncode == -signal.SIGKILL
    resumed = drive(tmp_path / "run", "--resume")
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr
    want, got = (without_wall_clock(read_metrics(tmp_path / d)) for d in ("reference", "run"))
    assert got == want and any("by_source" in r for r in got)
    final = "checkpoints/step-00000008/model.safetensors"
    a, b = load_file(tmp_path / "reference" / final), load_file(tmp_path / "run" / final)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.precision
def test_two_processes_read_the_same_mixed_batches_as_one(bilingual: Path, tmp_path: Path) -> None:
    from tests.test_distributed import TOLERANCE, kimbho_train, losses

    args = [
        "--preset", "tiny", "--max-steps", "4", "train.batch_size=8", "train.seq_len=32", "train.log_every=1",
        "train.eval_every=4", "train.eval_tokens=512", "train.seed=0", "train.optimizer=adamw",
        "data.mix=en:0.3,xx:0.7",
    ]  # fmt: skip
    assert run_cli("-q", "train", "--data", bilingual, "--out", tmp_path / "one", *args) == 0
    r = kimbho_train("--nproc", 2, "--data", bilingual, "--out", tmp_path / "two", *args)
    assert r.returncode == 0, r.stderr
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == 4 and max(abs(a - b) for a, b in zip(one, two, strict=True)) <= TOLERANCE
    evals = [read_metrics(tmp_path / d, "eval")[-1]["by_source"]["xx"]["val_loss"] for d in ("one", "two")]
    assert evals[0] == pytest.approx(evals[1], abs=TOLERANCE)


def test_a_balanced_tokenizer_gives_the_minority_language_more_bytes_per_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    english, other = write_bilingual(tmp_path)
    inputs = [f"en={english}", f"xx={other}"]
    for flag, out in (([], "balanced.json"), (["--no-balance"], "plain.json")):
        assert (
            run_cli(
                "tokenizer", "train", "--input", *inputs, "--vocab-size", 1024, "--out", tmp_path / out, *flag
            )
            == 0
        )
    capsys.readouterr()
    report = {}
    for out in ("balanced.json", "plain.json"):
        assert run_cli("tokenizer", "report", "--tokenizer", tmp_path / out, "--input", *inputs) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [r["source"] for r in rows] == ["en", "xx"]
        report[out] = {r["source"]: r for r in rows}
    balanced, plain = report["balanced.json"], report["plain.json"]
    assert balanced["xx"]["bytes_per_token"] > 1.15 * plain["xx"]["bytes_per_token"]
    assert balanced["xx"]["tokens_per_word"] < plain["xx"]["tokens_per_word"]
    assert balanced["en"]["bytes"] == plain["en"]["bytes"] == len(english_text(english).encode())


def english_text(path: Path) -> str:
    return "".join(json.loads(line)["text"] for line in path.read_text().splitlines())


def test_a_tokenizer_that_cuts_a_source_into_bytes_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    english, _ = write_bilingual(tmp_path)
    tokenizer = kimbho.Tokenizer.train([english_text(english)], 512)
    (tmp_path / "greek.txt").write_text("Καλημέρα σε όλους, τι κάνετε σήμερα; " * 300)
    rows = tokenizer_report(tokenizer, CorpusSource([f"en={english}", str(tmp_path / "greek.txt")]))
    fit = {r["source"]: r["bytes_per_token"] for r in rows}
    assert fit["greek"] < 1.2 and fit["greek"] < 0.5 * fit["en"]
    tokenizer.save(tmp_path / "tok.json")
    with caplog.at_level(logging.WARNING, logger="kimbho"):
        kimbho.prepare(
            [f"en={english}", str(tmp_path / "greek.txt")], tmp_path / "d", tokenizer=tmp_path / "tok.json"
        )
    assert "the tokenizer fits source 'greek' poorly" in caplog.text


def test_data_prepared_before_sources_were_named_still_trains_but_cannot_mix(
    bilingual: Path, tmp_path: Path
) -> None:
    import shutil

    old = tmp_path / "old"
    shutil.copytree(bilingual, old)
    meta = json.loads((old / "meta.json").read_text())
    meta["sources"] = [p for s in meta["sources"].values() for p in s["inputs"]]  # the earlier layout
    (old / "meta.json").write_text(json.dumps(meta))
    run = tiny_run_config(seq_len=32, max_steps=2, eval_every=2)
    trainer = kimbho.Trainer(run, old, tmp_path / "run", progress_bar=False)
    assert "by_source" not in (trainer.evaluate() or {})
    run.data = DataConfig(mix="en:1,xx:1")
    with pytest.raises(KimbhoError, match="prepared before sources were named"):
        kimbho.Trainer(run, old, tmp_path / "run2", progress_bar=False)
    assert len(TokenStream(old)) == meta["splits"]["train"]["tokens"]


def _span(start: int, tokens: int):  # type: ignore[no-untyped-def]
    from kimbho.data.sources import SourceSpan

    return SourceSpan(start, tokens, tokens * 4, 1)
