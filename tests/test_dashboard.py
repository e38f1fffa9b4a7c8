"""The dashboard pages over HTTP: login, pages, the decision POST (same rules as the API), CSRF."""

from __future__ import annotations

import re

import pytest

from app.extensions import db
from app.models import Secret
from tests.e2e.support import csrf_from, login_client

HX = {"HX-Request": "true"}


@pytest.fixture
def agent_request(client, world):
    """Make the agent ask to delete a secret in `api`; return the approval id."""

    def make(name: str = "DB_PASSWORD", workspace: str = "api") -> int:
        response = client.delete(
            f"/api/workspaces/{world.ws[workspace]}/secrets/{name}", headers=world.auth("agent")
        )
        assert response.status_code == 202, response.get_json()
        return response.get_json()["approval_id"]

    return make


def as_user(app, world, username: str):
    browser = app.test_client()
    response = login_client(browser, username, world.password)
    assert response.status_code == 303
    return browser


def token_of(browser, path: str = "/") -> str:
    return csrf_from(browser.get(path).get_data(as_text=True))


def decide(browser, approval_id: int, decision: str, reason: str | None = None, **extra):
    data = {"decision": decision, "csrf_token": token_of(browser), **extra}
    if reason is not None:
        data["reason"] = reason
    return browser.post(f"/approvals/{approval_id}/decision", data=data, headers=HX)


# ---- login ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/history", "/workspaces", "/approvals/1"])
def test_pages_redirect_to_login_without_a_session(client, world, path):
    response = client.get(path)
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/login?next=")


def test_login_clears_the_session_and_logout_ends_it(client, world):
    with client.session_transaction() as session:
        session["planted"] = "by an attacker"
    response = login_client(client, "carol", world.password)
    assert response.status_code == 303 and response.headers["Location"] == "/"
    with client.session_transaction() as session:
        assert "planted" not in session
    page = client.get("/").get_data(as_text=True)
    assert "Log out" in page and "carol" in page
    response = client.post("/logout", data={"csrf_token": csrf_from(page)})
    assert response.status_code == 303
    assert client.get("/").status_code == 302


def test_session_cookie_flags(client, world):
    response = login_client(client, "carol", world.password)
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_wrong_password_is_refused(client, world):
    response = login_client(client, "carol", "wrong")
    assert response.status_code == 401
    assert "wrong password" in response.get_data(as_text=True)
    assert client.get("/").status_code == 302


def test_login_redirects_only_to_local_paths(client, world):
    token = csrf_from(client.get("/login").get_data(as_text=True))
    for target, expected in [("/history", "/history"), ("//evil.example/", "/")]:
        response = client.post(
            "/login",
            data={
                "username": "carol",
                "password": world.password,
                "csrf_token": token,
                "next": target,
            },
        )
        assert response.headers["Location"] == expected
        token = csrf_from(client.get("/").get_data(as_text=True))


def test_failed_logins_are_throttled(app, client, world):
    app.config["COUNTERSIGN_LOGIN_LIMIT"] = "3/minute"
    statuses = [login_client(client, "carol", "guess").status_code for _ in range(4)]
    assert statuses == [401, 401, 401, 429]
    assert login_client(client, "carol", world.password).status_code == 429


def test_login_without_csrf_token_is_refused(client, world):
    response = client.post("/login", data={"username": "carol", "password": world.password})
    assert response.status_code == 400


# ---- pending -------------------------------------------------------------------------------


def test_pending_page_shows_rows_with_count_breadcrumb_and_requester(app, world, agent_request):
    approval_id = agent_request()
    page = as_user(app, world, "carol").get("/").get_data(as_text=True)
    assert "<title>(1) Countersign</title>" in page
    row = page[page.index(f'id="approval-{approval_id}"') :]
    assert "Delete secret" in row and "DB_PASSWORD" in row
    assert "<li>acme</li><li>prod</li><li>api</li>" in row
    assert "agent" in row and 'class="kind kind-agent"' in row
    assert "left</time>" in row and "Approve" in row and "Deny" in row
    assert "Escalation" not in row.split("</article>")[0]


