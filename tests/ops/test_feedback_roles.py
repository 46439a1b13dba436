"""Who may correct a served answer on the ShoeFix page (plugins/shoefix_feedback.py): reviewer roles only,
with Airflow's real SimpleAuthManager user objects, and the auth manager's own answer under any other."""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def fb():
    spec = importlib.util.spec_from_file_location("shoefix_feedback_t", ROOT / "plugins" / "shoefix_feedback.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_simple_auth_manager_roles(fb, monkeypatch):
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    manager = SimpleAuthManager()
    allowed = {role: fb.can_correct(SimpleAuthManagerUser(username="u", role=role), manager)
               for role in ("viewer", "user", "op", "admin")}
    assert allowed == {"viewer": False, "user": False, "op": True, "admin": True}
    assert fb.can_correct(SimpleAuthManagerUser(username="u", role=None), manager) is False
    monkeypatch.setenv("SHOEFIX_REVIEWER_ROLES", "admin")
    assert fb.can_correct(SimpleAuthManagerUser(username="u", role="op"), manager) is False


def test_other_auth_managers_decide_by_the_feedback_view(fb):
    class Manager:  # an auth manager whose users carry no SimpleAuthManager role (FAB, Keycloak...)
        def __init__(self, answer):
            self.answer, self.asked = answer, []

        def is_authorized_custom_view(self, *, method, resource_name, user):
            self.asked.append((method, resource_name))
            return self.answer

    class User:
        def get_name(self):
            return "expert"

    yes, no = Manager(True), Manager(False)
    assert fb.can_correct(User(), yes) is True and fb.can_correct(User(), no) is False
    assert yes.asked == [("PUT", "ShoeFix feedback")]


def test_cards_escape_what_users_typed(fb):
    row = {"answer_id": "a" * 32, "question": "<script>x</script>?", "answer": "<b>hi</b>", "model_version": "3",
           "latency_s": 1.0, "corrected": False}
    html = fb.answers_card([row], may_correct=False)
    assert "<script>x" not in html and "&lt;script&gt;" in html and "<form" not in html and "reviewer role" in html
    assert 'name="answer_id"' in fb.answers_card([row], may_correct=True)
    cov = {"answers": 1, "log": {"pending": 0, "dropped": 0}, "uncovered": [{"question": "<i>q</i>", "asked": 2}],
           "by_topic": {"odor": [{"question": "<i>q</i>", "asked": 2}]}}
    assert "&lt;i&gt;q&lt;/i&gt;" in fb.coverage_card(cov) and "× 2" in fb.coverage_card(cov)
