"""``GET /``: a status page for people, server-rendered HTML with no script or external asset.

It shows the partitions (log end, applied position, lag), a session's offsets for every
consumer (``/?session=ID``), the last dead letters (``TRACKER_API_DLQ``, see
:mod:`tracker.api.deadletters`) and the lag over the last minutes (:mod:`tracker.api.lagchart`).
It refreshes itself every 5 seconds.

The page needs a ``read`` token, as the API: ``Authorization: Bearer`` or the cookie that
the page's login form sets (``POST /login``; ``POST /logout`` clears it). Without one it
answers 401 with only the login form. A token bound to a user finds only that user's
sessions. Every text that comes from users or workers is HTML-escaped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from html import escape
from typing import Any

from litestar import MediaType, Request, Response, get, post
from litestar.datastructures import Cookie
from litestar.exceptions import NotAuthorizedException
from litestar.response import Redirect

from tracker.api.auth import COOKIE, grant_of
from tracker.api.context import Api, api_of, blocking
from tracker.api.deadletters import Letter, Source, recent
from tracker.api.errors import SessionHidden
from tracker.api.lagchart import LagHistory, lag_svg
from tracker.api.views import visible
from tracker.errors import InvalidInputError, TrackerError
from tracker.model import SessionDTO
from tracker.status import Status
from tracker.tokens import Grant

REFRESH_SECONDS = 5
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:60em;padding:0 1em;
color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;padding:.25em .8em;
text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#777}.error{color:#a00}.lagging{color:#a50;font-weight:bold}
svg text{font-size:11px;fill:#555}svg .axis{stroke:#999}
svg polyline{fill:none}svg .total{stroke:#1565c0;stroke-width:2}
svg .partition{stroke:#90a4ae;stroke-width:1}
form{display:inline}header{display:flex;justify-content:space-between;align-items:baseline}
"""


@dataclass
class StatusPage:
    """What the page reads besides the tracker: dead-letter places and the lag history."""

    sources: list[Source]
    history: LagHistory = field(default_factory=LagHistory)


def _page(title: str, body: str, *, refresh: bool) -> str:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if refresh else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width">{meta}'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>{body}</body></html>"
    )


def _html(content: str, status: int = 200, cookies: list[Cookie] | None = None) -> Response[str]:
    return Response(
        content,
        media_type=MediaType.HTML,
        status_code=status,
        headers=SECURITY_HEADERS,
        cookies=cookies,
    )


def login_page(message: str | None = None, status: int = 401) -> Response[str]:
    """Only the login form: nothing of the tracker is shown without a token."""
    note = f'<p class="error" id="login-error">{escape(message)}</p>' if message else ""
    body = (
        "<h1>offset-tracker status</h1>"
        "<p>Log in with an API token (<code>tracker tokens create --scope read</code>).</p>"
        f"{note}"
        '<form id="login" method="post" action="/login">'
        '<label>Token <input type="password" name="token" autocomplete="off" required '
        'autofocus></label> <button type="submit">Log in</button></form>'
    )
    return _html(_page("offset-tracker: log in", body, refresh=False), status)


def on_unauthorized(request: Request[Any, Any, Any], exc: NotAuthorizedException) -> Response[str]:
    """The status page without a (known) token: the login form, 401."""
    cookie = request.cookies.get(COOKIE)
    message = "That token is not valid any more: log in again." if cookie else None
    return login_page(message)


