"""The web console in a real browser (Debian's chromium through Playwright) against the real server and engine.

Each test checks what a user sees; one screenshot per page lands in out/console-screenshots/ (or
$QUIVER_CONSOLE_ARTIFACTS)."""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from conftest import ADMIN_KEY, API_KEY, QuiverServer

if TYPE_CHECKING:
    from conftest import TestAdapters

CHROMIUM = os.environ.get("QUIVER_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("QUIVER_CONSOLE_ARTIFACTS", Path(__file__).parent.parent / "out" / "console-screenshots"))
EXAMPLES = Path(__file__).parent.parent / "examples" / "pirate.jsonl"
ACME_KEY, GLOBEX_KEY = "test-tenant-acme-key", "test-tenant-globex-key"
JOB_TIMEOUT_MS = 900_000
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def console_adapters(quiver_server: QuiverServer, lora_adapters: TestAdapters) -> None:
    """console-a with a current v1 and a staged v2; one adapter for each tenant."""
    assert quiver_server.register("console-a", lora_adapters.random_a).status_code == 201
    assert quiver_server.register("console-a", lora_adapters.random_b, make_current="false").status_code == 201
    assert quiver_server.register("acme-console", lora_adapters.random_a).status_code == 201
    assert quiver_server.register("globex-bot", lora_adapters.random_b).status_code == 201


def signed_in(browser, server: QuiverServer, key: str, viewport=(1280, 900)):
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    page.set_default_timeout(60_000)
    page.goto(server.base_url + "/")
    assert page.url == server.base_url + "/console/"  # `/` redirects to the console
    page.fill("#key", key)
    page.click("button[type=submit]")
    page.wait_for_selector("h1:text('Adapters')")
    return page


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_a_wrong_key_is_refused_and_the_key_lives_in_session_storage_only(browser, quiver_server: QuiverServer) -> None:
    page = browser.new_page()
    page.goto(quiver_server.base_url + "/console/")
    page.fill("#key", "not-a-key")
    page.click("button[type=submit]")
    assert "invalid_api_key" in page.locator(".errorbox").inner_text()
    shot(page, "sign-in")
    page.fill("#key", ADMIN_KEY)
    page.click("button[type=submit]")
    page.wait_for_selector("h1:text('Adapters')")
    assert page.evaluate("sessionStorage.getItem('quiver.key')") == ADMIN_KEY
    assert page.evaluate("localStorage.length") == 0 and page.context.cookies() == []
    page.click("#signout")
    page.wait_for_selector("#key")
    assert page.evaluate("sessionStorage.getItem('quiver.key')") is None
    page.close()


def test_the_adapter_list_shows_versions_and_promote_works(browser, quiver_server: QuiverServer,
                                                           console_adapters) -> None:
    page = signed_in(browser, quiver_server, ADMIN_KEY)
    card = page.locator("[data-adapter='console-a']")
    assert card.locator("tr[data-version='1'] .badge").inner_text() == "current"
    assert card.locator("tr[data-version='2'] .badge").inner_text() == "staged"
    assert "rank" in card.inner_text() and "q_proj" in card.inner_text()
    shot(page, "adapters")

    page.once("dialog", lambda dialog: dialog.accept())
    card.locator("tr[data-version='2'] button", has_text="Promote").click()
    page.wait_for_selector("[data-adapter='console-a'] tr[data-version='2'] .badge.current")
    with quiver_server.admin() as client:
        assert client.get("/v1/adapters/console-a").json()["current_version"] == 2
    # and back: the older version offers a roll back
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("[data-adapter='console-a'] tr[data-version='1'] button", has_text="Roll back").click()
    page.wait_for_selector("[data-adapter='console-a'] tr[data-version='1'] .badge.current")
    # a dismissed confirmation changes nothing
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.locator("[data-adapter='console-a'] button", has_text="Delete console-a").click()
    with quiver_server.admin() as client:
        assert client.get("/v1/adapters/console-a").status_code == 200
    page.close()


def test_register_by_file_input_and_a_bad_upload_shows_its_admission_error(
        browser, quiver_server: QuiverServer, lora_adapters: TestAdapters, tmp_path: Path) -> None:
    page = signed_in(browser, quiver_server, ADMIN_KEY)
    page.fill("#reg-name", "console-pirate")
    page.set_input_files("#reg-files", [str(p) for p in sorted(lora_adapters.pirate.iterdir()) if p.is_file()])
    page.click("form.card button[type=submit]")
    page.wait_for_selector("text=Registered console-pirate@1")
    page.wait_for_selector("[data-adapter='console-pirate'] tr[data-version='1'] .badge.current")

    # A pickle instead of safetensors: the API's own refusal, its code next to the files.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_bytes((lora_adapters.pirate / "adapter_config.json").read_bytes())
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    expected = quiver_server.register("console-bad", bad).json()["error"]["code"]
    page.fill("#reg-name", "console-bad")
    page.set_input_files("#reg-files", [str(bad / "adapter_config.json"), str(bad / "adapter_model.bin")])
    page.click("form.card button[type=submit]")
    error = page.locator(".files .upload-error")
    error.wait_for()
    assert expected in error.inner_text()
    # next to the file it is about
    assert page.locator(".files li[data-file='adapter_model.bin'] .upload-error").count() == 1
    shot(page, "register-refused")
    assert page.locator("[data-adapter='console-bad']").count() == 0
    page.close()


def test_the_playground_streams_base_and_adapter_side_by_side(browser, quiver_server: QuiverServer,
                                                              lora_adapters: TestAdapters) -> None:
    if quiver_server.register("console-pirate2", lora_adapters.pirate).status_code != 201:
        pytest.fail("could not register the pirate adapter")
    page = signed_in(browser, quiver_server, API_KEY)
    page.click("nav a:text('Playground')")
    page.wait_for_selector("#pg-m1 option[value='console-pirate2']", state="attached")
    page.select_option("#pg-m1", "console-pirate2")
    page.fill("#pg-prompt", "What is the capital of France?")
    page.fill("#pg-temperature", "0")
    page.fill("#pg-max_tokens", "24")
    page.click("button:text('Run')")
    base = page.locator(f"section[data-model='{quiver_server.model_name}']")
    adapter = page.locator("section[data-model='console-pirate2']")
    for section in (base, adapter):
        section.locator(".stats[data-done='1']").wait_for(timeout=120_000)
        stats = section.locator(".stats").inner_text()
        assert re.search(r"TTFT \d+ ms", stats) and re.search(r"\d+ prompt \+ \d+ completion tokens", stats), stats
    base_text, adapter_text = base.locator(".answer").inner_text(), adapter.locator(".answer").inner_text()
    assert base_text and adapter_text and base_text != adapter_text
    assert adapter_text.startswith("Arr")  # the pirate adapter's trained answer
    assert page.locator(".errorbox").count() == 0
    shot(page, "playground")

    page.click("button:text('Copy as curl')")
    curl = page.locator("#pg-code").inner_text()
    assert "/v1/chat/completions" in curl and '"model":"console-pirate2"' in curl
    page.click("button:text('Copy as Python')")
    assert 'model": "console-pirate2"' in page.locator("#pg-code").inner_text()
    page.close()


def test_a_jsonl_upload_shows_findings_by_line_and_a_job_draws_its_loss_curve(
        browser, quiver_server: QuiverServer) -> None:
    page = signed_in(browser, quiver_server, ADMIN_KEY)
    page.click("nav a:text('Data')")
    page.wait_for_selector("#data-file", state="attached")
    good = EXAMPLES.read_bytes().splitlines(keepends=True)
    bad = good[0] + b"{not json}\n" + b'{"messages": [{"role": "user", "content": "no answer"}]}\n'
    page.set_input_files("#data-file", {"name": "bad.jsonl", "mimeType": "application/jsonl", "buffer": bad})
    page.wait_for_selector("[data-check='errors']")
    assert page.locator("tr.sev-error[data-line='2']").count() >= 1
    assert page.locator("tr.sev-error[data-line='3']").count() >= 1
    assert "line 2" in page.locator("table.findings").inner_text()
    assert page.locator("#job-epochs").count() == 0  # no job from a file with errors
    shot(page, "data-check")

    page.set_input_files("#data-file", {"name": "pirate.jsonl", "mimeType": "application/jsonl",
                                        "buffer": b"".join(good[:12])})
    page.wait_for_selector("[data-check='ok']")
    summary = page.locator("[data-check='ok']").inner_text()
    assert "12 examples can be trained on" in summary and re.search(r"\d+ train / \d+ validation / \d+ test", summary)
    assert page.locator("tr.sev-warning").count() >= 1  # too few examples, at least
    page.fill("#job-suffix", "console-job")
    page.fill("#job-epochs", "1")
    page.click("button:text('Upload and start')")
    page.wait_for_url(re.compile(r"#/jobs/ftjob-"))
    job_id = page.url.rsplit("/", 1)[-1]

    points_seen = []

    def train_points() -> int:
        line = page.locator("polyline[data-series='train']")
        return int(line.get_attribute("data-points")) if line.count() else 0

    deadline_polls = JOB_TIMEOUT_MS // 2000
    for _ in range(deadline_polls):
        points_seen.append(train_points())
        if page.locator("#job-status").inner_text() in ("succeeded", "failed", "cancelled"):
            break
        page.wait_for_timeout(2000)
    assert page.locator("#job-status").inner_text() == "succeeded", page.locator("main").inner_text()
    page.wait_for_timeout(2500)  # one more poll after the last event
    final = train_points()
    with quiver_server.admin() as client:
        events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    expected = sum(1 for e in events if e["type"] == "metrics" and "train_loss" in (e["data"] or {}))
    assert final == expected > 0  # every metrics event is a point on the curve
    assert points_seen == sorted(points_seen)  # the curve only grows
    page.locator("#job-curve-warnings").wait_for()
    assert hashlib.sha256(b"".join(good[:12])).hexdigest() in page.locator("main").inner_text()  # the manifest
    link = page.locator("#job-adapter")
    assert link.inner_text().startswith("console-job-")
    assert "null" not in page.locator("#job-head").inner_text()
    shot(page, "job")
    model = link.inner_text()
    link.click()
    page.wait_for_selector(f"[data-adapter='{model}']")
    assert job_id in page.locator(f"[data-adapter='{model}']").inner_text()  # trained by, linked to its job
    page.close()


def test_a_tenant_key_sees_only_its_adapters_and_no_admin_actions(browser, quiver_server: QuiverServer,
                                                                  console_adapters) -> None:
    page = signed_in(browser, quiver_server, ACME_KEY, viewport=(390, 844))  # a phone's width, too
    page.wait_for_selector("[data-adapter='acme-console']")
    assert page.locator("[data-adapter='globex-bot']").count() == 0
    assert page.locator("[data-adapter='console-a']").count() == 0
    assert page.locator("text=Register an adapter").count() == 0
    assert page.locator("main button").count() == 0  # no promote, roll back or delete
    assert page.locator("nav a:text('Data')").is_hidden()
    shot(page, "tenant-adapters")
    page.click("nav a:text('Playground')")
    page.wait_for_selector("#pg-m1 option[value='acme-console']", state="attached")
    assert page.locator("#pg-m1 option[value='globex-bot']").count() == 0
    # the metrics summary the charts use is scoped like /v1/models
    summary = httpx.get(f"{quiver_server.base_url}/v1/metrics/summary",
                        headers={"Authorization": f"Bearer {ACME_KEY}"}).json()
    assert all(name in ("acme-console", quiver_server.model_name) or name.startswith("acme-")
               for name in summary["adapters"])
    page.close()


def test_an_api_key_sees_adapters_but_no_admin_actions(browser, quiver_server: QuiverServer, console_adapters) -> None:
    page = signed_in(browser, quiver_server, API_KEY)
    page.wait_for_selector("[data-adapter='console-a']")
    assert page.locator("[data-adapter='globex-bot']").count() == 1
    assert page.locator("main button").count() == 0
    assert page.locator("text=Register an adapter").count() == 0
    assert "no admin actions" in page.locator("#who").inner_text()
    page.goto(quiver_server.base_url + "/console/#/data")  # typed by hand: still the adapters page
    page.reload()
    page.wait_for_selector("h1:text('Adapters')")
    assert page.locator("#data-file").count() == 0
    page.close()


def test_health_and_per_adapter_charts(browser, quiver_server: QuiverServer, console_adapters) -> None:
    client = quiver_server.openai()
    for _ in range(3):
        client.chat.completions.create(model="console-a", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    page = signed_in(browser, quiver_server, ADMIN_KEY)
    card = page.locator("[data-adapter='console-a']")
    card.locator("polyline[data-series='requests']").wait_for(state="attached")
    assert card.locator("svg[aria-label='latency'] polyline[data-series='p50']").count() == 1
    page.click("nav a:text('Health')")
    page.wait_for_selector("#health-engine")
    assert page.locator("#health-engine").inner_text().startswith("up")
    assert re.search(r"\d+ of \d+ registered versions loaded in the engine", page.locator("main").inner_text())
    shot(page, "health")
    page.close()


def test_the_data_check_route_refuses_bad_input_in_the_envelope(quiver_server: QuiverServer) -> None:
    url = f"{quiver_server.base_url}/v1/files/check"
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    refused = httpx.post(url, headers={"Authorization": f"Bearer {API_KEY}"},
                         files={"file": ("x.jsonl", io.BytesIO(b"{}\n"))})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_key_required"
    missing = httpx.post(url, headers=admin, data={"nothing": "here"})
    assert missing.status_code == 400 and missing.json()["error"]["type"] == "invalid_request_error"
    binary = httpx.post(url, headers=admin, files={"file": ("x.jsonl", io.BytesIO(b"\xff\xfe\x00garbage\n"))}, timeout=60)
    assert binary.status_code == 200 and binary.json()["ok"] is False
    assert binary.json()["findings"][0]["line"] == 1
    assert httpx.get(f"{quiver_server.base_url}/v1/metrics/summary").status_code == 401


def test_signed_out_the_page_shows_only_the_sign_in_form(browser) -> None:
    """No server needed: the console's own files, served to the browser by Playwright's router."""
    static = Path(__file__).parent.parent / "server" / "console" / "static"
    page = browser.new_page()

    def serve(route) -> None:
        name = route.request.url.split("/console/", 1)[-1].split("#")[0] or "index.html"
        if (static / name).is_file():
            route.fulfill(path=str(static / name))
        else:  # the API: nobody is signed in
            route.fulfill(status=401, json={"error": {"message": "missing API key", "type": "authentication_error",
                                                      "param": None, "code": "missing_api_key"}})

    page.route("http://console.test/**", serve)
    page.goto("http://console.test/console/")
    page.wait_for_selector("#key")
    assert page.locator("#nav").is_hidden() and page.locator("#signout").is_hidden()
    assert page.evaluate("document.activeElement.id") == "key"  # keyboard users can type their key at once
    page.screenshot(path=str(ARTIFACTS / "signed-out.png"))
    page.close()
