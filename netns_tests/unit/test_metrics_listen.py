"""Where the Prometheus metrics server listens: loopback by default, the
addresses host:port names, and a clear error for a port in use. Nothing is
attached under the pin root, so no kernel is needed (what a scrape says
about attached interfaces: e2e/test_metrics.py).
"""

from __future__ import annotations

import errno
import socket
import urllib.request
from pathlib import Path

import pytest

from xdpflow.app.config import DEFAULT_LISTEN, ConfigError, parse_hostport
from xdpflow.dataplane.pins import PinRoot
from xdpflow.export import metrics

from ..clitest import metric_samples, scrape


def test_listens_on_loopback_by_default(tmp_path: Path) -> None:
    pin_root = str(tmp_path / "pins")  # nothing attached under it
    assert DEFAULT_LISTEN == "127.0.0.1:9437"
    try:
        server = metrics.serve(parse_hostport(DEFAULT_LISTEN), PinRoot(pin_root))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            pytest.skip("port 9437 is taken on this machine")
        raise
    with server:
        assert server._httpd.socket.getsockname() == ("127.0.0.1", 9437)
        assert server.address == ("127.0.0.1", 9437)
        # nothing attached under the root: a scrape of the process metrics only
        assert metric_samples(scrape(server)) == {}
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", 9437), timeout=5).close()


def test_listen_addresses(tmp_path: Path) -> None:
    pin_root = str(tmp_path / "pins")  # nothing attached under it
    with metrics.serve(parse_hostport("[::1]:0"), PinRoot(pin_root)) as server:
        host, port = server._httpd.socket.getsockname()[:2]
        assert (host, port) == ("::1", server.port) and port != 0
        assert server.url == f"http://[::1]:{port}/metrics"
        with urllib.request.urlopen(server.url, timeout=30) as r:
            assert r.status == 200
    assert parse_hostport("localhost:80") == ("localhost", 80)
    assert parse_hostport("[2001:db8::1]:9437") == ("2001:db8::1", 9437)
    for bad in ("9437", ":9437", "::1:9437", "127.0.0.1", "127.0.0.1:65536", "[::1]9437", "127.0.0.1:x"):
        with pytest.raises(ConfigError):
            parse_hostport(bad)
    with metrics.serve(parse_hostport("127.0.0.1:0"), PinRoot(pin_root)) as first:
        with pytest.raises(OSError) as exc:
            metrics.serve(("127.0.0.1", first.port), PinRoot(pin_root))
        assert exc.value.errno == errno.EADDRINUSE
        assert "choose another port" in str(exc.value)
