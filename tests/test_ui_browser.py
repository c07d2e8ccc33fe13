"""The /ui download manager in real headless Chromium against a real longdl app.

One browser serves the whole module (its event loop is module-scoped, so the app
servers here run on that loop too, through aiohttp's ``TestServer``). Each test gets a
fresh browser context (empty localStorage) and a fresh app on a free port. Screenshots
of the main states land in ``tests/output/`` for review.
"""

from __future__ import annotations

import asyncio
import io
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import require_tool, test_settings
from playwright.async_api import Browser, Locator, Page, async_playwright, expect

from longdl.app import create_app
from longdl.engine import Artifact, JobContext
from longdl.handlers import download
from longdl.models import JobStatus
from longdl.seed import demo_content, seed
from longdl.web import keys

pytestmark = pytest.mark.asyncio(loop_scope="module")

OUTPUT_DIR = Path(__file__).parent / "output"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
#: Generous for a loaded 2-core machine; the jobs themselves take a second or two.
UI_TIMEOUT_MS = 20_000
SEEDED = (70000, 70007, 70014, 70021)

expect.set_options(timeout=UI_TIMEOUT_MS)

# Records every value each card's progress bar takes, before the page's own scripts run.
RECORD_PROGRESS = """
window.__progress = {};
new MutationObserver((records) => {
  for (const record of records) {
    const bar = record.target;
    const card = bar.closest && bar.closest("li.card");
    if (!card || bar.tagName !== "PROGRESS" || !bar.hasAttribute("value")) continue;
    (window.__progress[card.dataset.jobId] ||= []).push(Number(bar.getAttribute("value")));
  }
}).observe(document, { subtree: true, attributes: true, attributeFilter: ["value"] });
"""


class Gate:
    """Wraps the real download handler so a test decides when jobs may finish."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.opened.set()

    def close(self) -> None:
        self.opened.clear()

    def open(self) -> None:
        self.opened.set()

    async def handler(self, ctx: JobContext) -> Artifact:
        if not self.opened.is_set():
            ctx.report(percent=5, message="Waiting for upstream")
            await self.opened.wait()
        return await download.run(ctx)


@dataclass
class Service:
    """A running longdl app and what the test needs to steer it."""

    server: TestServer
    gate: Gate

    @property
    def app(self) -> web.Application:
        return self.server.app  # type: ignore[return-value]

    @property
    def origin(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def ui_url(self) -> str:
        return str(self.server.make_url("/ui"))


@dataclass
class Tab:
    """A page of the UI with what it requested and any script errors."""

    page: Page
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser() -> AsyncIterator[Browser]:
    chromium = require_tool("chromium")
    OUTPUT_DIR.mkdir(exist_ok=True)
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


@pytest_asyncio.fixture(loop_scope="module")
async def start_service(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Service]]]:
    """Start a real longdl app on a free port; keyword arguments override settings."""
    servers: list[TestServer] = []

    async def start(**overrides: Any) -> Service:
        gate = Gate()
        settings = test_settings(tmp_path / f"data{len(servers)}", **overrides)
        app = create_app(settings, handlers={"download": gate.handler})
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        await seed(app[keys.STORAGE], SEEDED)
        return Service(server, gate)

    yield start
    for server in servers:
        await server.close()


@pytest_asyncio.fixture(loop_scope="module")
async def service(start_service: Callable[..., Awaitable[Service]]) -> Service:
    """An app whose jobs finish as soon as the test opens the gate (open by default)."""
    return await start_service()


@pytest_asyncio.fixture(loop_scope="module")
async def open_tab(browser: Browser) -> AsyncIterator[Callable[[Service], Awaitable[Tab]]]:
    """Open the UI of a service in a fresh browser context."""
    contexts = []

    async def open_(service: Service) -> Tab:
        context = await browser.new_context(
            accept_downloads=True, viewport={"width": 960, "height": 900}
        )
        contexts.append(context)
        await context.add_init_script(RECORD_PROGRESS)
        page = await context.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        tab = Tab(page)
        page.on("request", lambda request: tab.requests.append(request.url))
        page.on("pageerror", lambda error: tab.errors.append(str(error)))
        page.on(
            "console",
            lambda message: tab.errors.append(message.text) if message.type == "error" else None,
        )
        await page.goto(service.ui_url)
        await expect(page.locator("html[data-ready=true]")).to_be_attached()
        return tab

    yield open_
    for context in contexts:
        await context.close()


def cards(page: Page) -> Locator:
    return page.locator("#jobs > li.card")


def card(page: Page, job_id: str) -> Locator:
    return page.locator(f'#jobs > li.card[data-job-id="{job_id}"]')


async def start_job(page: Page, file_ids: str) -> str:
    """Type ids, press Start, and return the new card's job id."""
    before = await cards(page).count()
    await page.get_by_label("File ids").fill(file_ids)
    await page.get_by_role("button", name="Start").click()
    await expect(cards(page)).to_have_count(before + 1)
    job_id = await cards(page).first.get_attribute("data-job-id")
    assert job_id is not None
    return job_id


