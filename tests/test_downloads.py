"""Plugins given by plugin.url: downloaded only when allowed and pinned, verified, retried."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading

import pytest

from conftest import spec, wait_for

PLUGIN = b"""#!/bin/sh
cat >/dev/null
echo '{"status": "satisfied", "title": "downloaded"}'
"""


class PluginServer:
    """Serves /plugin; `failures` first answers are 404; counts requests."""

    def __init__(self, body: bytes, failures: int = 0):
        self.body = body
        self.failures = failures
        self.requests = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                if server.failures > 0:
                    server.failures -= 1
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/plugin"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    servers = []

    def make(body: bytes = PLUGIN, failures: int = 0) -> PluginServer:
        s = PluginServer(body, failures)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def url_spec(url: str, sha: str | None, **kw) -> dict:
    doc = spec(plugin="fetched", **kw)
    doc["plugin"]["url"] = url
    if sha:
        doc["plugin"]["sha256"] = sha
    return doc


ALLOW = '[plugin_store]\nallow_download = true\nallow_http = true\nmax_size = "{max}"\n'


@pytest.mark.timeout(60)
def test_a_pinned_plugin_is_downloaded_verified_and_run(service_factory, server):
    srv = server()
    svc = service_factory(ALLOW.format(max="1MiB"))
    doc = url_spec(srv.url, hashlib.sha256(PLUGIN).hexdigest(), interval="2s")
    svc.write_spec("job.json", doc)
    svc.start()
    results = wait_for(lambda: [r for r in svc.results_for(doc["uuid"]) if r["status"] == "satisfied"] or None,
                       30, what="a result of the downloaded plugin")
    assert results[0]["title"] == "downloaded"
    assert results[0]["plugin"]["sha256"] == hashlib.sha256(PLUGIN).hexdigest()
    stored = svc.state / "plugins" / "fetched" / "1.0.0"
    assert (stored / "fetched").read_bytes() == PLUGIN
    assert oct((stored / "fetched").stat().st_mode & 0o777) == "0o755"
    assert 'protocol = "assessment/1"' in (stored / "plugin.toml").read_text()
    assert srv.requests == 1


@pytest.mark.timeout(60)
def test_a_wrong_digest_is_never_run_and_is_reported(service_factory, server):
    srv = server()
    svc = service_factory(ALLOW.format(max="1MiB"))
    doc = url_spec(srv.url, "0" * 64, interval="1s")
    svc.write_spec("job.json", doc)
    svc.start()
    result = wait_for(lambda: [r for r in svc.results_for(doc["uuid"]) if "sha256 mismatch" in (r["reason"] or "")],
                      30, what="an error naming the digest")[0]
    assert result["status"] == "error" and result["reason"].startswith("plugin not found: fetched@1.0.0")
    assert not (svc.state / "plugins" / "fetched" / "1.0.0").exists()


@pytest.mark.timeout(60)
def test_failed_downloads_are_retried(service_factory, server):
    srv = server(failures=1)
    svc = service_factory(ALLOW.format(max="1MiB"))
    doc = url_spec(srv.url, hashlib.sha256(PLUGIN).hexdigest(), interval="1s")
    svc.write_spec("job.json", doc)
    svc.start()
    wait_for(lambda: [r for r in svc.results_for(doc["uuid"]) if "HTTP 404" in (r["reason"] or "")], 30,
             what="an error result naming the failed download")
    wait_for(lambda: [r for r in svc.results_for(doc["uuid"]) if r["status"] == "satisfied"], 40,
             what="a result once the retry succeeded")
    assert srv.requests == 2


@pytest.mark.timeout(60)
def test_no_download_unless_allowed_pinned_and_small_enough(service_factory, server):
    srv = server()
    svc = service_factory(ALLOW.format(max="16"), name="small")
    big = url_spec(srv.url, hashlib.sha256(PLUGIN).hexdigest(), interval="1s")
    unpinned = url_spec(srv.url, None, interval="1s")
    unpinned["plugin"]["name"] = "unpinned"
    svc.write_spec("big.json", big)
    svc.write_spec("unpinned.json", unpinned)
    svc.start()
    wait_for(lambda: [r for r in svc.results_for(big["uuid"]) if "too large" in (r["reason"] or "")], 30,
             what="an error result for the oversized plugin")
    r = svc.wait_result(unpinned["uuid"])[0]
    assert r["status"] == "error" and "only with a plugin.sha256" in r["reason"]
    svc.stop()

    off = service_factory(name="off")
    doc = url_spec(srv.url, hashlib.sha256(PLUGIN).hexdigest())
    off.write_spec("job.json", doc)
    off.start()
    r = off.wait_result(doc["uuid"])[0]
    assert r["status"] == "error" and "allow_download is false" in r["reason"]
    assert srv.requests == 1  # only the oversized attempt, cut off by its size
    assert not os.path.exists(off.state / "plugins" / "unpinned")
