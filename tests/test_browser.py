"""A real browser through the proxy: headless Chromium loads a page from a loopback HTTPS
origin through a CONNECT tunnel, and shows its own error page when the proxy refuses.

Skipped where no Chromium is installed (``.ci/run`` installs Debian's ``chromium``).
Everything stays on the machine: splicegate resolves names with a loopback DNS server and
allows only the name ``localhost`` (``--allow-domain``), so the requests Chromium makes on its
own (component updates, accounts) are refused with a 403 instead of leaving; the origin's
throwaway certificate is trusted by pinning its public key
(``--ignore-certificate-errors-spki-list``), which headless Chromium honours without an NSS
database. Chromium runs in its own process group, which is killed when it is done (it forks
zygote, GPU and renderer processes).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dnsserver import DnsServer
from proxyproc import Origin, ProxyProcess, http_responder, origin

BROWSER = next(
    (
        path
        for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
        if (path := shutil.which(name))
    ),
    None,
)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium or google-chrome on PATH")

#: How long one browser run may take (it starts in about 2 s here).
BROWSER_TIMEOUT = 60.0
MARKER = "through the splicegate tunnel, 4711"
PAGE = (
    "<!doctype html><html><head><title>splicegate browser test</title></head>"
    f'<body><p id="marker">{MARKER}</p></body></html>'
).encode()


serve_page = http_responder(PAGE, "text/html; charset=utf-8")


@dataclass
class Site:
    origin: Origin
    spki_pin: str  # base64 of the SHA-256 of the leaf's SubjectPublicKeyInfo


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    with origin(serve_page, tls=context) as server:
        yield Site(server, base64.b64encode(hashlib.sha256(spki).digest()).decode())


@pytest.fixture(scope="module")
def proxy() -> Iterator[ProxyProcess]:
    with DnsServer() as dns:
        dns.add("localhost", a=["127.0.0.1"])
        proc = ProxyProcess(
            "--allow-dest", "127.0.0.0/8", "--allow-port", "any",
            "--allow-domain", "localhost", "--nameserver", f"127.0.0.1:{dns.port}",
            "--log-level", "debug",
        )  # fmt: skip
        try:
            yield proc
        finally:
            assert proc.stop() == 0


@dataclass
class BrowserRun:
    returncode: int
    dom: str
    stderr: str


def run_chromium(proxy: ProxyProcess, site: Site, url: str, profile: Path,
                 *extra: str) -> BrowserRun:  # fmt: skip
    """Headless Chromium with the proxy, printing the DOM of ``url`` once loaded."""
    assert BROWSER is not None
    command = [
        BROWSER,
        "--headless",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        f"--proxy-server=http://{proxy.address[0]}:{proxy.address[1]}",
        "--proxy-bypass-list=<-loopback>",  # else Chromium goes to localhost directly
        f"--ignore-certificate-errors-spki-list={site.spki_pin}",
        *extra,
        "--dump-dom",
        url,
    ]
    if os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the children go with it
    )
    try:
        out, err = proc.communicate(timeout=BROWSER_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=15)
        pytest.fail(f"Chromium did not finish in {BROWSER_TIMEOUT:g} s:\n{err.decode()[-3000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything of its group still running
    return BrowserRun(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def test_chromium_loads_a_page_through_the_tunnel(proxy: ProxyProcess, site: Site,
                                                  tmp_path: Path) -> None:  # fmt: skip
    port = site.origin.port
    run = run_chromium(proxy, site, f"https://localhost:{port}/", tmp_path / "profile")
    assert MARKER in run.dom, f"page not in the DOM dump:\n{run.dom[:2000]}\n{run.stderr[-3000:]}"
    assert f'<p id="marker">{MARKER}</p>' in run.dom
    # It went through the proxy (not straight to loopback), to the name Chromium was given:
    proxy.wait_for_log(rf"tunnel \S+ -> localhost:{port} .*closed")
    assert site.origin.errors == []


def test_chromium_shows_its_tunnel_error_page(proxy: ProxyProcess, site: Site,
                                              tmp_path: Path) -> None:  # fmt: skip
    with socket.socket() as unused:  # bound, never listening: the connect is refused
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        # Given the refused URL itself, headless Chromium only logs "Page load failed" and
        # dumps nothing; navigating there from a first page leaves its error page loaded.
        url = f'data:text/html,<script>location.href="https://localhost:{port}/"</script>'
        netlog = tmp_path / "netlog.json"
        run = run_chromium(
            proxy, site, url, tmp_path / "profile",
            "--virtual-time-budget=5000", f"--log-net-log={netlog}",
        )  # fmt: skip
    assert '"errorCode":"ERR_TUNNEL_CONNECTION_FAILED"' in run.dom, (
        f"no tunnel error page in the DOM dump:\n{run.dom[:2000]}\n{run.stderr[-3000:]}"
    )
    assert 'id="main-frame-error"' in run.dom  # Chromium's own error page
    proxy.wait_for_log(rf"refused \S+ localhost:{port}: 502 connection_refused")
    # What Chromium was told, from its net log: the proxy's 502 and why.
    assert "Proxy-Status: splicegate; error=connection_refused" in netlog.read_text()
