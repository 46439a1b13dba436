"""Refuse a REST trigger of a ShoeFix DAG whose conf breaks shoefix_tasks.ops.trigger, before a run exists.

Airflow's trigger endpoint validates the DAG's declared Params but silently keeps unknown conf
keys (and accepts NaN for a bounded number), so a caller could still smuggle `gate`, `policy` or
similar keys into a run. This pure-ASGI middleware (installed by shoefix_plugin.py through
`fastapi_root_middlewares`) reads the JSON body of

    POST /api/v2/dags/{dag_id}/dagRuns                          body key `conf`
    POST /api/v2/backfills, POST /api/v2/backfills/dry_run       body keys `dag_id`, `dag_run_conf`

for DAG ids starting with `shoefix_`, runs `trigger.validate_conf` and answers
`400 {"detail": "trigger refused: ..."}` on a refusal; otherwise the request goes on unchanged
(the body it read is handed to Airflow again). The first task of every ShoeFix DAG checks the
same rules again, for runs that never pass through here (`airflow dags trigger`, `dags test -c`).

Ordering against authentication (a middleware runs before Airflow's auth dependencies): a refusal
message names recipes and inbox roots, so it is only ever given to a caller Airflow itself would
let trigger the DAG. With no credential (no `Authorization: Bearer` header, no `_token` cookie:
the same precedence as Airflow's `get_user`), a token the auth manager does not accept, or a user
the auth manager does not authorize to create runs of that DAG, the request passes through
untouched and Airflow answers its own 401/403. If the authorization check itself errors, the conf
is validated anyway (fail closed on policy), and a policy that cannot be loaded answers 500.

Imports only the standard library at load time (every Airflow process loads plugins); Airflow's
auth manager and shoefix_tasks.ops.trigger are imported on the first matching request, in the
api-server. Listed in plugins/.airflowignore: loaded by shoefix_plugin.py, not as a plugin itself.
"""

from __future__ import annotations

import json
import logging
import re
from http.cookies import CookieError, SimpleCookie

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 1 << 20  # no ShoeFix trigger is anywhere near this
RUN_PATH = re.compile(r"^/api/v2/dags/(?P<dag_id>[^/]+)/dagRuns/?$")
BACKFILL_PATH = re.compile(r"^/api/v2/backfills(?:/dry_run)?/?$")
DAG_PREFIX = "shoefix_"
COOKIE = "_token"  # airflow.api_fastapi.auth.managers.base_auth_manager.COOKIE_NAME_JWT_TOKEN


def credential(scope) -> str | None:
    """The JWT Airflow would authenticate this request with: Bearer header first, else the cookie."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    try:
        morsel = SimpleCookie(headers.get("cookie", "")).get(COOKIE)
    except CookieError:
        return None
    return morsel.value if morsel is not None and morsel.value else None


async def may_trigger(token: str, dag_id: str) -> bool:
    """Would Airflow let this token's user create a run of `dag_id`? (False = let Airflow say no.)"""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from anyio import to_thread

    try:
        user = await get_auth_manager().get_user_from_token(token)
    except Exception:  # noqa: BLE001 - expired, forged, revoked: Airflow answers 401/403 itself
        return False
    try:
        return bool(await to_thread.run_sync(lambda: get_auth_manager().is_authorized_dag(
            method="POST", access_entity=DagAccessEntity.RUN, details=DagDetails(id=dag_id), user=user)))
    except Exception:  # noqa: BLE001 - cannot tell: check the conf anyway
        log.warning("ShoeFix trigger guard: authorization check for %s failed; validating the conf anyway", dag_id,
                    exc_info=True)
        return True


async def respond(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class TriggerGuard:
    """ASGI middleware: `app.add_middleware(TriggerGuard)`."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        path, root = scope.get("path", ""), scope.get("root_path") or ""
        path = path[len(root):] if root and path.startswith(root) else path
        run, backfill = RUN_PATH.match(path), BACKFILL_PATH.match(path)
        if not (backfill or (run and run["dag_id"].startswith(DAG_PREFIX))):
            return await self.app(scope, receive, send)
        token = credential(scope)
        if token is None:  # unauthenticated: Airflow's 401, never a policy message
            return await self.app(scope, receive, send)

        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                return await respond(send, 413, f"request body over {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        refusal = await self.check(body, run["dag_id"] if run else None, token)
        if refusal is not None:
            return await respond(send, *refusal)
        return await self.app(scope, replay, send)

    @staticmethod
    async def check(body: bytes, dag_id: str | None, token: str) -> tuple[int, str] | None:
        """(status, detail) to answer instead of Airflow, or None to let the request through."""
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            return None  # Airflow answers 422 for a body that is not JSON
        if not isinstance(data, dict):
            return None
        conf = data.get("conf") if dag_id is not None else data.get("dag_run_conf")
        dag_id = dag_id if dag_id is not None else data.get("dag_id")
        if not isinstance(dag_id, str) or not dag_id.startswith(DAG_PREFIX) or not await may_trigger(token, dag_id):
            return None
        from anyio import to_thread

        from shoefix_tasks.ops.trigger import TriggerRefused, validate_conf

        try:
            await to_thread.run_sync(validate_conf, dag_id, conf)
        except TriggerRefused as err:
            log.info("ShoeFix trigger guard refused a trigger of %s: %s", dag_id, err)
            return 400, f"trigger refused: {err}"
        except Exception:  # noqa: BLE001 - e.g. an unreadable policy file: refuse rather than let it through
            log.exception("ShoeFix trigger guard could not check a trigger of %s", dag_id)
            return 500, "the ShoeFix trigger check failed (see the api-server log); no run was created"
        return None
