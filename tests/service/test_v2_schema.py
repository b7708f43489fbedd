"""Schemathesis against the Open Inference Protocol's REST routes as GET /docs.json describes them: generated
requests, valid and not, for this server's model and for unknown ones, get no 5xx, and every answer conforms
to the document (status code, content type, body schema)."""

from __future__ import annotations

import traceback

import pytest

schemathesis = pytest.importorskip("schemathesis")  # the test extra installs it
from hypothesis import HealthCheck, given, settings  # noqa: E402 (schemathesis brings hypothesis)
from hypothesis import strategies as st  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import pcmodel  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def check_v2_routes(url: str, document: dict, examples: int = 10) -> dict[str, set[int]]:
    """Run the generated requests against url; returns the statuses seen per operation (raises on a failed check)."""
    schema = schemathesis.openapi.from_dict(document).include(path_regex="^/v2")
    real = {"name": "conv-rgb", "version": pcmodel.load("default").sha256[:12]}
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    seen: dict[str, set[int]] = {}
    for operation in [result.ok() for result in schema.get_all_operations()]:
        ours = {k: v for k, v in real.items() if "{" + k + "}" in operation.path} or None
        strategies = [operation.as_strategy(mode, path_parameters=ours) for mode in modes]
        strategies.append(operation.as_strategy(modes[0]))  # any model name: 404
        statuses = seen.setdefault(f"{operation.method.upper()} {operation.path}", set())
        _run(st.one_of(strategies), url, statuses, examples)
    return seen


def _run(strategy: st.SearchStrategy, url: str, statuses: set[int], examples: int) -> None:
    @given(case=strategy)
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def answers_as_documented(case) -> None:
        response = case.call(base_url=url)
        statuses.add(response.status_code)
        case.validate_response(response, checks=CHECKS)

    answers_as_documented()


def test_v2_routes_answer_as_documented(server):
    seen = check_v2_routes(server.url, server.get("/docs.json").json())
    assert len(seen) == 9  # /v2, two health routes, and metadata, ready and infer with and without a version
    # Generated bodies reach the parser (400) for this model's name, and unknown names get 404.
    assert {400, 404} <= seen["POST /v2/models/{name}/infer"], seen
    assert {200, 404} <= seen["GET /v2/models/{name}"], seen
    assert all(status < 500 for statuses in seen.values() for status in statuses)


def test_the_check_fails_when_the_document_is_wrong(server):
    """The same run fails once the document leaves out a status the server answers (so it checks something)."""
    document = server.get("/docs.json").json()
    del document["paths"]["/v2/models/{name}/infer"]["post"]["responses"]["400"]
    with pytest.raises(FailureGroup) as caught:
        check_v2_routes(server.url, document, examples=5)
    assert "Undocumented status code" in "".join(traceback.format_exception(caught.value))
