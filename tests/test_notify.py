"""systemd notifications (supervisor/notify.py): the protocol pieces, then the real service
talking to a fake NOTIFY_SOCKET (an AF_UNIX datagram socket bound in a temp folder)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid as uuidlib
from types import SimpleNamespace

import psutil
import pytest

from conftest import OK_PLUGIN, make_plugin, spec, wait_for
from supervisor.control import NoService, request
from supervisor.notify import Notifier, socket_address, status_line, watchdog_interval


class FakeSystemd:
    """Receives sd_notify datagrams on a path (or an abstract name) in a background thread.

    The first time READY=1 arrives it asks the control socket for /status at once, to show
    what the service looked like at the moment it said it was ready.
    """

    def __init__(self, address: str | bytes, control_sock: str | None = None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.1)
        self.control_sock = control_sock
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.status_at_ready: tuple[int, bytes] | str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            if fields.get("READY") == "1" and self.status_at_ready is None and self.control_sock:
                try:
                    self.status_at_ready = request(self.control_sock, "GET", "/status", timeout=5)
                except NoService as e:
                    self.status_at_ready = f"no answer: {e}"
            self.messages.append((time.monotonic(), fields))

    def with_key(self, key: str, value: str | None = None) -> list[tuple[float, dict[str, str]]]:
        return [(t, m) for t, m in list(self.messages) if key in m and (value is None or m[key] == value)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


# -- the pieces ----------------------------------------------------------------------------


def test_socket_addresses():
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abstract/name") == b"\0abstract/name"
    assert socket_address("@") is None
    assert socket_address("vsock:2:1234") is None
    assert socket_address("relative/path") is None


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_our_pid():
    assert watchdog_interval({}, 10) is None
    assert watchdog_interval({"WATCHDOG_USEC": "2000000"}, 10) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "10"}, 10) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "11"}, 10) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 10) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, 10) is None
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "x"}, 10) is None


def test_without_notify_socket_everything_is_a_no_op():
    n = Notifier({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled and n.watchdog is None
    assert n.next_timer() == float("inf")
    assert n.send("READY=1") is False
    n.tick(SimpleNamespace(publisher=SimpleNamespace(stats=object())), 0.0)
    n.stopping()
    assert n.sock is None and not n.ready_sent


def test_from_environ_hides_the_variables_from_children():
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
    n = Notifier.from_environ(env)
    assert n.enabled and n.watchdog == 2.0
    assert env == {"PATH": "/bin"}


def test_unusable_socket_value_disables_notifications():
    n = Notifier({"NOTIFY_SOCKET": "not-a-path", "WATCHDOG_USEC": "1000000"})
    assert not n.enabled and n.watchdog is None


def test_a_send_to_a_missing_socket_is_not_fatal(tmp_path):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert n.enabled
    assert n.send("READY=1") is False
    assert n.send("READY=1") is False  # warned once, still no exception
    n.close()


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_tick_sends_ready_status_watchdog_and_stopping(tmp_path, kind):
    if kind == "path":
        env_value = bind = str(tmp_path / "notify")
    else:
        name = f"ar-test-{uuidlib.uuid4().hex}"
        env_value, bind = "@" + name, b"\0" + name.encode()
    fake = FakeSystemd(bind)
    try:
        n = Notifier({"NOTIFY_SOCKET": env_value, "WATCHDOG_USEC": "1000000"}, pid=123)
        assert n.watchdog == 0.5
        rec = SimpleNamespace(state="starting")
        svc = SimpleNamespace(publisher=SimpleNamespace(stats=None, ready=True),
                              manager=SimpleNamespace(runners={"a": rec}), rejected=[])
        n.tick(svc, 10.0)  # the publisher has not reported yet: a watchdog ping, no READY
        assert n.next_timer() == 10.5
        wait_for(lambda: fake.with_key("WATCHDOG"), 5, what="the first watchdog ping")
        assert not fake.with_key("READY")
        n.tick(svc, 10.1)  # not due: nothing
        svc.publisher.stats = SimpleNamespace(outbox_results=3)
        n.tick(svc, 10.2)
        ready = wait_for(lambda: fake.with_key("READY", "1"), 5, what="READY=1")
        assert ready[0][1]["STATUS"] == "1 job, 0 running, outbox 3"
        rec.state = "running"
        n.tick(svc, 10.6)  # watchdog due; STATUS not yet (at most once a second)
        n.tick(svc, 11.3)  # STATUS changed and due
        wait_for(lambda: fake.with_key("STATUS", "1 job, 1 running, outbox 3"), 5, what="the new STATUS")
        n.tick(svc, 12.4)  # unchanged: no new STATUS
        svc.publisher.ready = False
        svc.rejected = [object()]
        n.tick(svc, 13.5)
        wait_for(lambda: fake.with_key("STATUS", "1 job, 1 running, outbox 3, publisher down, 1 rejected"), 5,
                 what="the STATUS naming what is wrong")
        n.stopping("stopping: 1 runners")
        stop = wait_for(lambda: fake.with_key("STOPPING", "1"), 5, what="STOPPING=1")
        assert stop[0][1]["STATUS"] == "stopping: 1 runners"
        count = len(fake.messages)
        n.tick(svc, 20.0)  # after STOPPING nothing more, not even the watchdog
        n.stopping()
        time.sleep(0.3)
        assert len(fake.messages) == count
        statuses = [m["STATUS"] for _, m in fake.messages if "STATUS" in m]
        assert statuses == ["1 job, 0 running, outbox 3", "1 job, 1 running, outbox 3",
                            "1 job, 1 running, outbox 3, publisher down, 1 rejected", "stopping: 1 runners"]
        pings = [t for t, m in fake.messages if m.get("WATCHDOG") == "1"]
        assert len(pings) == 5  # at 10.0, 10.6, 11.3, 12.4 and 13.5
        n.close()
    finally:
        fake.close()


def test_status_line_of_a_bare_service():
    assert status_line(SimpleNamespace()) == "0 jobs, 0 running, outbox 0"


# -- the real service ---------------------------------------------------------------------


def _setup(service_factory):
    svc = service_factory()
    make_plugin(svc.plugins, "ok", OK_PLUGIN)
    job = spec(plugin="ok", interval="1h")
    svc.write_spec("ok.json", job)
    return svc, job["uuid"]


def test_service_notifies_ready_status_watchdog_and_stopping(service_factory, area):
    svc, job = _setup(service_factory)
    # a first run stores the spec; then its folder goes away, so the second run has only the
    # stored spec, which must be loaded (and its runner started) before READY=1
    svc.start()
    svc.wait_result(job)
    assert svc.stop() == 0
    svc.jobs.rename(svc.jobs.with_name("jobs.d.away"))

    fake = FakeSystemd(str(area / "notify.sock"), control_sock=str(svc.root / "run" / "control.sock"))
    try:
        started = time.monotonic()
        svc.start(env={"NOTIFY_SOCKET": str(area / "notify.sock"), "WATCHDOG_USEC": "1000000",
                       "WATCHDOG_PID": None})
        ready = wait_for(lambda: fake.with_key("READY", "1"), 20, what="READY=1")
        assert len(ready) == 1
        # at the moment READY=1 arrived the control socket answered, with the stored spec's job
        # and a publisher that had reported from its outbox
        assert isinstance(fake.status_at_ready, tuple), fake.status_at_ready
        code, body = fake.status_at_ready
        assert code == 200
        doc = json.loads(body)
        assert [j["uuid"] for j in doc["jobs"]] == [job]
        assert doc["publisher"]["pid"] is not None
        assert ready[0][1]["STATUS"].startswith("1 job, ")
        # nothing but watchdog pings came before READY
        before = [m for t, m in fake.messages if t < ready[0][0]]
        assert all(set(m) == {"WATCHDOG"} for m in before), before

        # STATUS settles on the runner being up; watchdog pings keep coming every ~0.5 s
        wait_for(lambda: fake.with_key("STATUS", "1 job, 1 running, outbox 0"), 10, what="STATUS with 1 running")
        t0 = time.monotonic()
        time.sleep(2.6)
        pings = [t for t, m in fake.with_key("WATCHDOG", "1") if t >= t0]
        assert len(pings) >= 4, pings
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert max(gaps) < 1.0, gaps  # never as long as WATCHDOG_USEC
        assert min(gaps) > 0.3, gaps  # and not in a busy loop

        # children do not inherit the variables
        pub = svc.status()["publisher"]["pid"]
        assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC"} & set(psutil.Process(pub).environ())

        assert svc.stop() == 0
        stopping = wait_for(lambda: fake.with_key("STOPPING", "1"), 5, what="STOPPING=1")
        assert stopping[0][1]["STATUS"].startswith("stopping")
        last = stopping[0][0]
        assert not [m for t, m in fake.messages if t > last], "nothing after STOPPING=1"
        assert started < ready[0][0] < last
    finally:
        fake.close()


def test_abstract_socket_and_a_watchdog_meant_for_another_pid(service_factory):
    svc, job = _setup(service_factory)
    name = f"ar-test-{uuidlib.uuid4().hex}"
    fake = FakeSystemd(b"\0" + name.encode())
    try:
        svc.start(env={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
        wait_for(lambda: fake.with_key("READY", "1"), 20, what="READY=1 on the abstract socket")
        svc.wait_result(job)
        time.sleep(0.5)
        assert not fake.with_key("WATCHDOG"), "WATCHDOG_PID names another process: no pings"
        assert svc.stop() == 0
        wait_for(lambda: fake.with_key("STOPPING", "1"), 5, what="STOPPING=1")
    finally:
        fake.close()


def test_without_notify_socket_the_service_runs_as_before(service_factory):
    svc, job = _setup(service_factory)
    svc.start(env={"NOTIFY_SOCKET": None, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": None})
    svc.wait_result(job)
    assert svc.stop() == 0
    assert "notify systemd" not in svc.log_text()


def test_an_unreachable_notify_socket_does_not_hurt(service_factory, area):
    svc, job = _setup(service_factory)
    svc.start(env={"NOTIFY_SOCKET": str(area / "nobody-listens.sock"), "WATCHDOG_USEC": "100000",
                   "WATCHDOG_PID": None})
    svc.wait_result(job)
    assert svc.stop() == 0
    assert svc.log_text().count("cannot notify systemd") == 1  # said once, not at every ping
