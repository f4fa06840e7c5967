"""Fuzzing the server's own OpenAPI schema with schemathesis: requests that fit the schema and
requests that break it, for every operation; no response may be a 5xx."""

from __future__ import annotations

from collections.abc import Iterator

import hypothesis
import pytest
import schemathesis
import torch
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

import kimbho
from kimbho.config import KimbhoConfig
from kimbho.inference.chat import ChatFormat
from kimbho.serve.app import ServerOptions, create_app
from tests.conftest import running_server

EXAMPLES = 100  # per operation and mode; the whole run takes ~20 s here


@pytest.fixture(scope="module")
def api(tokenizer: kimbho.Tokenizer) -> Iterator[tuple[str, object]]:
    torch.manual_seed(0)
    model = kimbho.KimbhoV1Model(KimbhoConfig.from_preset("tiny")).eval()
    app = create_app(model, tokenizer, ServerOptions(model_name="tiny", slots=4), ChatFormat(tokenizer))
    with running_server(app) as url:
        yield url, schemathesis.openapi.from_url(url + "/openapi.json")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_server_errors(api, mode) -> None:  # type: ignore[no-untyped-def]
    url, schema = api
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/health",
    }
    if mode == GenerationMode.NEGATIVE:  # an operation that takes no input has no invalid input
        operations = [op for op in operations if len(op.body)]
    statuses: dict[int, int] = {}
    for operation in operations:

        @hypothesis.settings(
            max_examples=EXAMPLES,
            derandomize=True,  # the same cases every run: a failure is reproducible
            database=None,
            deadline=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case) -> None:  # type: ignore[no-untyped-def]
            response = case.call_and_validate(base_url=url, checks=[not_a_server_error])
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        fuzz()
    assert all(status < 500 for status in statuses)
    # both kinds of request were really made: successes for valid ones, 4xx for invalid ones
    assert (
        any(200 <= s < 300 for s in statuses)
        if mode == GenerationMode.POSITIVE
        else any(400 <= s < 500 for s in statuses)
    )
    print(f"schemathesis {mode.value}: responses by status {dict(sorted(statuses.items()))}")
