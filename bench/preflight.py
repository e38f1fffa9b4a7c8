"""Preflight: does the production configuration survive sequential first requests?

Found by these benchmarks: the dedup ``INSERT ... ON CONFLICT (workspace_id, action,
request_hash) WHERE status = $n DO NOTHING`` passes the partial-index predicate as a bound
parameter. psycopg 3 prepares a statement server-side from its 6th execution on a connection,
and PostgreSQL switches a prepared statement to a generic plan after 5 custom ones; a generic
plan cannot prove ``status = $n`` implies the index predicate ``status = 'pending'``, so from the
11th new pending request on a pooled connection the INSERT fails ("no unique or exclusion
constraint matching the ON CONFLICT specification") and the gate answers 503 (closed).

When the preflight sees a 503, the benchmarks' servers run with a configuration-only workaround
(psycopg ``prepare_threshold = None``: never prepare) and the results say so.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from bench import harness
from bench.harness import log, secret_path

ENGINE_OPTIONS = {"pool_pre_ping": True, "connect_args": {"prepare_threshold": None}}
# FLASK_* sets Flask's own config keys in this app's config layer; the COUNTERSIGN_ twin serves
# builds that read only prefixed variables (Flask's from_prefixed_env).
WORKAROUND = {
    "FLASK_SQLALCHEMY_ENGINE_OPTIONS": json.dumps(ENGINE_OPTIONS),
    "COUNTERSIGN_SQLALCHEMY_ENGINE_OPTIONS": json.dumps(ENGINE_OPTIONS),
}


def first_requests(url: str, count: int = 24, **config: Any) -> dict[str, int]:
    """Statuses of ``count`` sequential first-time agent requests, in-process on one connection.

    In-process the pool hands every request the same connection and nothing rolls it back, so
    the failure is deterministic (every 11th request). Under gunicorn it shows only under
    concurrency, when the post-commit reads of a 202 land on another pooled connection and the
    one that ran the INSERT is returned without the ROLLBACK that would clear psycopg's cache.
    """
    harness.empty_database(url)
    world = harness.seed(url, leaves=1, agents=1)
    leaf = world.leaves[0]
    names = [f"preflight-{i}" for i in range(count)]
    harness.add_secrets(url, [(leaf, name) for name in names])
    statuses: dict[str, int] = {}
    logging.disable(logging.CRITICAL)  # the gate logs each failure with a traceback
    with harness.local_app(url, **config) as app:
        client = app.test_client()
        for name in names:
            status = client.delete(
                secret_path(leaf, name),
                headers={"Authorization": f"Bearer {world.tokens['agent']}"},
            ).status_code
            statuses[str(status)] = statuses.get(str(status), 0) + 1
    logging.disable(logging.NOTSET)
    return statuses


def run(url: str) -> dict[str, Any]:
    """Check the production configuration; switch the servers to the workaround if needed."""
    statuses = first_requests(url)
    result: dict[str, Any] = {"first_requests_statuses": statuses}
    if statuses.get("503"):
        log(f"preflight: {statuses['503']} of 24 first requests got 503: applying workaround")
        fixed = first_requests(url, SQLALCHEMY_ENGINE_OPTIONS=ENGINE_OPTIONS)
        result.update(
            statuses_with_workaround=fixed,
            issue="dedup INSERT ... ON CONFLICT (...) WHERE status = <bound parameter> fails "
            "once psycopg prepares it and PostgreSQL plans it generically (the 11th new "
            "pending request on a connection without a rollback in between): 503 fail-closed",
            workaround=WORKAROUND,
        )
        harness.SERVER_ENV.update(WORKAROUND)
    else:
        log(f"preflight: production configuration fine ({statuses})")
    harness.empty_database(url)
    return result


if __name__ == "__main__":
    print(json.dumps(run(harness.database_url()), indent=2))