async def job_status(service: Service, job_id: str) -> JobStatus | None:
    job = await service.app[keys.ENGINE].get(job_id)
    return None if job is None else job.status


async def screenshot(page: Page, name: str) -> None:
    await page.screenshot(
        path=str(OUTPUT_DIR / f"ui-{name}.png"), full_page=True, animations="disabled"
    )


def zip_members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


# --- tests -----------------------------------------------------------------------------


async def test_two_jobs_progress_and_download_their_files(
    start_service: Callable[..., Awaitable[Service]],
    open_tab: Callable[[Service], Awaitable[Tab]],
) -> None:
    """Two jobs run at once, both bars move and each Download link gets its files' ZIP."""
    service = await start_service(
        download_delay_enabled=True, download_delay_min_ms=1000, download_delay_max_ms=1500
    )
    tab = await open_tab(service)
    page = tab.page
    first = await start_job(page, "70000 70007")
    second = await start_job(page, "70014, 70021")
    await expect(card(page, second).locator(".message")).to_contain_text("Resolving")
    await screenshot(page, "running")

    for job_id in (first, second):
        await expect(card(page, job_id).get_by_role("link", name="Download")).to_be_visible()
    await screenshot(page, "completed")

    progress: dict[str, list[float]] = await page.evaluate("window.__progress")
    for job_id in (first, second):
        assert [] != [v for v in progress[job_id] if 0 < v < 100], progress[job_id]
        assert 100 == progress[job_id][-1]
    downloaded = {}
    for job_id in (first, second):
        async with page.expect_download() as info:
            await card(page, job_id).get_by_role("link", name="Download").click()
        path = await (await info.value).path()
        downloaded[job_id] = zip_members(await asyncio.to_thread(Path(path).read_bytes))
    assert {"70000.zip": demo_content(70000), "70007.zip": demo_content(70007)} == downloaded[first]
    assert {"70014.zip": demo_content(70014), "70021.zip": demo_content(70021)} == downloaded[
        second
    ]


async def test_reload_mid_job_resumes_the_card(
    service: Service, open_tab: Callable[[Service], Awaitable[Tab]]
) -> None:
    """After a reload the running job's card comes back from localStorage and completes."""
    service.gate.close()
    page = (await open_tab(service)).page
    job_id = await start_job(page, "70000 70007")
    await expect(card(page, job_id).locator(".message")).to_have_text("Waiting for upstream")

    await page.reload()
    resumed = card(page, job_id)
    await expect(resumed.locator(".message")).to_have_text("Waiting for upstream")
    await expect(resumed.locator(".badge")).to_have_text("Preparing")
    await screenshot(page, "resumed")
    service.gate.open()
    await expect(resumed.get_by_role("link", name="Download")).to_be_visible()
    assert 1 == await cards(page).count()


async def test_cancel_shows_the_job_canceled(
    service: Service, open_tab: Callable[[Service], Awaitable[Tab]]
) -> None:
    """Cancel on a running job's card cancels it on the server and the card says so."""
    service.gate.close()
    page = (await open_tab(service)).page
    job_id = await start_job(page, "70000")
    job_card = card(page, job_id)
    await expect(job_card.locator(".message")).to_have_text("Waiting for upstream")

    await job_card.get_by_role("button", name="Cancel").click()
    await expect(job_card.locator(".badge")).to_have_text("Canceled")
    await screenshot(page, "canceled")
    assert JobStatus.CANCELED == await job_status(service, job_id)
    await expect(job_card.get_by_role("button", name="Cancel")).to_be_hidden()
    service.gate.open()