def test_escalation_badge_when_the_right_comes_from_an_ancestor(app, world, agent_request):
    approval_id = agent_request()
    page = as_user(app, world, "alice").get("/").get_data(as_text=True)
    row = page[page.index(f'id="approval-{approval_id}"') :].split("</article>")[0]
    assert "Escalation · via acme" in row


def test_viewer_sees_the_row_without_buttons(app, world, agent_request):
    approval_id = agent_request()
    page = as_user(app, world, "victor").get("/").get_data(as_text=True)
    row = page[page.index(f'id="approval-{approval_id}"') :].split("</article>")[0]
    assert "View only" in row
    assert "/decision" not in row
    assert "<title>Countersign</title>" in page  # nothing awaits *his* decision


@pytest.mark.parametrize("username", ["dave", "mallory"])
def test_users_without_a_role_on_the_subtree_do_not_see_it(app, world, agent_request, username):
    approval_id = agent_request()
    browser = as_user(app, world, username)
    assert f"approval-{approval_id}" not in browser.get("/").get_data(as_text=True)
    assert browser.get(f"/approvals/{approval_id}").status_code == 404


def test_pages_render(app, world, agent_request):
    agent_request()
    browser = as_user(app, world, "alice")
    for path in ["/", "/history", "/workspaces"]:
        assert browser.get(path).status_code == 200


# ---- deciding ------------------------------------------------------------------------------


def test_approve_through_the_dashboard_lets_the_agent_retry(app, client, world, agent_request):
    approval_id = agent_request()
    carol = as_user(app, world, "carol")
    response = decide(carol, approval_id, "approve", **{"from": "list"})
    assert response.status_code == 200
    body = response.get_data(as_text=True)
    assert f'id="approval-{approval_id}"' in body and "approved" in body
    assert 'id="pending-count"' in body and 'data-count="0"' in body
    retry = client.delete(
        f"/api/workspaces/{world.ws['api']}/secrets/DB_PASSWORD", headers=world.auth("agent")
    )
    assert retry.status_code == 204


def test_deny_needs_a_reason_and_the_agent_gets_it(app, client, world, agent_request):
    approval_id = agent_request()
    carol = as_user(app, world, "carol")
    response = decide(carol, approval_id, "deny", reason="   ")
    assert response.status_code == 422
    assert "needs a reason" in response.get_data(as_text=True)
    response = decide(carol, approval_id, "deny", reason="not during the freeze")
    assert response.status_code == 200
    retry = client.delete(
        f"/api/workspaces/{world.ws['api']}/secrets/DB_PASSWORD", headers=world.auth("agent")
    )
    assert retry.status_code == 403
    assert retry.get_json()["reason"] == "not during the freeze"


def test_no_right_is_403_with_a_message_in_the_page(app, world, agent_request):
    approval_id = agent_request()
    for username in ("victor", "dave"):
        response = decide(as_user(app, world, username), approval_id, "approve")
        assert response.status_code == 403
        body = response.get_data(as_text=True)
        assert "no right to decide" in body and 'hx-swap-oob="afterbegin:#notices"' in body


def test_deciding_twice_is_409_with_a_message(app, world, agent_request):
    approval_id = agent_request()
    assert decide(as_user(app, world, "carol"), approval_id, "approve").status_code == 200
    response = decide(as_user(app, world, "alice"), approval_id, "deny", reason="too late")
    assert response.status_code == 409
    assert "no longer pending: it is approved" in response.get_data(as_text=True)


def test_unknown_approval_is_404_message(app, world):
    response = decide(as_user(app, world, "carol"), 999, "approve")
    assert response.status_code == 404
    assert "does not exist" in response.get_data(as_text=True)


