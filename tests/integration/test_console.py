"""The web console in a real browser: Debian's headless Chromium driven by Selenium (Debian's
chromedriver, no browser download), against a replica serving `--console-listen` on loopback
in a federation of five daemons. Screenshots of each view go to docs/console/ when
GPUFED_CONSOLE_SCREENSHOTS=1 (docs/console.md shows them)."""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpufed.client import Client
from gpufed.v1 import lease_pb2, reservation_pb2
from tests.harness import ADMIN_TOKEN, EtcdCluster, unique_prefix, wait_until
from tests.integration.federation import NODES, Federation, start_federation

pytestmark = pytest.mark.integration
CHROMIUM = os.environ.get("CHROMIUM_BIN") or shutil.which("chromium") or ""
CHROMEDRIVER = os.environ.get("CHROMEDRIVER_BIN") or shutil.which("chromedriver") or ""
SHOTS = Path(__file__).parents[2] / "docs" / "console"

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a dev dependency (make setup)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402


@pytest.fixture(scope="module")
def console(etcd: EtcdCluster) -> Iterator[tuple[Federation, str]]:
    fed = start_federation(etcd, unique_prefix(), console_listen="127.0.0.1:0")
    try:
        replica = fed.replicas[0].replica
        assert replica is not None and replica.console is not None
        yield fed, replica.console.url
    finally:
        fed.stop()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """One headless Chromium for the module (starting one costs about a second)."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(
            "no chromium/chromedriver: `make setup` installs Debian's chromium and chromium-driver "
            "where it has root (scripts/ensure_chromium.sh), or set CHROMIUM_BIN and CHROMEDRIVER_BIN"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1400,900",
        "--disable-dev-shm-usage",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser(chromium: Any) -> Iterator[Any]:
    """The module's browser, signed out: each test starts without cookies."""
    chromium.delete_all_cookies()
    yield chromium
    chromium.delete_all_cookies()


def sign_in(driver: Any, url: str, token: str) -> None:
    driver.get(url + "/signin")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "signin").click()
    wait_until(lambda: "/signin" not in driver.current_url, timeout=10)


def table(driver: Any, table_id: str) -> list[list[str]]:
    """The body cells of a table, read in one script: polled tables are swapped every few
    seconds, so element-by-element reads could meet a replaced (stale) row."""
    rows = driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map("
        "r => Array.from(r.querySelectorAll('td')).map(td => td.innerText.trim()));",
        f"#{table_id} tbody tr",
    )
    return [[str(c) for c in r] for r in rows]


def state_of(driver: Any, row_id: str) -> str:
    """The state cell of a table row ("" while the row is not there)."""
    cells = driver.find_elements(By.CSS_SELECTOR, f"#{row_id} td.state")
    return str(cells[0].text) if cells else ""


def shot(driver: Any, name: str) -> None:
    if os.environ.get("GPUFED_CONSOLE_SCREENSHOTS"):
        SHOTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SHOTS / f"{name}.png"))


