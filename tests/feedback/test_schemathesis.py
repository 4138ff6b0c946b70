"""Property-based API test: schemathesis generates requests from the OpenAPI schema; none may get a 5xx,
and every answer must match the documented responses."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from rlhf.feedback.client import FeedbackClient
from rlhf.feedback.testing import make_user, run_server

EXAMPLES_PER_OPERATION = int(os.environ.get("RLHF_SCHEMATHESIS_EXAMPLES", "15"))
# Operations whose bodies pass rules the schema cannot state (an answer field that fits the task's kind;
# enough completions for the task kind): a schema-valid body may rightly get 422 there.
SEMANTIC_422 = {"POST /api/votes", "POST /api/projects/{name}/import"}


@pytest.fixture
def api_server(db_url: str) -> Iterator[tuple[str, dict[str, str]]]:
    """A live server with a seeded project; (base URL, admin Authorization header)."""
    token = make_user(db_url, "schemathesis-admin-7f3c", role="admin")
    with run_server(db_url, votes_per_minute=0) as url:
        client = FeedbackClient(url, token)
        rows = [
            {"prompt": f"p{i}", "prompt_id": f"p{i}", "completions": [{"text": "a"}, {"text": "b"}]}
            for i in range(5)
        ]
        client.import_candidates(
            "demo", rows, gold=[{"prompt": "g", "completion_a": "x", "completion_b": "y", "choice": "A"}]
        )
        client.create_user("labeler-1")
        client.close()
        yield url, {"Authorization": f"Bearer {token}"}


def test_api_has_no_server_errors(api_server: tuple[str, dict[str, str]]) -> None:
    """Every operation, EXAMPLES_PER_OPERATION generated requests each, authenticated as an admin.

    (Driven through Hypothesis directly: schemathesis' lazy pytest fixture loader does not work with
    this pytest version.)
    """
    url, headers = api_server
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=headers)
    failures = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case) -> None:
            excluded = [positive_data_acceptance] if case.operation.label in SEMANTIC_422 else None
            case.call_and_validate(base_url=url, headers=headers, excluded_checks=excluded)

        try:
            check()
        except BaseException as e:  # noqa: BLE001 - collect every operation's failures, then report them all
            if isinstance(e, KeyboardInterrupt):
                raise
            failures.append(f"{operation.label}: {e}")
    assert not failures, "\n\n".join(failures)