def test_decision_post_without_csrf_token_is_400(app, world, agent_request):
    approval_id = agent_request()
    carol = as_user(app, world, "carol")
    response = carol.post(f"/approvals/{approval_id}/decision", data={"decision": "approve"})
    assert response.status_code == 400
    response = carol.post(
        f"/approvals/{approval_id}/decision", data={"decision": "approve"}, headers=HX
    )
    assert response.status_code == 400
    with app.app_context():
        from app.models import ApprovalRequest

        assert db.session.get(ApprovalRequest, approval_id).status == "pending"


def test_decision_without_session_is_refused(client, world, agent_request):
    approval_id = agent_request()
    token = csrf_from(client.get("/login").get_data(as_text=True))
    response = client.post(
        f"/approvals/{approval_id}/decision", data={"decision": "approve", "csrf_token": token}
    )
    assert response.status_code == 401


def test_plain_form_post_redirects_with_a_flash(app, world, agent_request):
    approval_id = agent_request()
    carol = as_user(app, world, "carol")
    response = carol.post(
        f"/approvals/{approval_id}/decision",
        data={"decision": "approve", "csrf_token": token_of(carol), "next": "/history"},
    )
    assert response.status_code == 303 and response.headers["Location"] == "/history"
    assert f"Approved request #{approval_id}" in carol.get("/history").get_data(as_text=True)
    response = carol.post(
        f"/approvals/{approval_id}/decision",
        data={"decision": "approve", "csrf_token": token_of(carol)},
    )
    assert response.status_code == 409
    assert "no longer pending" in response.get_data(as_text=True)


def test_decision_from_the_detail_page_refreshes_the_panel(app, world, agent_request):
    approval_id = agent_request()
    carol = as_user(app, world, "carol")
    response = decide(carol, approval_id, "deny", reason="no", **{"from": "detail"})
    body = response.get_data(as_text=True)
    assert f'id="approval-detail-{approval_id}"' in body and "denied" in body


# ---- detail, history, workspaces -----------------------------------------------------------


def test_detail_shows_subtree_hash_timeline_and_decision(app, client, world):
    response = client.delete(
        f"/api/workspaces/{world.ws['prod']}?recursive=true", headers=world.auth("agent")
    )
    assert response.status_code == 202
    approval_id = response.get_json()["approval_id"]
    alice = as_user(app, world, "alice")
    decide(alice, approval_id, "deny", reason="prod stays", **{"from": "detail"})
    page = alice.get(f"/approvals/{approval_id}").get_data(as_text=True)
    api_json = client.get(f"/api/approvals/{approval_id}", headers=world.auth("alice")).get_json()
    assert api_json["request_hash"] in page
    assert "2 workspaces" in page and "(recursive delete)" in page
    subtree = page[page.index('class="subtree"') : page.index("</ul>", page.index('"subtree"'))]
    assert "prod" in subtree and "api" in subtree and "staging" not in subtree
    assert "event-created" in page and "event-denied" in page
    assert "prod stays" in page and "alice" in page


def test_history_lists_settled_requests_with_filters_and_paging(app, client, world, monkeypatch):
    with app.app_context():
        db.session.add_all(
            Secret(workspace_id=world.ws["api"], name=f"S{i}", value="x") for i in range(4)
        )
        db.session.commit()
    ids = []
    for i in range(4):
        response = client.delete(
            f"/api/workspaces/{world.ws['api']}/secrets/S{i}", headers=world.auth("agent")
        )
        ids.append(response.get_json()["approval_id"])
    carol = as_user(app, world, "carol")
    decide(carol, ids[0], "approve")
    decide(carol, ids[1], "deny", reason="nope")
    decide(carol, ids[2], "deny", reason="nope again")
    page = carol.get("/history").get_data(as_text=True)
    assert all(f'id="history-{i}"' in page for i in ids[:3])
    assert f'id="history-{ids[3]}"' not in page  # still pending
    denied = carol.get("/history?status=denied").get_data(as_text=True)
    assert f'id="history-{ids[0]}"' not in denied and f'id="history-{ids[1]}"' in denied
    other = carol.get("/history?action=workspace.delete").get_data(as_text=True)
    assert "history-" not in other
    scoped = carol.get(f"/history?workspace={world.ws['api']}").get_data(as_text=True)
    assert f'id="history-{ids[0]}"' in scoped
    monkeypatch.setattr("app.dashboard.views.PAGE_SIZE", 2)
    first = carol.get("/history").get_data(as_text=True)
    second = carol.get("/history?page=2").get_data(as_text=True)
    assert len(re.findall(r'id="history-', first)) == 2
    assert len(re.findall(r'id="history-', second)) == 1
    assert "page 2 of 2" in second and 'rel="prev"' in second