async def test_failed_job_shows_its_reason_and_retry_starts_a_new_job(
    service: Service, open_tab: Callable[[Service], Awaitable[Tab]]
) -> None:
    """A job for a missing file shows why it failed; Retry runs a new job that succeeds."""
    page = (await open_tab(service)).page
    failed_id = await start_job(page, "70001")
    failed_card = card(page, failed_id)
    await expect(failed_card.locator(".badge")).to_have_text("Failed")
    await expect(failed_card.locator(".reason")).to_have_text(
        "None of the requested files exist: 70001"
    )
    await screenshot(page, "failed")

    await seed(service.app[keys.STORAGE], [70001])
    await failed_card.get_by_role("button", name="Retry").click()
    await expect(failed_card).to_have_count(0)
    retried_id = await cards(page).first.get_attribute("data-job-id")
    assert retried_id is not None and failed_id != retried_id
    await expect(card(page, retried_id).get_by_role("link", name="Download")).to_be_visible()


async def test_page_recovers_from_a_network_cut(
    start_service: Callable[..., Awaitable[Service]],
    open_tab: Callable[[Service], Awaitable[Tab]],
) -> None:
    """With the network cut the card says it is reconnecting; once back, the job completes."""
    # Streams end every second here, as they would when a connection dies, so the page
    # has to reconnect while the browser is offline.
    service = await start_service(sse_max_s=1.0)
    service.gate.close()
    page = (await open_tab(service)).page
    job_id = await start_job(page, "70000 70007")
    job_card = card(page, job_id)
    await expect(job_card.locator(".message")).to_have_text("Waiting for upstream")

    await page.context.set_offline(True)
    await expect(job_card.locator(".connection")).to_be_visible()
    await screenshot(page, "reconnecting")
    service.gate.open()
    await page.context.set_offline(False)
    await expect(job_card.get_by_role("link", name="Download")).to_be_visible()
    await expect(job_card.locator(".connection")).to_be_hidden()


async def test_invalid_ids_are_explained_without_calling_the_service(
    service: Service, open_tab: Callable[[Service], Awaitable[Tab]]
) -> None:
    """Malformed or out-of-range ids get a clear message and start nothing."""
    tab = await open_tab(service)
    page = tab.page
    await page.get_by_label("File ids").fill("70000 abc 5")
    await page.get_by_role("button", name="Start").click()
    error = page.get_by_role("alert")
    await expect(error).to_contain_text("“abc” is not a file id")
    await expect(error).to_contain_text("5 is out of range")
    await expect(page.get_by_label("File ids")).to_have_attribute("aria-invalid", "true")
    await screenshot(page, "invalid")
    assert 0 == await cards(page).count()
    assert [] == [url for url in tab.requests if "/v1/download/initiate" in url]


async def test_page_talks_to_nothing_but_the_app_and_has_no_script_errors(
    service: Service, open_tab: Callable[[Service], Awaitable[Tab]]
) -> None:
    """Loading the page and running a job requests only the app's origin, without errors."""
    tab = await open_tab(service)
    job_id = await start_job(tab.page, "70000 70014")
    await expect(card(tab.page, job_id).get_by_role("link", name="Download")).to_be_visible()
    origins = {url.split("/")[0] + "//" + url.split("/")[2] for url in tab.requests}
    assert {service.origin} == origins
    assert [] == tab.errors