def cli_rows(fed: Federation, *args: str) -> list[list[str]]:
    """The table `gpufed ... ` prints (as CSV: the same cells, no column padding), header first."""
    env = {
        **os.environ,
        "GPUFED_ENDPOINT": fed.replicas[0].address,
        "GPUFED_TOKEN": fed.tenant_token,
        "GPUFED_CONFIG": "/nonexistent",
    }
    out = subprocess.run(
        [sys.executable, "-m", "gpufed", "-o", "csv", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return [row for row in csv.reader(io.StringIO(out.stdout)) if row]


def test_a_tenant_signs_in_and_its_token_is_an_httponly_strict_cookie_never_in_the_page(
    console: tuple[Federation, str], browser: Any
) -> None:
    fed, url = console
    browser.get(url + "/signin")
    shot(browser, "signin")
    sign_in(browser, url, fed.tenant_token)
    assert browser.current_url.endswith("/offers")
    cookie = browser.get_cookie("gpufed_session")
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    assert fed.tenant_token not in browser.page_source
    assert browser.execute_script("return document.cookie") == ""  # HttpOnly: no script sees it
    wait_until(lambda: len(table(browser, "offers-table")) > 1, timeout=10)
    shot(browser, "offers")
    browser.get(url + "/capacity")
    wait_until(lambda: len(table(browser, "capacity-table")) > 1, timeout=10)
    shot(browser, "capacity")


def test_the_capacity_map_colours_each_country_by_its_share_free_and_names_its_models(
    console: tuple[Federation, str], browser: Any
) -> None:
    fed, url = console
    sign_in(browser, url, fed.tenant_token)
    with fed.client() as c:
        held = c.create_lease(6, gpu_model="H200")  # nyc-1's eight: two left free
    try:
        browser.get(url + "/capacity")

        def country(code: str) -> tuple[str, str]:
            path = browser.find_element(By.CSS_SELECTOR, f'#capacity-map path[data-country="{code}"]')
            title = path.find_element(By.TAG_NAME, "title").get_attribute("textContent")
            return path.get_attribute("class"), title

        cls, title = country("DE")
        assert cls == "cap-4" and "8 of 8 GPUs free" in title and "NVIDIA H100 80GB HBM3: 8 / 8" in title
        cls, title = country("US")
        assert cls == "cap-2" and "2 of 8 GPUs free" in title  # a quarter free
        assert country("JP") == ("cap-none", "Japan (JP): no GPUs")
    finally:
        with fed.client() as c:
            c.release_lease(held.name)


def test_offers_for_a_filter_are_exactly_what_gpufed_offers_search_prints(
    console: tuple[Federation, str], browser: Any
) -> None:
    fed, url = console
    sign_in(browser, url, fed.tenant_token)
    browser.find_element(By.ID, "f-model").send_keys("H100")
    browser.find_element(By.ID, "f-countries").send_keys("DE,FI")
    browser.find_element(By.ID, "f-count").send_keys("4")
    browser.find_element(By.ID, "search").click()
    wait_until(lambda: "model=H100" in browser.current_url, timeout=10)
    page = wait_until_rows(browser, "offers-table")
    header = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#offers-table thead th")]
    assert [header, *page] == cli_rows(
        fed, "offers", "search", "--model", "H100", "--country", "DE,FI", "--count", "4"
    )
    assert page and all(r[5] in ("DE", "FI") for r in page)
    Select(browser.find_element(By.ID, "f-order")).select_by_visible_text("free")
    browser.find_element(By.ID, "search").click()
    wait_until(lambda: "order_by=free" in browser.current_url, timeout=10)
    assert (
        wait_until_rows(browser, "offers-table")
        == cli_rows(
            fed,
            "offers",
            "search",
            "--model",
            "H100",
            "--country",
            "DE,FI",
            "--count",
            "4",
            "--order-by",
            "free",
        )[1:]
    )


def wait_until_rows(driver: Any, table_id: str) -> list[list[str]]:
    found: list[list[str]] = []

    def ready() -> bool:
        found[:] = table(driver, table_id)
        return bool(found) and "no offers match" not in found[0][0]

    wait_until(ready, timeout=10)
    return found


def test_a_lease_created_from_the_page_goes_active_and_released_ends_live(
    console: tuple[Federation, str], browser: Any
) -> None:
    fed, url = console
    sign_in(browser, url, fed.tenant_token)
    browser.get(url + "/leases")
    browser.find_element(By.ID, "l-count").clear()
    browser.find_element(By.ID, "l-count").send_keys("2")
    browser.find_element(By.ID, "l-model").send_keys("A100")
    browser.find_element(By.ID, "lease-create-button").click()
    with fed.client() as c:
        wait_until(lambda: any(x.state == lease_pb2.LEASE_STATE_ACTIVE for x in c.list_leases()), timeout=10)
        lease = next(x for x in c.list_leases() if x.state == lease_pb2.LEASE_STATE_ACTIVE)
    lease_id = lease.name.removeprefix("leases/")

    def state() -> str:
        return state_of(browser, f"lease-{lease_id}")

    wait_until(lambda: state() == "ACTIVE", timeout=10)
    shot(browser, "leases")
    browser.find_element(By.ID, f"release-{lease_id}").click()
    wait_until(lambda: state().startswith("ENDED"), timeout=10)
    assert "RELEASED" in state()
    # Its usage record: the tenant's own, at the quoted price.
    browser.get(url + "/usage")
    wait_until(lambda: any(r[0] == lease.name for r in table(browser, "usage-table")), timeout=10)
    row = next(r for r in table(browser, "usage-table") if r[0] == lease.name)
    assert row[2] == "dev" and row[3] == "2" and row[6].endswith("USD") and row[7] == "RELEASED"
    shot(browser, "usage")
    browser.get(url + "/leases")
    # Ended from elsewhere (the SDK): the page shows it without a reload.
    with fed.client() as c:
        other = c.create_lease(1, gpu_model="L40S")
    other_id = other.name.removeprefix("leases/")
    wait_until(lambda: bool(browser.find_elements(By.ID, f"lease-{other_id}")), timeout=10)
    with fed.client() as c:
        c.release_lease(other.name)
    wait_until(
        lambda: (
            "RELEASED"
            in "".join(e.text for e in browser.find_elements(By.CSS_SELECTOR, f"#lease-{other_id} td.state"))
        ),
        timeout=10,
    )


def test_a_booked_reservation_shows_with_its_window_and_cancelled_from_the_page_ends_live(
    console: tuple[Federation, str], browser: Any
) -> None:
    import time

    from tests.harness import reservations_open

    fed, url = console
    with fed.client() as c:
        wait_until(lambda: reservations_open(c), timeout=20)
        booked = c.create_reservation(2, time.time() + 3600, 1800, gpu_model="A100")
    rid = booked.name.removeprefix("reservations/")
    sign_in(browser, url, fed.tenant_token)
    browser.get(url + "/leases")

    def state() -> str:
        return state_of(browser, f"reservation-{rid}")

    wait_until(lambda: state() == "SCHEDULED", timeout=10)
    shot(browser, "leases")
    browser.find_element(By.ID, f"cancel-{rid}").click()
    wait_until(lambda: state() == "ENDED", timeout=10)
    with fed.client() as c:
        assert c.get_reservation(booked.name).state == reservation_pb2.RESERVATION_STATE_ENDED


def test_a_tenant_reads_its_quota_and_an_admin_sets_one_from_the_page(
    console: tuple[Federation, str], browser: Any
) -> None:
    fed, url = console
    sign_in(browser, url, fed.tenant_token)
    browser.get(url + "/account")
    quota = dict((r[0], r[1]) for r in ([th.text, td.text] for th, td in _pairs(browser, "quota-table")))
    assert "max_gpus" in quota and "in use: GPUs held" in quota
    assert not browser.find_elements(By.ID, "quota-form")  # a tenant reads, an operator writes
    browser.delete_all_cookies()
    sign_in(browser, url, ADMIN_TOKEN)
    browser.get(url + "/account?kind=tenants&name=dev")
    browser.find_element(By.ID, "q-max-gpus").send_keys("12")
    browser.find_element(By.ID, "q-set").click()
    with fed.admin() as admin:
        wait_until(lambda: admin.get_quota("quotas/tenants/dev").quota.tenant.max_gpus == 12, timeout=10)
        # The page it comes back to shows the new value.
        wait_until(
            lambda: ["max_gpus", "12"] in [[th.text, td.text] for th, td in _pairs(browser, "quota-table")],
            timeout=10,
        )
        shot(browser, "quotas")
        admin.set_quota("quotas/tenants/dev")  # back to the defaults


def _pairs(driver: Any, table_id: str) -> list[tuple[Any, Any]]:
    return [
        (r.find_element(By.TAG_NAME, "th"), r.find_element(By.TAG_NAME, "td"))
        for r in driver.find_elements(By.CSS_SELECTOR, f"#{table_id} tr")
    ]


def test_a_tenant_never_sees_another_tenants_lease(console: tuple[Federation, str], browser: Any) -> None:
    fed, url = console
    with Client(fed.replicas[0].address, ADMIN_TOKEN) as admin:
        other_token = admin.create_token("tenant", "someone-else").secret
    with fed.client(token=other_token) as other:
        theirs = other.create_lease(1, gpu_model="H200")
    try:
        sign_in(browser, url, fed.tenant_token)
        browser.get(url + "/leases")
        wait_until(lambda: bool(browser.find_elements(By.ID, "leases-table")), timeout=10)
        assert theirs.name not in browser.page_source
        # Nor by asking for it: the release is the API's, which answers NOT_FOUND.
        theirs_id = theirs.name.removeprefix("leases/")
        csrf = browser.execute_script("return document.querySelector('input[name=csrf_token]').value")
        status = browser.execute_script(
            "const r = await fetch(arguments[0], {method: 'POST', headers: {'X-CSRF-Token': arguments[1]}});"
            "return r.status;",
            f"{url}/leases/{theirs_id}/release",
            csrf,
        )
        assert status == 404
    finally:
        with fed.client(token=other_token) as other:
            other.release_lease(theirs.name)
    # Nor its usage record, which exists (the other tenant reads it).
    with fed.client(token=other_token) as other:
        wait_until(lambda: any(u.lease == theirs.name for u in other.usage_records()), timeout=10)
    browser.get(url + "/usage")
    assert theirs.name not in browser.page_source


def test_a_private_pool_shows_only_to_its_tenant(console: tuple[Federation, str], browser: Any) -> None:
    from node_daemon.fake_nvml import FakeNvml
    from tests.harness import DaemonThread, daemon_config

    fed, url = console
    with fed.admin() as admin:
        pool_provider = admin.create_token("provider", "lab", private_to="owner").secret
        owner_token = admin.create_token("tenant", "owner").secret
    daemon = DaemonThread(
        daemon_config([fed.replicas[0].address], pool_provider, "lab", "lab-1", "SE"), FakeNvml("a100-80g-8")
    ).start()
    try:
        with fed.client(token=owner_token) as owner:
            wait_until(
                lambda: any(o.node == "providers/lab/nodes/lab-1" for o in owner.search_offers()), timeout=20
            )
        sign_in(browser, url, fed.tenant_token)
        browser.get(url + "/offers?countries=SE")
        assert "lab-1" not in browser.page_source and "no offers match" in browser.page_source
        browser.get(url + "/capacity")
        assert "SE" not in [r[1] for r in table(browser, "capacity-table")]
        browser.delete_all_cookies()
        sign_in(browser, url, owner_token)
        browser.get(url + "/offers?countries=SE")
        rows = wait_until_rows(browser, "offers-table")
        assert [(r[0], r[8]) for r in rows] == [("providers/lab/nodes/lab-1", "own")]
    finally:
        daemon.stop()


def test_a_provider_sees_only_its_own_nodes_with_per_gpu_health_repairs_and_sparklines(
    console: tuple[Federation, str], browser: Any
) -> None:
    fed, url = console
    sign_in(browser, url, fed.provider_tokens["blue"])
    assert browser.current_url.endswith("/nodes")
    assert [r[0] for r in table(browser, "nodes-table")] == ["providers/blue/nodes/hel-1"]
    browser.find_element(By.LINK_TEXT, "providers/blue/nodes/hel-1").click()

    def gpu0() -> list[str]:
        rows = table(browser, "gpus-table")
        return rows[0] if rows else []

    # GPU 0 runs hot (the federation's thermal fault): DEGRADED, with NVIDIA's reason code.
    wait_until(lambda: gpu0()[3:4] == ["DEGRADED"] and "THERMAL_SLOWDOWN" in gpu0()[8], timeout=10)
    wait_until(
        lambda: len(browser.find_elements(By.CSS_SELECTOR, "#gpus-table svg.spark polyline")) >= 16,
        timeout=15,
    )
    shot(browser, "node")
    assert not browser.find_elements(By.ID, "node-cordon")  # operators' buttons only
    # Another provider's node is the API's NOT_FOUND, page or not.
    browser.get(url + "/providers/neo/nodes/fra-1")
    assert "NOT_FOUND" in browser.find_element(By.ID, "error").text


def test_an_admin_cordons_and_uncordons_a_node_from_its_page(
    console: tuple[Federation, str], browser: Any
) -> None:
    fed, url = console
    sign_in(browser, url, ADMIN_TOKEN)
    browser.get(url + "/nodes")
    assert {f"providers/{n[0]}/nodes/{n[1]}" for n in NODES} <= {r[0] for r in table(browser, "nodes-table")}
    browser.get(url + "/providers/acme/nodes/ams-1")
    browser.find_element(By.CSS_SELECTOR, "form[action$='/cordon'] input[name=reason]").send_keys(
        "maintenance"
    )
    browser.find_element(By.ID, "node-cordon").click()
    with fed.admin() as admin:
        wait_until(lambda: admin.get_node("providers/acme/nodes/ams-1").state == 3, timeout=10)
        browser.find_element(By.ID, "node-uncordon").click()
        wait_until(lambda: admin.get_node("providers/acme/nodes/ams-1").state == 1, timeout=10)
    # Both acts are in the audit tail, with who did them and to what.
    browser.get(url + "/audit")

    def audited() -> list[str]:
        return [r[3] for r in table(browser, "audit-table") if r[4:5] == ["providers/acme/nodes/ams-1"]]

    wait_until(lambda: {"AdminService.CordonNode", "AdminService.UncordonNode"} <= set(audited()), timeout=10)
    shot(browser, "audit")
    with fed.client() as tenant:  # the tail is the operators'
        with pytest.raises(Exception) as e:
            tenant.audit_events()
        assert "PERMISSION_DENIED" in str(e.value)


def test_a_write_without_the_csrf_token_is_refused_and_changes_nothing(
    console: tuple[Federation, str], browser: Any
) -> None:
    fed, url = console
    sign_in(browser, url, fed.tenant_token)
    browser.get(url + "/leases")
    with fed.client() as c:
        before = len(c.list_leases())
    status = browser.execute_script(
        "const r = await fetch('/leases', {method: 'POST', headers: {'Content-Type': "
        "'application/x-www-form-urlencoded'}, body: 'count=1&model=H100'}); return r.status;"
    )
    assert status == 403
    wrong = browser.execute_script(
        "const r = await fetch('/leases', {method: 'POST', headers: {'Content-Type': "
        "'application/x-www-form-urlencoded', 'X-CSRF-Token': 'f00d'}, body: 'count=1'}); return r.status;"
    )
    assert wrong == 403
    with fed.client() as c:
        assert len(c.list_leases()) == before


def test_pages_carry_a_strict_content_security_policy_and_need_a_session(
    console: tuple[Federation, str],
) -> None:
    _, url = console
    with urllib.request.urlopen(url + "/signin", timeout=5) as r:
        csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a: Any, **k: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as e:
        opener.open(url + "/leases", timeout=5)
    assert e.value.code == 303 and e.value.headers["Location"] == "/signin"
    bad = urllib.parse.urlencode({"token": "gpf_not_a_token"}).encode()
    with pytest.raises(urllib.error.HTTPError) as e:
        opener.open(url + "/signin", data=bad, timeout=5)
    assert e.value.code == 401


def test_get_caller_names_each_tokens_kind_and_principal_and_nothing_else(
    console: tuple[Federation, str],
) -> None:
    from gpufed.v1 import admin_pb2

    fed, _ = console
    with fed.client() as tenant:
        me = tenant.caller()
    assert (me.kind, me.principal) == (admin_pb2.TOKEN_KIND_TENANT, "dev")
    with fed.client(token=fed.provider_tokens["neo"]) as provider:
        assert (provider.caller().kind, provider.caller().principal) == (admin_pb2.TOKEN_KIND_PROVIDER, "neo")
    with fed.admin() as admin:
        assert admin.caller().kind == admin_pb2.TOKEN_KIND_ADMIN
    with fed.client(token="gpf_000000000000_nope") as nobody, pytest.raises(Exception) as e:
        nobody.caller()
    assert "UNAUTHENTICATED" in str(e.value)
