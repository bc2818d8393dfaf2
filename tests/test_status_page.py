"""The status page at ``/``: a real ``tracker serve`` process, looked at with a real
headless browser (Playwright driving Debian's chromium) and with httpx.

The server's file stream has dead letters written by the stream's own helper (one reason
is a script tag: it must show as text and never run), and events appended to the log
behind the server's back, so the page has a lag to show.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import redis
from kafka import KafkaAdminClient
from playwright.sync_api import Dialog, Page, sync_playwright

from consumers.filestream import FileStream, append_messages, open_stream_log
from consumers.kafkastream import KafkaStream, ensure_topic
from consumers.streams import DeadLetter
from tests.apiserver import AGENT, OTHER, USER, start_server
from tests.conftest import delete_prefix, prefix_for
from tests.services import stop_process
from tracker.api.deadletters import parse_sources, recent
from tracker.errors import ConfigError
from tracker.events import OffsetCommitted, new_event_ids, utcnow
from tracker.logs import open_log
from tracker.settings import Settings
from tracker.tokens import TokenFile
from tracker.writer import Writer

CHROMIUM = Path("/usr/bin/chromium")
SCRIPT = "<script>alert(1)</script>"
TITLE = "<b>not bold</b> & co"
BEHIND = 3
"""Events appended to the log without projecting them: the lag the page must show."""


@dataclass
class Site:
    url: str
    tokens: dict[str, str]
    mine: str
    """A session of USER, with offsets of two consumers."""
    theirs: str
    """A session of OTHER."""
    end: str
    applied: str
    stream: str
    """The stream directory the dead letters name (``dlq.stream``)."""

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[token]}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


def write_dead_letters(stream: Path) -> None:
    """Two dead letters of consumer ``notifier``, written as a worker writes them."""
    with open_stream_log(stream, create=True) as log:
        append_messages(log, [[("s1", b"not json"), ("s2", b"{}")]])
    source = FileStream(stream, "notifier")
    try:
        source.dead_letter(
            [
                DeadLetter(0, 0, b"s1", b"not json", [], SCRIPT),
                DeadLetter(0, 1, b"s2", b"{}", [], "offset: Object missing required field"),
            ],
            "notifier",
        )
    finally:
        source.close()


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, redis_client: redis.Redis
) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("status")
    prefix = prefix_for(f"{__name__}::site", "status")
    delete_prefix(redis_client, prefix)
    tokens_path = tmp / "tokens.json"
    tokens = TokenFile(tokens_path)
    secrets: dict[str, str] = {}
    secrets["read"], _ = tokens.create("read", name="read")
    secrets["write"], _ = tokens.create("write", name="write")
    secrets["user-read"], _ = tokens.create("read", user_id=USER, name="user-read")
    write_dead_letters(tmp / "stream")
    url, process, _ = start_server(
        tmp, redis_url, prefix, tokens_path,
        TRACKER_API_DLQ=f"dir:{tmp / 'stream' / 'dlq'}", TRACKER_API_LAG_SAMPLE="0.2",
    )  # fmt: skip
    try:
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {secrets['write']}"}, timeout=30
        ) as write:
            mine = write.post(
                "/api/sessions", json={"agent_id": AGENT, "user_id": USER, "title": TITLE}
            ).json()["id"]
            theirs = write.post("/api/sessions", json={"agent_id": AGENT, "user_id": OTHER})
            offsets = {"client": 7, "notifier": 3}
            patched = write.patch(f"/api/sessions/{mine}", json={"consumption_offsets": offsets})
            assert patched.status_code == 200, patched.text
        settings = Settings(data_dir=tmp / "data", redis_url=redis_url, prefix=prefix)
        log = open_log(settings, create=False)
        try:
            applied = log.end(0)
            events = [
                OffsetCommitted(
                    session_id=mine,
                    consumer="backfill",
                    offset=n,
                    event_id=event_id,
                    recorded_at=utcnow(),
                )
                for n, event_id in enumerate(new_event_ids(BEHIND))
            ]
            Writer(log).append(events)
            end = log.end(0)
        finally:
            log.close()
        assert applied is not None and end is not None
        stream = str(tmp / "stream")
        yield Site(url, secrets, mine, theirs.json()["id"], end.token(), applied.token(), stream)
    finally:
        stop_process(process)
        delete_prefix(redis_client, prefix)


def cells(page: Page, selector: str) -> list[list[str]]:
    rows = page.locator(f"{selector} tbody tr")
    return [
        [cell.strip() for cell in rows.nth(i).locator("td").all_inner_texts()]
        for i in range(rows.count())
    ]


def test_the_page_in_a_browser(site: Site) -> None:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: .ci/run installs it (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page()
            dialogs: list[str] = []

            def no_dialogs(dialog: Dialog) -> None:
                dialogs.append(f"{dialog.type}: {dialog.message}")
                dialog.dismiss()

            page.on("dialog", no_dialogs)
            response = page.goto(site.url + "/")
            assert response is not None and response.status == 401
            assert page.locator("form#login").is_visible()
            assert page.locator("#partitions").count() == 0

            page.fill("input[name=token]", "not-a-token")
            page.click("form#login button")
            assert page.locator("#login-error").inner_text() == "Unknown token."

            page.fill("input[name=token]", site.tokens["read"])
            page.click("form#login button")
            page.wait_for_selector("#partitions")
            cookie = {c["name"]: c for c in page.context.cookies()}["tracker_token"]
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            assert cells(page, "#partitions") == [["0", site.end, site.applied, str(BEHIND)]]
            assert page.locator("#total-lag").inner_text() == str(BEHIND)

            page.fill("input[name=session]", site.mine)
            page.click("form#lookup button")
            page.wait_for_selector("#offsets")
            assert page.url.endswith(f"/?session={site.mine}")
            assert cells(page, "#offsets") == [["client", "7"], ["notifier", "3"]]
            assert TITLE in page.locator("#session").inner_text()

            reasons = page.locator("#dead-letters td.reason").all_inner_texts()
            assert reasons == ["offset: Object missing required field", SCRIPT]
            letters = cells(page, "#dead-letters")
            assert [row[1:4] for row in letters] == [
                ["notifier", site.stream, "0:1"],
                ["notifier", site.stream, "0:0"],
            ]
            assert page.locator("body script, body b").count() == 0

            assert dialogs == [], "a dead letter's reason ran as a script"

            deadline = time.monotonic() + 30  # until a sample after the events came in
            while str(BEHIND) not in (
                labels := page.locator("#lag-chart text").all_text_contents()
            ):
                assert time.monotonic() < deadline, f"the chart's labels stay {labels}"
                time.sleep(0.2)
                page.reload()
            assert "0" in labels and "now" in labels  # the y axis from 0; the x axis to now
            points = page.get_attribute("#lag-chart polyline.total", "points")
            assert points is not None and len(points.split()) >= 2

            page.click("text=Log out")
            page.wait_for_selector("form#login")
            page.evaluate("alert('probe')")  # the handler does see a dialog
            assert dialogs == ["alert: probe"]
        finally:
            browser.close()


def test_no_token_gets_only_the_login_form(site: Site) -> None:
    with site.client() as anonymous:
        response = anonymous.get("/", params={"session": site.mine})
        assert response.status_code == 401
        assert response.headers["content-type"].startswith("text/html")
        assert 'id="login"' in response.text
        assert site.mine not in response.text and "partitions" not in response.text
        refused = anonymous.post("/login", data={"token": "nope"})
        assert refused.status_code == 401 and "Unknown token." in refused.text


def test_the_cookie_opens_the_page_but_not_the_json_api(site: Site) -> None:
    with site.client() as browser:
        login = browser.post("/login", data={"token": site.tokens["read"]})
        assert login.status_code == 303 and login.headers["location"] == "/"
        set_cookie = login.headers["set-cookie"].lower()
        assert "httponly" in set_cookie and "samesite=strict" in set_cookie
        assert browser.get("/").status_code == 200
        assert browser.get(f"/api/sessions/{site.mine}").status_code == 401


def test_a_bound_token_finds_only_its_users_sessions(site: Site) -> None:
    with site.client("user-read") as bound:
        own = bound.get("/", params={"session": site.mine})
        assert own.status_code == 200 and 'id="offsets"' in own.text
        other = bound.get("/", params={"session": site.theirs})
        assert other.status_code == 404 and "Session not found" in other.text
        assert OTHER not in other.text and 'id="offsets"' not in other.text
    with site.client("read") as unbound:
        other = unbound.get("/", params={"session": site.theirs})
        assert other.status_code == 200 and OTHER in other.text


def test_user_text_is_escaped(site: Site) -> None:
    with site.client("read") as client:
        html = client.get("/", params={"session": site.mine}).text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and SCRIPT not in html
    assert "&lt;b&gt;not bold&lt;/b&gt; &amp; co" in html and "<b>" not in html
    with site.client("read") as client:
        odd = client.get("/", params={"session": '"><script>alert(2)</script>'})
    assert odd.status_code == 422 and "<script>alert(2)" not in odd.text


def test_dlq_places_are_parsed_or_refused() -> None:
    env = {"TRACKER_API_DLQ": "dir:/a/dlq, kafka:events.dlq,kafka:broker:9092/x.dlq"}
    places = parse_sources(env, "k:9092")
    assert [(s.kind, s.where, s.bootstrap) for s in places] == [
        ("dir", "/a/dlq", None),
        ("kafka", "events.dlq", "k:9092"),
        ("kafka", "x.dlq", "broker:9092"),
    ]
    for bad in ["/a/dlq", "kafka:", "kafka:bad topic", "file:/x"]:
        with pytest.raises(ConfigError, match="TRACKER_API_DLQ"):
            parse_sources({"TRACKER_API_DLQ": bad}, "k:9092")
    with pytest.raises(ConfigError, match="TRACKER_KAFKA_BOOTSTRAP"):
        parse_sources({"TRACKER_API_DLQ": "kafka:events.dlq"}, None)


def test_dead_letters_of_a_kafka_topic(kafka_bootstrap: str, kafka_topic: str) -> None:
    """The last 20 of a Kafka dead-letter topic, as a worker's stream writes them, with the
    time Kafka recorded."""
    ensure_topic(kafka_bootstrap, kafka_topic, 1, timeout=30)
    stream = KafkaStream(kafka_bootstrap, kafka_topic, "notifier")
    before = datetime.now(UTC) - timedelta(seconds=5)
    try:
        for first in (0, 15):
            letters = [DeadLetter(0, n, None, b"x", [], f"reason {n}") for n in range(first, 25)]
            stream.dead_letter(letters[:15], "notifier")
    finally:
        stream.close()
    dlq = f"{kafka_topic}.dlq"
    try:
        places = parse_sources({"TRACKER_API_DLQ": f"kafka:{dlq}"}, kafka_bootstrap)
        shown, problems = recent(places)
        assert problems == []
        assert [d.reason for d in shown] == [f"reason {n}" for n in range(24, 4, -1)]
        assert {(d.consumer, d.stream, d.source) for d in shown} == {
            ("notifier", kafka_topic, f"kafka:{dlq}")
        }
        assert shown[0].position == "0:24"
        assert all(d.time is not None and d.time > before for d in shown)
    finally:
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        try:
            admin.delete_topics([dlq], raise_errors=False)
        finally:
            admin.close()
