"""Reading the small JSON and YAML files of model directories, checkpoints and runs: one reader,
one set of errors; and the SHA-256 of a file, which manifests and fine-tuning data record."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from ..errors import KimbhoError


def read_mapping(path: Path, error: type[KimbhoError] = KimbhoError) -> dict[str, Any]:
    """The JSON object (`.json`) or YAML mapping (otherwise) in `path`; anything else, a missing
    or unreadable file included, raises `error` naming it."""
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        text = path.read_text()
        value = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError):
        raise error(f"{path} is missing or not valid {kind}") from None
    except RecursionError:  # both parsers recurse once per level of nesting
        raise error(f"{path} is nested too deeply to be a Kimbho or Hugging Face file") from None
    if not isinstance(value, dict):
        raise error(f"{path} does not hold a {kind} {'object' if kind == 'JSON' else 'mapping'}")
    return value


def sha256_of_file(path: Path) -> str:
    """The file's SHA-256, read a megabyte at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
