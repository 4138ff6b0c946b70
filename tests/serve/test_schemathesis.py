"""Property-based API test of the model server: schemathesis generates requests from its OpenAPI schema,
with every check on; none may get a 5xx or an answer its schema does not document."""

from __future__ import annotations

import os
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

EXAMPLES_PER_OPERATION = int(os.environ.get("RLHF_SCHEMATHESIS_EXAMPLES", "10"))
# Bodies that pass the schema but not rules it cannot state (a model id that exists, a prompt that fits the
# context, a feedback id and token the server issued): a schema-valid body may rightly get a 4xx there.
SEMANTIC_4XX = {
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v1/feedback",
    "GET /v1/models/{model}",
}


def test_api_conforms_to_its_schema(server: dict[str, Any]) -> None:
    url = server["url"]
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    failures = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case) -> None:
            if case.body and isinstance(case.body, dict) and "max_tokens" in case.body:
                case.body["max_tokens"] = min(case.body["max_tokens"] or 1, 4)  # keep generations short
            excluded = [positive_data_acceptance] if case.operation.label in SEMANTIC_4XX else None
            case.call_and_validate(base_url=url, excluded_checks=excluded, timeout=60)

        try:
            check()
        except BaseException as e:  # noqa: BLE001 - collect every operation's failures, then report them all
            if isinstance(e, KeyboardInterrupt):
                raise
            failures.append(f"{operation.label}: {e}")
    assert not failures, "\n\n".join(failures)
