import math
from pathlib import Path

import pytest

import kimbho
from kimbho.demo import unigram_bpb
from kimbho.errors import KimbhoError


def test_eval_on_data_directory(trained_run: Path, data_dir: Path) -> None:
    model, tok = kimbho.load(trained_run)
    result = kimbho.evaluate(model, tok, data_dir)
    assert set(result) == {"loss", "perplexity", "bits_per_byte", "tokens"}
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    val = kimbho.TokenStream(data_dir, "val")
    assert result["tokens"] == len(val) - 1
    expected_bpb = result["loss"] * result["tokens"] / math.log(2) / ((len(val) - 1) * val.bytes_per_token)
    assert result["bits_per_byte"] == pytest.approx(expected_bpb)
    # A trained model beats the unigram baseline on held-out text.
    assert result["bits_per_byte"] < unigram_bpb(data_dir)


def test_eval_on_text_file_counts_bytes(trained_run: Path, tmp_path: Path) -> None:
    model, tok = kimbho.load(trained_run)
    text = "The assert statement is a convenient way to insert debugging assertions into a program. " * 5
    (tmp_path / "held_out.txt").write_text(text)
    result = kimbho.evaluate(model, tok, tmp_path / "held_out.txt")
    ids = tok.encode(text)
    assert result["tokens"] == len(ids) - 1
    predicted_bytes = len(tok.decode(ids[1:]).encode())
    assert result["bits_per_byte"] == pytest.approx(
        result["loss"] * result["tokens"] / math.log(2) / predicted_bytes
    )
    limited = kimbho.evaluate(model, tok, tmp_path / "held_out.txt", max_tokens=10)
    assert limited["tokens"] == 10


def test_eval_bad_inputs(trained_run: Path, tmp_path: Path) -> None:
    model, tok = kimbho.load(trained_run)
    with pytest.raises(KimbhoError, match="does not exist"):
        kimbho.evaluate(model, tok, tmp_path / "missing.txt")
    (tmp_path / "tiny.txt").write_text("a")
    with pytest.raises(KimbhoError, match="too little text"):
        kimbho.evaluate(model, tok, tmp_path / "tiny.txt")
    other = tmp_path / "other"
    kimbho.prepare(None, other, vocab_size=300)
    with pytest.raises(KimbhoError, match="different tokenizer"):
        kimbho.evaluate(model, tok, other)
