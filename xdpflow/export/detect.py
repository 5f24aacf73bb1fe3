"""Attack detection: per-destination rates from the data plane's per-host
counters, and a state machine per victim.

Pure: ``Detector.update()`` takes one read of the counters (a ``HostCounts``
of the protect tables, or anything with the same arrays) and the time, and
returns what started and ended; nothing here touches the kernel, so tests
feed it snapshots.

Rates come from deltas between two reads, per host. A host seen for the
first time after the first read counts from zero (it was inserted since);
on the first read there is no previous one, so a restarted daemon has rates
one read later. A counter that went down (the host was forgotten and
inserted again) counts from zero too.

An attack starts when any of the group's thresholds is exceeded in every
read covering ``trigger_seconds``, and ends when every rate stays below
``threshold x release_ratio`` for ``release_seconds``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import numpy as np

from xdpflow.dataplane.pins import PinRoot
from xdpflow.errors import XdpflowError
from xdpflow.export.policy import (  # noqa: F401  (re-exported: detect is where callers look)
    HOSTS,
    IDLE_HOST_SECONDS,
    MITIGATION_TTL,
    MITIGATIONS,
    RATE_LIMIT_PPS,
    RATES,
    RECENT_ATTACKS,
    RELEASE_RATIO,
    RELEASE_SECONDS,
    STATE_DIR,
    TRIGGER_SECONDS,
    Net,
    Policy,
)


@dataclass
class Mitigation:
    """What was done (or, dry run, would have been) about an attack."""

    kind: str
    rules: list[int] = field(default_factory=list)  # ids of the rules installed
    lines: list[str] = field(default_factory=list)  # the rules, as `rule list` lines
    dry_run: bool = False
    declined: str | None = None  # why nothing was installed
    expires_at: float | None = None  # the rules' current expiry

    def json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "rules": list(self.rules),
            "lines": list(self.lines),
            "dry_run": self.dry_run,
            "declined": self.declined,
            "expires_at": self.expires_at,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Mitigation:
        return cls(
            kind=str(d["kind"]),
            rules=[int(i) for i in d.get("rules", [])],
            lines=[str(x) for x in d.get("lines", [])],
            dry_run=bool(d.get("dry_run", False)),
            declined=d.get("declined"),
            expires_at=d.get("expires_at"),
        )


@dataclass
class Attack:
    id: int
    victim: str
    group: str
    start: float
    end: float | None = None
    peak: dict[str, float] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)  # the last read's
    exceeded: list[str] = field(default_factory=list)  # thresholds exceeded at the start
    mitigation: Mitigation | None = None

    @property
    def active(self) -> bool:
        return self.end is None

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "victim": self.victim,
            "group": self.group,
            "start": self.start,
            "end": self.end,
            "active": self.active,
            "exceeded": list(self.exceeded),
            "peak": dict(self.peak),
            "rates": dict(self.rates),
            "mitigation": self.mitigation.json() if self.mitigation is not None else None,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Attack:
        m = d.get("mitigation")
        return cls(
            id=int(d["id"]),
            victim=str(ip_address(d["victim"])),
            group=str(d["group"]),
            start=float(d["start"]),
            end=None if d.get("end") is None else float(d["end"]),
            peak={str(k): float(v) for k, v in d.get("peak", {}).items()},
            rates={str(k): float(v) for k, v in d.get("rates", {}).items()},
            exceeded=[str(x) for x in d.get("exceeded", [])],
            mitigation=Mitigation.from_json(m) if m else None,
        )


def host_key(family: int, addr: bytes) -> tuple[int, bytes]:
    """The key a host is known by here: (4 or 6, its 4 or 16 address bytes)."""
    return (family, bytes(addr[:4]) if family == 4 else bytes(addr[:16]))


def host_text(key: tuple[int, bytes]) -> str:
    family, raw = key
    return str(IPv4Address(raw) if family == 4 else IPv6Address(raw))


def key_of(victim: str) -> tuple[int, bytes]:
    a = ip_address(victim)
    return (a.version, a.packed)


@dataclass
class _Watch:
    over_since: float | None = None  # first read over a threshold, not yet an attack
    calm_since: float | None = None  # first read below every release level, in an attack
    attack: Attack | None = None


@dataclass
class Change:
    """What one read changed: ``kind`` is "start" or "end"."""

    kind: str
    attack: Attack


class Detector:
    """The state machine of every protected host. ``policies[i]`` is group
    id ``i + 1`` of the protect tables."""

    def __init__(self, policies: Sequence[Policy], next_id: int = 1) -> None:
        self.policies = list(policies)
        self.next_id = next_id
        self.total: dict[str, int] = {}  # group -> attacks started by this process
        self._prev_pos: dict[tuple[int, bytes], int] = {}  # host -> its row of _prev_mat
        self._prev_mat = np.zeros((0, len(RATES)))
        self._prev_time: float | None = None
        self._moved: dict[tuple[int, bytes], float] = {}  # host -> last time its counters moved
        self._watch: dict[tuple[int, bytes], _Watch] = {}
        self.recent: list[Attack] = []  # ended, oldest first
        self.rates: dict[tuple[int, bytes], dict[str, float]] = {}  # last read, hosts over a threshold or attacked

    def set_policies(self, policies: Sequence[Policy]) -> None:
        """A reloaded config: attacks in a group still configured go on."""
        self.policies = list(policies)

    def resume(self, attacks: Iterable[Attack]) -> None:
        """Attacks a previous daemon left active (its state file): they go
        on, and end by the usual rule."""
        for a in attacks:
            if a.active:
                self._watch[key_of(a.victim)] = _Watch(attack=a)
            else:
                self.recent.append(a)
            self.next_id = max(self.next_id, a.id + 1)
        self.recent = self.recent[-RECENT_ATTACKS:]

    def active(self) -> list[Attack]:
        return [w.attack for w in self._watch.values() if w.attack is not None]

    def attacks(self) -> list[Attack]:
        """Active and recent attacks, oldest first."""
        return sorted([*self.recent, *self.active()], key=lambda a: (a.start, a.id))

    def _policy(self, name: str) -> Policy | None:
        return next((p for p in self.policies if p.name == name), None)

    def update(self, counts: Any, now: float) -> list[Change]:
        """One read of the per-host counters at ``now`` (Unix seconds):
        ``counts`` has arrays family, addr (16-byte rows), group (1-based),
        and one per RATES counter. Returns the attacks that started and
        ended, in that order."""
        fam = np.asarray(counts.family)
        addr = np.asarray(counts.addr)
        keys = [host_key(int(f), a.tobytes()) for f, a in zip(fam, addr)]
        n = len(keys)
        cur = np.zeros((n, len(RATES)))
        for j, (c, factor) in enumerate(RATES.values()):
            cur[:, j] = np.asarray(getattr(counts, c), dtype=np.float64) * factor
        groups = np.asarray(counts.group, dtype=np.int64)
        first = self._prev_time is None
        dt = 1.0 if first else max(now - (self._prev_time or now), 1e-3)
        pos = np.fromiter((self._prev_pos.get(k, -1) for k in keys), dtype=np.int64, count=n)
        prev = np.where((pos >= 0)[:, None], self._prev_mat[np.maximum(pos, 0)] if n and len(self._prev_mat) else 0, 0)
        delta = cur - prev
        delta = np.where(delta < 0, cur, delta)  # forgotten and inserted again: from zero
        rates = delta / dt
        for moved in np.nonzero((pos < 0) | (delta != 0).any(axis=1))[0].tolist():
            self._moved[keys[moved]] = now
        changes: list[Change] = []
        self.rates = {}
        if not first:
            # thresholds of each host's group (inf: none); a host of no configured group is never over
            table = np.full((max(len(self.policies), 1), len(RATES)), np.inf)
            for gi, p in enumerate(self.policies):
                table[gi] = [p.thresholds.get(r, np.inf) for r in RATES]
            valid = (groups >= 1) & (groups <= len(self.policies))
            t = table[np.clip(groups - 1, 0, len(table) - 1)]
            over = valid & (rates > t).any(axis=1)
            index = dict(zip(keys, range(n)))
            todo = set(np.nonzero(over)[0].tolist())
            todo |= {index[k] for k in self._watch if k in index and valid[index[k]]}
            for row in sorted(todo):
                changes += self._step(keys[row], self.policies[int(groups[row]) - 1], rates[row], now, dt)
            # hosts gone from the table: their attacks end by the release rule with rates of zero
            for k, w in list(self._watch.items()):
                if k in index:
                    continue
                pol = self._policy(w.attack.group) if w.attack is not None else None
                if pol is not None:
                    changes += self._step(k, pol, np.zeros(len(RATES)), now, dt)
                elif w.attack is None:
                    del self._watch[k]
        # an attack whose group left the config ends now
        names = {p.name for p in self.policies}
        for k, w in list(self._watch.items()):
            if w.attack is not None and w.attack.group not in names:
                changes.append(self._end(k, w, now))
        self._prev_pos = dict(zip(keys, range(n)))
        self._prev_mat = cur
        self._prev_time = now
        changes.sort(key=lambda c: c.kind != "start")
        return changes

    def _step(self, k: tuple[int, bytes], pol: Policy, r: np.ndarray, now: float, dt: float) -> list[Change]:
        t = np.array([pol.thresholds.get(name, np.inf) for name in RATES])
        over = r > t
        rd = {name: float(v) for name, v in zip(RATES, r)}
        w = self._watch.get(k)
        if w is None:
            if not over.any():
                return []
            w = self._watch[k] = _Watch()
        if w.attack is None:
            if not over.any():
                del self._watch[k]
                return []
            self.rates[k] = rd
            if w.over_since is None:
                w.over_since = now - dt  # the rate covers the last interval
            if now - w.over_since + 1e-6 < pol.trigger_seconds:
                return []
            a = Attack(
                id=self.next_id,
                victim=host_text(k),
                group=pol.name,
                start=now,
                peak=dict(rd),
                rates=rd,
                exceeded=[n for n, o in zip(RATES, over) if o],
            )
            self.next_id += 1
            self.total[pol.name] = self.total.get(pol.name, 0) + 1
            w.attack, w.over_since = a, None
            return [Change("start", a)]
        a = w.attack
        self.rates[k] = rd
        a.rates = rd
        a.peak = {n: max(a.peak.get(n, 0.0), v) for n, v in rd.items()}
        if (r < t * pol.release_ratio).all():
            if w.calm_since is None:
                w.calm_since = now - dt
            if now - w.calm_since + 1e-6 >= pol.release_seconds:
                return [self._end(k, w, now)]
        else:
            w.calm_since = None
        return []

    def _end(self, k: tuple[int, bytes], w: _Watch, now: float) -> Change:
        a = w.attack
        assert a is not None
        a.end = now
        del self._watch[k]
        self.recent = [*self.recent, a][-RECENT_ATTACKS:]
        return Change("end", a)

    def idle_hosts(self, now: float, idle: float = IDLE_HOST_SECONDS) -> list[tuple[int, bytes]]:
        """Hosts whose counters have not moved for ``idle`` seconds and that
        are not under attack: the daemon forgets them (room in the table)."""
        out = [k for k, t in self._moved.items() if now - t >= idle and k not in self._watch]
        for k in out:
            del self._moved[k]
        return out


# the state file ---------------------------------------------------------------


def state_path(pins: PinRoot) -> str:
    """Where the daemon of ``pins`` keeps its attacks (bpffs holds no
    regular files): one file per pin root under /run/xdpflow."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", pins.root.strip("/")) or "root"
    return os.path.join(os.environ.get("XDPFLOW_STATE_DIR", STATE_DIR), f"{name}.attacks.json")


def save_state(path: str, attacks: Sequence[Attack], next_id: int) -> None:
    """Write the attacks atomically (temporary file, then rename), root
    only. Raises OSError."""
    d = os.path.dirname(path)
    os.makedirs(d, mode=0o700, exist_ok=True)
    doc = {"next_id": next_id, "attacks": [a.json() for a in attacks]}
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".attacks-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_state(path: str) -> tuple[list[Attack], int]:
    """(attacks, next id) from the state file; none when it does not exist.
    Raises XdpflowError for a file that cannot be read."""
    try:
        with open(path) as f:
            doc = json.load(f)
        return [Attack.from_json(a) for a in doc.get("attacks", [])], int(doc.get("next_id", 1))
    except FileNotFoundError:
        return [], 1
    except OSError as e:
        raise XdpflowError(e.errno or errno.EIO, f"cannot read the attacks state {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise XdpflowError(
            errno.EIO, f"the attacks state {path} is damaged ({e}): remove it; the daemon detects attacks again"
        ) from None


__all__ = [
    "MITIGATIONS",
    "RATES",
    "Attack",
    "Change",
    "Detector",
    "Mitigation",
    "Policy",
    "load_state",
    "save_state",
    "state_path",
]