async def test_many_jobs_at_once_leave_the_page_responsive(
    start_service: Callable[..., Awaitable[Service]],
    open_tab: Callable[[Service], Awaitable[Tab]],
) -> None:
    """Seven running jobs do not use up the browser's connections: Cancel still goes through."""
    service = await start_service(worker_concurrency=8)
    service.gate.close()
    page = (await open_tab(service)).page
    job_ids = [await start_job(page, str(file_id)) for file_id in (*SEEDED, *SEEDED[:3])]
    for job_id in job_ids:
        await expect(card(page, job_id).locator(".message")).to_have_text("Waiting for upstream")
    await screenshot(page, "many")

    await card(page, job_ids[0]).get_by_role("button", name="Cancel").click()
    await expect(card(page, job_ids[0]).locator(".badge")).to_have_text("Canceled")
    service.gate.open()
    for job_id in job_ids[1:]:
        await expect(card(page, job_id).get_by_role("link", name="Download")).to_be_visible()


async def test_keyboard_alone_starts_and_cancels_and_changes_are_announced(
    service: Service, open_tab: Callable[[Service], Awaitable[Tab]]
) -> None:
    """Keys alone start and cancel a job; the live region says so and focus stays on the card."""
    service.gate.close()
    page = (await open_tab(service)).page
    await page.keyboard.press("Tab")  # the skip link comes first
    await page.keyboard.press("Tab")
    await expect(page.get_by_label("File ids")).to_be_focused()
    await page.keyboard.type("70000")
    await page.keyboard.press("Enter")
    job_card = cards(page).first
    await expect(job_card.locator(".message")).to_have_text("Waiting for upstream")

    cancel = job_card.get_by_role("button", name="Cancel")
    for _ in range(10):  # from the form, a few Tab presses reach the card's button
        await page.keyboard.press("Tab")
        if await cancel.evaluate("button => button === document.activeElement"):
            break
    await expect(cancel).to_be_focused()
    await page.keyboard.press("Enter")
    await expect(job_card.locator(".badge")).to_have_text("Canceled")
    await expect(page.locator("[aria-live=polite]")).to_have_text("File 70000 was canceled.")
    await expect(job_card.get_by_role("button", name="Retry")).to_be_focused()
    service.gate.open()


async def test_docs_render_offline_under_their_csp(browser: Browser, service: Service) -> None:
    """/docs shows every operation, asks nothing of the network but the app, and no script
    error or CSP violation occurs."""
    context = await browser.new_context(viewport={"width": 1200, "height": 900})
    page = await context.new_page()
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    try:
        await page.goto(f"{service.origin}/docs")
        for path in ("/v1/download/initiate", "/v1/download/status/{job_id}", "/health"):
            await expect(page.get_by_text(path, exact=True).first).to_be_visible()
        await screenshot(page, "docs")
    finally:
        await context.close()
    assert [] == [url for url in requests if not url.startswith(service.origin)]
    assert [] == errors


async def test_api_key_is_asked_for_then_used_for_everything(
    start_service: Callable[..., Awaitable[Service]],
    open_tab: Callable[[Service], Awaitable[Tab]],
) -> None:
    """With API_KEYS set, a 401 brings up the key form; with the key saved the page
    starts, follows (across a reload) and downloads a job, and the key is in no URL."""
    service = await start_service(api_keys=["ui:key-4f2a9"])
    service.gate.close()
    tab = await open_tab(service)
    page = tab.page
    await page.get_by_label("File ids").fill("70000 70007")
    await page.get_by_role("button", name="Start").click()
    await expect(page.get_by_role("heading", name="API key needed")).to_be_visible()
    await screenshot(page, "api-key")
    assert 0 == await cards(page).count()

    await page.get_by_role("textbox", name="API key").fill("key-4f2a9")
    await page.get_by_role("button", name="Save key").click()
    await expect(page.locator("#key-panel")).to_be_hidden()
    job_id = await start_job(page, "70000 70007")
    await expect(card(page, job_id).locator(".message")).to_have_text("Waiting for upstream")
    await page.reload()
    service.gate.open()
    download = card(page, job_id).get_by_role("link", name="Download")
    await expect(download).to_be_visible()
    async with page.expect_download() as info:
        await download.click()
    path = await (await info.value).path()
    members = zip_members(await asyncio.to_thread(Path(path).read_bytes))

    assert {"70000.zip": demo_content(70000), "70007.zip": demo_content(70007)} == members
    assert [] == [url for url in tab.requests if "key-4f2a9" in url]
