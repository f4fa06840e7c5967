from pathlib import Path

import pytest

from kimbho.config import PRESETS, KimbhoConfig, TrainConfig, parse_override, resolve_run_config
from kimbho.errors import KimbhoError


def test_defaults_are_the_seed_table() -> None:
    cfg = KimbhoConfig()
    assert (cfg.vocab_size, cfg.emb_dim, cfg.num_heads, cfg.num_blocks, cfg.pad_idx) == (1000, 64, 8, 2, 0)
    assert (cfg.group_size, cfg.rope_base, cfg.num_kv_heads) == (4, 10000.0, 2)


@pytest.mark.parametrize(
    "name, kv_heads, hidden",
    [("seed", 2, 176), ("small", 2, 1024), ("base", 4, 2048), ("1b", 8, 8192), ("tiny", 2, 128)],
)
def test_presets_match_the_interface_table(name: str, kv_heads: int, hidden: int) -> None:
    cfg = KimbhoConfig.from_preset(name)
    assert cfg.num_kv_heads == kv_heads
    assert cfg.mlp_hidden == hidden


def test_small_preset_shape() -> None:
    cfg = KimbhoConfig.from_preset("small")
    assert (cfg.vocab_size, cfg.emb_dim, cfg.num_heads, cfg.group_size, cfg.num_blocks, cfg.max_seq_len) == (
        8192,
        384,
        6,
        3,
        6,
        256,
    )


def test_unknown_preset_lists_the_valid_names() -> None:
    with pytest.raises(KimbhoError, match="seed, tiny, small, base, 1b"):
        KimbhoConfig.from_preset("huge")


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(num_heads=6, group_size=4), "not divisible by model.group_size"),
        (dict(emb_dim=60, num_heads=8, group_size=4), "not divisible by model.num_heads"),
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
        (dict(pad_idx=1000), "outside the vocabulary"),
        (dict(dropout=1.5), "dropout"),
    ],
)
def test_invalid_model_configs_fail_at_construction(fields: dict, message: str) -> None:
    with pytest.raises(KimbhoError, match=message):
        KimbhoConfig(**fields)


def test_explicit_mlp_hidden_is_kept() -> None:
    assert KimbhoConfig(mlp_hidden=100).mlp_hidden == 100


def test_overrides_are_typed_by_field() -> None:
    assert parse_override("train.lr=1e-3") == ("train", "lr", 0.001)
    assert parse_override("train.max_steps=1e3") == ("train", "max_steps", 1000)
    assert parse_override("model.tie_embeddings=true") == ("model", "tie_embeddings", True)
    assert parse_override("train.compile=false") == ("train", "compile", "false")
    assert parse_override("train.seq_len=null") == ("train", "seq_len", None)


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.lr", "expected key=value"),
        ("train.nope=1", "unknown config key"),
        ("foo.bar=1", "must start with"),
        ("train.max_steps=1.5", "expects int"),
        ("model.tie_embeddings=maybe", "expects bool"),
    ],
)
def test_bad_overrides_name_the_problem(item: str, message: str) -> None:
    with pytest.raises(KimbhoError, match=message):
        parse_override(item)


def test_priority_preset_then_file_then_overrides(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        "model:\n  emb_dim: 128\n  num_heads: 4\n  group_size: 2\ntrain:\n  lr: 3e-4\n  batch_size: 8\n"
    )
    run, explicit = resolve_run_config(config, "small", ["train.batch_size=4"])
    assert run.model.emb_dim == 128 and run.model.num_blocks == 6  # file over preset, preset kept elsewhere
    assert run.train.lr == 3e-4 and run.train.batch_size == 4
    assert explicit == {
        "model.emb_dim",
        "model.num_heads",
        "model.group_size",
        "train.lr",
        "train.batch_size",
    }


def test_bad_config_files(tmp_path: Path) -> None:
    with pytest.raises(KimbhoError, match="does not exist"):
        resolve_run_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(KimbhoError, match="not valid YAML"):
        resolve_run_config(bad)
    bad.write_text("optimizer:\n  lr: 1\n")
    with pytest.raises(KimbhoError, match="top-level keys"):
        resolve_run_config(bad)


def test_train_config_validation() -> None:
    with pytest.raises(KimbhoError, match="train.precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(KimbhoError, match="train.batch_size must be positive"):
        TrainConfig(batch_size=0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("decay_fraction", 1.5, r"train.decay_fraction must be in \[0, 1\], got 1.5"),
        ("decay_fraction", -0.1, r"train.decay_fraction must be in \[0, 1\]"),
        ("min_lr_ratio", 2.0, r"train.min_lr_ratio must be in \[0, 1\]"),
        ("min_lr_ratio", float("nan"), r"train.min_lr_ratio must be in \[0, 1\], got nan"),
        ("grad_clip", -1.0, "train.grad_clip must be a non-negative number"),
        ("eval_tokens", 0, "train.eval_tokens must be at least 1"),
        ("weight_decay", -0.1, "train.weight_decay must be a non-negative number"),
        ("beta1", 1.0, r"train.beta1 must be in \[0, 1\)"),
        ("beta2", -0.5, r"train.beta2 must be in \[0, 1\)"),
        ("lr", float("nan"), "train.lr must be a positive number"),
    ],
)
def test_out_of_range_train_fields_are_one_clear_line(field: str, value: float, message: str) -> None:
    with pytest.raises(KimbhoError, match=message):
        TrainConfig(**{field: value})
    with pytest.raises(KimbhoError, match=message):  # the same from the command line
        resolve_run_config(overrides=[f"train.{field}={value}"])


def test_every_preset_builds_a_valid_config() -> None:
    for name in PRESETS:
        KimbhoConfig.from_preset(name)
