"""Typed configuration: the model (`KimbhoConfig`), training (`TrainConfig`) and a run (both).

One YAML file and `section.field=value` overrides address the same keys, e.g.
`model.emb_dim=256 train.lr=3e-4`. The resolved `RunConfig` is written next to every run.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import KimbhoError


def _doc(text: str) -> dict[str, str]:
    """Field metadata: the help text shown by `kimbho train --help`."""
    return {"help": text}


# The longest context a config may declare: Llama 3.1's 131,072 fits; its rotary tables take at
# most 256 MiB at head dimension 128, where 10**12 positions would take terabytes.
MAX_CONTEXT = 2**18


@dataclass
class KimbhoConfig:
    """Shape of a Kimbho model. Field names and meanings follow the seed README and map one to
    one onto Hugging Face's `LlamaConfig` (see `kimbho.interop.hf`)."""

    vocab_size: int = field(default=1000, metadata=_doc("tokens in the vocabulary"))
    emb_dim: int = field(default=64, metadata=_doc("width of the residual stream (hidden_size)"))
    num_heads: int = field(default=8, metadata=_doc("query heads per attention layer"))
    num_blocks: int = field(default=2, metadata=_doc("decoder blocks"))
    group_size: int = field(
        default=4,
        metadata=_doc("query heads sharing one key/value head: num_kv_heads = num_heads // group_size"),
    )
    rope_base: float = field(default=10000.0, metadata=_doc("rotary embedding base (rope_theta)"))
    pad_idx: int = field(default=0, metadata=_doc("padding token id (its embedding gets no gradient)"))
    max_seq_len: int = field(default=32, metadata=_doc("longest sequence the model accepts (context)"))
    mlp_hidden: int | None = field(
        default=None,
        metadata=_doc("SwiGLU hidden width; derived as ~8/3 * emb_dim (multiple of 16) when unset"),
    )
    norm_eps: float = field(default=1e-5, metadata=_doc("RMSNorm epsilon (rms_norm_eps)"))
    tie_embeddings: bool = field(
        default=False, metadata=_doc("share the token embedding with the output head")
    )
    dropout: float = field(default=0.0, metadata=_doc("dropout on attention and MLP outputs while training"))
    init_std: float = field(default=0.02, metadata=_doc("standard deviation of the initial weights"))

    def __post_init__(self) -> None:
        if self.mlp_hidden is None:
            self.mlp_hidden = _round_up(int(8 * self.emb_dim / 3), 16)
        self.rope_base = float(self.rope_base)
        positive = (
            "vocab_size",
            "emb_dim",
            "num_heads",
            "num_blocks",
            "group_size",
            "max_seq_len",
            "mlp_hidden",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise KimbhoError(f"model.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.group_size != 0:
            raise KimbhoError(
                f"model.num_heads={self.num_heads} is not divisible by model.group_size={self.group_size}: "
                f"each key/value head is shared by group_size query heads"
            )
        if self.emb_dim % self.num_heads != 0:
            raise KimbhoError(
                f"model.emb_dim={self.emb_dim} is not divisible by model.num_heads={self.num_heads}"
            )
        if self.head_dim % 2 != 0:
            raise KimbhoError(
                f"head dimension emb_dim/num_heads={self.head_dim} must be even for rotary embeddings"
            )
        if not 0 <= self.pad_idx < self.vocab_size:
            raise KimbhoError(
                f"model.pad_idx={self.pad_idx} is outside the vocabulary of {self.vocab_size} tokens"
            )
        if self.max_seq_len > MAX_CONTEXT:
            # Its rotary tables (and any cache of that length) would be allocated in full.
            raise KimbhoError(
                f"model.max_seq_len={self.max_seq_len:,} is longer than the {MAX_CONTEXT:,} tokens Kimbho supports"
            )
        if self.rope_base <= 1.0:
            raise KimbhoError(f"model.rope_base must be greater than 1, got {self.rope_base}")
        if not 0.0 <= self.dropout < 1.0:
            raise KimbhoError(f"model.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads // self.group_size

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> KimbhoConfig:
        """The named preset (see `PRESETS`), with any field overridden."""
        if name not in PRESETS:
            raise KimbhoError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> KimbhoConfig:
        return cls(**_checked_fields(cls, values, "model"))


PRESETS: dict[str, dict[str, Any]] = {
    # The seed README's table of defaults.
    "seed": dict(vocab_size=1000, emb_dim=64, num_heads=8, group_size=4, num_blocks=2, max_seq_len=32),
    # For tests: grouped-query attention (2 query heads per K/V head) in a model that builds in milliseconds.
    "tiny": dict(
        vocab_size=512, emb_dim=64, num_heads=4, group_size=2, num_blocks=2, mlp_hidden=128, max_seq_len=64
    ),
    "small": dict(
        vocab_size=8192,
        emb_dim=384,
        num_heads=6,
        group_size=3,
        num_blocks=6,
        mlp_hidden=1024,
        max_seq_len=256,
    ),
    "base": dict(
        vocab_size=32000,
        emb_dim=768,
        num_heads=12,
        group_size=3,
        num_blocks=12,
        mlp_hidden=2048,
        max_seq_len=1024,
    ),
    "1b": dict(
        vocab_size=32000,
        emb_dim=2048,
        num_heads=32,
        group_size=4,
        num_blocks=16,
        mlp_hidden=8192,
        max_seq_len=2048,
    ),
}


@dataclass
class TrainConfig:
    """How to train. `batch_size` is global: sequences per optimizer step across all processes and
    gradient-accumulation micro-steps."""

    batch_size: int = field(
        default=16, metadata=_doc("sequences per optimizer step (all processes, all micro-steps)")
    )
    micro_batch_size: int | None = field(
        default=None,
        metadata=_doc("sequences per forward pass on one process; unset: the whole per-process batch"),
    )
    seq_len: int | None = field(default=None, metadata=_doc("tokens per sequence; unset: model.max_seq_len"))
    lr: float = field(default=3e-3, metadata=_doc("peak learning rate (Muon and AdamW alike)"))
    min_lr_ratio: float = field(default=0.1, metadata=_doc("final learning rate as a fraction of the peak"))
    warmup_steps: int = field(default=10, metadata=_doc("linear warm-up steps"))
    max_steps: int = field(default=1000, metadata=_doc("length of the run; the schedule ends here"))
    schedule: str = field(default="wsd", metadata=_doc("wsd (warm-up, stable, decay) | cosine | constant"))
    decay_fraction: float = field(default=0.4, metadata=_doc("wsd: fraction of the run spent decaying"))
    weight_decay: float = field(
        default=0.5, metadata=_doc("decoupled weight decay on matrices (Muon's and AdamW's), none on gains")
    )
    beta1: float = field(default=0.9, metadata=_doc("AdamW beta1"))
    beta2: float = field(default=0.95, metadata=_doc("AdamW beta2"))
    grad_clip: float = field(default=1.0, metadata=_doc("clip the global gradient norm to this (0: off)"))
    log_every: int = field(
        default=10, metadata=_doc("steps between train records; tokens_per_sec covers that interval")
    )
    eval_every: int = field(
        default=200, metadata=_doc("steps between validation passes (0: only at the end)")
    )
    eval_tokens: int = field(
        default=65536, metadata=_doc("validation tokens per pass (a fixed set of windows)")
    )
    sample_every: int = field(
        default=0, metadata=_doc("steps between sample texts (0: with each validation)")
    )
    sample_tokens: int = field(default=48, metadata=_doc("tokens per sample text"))
    save_every: int = field(
        default=500, metadata=_doc("steps between checkpoints (a final one is always written)")
    )
    keep_last: int = field(default=3, metadata=_doc("how many checkpoints to keep"))
    keep_best: bool = field(
        default=True,
        metadata=_doc("also keep the weights with the lowest validation loss in checkpoints/best/"),
    )
    max_skipped_steps: int = field(
        default=10,
        metadata=_doc(
            "stop the run after this many optimizer steps in a row were skipped (NaN/Inf or spike)"
        ),
    )
    skip_spikes: float = field(
        default=0.0,
        metadata=_doc(
            "skip a step whose loss or gradient norm exceeds this many times its mean over the last "
            "50 steps (0: off; NaN/Inf steps are always skipped)"
        ),
    )
    verify_data: str = field(
        default="auto",
        metadata=_doc(
            "check the shards before the first step: token ids within the vocabulary, and the SHA-256 "
            "of each split against meta.json | true | false (auto: the hash only for splits under 2 GB)"
        ),
    )
    seed: int = field(default=1337, metadata=_doc("everything random derives from it"))
    precision: str = field(default="auto", metadata=_doc("auto | fp32 | bf16"))
    compile: str = field(default="auto", metadata=_doc("auto | true | false"))
    optimizer: str = field(
        default="muon", metadata=_doc("muon (Muon for hidden matrices, AdamW for the rest) | adamw")
    )
    activation_checkpointing: bool = field(
        default=False,
        metadata=_doc("recompute each block's activations in backward: less memory, ~1/3 more compute"),
    )
    device: str = field(
        default="auto", metadata=_doc("auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps")
    )
    parallel: str = field(
        default="ddp",
        metadata=_doc(
            "how processes started by torchrun (or --nproc) share the work: ddp (a replica per "
            "process, gradients averaged) | fsdp (FSDP2: parameters, gradients and optimizer state "
            "sharded); one process trains unsharded"
        ),
    )
    dist_timeout: float = field(
        default=1800.0,
        metadata=_doc(
            "seconds a process waits for the others at a collective (gradient sync, checkpoint "
            "gathering) before the run fails"
        ),
    )

    def __post_init__(self) -> None:
        self.compile = str(self.compile).lower()  # YAML reads `true` as a bool
        self.verify_data = str(self.verify_data).lower()
        for name in ("batch_size", "max_steps", "log_every"):
            if getattr(self, name) <= 0:
                raise KimbhoError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "sample_every", "save_every", "sample_tokens"):
            if getattr(self, name) < 0:
                raise KimbhoError(f"train.{name} must not be negative, got {getattr(self, name)}")
        if self.keep_last < 1:
            raise KimbhoError(f"train.keep_last must be at least 1, got {self.keep_last}")
        if self.max_skipped_steps < 1:
            raise KimbhoError(f"train.max_skipped_steps must be at least 1, got {self.max_skipped_steps}")
        if self.skip_spikes != 0 and self.skip_spikes <= 1:
            raise KimbhoError(
                f"train.skip_spikes must be 0 (off) or a factor above 1 (such as 3), got {self.skip_spikes}"
            )
        # Written as "not in range" so that NaN, which fails every comparison, is refused too.
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise KimbhoError(f"train.lr must be a positive number, got {self.lr}")
        if self.eval_tokens < 1:
            raise KimbhoError(
                f"train.eval_tokens must be at least 1 (validation tokens per pass), got {self.eval_tokens}"
            )
        for name in ("min_lr_ratio", "decay_fraction"):  # fractions of the peak lr, of the run
            if not 0 <= getattr(self, name) <= 1:
                raise KimbhoError(f"train.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("beta1", "beta2"):  # AdamW's moment decays: 1 would never forget
            if not 0 <= getattr(self, name) < 1:
                raise KimbhoError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise KimbhoError(f"train.{name} must be a non-negative number (0: off), got {value}")
        if self.dist_timeout <= 0:
            raise KimbhoError(f"train.dist_timeout must be positive (seconds), got {self.dist_timeout}")
        if self.micro_batch_size is not None and self.micro_batch_size <= 0:
            raise KimbhoError(f"train.micro_batch_size must be positive, got {self.micro_batch_size}")
        if self.seq_len is not None and self.seq_len <= 0:
            raise KimbhoError(f"train.seq_len must be positive, got {self.seq_len}")
        choices = {
            "schedule": ("cosine", "wsd", "constant"),
            "precision": ("auto", "fp32", "bf16"),
            "verify_data": ("auto", "true", "false"),
            "compile": ("auto", "true", "false"),
            "optimizer": ("adamw", "muon"),
            "parallel": ("ddp", "fsdp"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise KimbhoError(f"train.{name}={getattr(self, name)!r} is not one of: {', '.join(allowed)}")


@dataclass
class LoraConfig:
    """Low-rank adapters (`model/lora.py`): `rank` 0 trains every weight; above 0 only adapters
    of that rank on the attention and MLP projections, over a frozen base."""

    rank: int = field(
        default=0,
        metadata=_doc(
            "0: full fine-tuning; R > 0: LoRA adapters of rank R on every attention and MLP projection"
        ),
    )
    alpha: float = field(default=16.0, metadata=_doc("LoRA scale numerator (scale = alpha / rank)"))

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise KimbhoError(f"lora.rank must be 0 (off) or positive, got {self.rank}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise KimbhoError(f"lora.alpha must be a positive number, got {self.alpha}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class DataConfig:
    """How often each named source of the data is sampled (`data/sources.py`)."""

    mix: str = field(
        default="",
        metadata=_doc(
            "sampling weight per named source, NAME:WEIGHT,... (empty: each source's share of the tokens)"
        ),
    )
    mix_temperature: float = field(
        default=1.0,
        metadata=_doc("weights raised to this power: 1 keeps them, < 1 flattens them toward uniform"),
    )

    def __post_init__(self) -> None:
        from .data.sources import parse_mix

        parse_mix(self.mix)  # weights that do not parse fail here, before any work
        if not (self.mix_temperature > 0 and math.isfinite(self.mix_temperature)):
            raise KimbhoError(f"data.mix_temperature must be a positive number, got {self.mix_temperature}")

    @property
    def weights(self) -> dict[str, float]:
        from .data.sources import parse_mix

        return parse_mix(self.mix)

    @property
    def mixed(self) -> bool:
        """Whether batches are drawn by a mixture rather than uniformly over all tokens."""
        return bool(self.mix) or self.mix_temperature != 1.0


@dataclass
class RunConfig:
    """A whole training run: the model, how to train it, and (fine-tuning) its adapters."""

    model: KimbhoConfig = field(default_factory=KimbhoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = {"model": self.model.to_dict(), "train": dataclasses.asdict(self.train)}
        # Only runs that use a section record it, so other runs' config.yaml reads as before.
        if self.lora.rank:
            values["lora"] = dataclasses.asdict(self.lora)
        if self.data.mixed:
            values["data"] = dataclasses.asdict(self.data)
        return values

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        unknown = set(values) - set(SECTIONS)
        if unknown:
            raise KimbhoError(f"unknown config section(s) {sorted(unknown)}; use {', '.join(SECTIONS)}")
        return cls(
            model=KimbhoConfig.from_dict(values.get("model") or {}),
            train=TrainConfig(**_checked_fields(TrainConfig, values.get("train") or {}, "train")),
            lora=LoraConfig(**_checked_fields(LoraConfig, values.get("lora") or {}, "lora")),
            data=DataConfig(**_checked_fields(DataConfig, values.get("data") or {}, "data")),
        )


# Config file sections and the `section.key=value` prefixes, with the class of each.
SECTIONS: dict[str, type] = {
    "model": KimbhoConfig,
    "train": TrainConfig,
    "lora": LoraConfig,
    "data": DataConfig,
}


def resolve_run_config(
    config_file: Path | None = None, preset: str | None = None, overrides: list[str] | None = None
) -> tuple[RunConfig, set[str]]:
    """Build the run config from (in increasing priority) defaults, a preset, a YAML file and
    `key=value` overrides. Returns it with the set of keys the user set explicitly (the trainer
    lets the data's tokenizer decide `model.vocab_size` unless the user set it)."""
    values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    explicit: set[str] = set()
    if preset is not None:
        if preset not in PRESETS:
            raise KimbhoError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        values["model"].update(PRESETS[preset])
    if config_file is not None:
        loaded = _load_yaml(config_file)
        for section, entries in loaded.items():
            if section not in values or not isinstance(entries, dict):
                raise KimbhoError(
                    f"{config_file}: top-level keys must be mappings named {', '.join(SECTIONS)}, got {section!r}"
                )
            for key, value in entries.items():
                values[section][key] = value
                explicit.add(f"{section}.{key}")
    for item in overrides or []:
        section, key, value = parse_override(item)
        values[section][key] = value
        explicit.add(f"{section}.{key}")
    return RunConfig.from_dict(values), explicit


def parse_override(item: str) -> tuple[str, str, Any]:
    """`"train.lr=3e-4"` -> `("train", "lr", 0.0003)`, typed by the field it names."""
    if "=" not in item:
        raise KimbhoError(f"expected key=value (for example train.lr=3e-4), got {item!r}")
    key, raw = item.split("=", 1)
    section, _, name = key.strip().partition(".")
    if section not in SECTIONS or not name:
        raise KimbhoError(f"config key {key!r} must start with {', '.join(s + '.' for s in SECTIONS)}")
    fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
    if name not in fields:
        raise KimbhoError(f"unknown config key {key!r}; {section} keys are: {', '.join(fields)}")
    return section, name, _coerce(raw, fields[name], key)


def config_help() -> str:
    """Every config key with its default and meaning, for `kimbho train --help`."""
    lines = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            lines.append(f"  {section}.{f.name:<18} {f.metadata.get('help', '')} (default: {default})")
    return "\n".join(lines)


def _round_up(value: int, multiple: int) -> int:
    return multiple * math.ceil(value / multiple)


def _checked_fields(cls: type, values: dict[str, Any], section: str) -> dict[str, Any]:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in names]
    if unknown:
        raise KimbhoError(f"unknown {section} key(s) {unknown}; valid keys are: {', '.join(names)}")
    return {k: _coerce(v, names[k], f"{section}.{k}") for k, v in values.items()}


def _coerce(raw: Any, f: dataclasses.Field, key: str) -> Any:
    """Type a YAML/CLI value by its dataclass field, so `train.lr=1e-3` and `max_steps: 1e3` work."""
    value = yaml.safe_load(raw) if isinstance(raw, str) else raw
    hint = typing.get_type_hints(SECTIONS[key.partition(".")[0]])[f.name]
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(
        hint
    )
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if value is None:
        if optional:
            return None
        raise KimbhoError(f"{key} cannot be empty")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if base is int:
            number = float(value) if isinstance(value, str) else value  # YAML reads 1e3 as a string
            if isinstance(number, bool) or (isinstance(number, float) and not number.is_integer()):
                raise TypeError
            return int(number)
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if base is str:
            return str(value).lower() if isinstance(value, bool) else str(value)
    except (TypeError, ValueError):
        pass
    raise KimbhoError(f"{key} expects {getattr(base, '__name__', base)}, got {raw!r}")


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise KimbhoError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise KimbhoError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise KimbhoError(f"config file {path} must hold a mapping of sections ({', '.join(SECTIONS)})")
    return loaded