def _partitions(status: Status) -> str:
    rows = "".join(
        f'<tr data-partition="{p.partition}"><td class="n">{p.partition}</td>'
        f"<td>{escape(p.end or '—')}</td><td>{escape(p.applied or '—')}</td>"
        f'<td class="n lag{" lagging" if p.lag else ""}">{p.lag}</td></tr>'
        for p in status.partitions
    )
    return (
        f"<h2>Partitions</h2><p>Generation {status.generation}; total lag "
        f'<strong id="total-lag">{status.lag}</strong> events.</p>'
        '<table id="partitions"><thead><tr><th>partition</th><th>log end</th>'
        f"<th>applied</th><th>lag</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _lookup_form(session_id: str | None) -> str:
    value = escape(session_id or "", quote=True)
    return (
        '<form id="lookup" method="get" action="/"><label>Session id '
        f'<input name="session" value="{value}" maxlength="64" required></label> '
        '<button type="submit">Look up</button></form>'
    )


def _session(session_id: str, session: SessionDTO | None, problem: str | None) -> str:
    if session is None:
        return f'<p class="error" id="session-error">{escape(problem or "Session not found")}</p>'
    offsets = (
        "".join(
            f"<tr><td>{escape(consumer)}</td><td class='n'>{offset}</td></tr>"
            for consumer, offset in sorted(session.consumption_offsets.items())
        )
        or '<tr><td colspan="2" class="muted">no offsets committed</td></tr>'
    )
    title = escape(session.title) if session.title is not None else '<span class="muted">—</span>'
    return (
        f'<div id="session"><p>Session <code>{escape(session_id)}</code>: title {title}, '
        f"user <code>{escape(session.user_id)}</code>, agent "
        f"<code>{escape(session.agent_id)}</code>, created "
        f"{escape(session.created_at.isoformat())}</p>"
        '<table id="offsets"><thead><tr><th>consumer</th><th>offset</th></tr></thead>'
        f"<tbody>{offsets}</tbody></table></div>"
    )


def _time(at: datetime | None) -> str:
    return escape(at.isoformat(timespec="seconds")) if at else '<span class="muted">—</span>'


def _dead_letters(sources: list[Source], letters: list[Letter], problems: list[str]) -> str:
    if not sources:
        return (
            '<h2>Dead letters</h2><p class="muted" id="dead-letters">Set TRACKER_API_DLQ '
            "(<code>dir:PATH</code>, <code>kafka:TOPIC</code>) to show them.</p>"
        )
    errors = "".join(f'<p class="error">{escape(p)}</p>' for p in problems)
    if not letters:
        return f'<h2>Dead letters</h2>{errors}<p id="dead-letters">None.</p>'
    rows = "".join(
        f"<tr><td>{_time(d.time)}</td><td>{escape(d.consumer)}</td><td>{escape(d.stream)}</td>"
        f'<td>{escape(d.position)}</td><td class="reason">{escape(d.reason)}</td></tr>'
        for d in letters
    )
    return (
        f"<h2>Dead letters</h2>{errors}<p class='muted'>The last {len(letters)} from "
        f"{escape(', '.join(s.label for s in sources))}.</p>"
        '<table id="dead-letters"><thead><tr><th>time</th><th>consumer</th><th>stream</th>'
        f"<th>position</th><th>reason</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _who(grant: Grant) -> str:
    user = f", user <code>{escape(grant.user_id)}</code>" if grant.user_id else ""
    return (
        f"<span>Token <code>{escape(grant.name)}</code> ({escape(grant.scope)}{user}) "
        '<a href="">refresh</a> '
        '<form method="post" action="/logout"><button type="submit">Log out</button></form>'
        "</span>"
    )


def page_of(request: Request[Any, Any, Any]) -> StatusPage:
    page: StatusPage = request.app.state.status_page
    return page


def _find(api: Api, grant: Grant, session_id: str) -> tuple[SessionDTO | None, str | None, int]:
    try:
        return visible(api, grant, session_id), None, 200
    except SessionHidden:
        return None, "Session not found", 404
    except InvalidInputError as error:
        return None, str(error), 422


@get(
    "/",
    opt={"scope": "read", "cookie": True},
    include_in_schema=False,
    exception_handlers={NotAuthorizedException: on_unauthorized},
)
async def status_page(request: Request[Any, Any, Any], session: str | None = None) -> Response[str]:
    """The status page (HTML); ``?session=ID`` looks a session up."""
    api, grant, page = api_of(request), grant_of(request), page_of(request)
    session_id = session.strip() if session else None

    def run() -> tuple[Status | str, list[Letter], list[str], tuple[Any, str | None, int]]:
        try:
            status: Status | str = api.tracker.status()
        except TrackerError as error:
            status = str(error)
        letters, problems = recent(page.sources)
        found: tuple[Any, str | None, int] = (None, None, 200)
        if session_id:
            try:
                found = _find(api, grant, session_id)
            except TrackerError as error:
                found = (None, str(error), 503)
        return status, letters, problems, found

    status, letters, problems, (found, problem, code) = await blocking(run)
    parts = [
        f"<header><h1>offset-tracker status</h1>{_who(grant)}</header>",
        _partitions(status)
        if isinstance(status, Status)
        else f'<h2>Partitions</h2><p class="error">{escape(status)}</p>',
        "<h2>Lag, last minutes</h2>",
        lag_svg(list(page.history.samples)),
        "<h2>Session</h2>",
        _lookup_form(session_id),
    ]
    if session_id:
        parts.append(_session(session_id, found, problem))
    parts.append(_dead_letters(page.sources, letters, problems))
    return _html(_page("offset-tracker status", "".join(parts), refresh=True), code)


def _cookie(value: str, request: Request[Any, Any, Any], max_age: int | None = None) -> Cookie:
    return Cookie(
        key=COOKIE,
        value=value,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        max_age=max_age,
    )


@post("/login", include_in_schema=False, status_code=303)
async def login(request: Request[Any, Any, Any]) -> Response[Any]:
    """Check the form's token; if known, keep it in the cookie and go to the page."""
    form = await request.form()
    token = form.get("token")
    token = token.strip() if isinstance(token, str) else ""
    api = api_of(request)
    try:
        if not token:
            raise NotAuthorizedException("missing token")
        api.auth.lookup(token)
    except NotAuthorizedException:
        return login_page("Unknown token.")
    return Redirect("/", status_code=303, cookies=[_cookie(token, request)])


@post("/logout", include_in_schema=False, status_code=303)
async def logout(request: Request[Any, Any, Any]) -> Response[Any]:
    """Forget the login cookie."""
    return Redirect("/", status_code=303, cookies=[_cookie("", request, max_age=0)])


ROUTES = [status_page, login, logout]