def test_workspaces_tree_shows_approvers_and_pending_counts(app, world, agent_request):
    agent_request()
    page = as_user(app, world, "alice").get("/workspaces").get_data(as_text=True)
    for name in ("acme", "prod", "staging", "api"):
        assert f'id="workspace-{world.ws[name]}"' in page
    api_node = page[page.index(f'id="workspace-{world.ws["api"]}"') :]
    assert "1 pending" in api_node.split("</li>")[0]
    assert "carol" in api_node and "victor" in api_node
    page = as_user(app, world, "dave").get("/workspaces").get_data(as_text=True)
    assert f'id="workspace-{world.ws["staging"]}"' in page
    assert f'id="workspace-{world.ws["api"]}"' not in page


def test_error_pages_still_render(client):
    response = client.get("/no-such-page")
    assert response.status_code == 404
    assert "Not Found" in response.get_data(as_text=True)


def set_terms(app, approval_id: int, **changes) -> None:
    """Give one request stricter policy terms, as a policy file would have."""
    from app.models import ApprovalRequest

    with app.app_context():
        request = db.session.get(ApprovalRequest, approval_id)
        terms = dict(request.policy_terms or {})
        for key, value in changes.items():
            if key == "approvals_required":
                request.approvals_required = value
            terms[key] = value
        request.policy_terms = terms
        db.session.commit()


def test_two_person_rule_counts_votes_and_refuses_a_second_vote(app, client, world, agent_request):
    approval_id = agent_request()
    set_terms(app, approval_id, approvals_required=2)
    carol, alice = as_user(app, world, "carol"), as_user(app, world, "alice")
    row = carol.get("/").get_data(as_text=True)
    assert "0 of 2 approvals" in row
    response = decide(carol, approval_id, "approve")
    assert response.status_code == 200
    assert "it needs more approvals" in response.get_data(as_text=True)
    page = carol.get("/").get_data(as_text=True)
    mine = page[page.index(f'id="approval-{approval_id}"') :].split("</article>")[0]
    assert "1 of 2 approvals" in mine and "You approved. It needs 1 more." in mine
    assert 'value="approve"' not in mine and 'value="deny"' in mine
    again = decide(carol, approval_id, "approve")
    assert again.status_code == 409
    assert "already approved" in again.get_data(as_text=True)
    assert decide(alice, approval_id, "approve").status_code == 200
    retry = client.delete(
        f"/api/workspaces/{world.ws['api']}/secrets/DB_PASSWORD", headers=world.auth("agent")
    )
    assert retry.status_code == 204


def test_policy_reason_for_approvals_gets_a_reason_field(app, world, agent_request):
    approval_id = agent_request()
    set_terms(app, approval_id, reason_required=["approve", "deny"])
    carol = as_user(app, world, "carol")
    page = carol.get("/").get_data(as_text=True)
    assert f'id="approve-reason-list-{approval_id}"' in page
    response = decide(carol, approval_id, "approve")
    assert response.status_code == 422
    assert "needs a reason" in response.get_data(as_text=True)
    assert decide(carol, approval_id, "approve", reason="rotated already").status_code == 200
