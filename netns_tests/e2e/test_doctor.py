"""`xdpflow doctor`: the host's features, probed for real, and per interface
the driver, native XDP support and what is attached; exit 0 only when
xdpflow can run natively on every interface named."""

from __future__ import annotations

import json

from xdpflow.testing.lab import Lab

from ..clitest import Cli, attach_foreign

LAB_PREFIX = "xfdoc"

HOST_CHECKS = [
    "btf", "ring_buffer", "lru_maps", "tail_calls", "bpf_link", "live_frames", "freplace", "bpffs", "privileges",
]  # fmt: skip


def doctor(cli: Cli, *args: str) -> tuple[int, str, str]:
    r = cli.run("doctor", *args)
    return r.returncode, r.stdout, r.stderr


def test_doctor_on_veths_says_native(lab: Lab, cli: Cli) -> None:
    code, out, err = doctor(cli, lab.dut_if, "--json")
    assert (code, err) == (0, "")
    rep = json.loads(out)
    assert rep["ok"] is True
    checks = {c["name"]: c for c in rep["checks"]}
    assert list(checks) == HOST_CHECKS
    for name in ("btf", "ring_buffer", "lru_maps", "tail_calls", "bpf_link", "live_frames", "bpffs", "privileges"):
        assert checks[name]["ok"] is True, checks[name]
    # this kernel refuses extension programs: libxdp's dispatcher cannot work here
    assert checks["freplace"]["ok"] is False and checks["freplace"]["required"] is False
    assert "Operation not permitted" in checks["freplace"]["detail"]
    assert "--then PROG" in checks["freplace"]["fix"]
    (iface,) = rep["interfaces"]
    assert iface["ifname"] == lab.dut_if and iface["ok"] is True
    assert (iface["driver"], iface["native_xdp"], iface["programs"], iface["problems"]) == ("veth", True, [], [])
    assert "basic" in iface["xdp_features"]
    assert 0 < rep["memory"]["bytes"] < rep["memory"]["available"] and rep["memory"]["ok"] is True

    code, text, err = doctor(cli, lab.dut_if)
    assert (code, err) == (0, "")
    assert f"{lab.dut_if}: driver veth, native XDP" in text
    assert "freplace     no" in text
    assert text.rstrip().endswith("xdpflow can run natively on every interface named")


def test_doctor_on_loopback_says_what_to_do(lab: Lab, cli: Cli) -> None:
    code, out, err = doctor(cli, "lo", "--json")
    assert (code, err) == (1, "")
    rep = json.loads(out)
    assert rep["ok"] is False
    (iface,) = rep["interfaces"]
    assert (iface["ifname"], iface["ok"], iface["native_xdp"], iface["driver"]) == ("lo", False, False, None)
    assert iface["xdp_features"] == []
    (problem,) = iface["problems"]
    assert problem["problem"] == "lo (no driver) has no native XDP support"
    assert "--mode skb" in problem["fix"]

    code, text, err = doctor(cli, "lo")
    assert (code, err) == (1, "")
    assert "lo: driver -, no native XDP" in text
    assert "  - xdpflow runs on lo only in generic mode" in text
    assert text.rstrip().endswith("xdpflow cannot run natively everywhere asked: see above")

    # one interface that cannot run natively is enough for exit 1
    code, _out, _err = doctor(cli, lab.dut_if, "lo")
    assert code == 1


def test_doctor_shows_what_is_attached_and_how(lab: Lab, cli: Cli) -> None:
    (r,) = cli.json("attach", lab.dut_if)
    rep = json.loads(doctor(cli, lab.dut_if, "--json")[1])
    (iface,) = rep["interfaces"]
    assert iface["programs"] == [{"prog_id": r["prog_id"], "name": "xdpflow", "mode": "native", "attach": "link"}]
    cli("detach", lab.dut_if)
    foreign = attach_foreign(lab.dut_ns, lab.dut_if)
    code, out, _err = doctor(cli, lab.dut_if, "--json")
    (iface,) = json.loads(out)["interfaces"]
    assert iface["programs"] == [{"prog_id": foreign, "name": "xdp_pass", "mode": "native", "attach": "netlink"}]
    assert code == 0  # another program does not keep xdpflow from running natively
    text = doctor(cli, lab.dut_if)[1]
    assert f"runs XDP program {foreign} xdp_pass (native mode, through netlink)" in text


def test_doctor_on_a_missing_interface(lab: Lab, cli: Cli) -> None:
    code, out, _err = doctor(cli, "xfnosuch0", "--json")
    assert code == 1
    (iface,) = json.loads(out)["interfaces"]
    assert iface["ok"] is False
    assert "no interface named 'xfnosuch0'" in iface["problems"][0]["problem"]
