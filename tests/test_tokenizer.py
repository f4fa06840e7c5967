import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kimbho import Tokenizer
from kimbho.errors import KimbhoError

TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  \n\n\ttabs\r\nwindows newlines",
    "naïve café — “quotes” and ‘apostrophes’",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 👩‍👩‍👧‍👦 🇺🇳 and combining e\u0301",
    "zero width\u200bjoiner and \x00 nul and \x7f del",
    "<|endoftext|> and <|pad|> written in text are just text",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_any_unicode_round_trips(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_token_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.pad_id == 0 and tokenizer.eot_id == 1
    assert tokenizer.token_to_id("<|user|>") is not None


def test_special_strings_in_text_are_not_special(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("<|endoftext|>")
    assert tokenizer.eot_id not in ids and len(ids) > 1


def test_batch_encoding_matches_single(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode_batch(TEXTS) == [tokenizer.encode(t) for t in TEXTS]


def test_save_and_load_keep_hash(tokenizer: Tokenizer, tmp_path) -> None:
    tokenizer.save(tmp_path / "tok.json")
    again = Tokenizer.from_file(tmp_path / "tok.json")
    assert again.sha256 == tokenizer.sha256 and again.vocab_size == tokenizer.vocab_size == 512


def test_training_errors(tmp_path) -> None:
    with pytest.raises(KimbhoError, match="empty corpus"):
        Tokenizer.train(iter([]), 300)
    with pytest.raises(KimbhoError, match="too small"):
        Tokenizer.train(["some text"], 100)
    with pytest.raises(KimbhoError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(KimbhoError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path / "bad.json")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(min_value=0, max_value=511), max_size=20))
def test_text_stream_pieces_join_to_the_decoded_text(tokenizer: Tokenizer, ids: list[int]) -> None:
    """Any ids (special tokens, characters split across tokens, invalid byte sequences): the
    pieces are whole characters and join to exactly `decode`."""
    stream = tokenizer.text_stream()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tokenizer.decode(ids)
    for piece in pieces:
        piece.encode("utf-8")  # strict


def test_text_stream_holds_back_a_split_character(tokenizer: Tokenizer) -> None:
    euro = "€".encode()  # 3 bytes: the byte tokens of a 512-token vocabulary split it
    byte_ids = [tokenizer.token_bytes.index(bytes([b])) for b in euro]  # type: ignore[union-attr]
    stream = tokenizer.text_stream()
    assert [stream.push(i) for i in byte_ids] == ["", "", "€"]


def test_text_stream_without_byte_level_decoding() -> None:
    """A tokenizer that is not byte-level (a word-level one here) streams by re-decoding."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    inner = HFTokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    inner.decoder = decoders.WordPiece()
    tok = Tokenizer(inner)
    assert tok.token_bytes is None
    stream = tok.text_stream()
    text = "".join([stream.push(0), stream.push(1), stream.push(0), stream.flush()])
    assert text == tok.decode([0, 1, 0])
