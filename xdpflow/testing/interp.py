"""A BPF interpreter that counts what one frame executes: the path length.

Timing a path to the nanosecond is out of reach on a shared machine (the same
object reads ±15 ns from one run to the next); counting its instructions is
not. ``Interp(obj, "xdpflow").run(frame)`` executes a loaded program's
instructions, as libbpf handed them to the kernel, on one frame and returns
the verdict, the instructions executed and the helper calls made. Maps are
read from the kernel (the loaded object's real contents: blocklist tables,
rule tables, flows, config, .rodata) and written only in the interpreter's
copy, so a run changes nothing in the kernel.

What it counts is BPF instructions before the verifier rewrites them: the
verifier inlines array lookups (a few instructions each, the same in every
variant) and JITs the rest about one-to-one. Helper calls are counted once
each and listed, since one of them (a hash lookup) can cost more than the
rest of the path.

Test tooling: never imported by the product.
"""

from __future__ import annotations

import errno
import operator
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from xdpflow.bindings.libbpf import Object, ffi, lib, map_info, possible_cpus, round_up8
from xdpflow.dataplane import clock
from xdpflow.dataplane.lifecycle import PROG_NAME

# map types (linux/bpf.h) whose values it lays out differently
_ARRAY, _PERCPU_HASH, _PERCPU_ARRAY, _LRU_PERCPU_HASH = 2, 5, 6, 10
_PERCPU = {_PERCPU_HASH, _PERCPU_ARRAY, _LRU_PERCPU_HASH}
_ARRAYS = {_ARRAY, _PERCPU_ARRAY}

# helpers (linux/bpf.h)
H_LOOKUP, H_UPDATE, H_DELETE, H_KTIME, H_TAIL_CALL, H_CPU = 1, 2, 3, 5, 12, 8
H_JIFFIES, H_RB_RESERVE, H_RB_SUBMIT, H_LOOP = 118, 131, 132, 181
HELPER_NAMES = {
    H_LOOKUP: "map_lookup_elem",
    H_UPDATE: "map_update_elem",
    H_DELETE: "map_delete_elem",
    H_KTIME: "ktime_get_ns",
    H_TAIL_CALL: "tail_call",
    H_CPU: "get_smp_processor_id",
    H_JIFFIES: "jiffies64",
    H_RB_RESERVE: "ringbuf_reserve",
    H_RB_SUBMIT: "ringbuf_submit",
    H_LOOP: "loop",
}

# addresses: region index << 40 | offset; region 0 is NULL and scalars
_SHIFT = 40
_OFF = (1 << _SHIFT) - 1
_MAPS, _FUNCS, _CTX, _PKT = 1, 2, 3, 4
_M64 = (1 << 64) - 1
_M32 = (1 << 32) - 1
_STACK = 512
_SIZES = {0x00: 4, 0x08: 2, 0x10: 1, 0x18: 8}


# conditional jumps by operation (code & 0xf0)
_UNSIGNED: dict[int, Callable[[int, int], bool]] = {
    0x10: operator.eq,
    0x50: operator.ne,
    0x20: operator.gt,
    0x30: operator.ge,
    0xA0: operator.lt,
    0xB0: operator.le,
    0x40: lambda a, b: bool(a & b),  # jset
}
_SIGNED: dict[int, Callable[[int, int], bool]] = {
    0x60: operator.gt,
    0x70: operator.ge,
    0xC0: operator.lt,
    0xD0: operator.le,
}


def _s64(x: int) -> int:
    return x - (1 << 64) if x >> 63 else x


def _s32(x: int) -> int:
    x &= _M32
    return x - (1 << 32) if x >> 31 else x


class InterpError(Exception):
    """The program did something this interpreter does not model, or accessed
    memory outside every region (a bug the verifier would have refused)."""


@dataclass
class Run:
    """One frame's path: the verdict and what it took to reach it."""

    action: int
    insns: int
    helpers: Counter[str] = field(default_factory=Counter)
    lookups: Counter[str] = field(default_factory=Counter)  # map name -> lookups


@dataclass
class _MapDesc:
    fd: int
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int


class Interp:
    """Runs program ``prog`` of the loaded ``obj`` on frames, CPU ``cpu``'s view
    of per-CPU maps. Raises InterpError for what it cannot model."""

    def __init__(self, obj: Object, prog: str, cpu: int = 0, trace: bool = False) -> None:
        raw = obj.insns(prog)
        self.trace: list[int] | None = [] if trace else None
        # the kernel's jiffies and clock, read by the object's own clock
        # program: rate limits and TTLs compare with them
        self._clock = obj.program(clock.CLOCK_PROG)
        self.code = [struct.unpack_from("<BBhi", raw, i) for i in range(0, len(raw), 8)]
        self.cpu = cpu
        self.ncpus = possible_cpus()
        self._maps: dict[int, _MapDesc] = {}

    # ---------------------------------------------------------------- memory

    def _map(self, fd: int) -> _MapDesc:
        if fd not in self._maps:
            i = map_info(fd)
            self._maps[fd] = _MapDesc(fd, i.name, i.type, i.key_size, i.value_size, i.max_entries)
        return self._maps[fd]

    def _new_region(self, data: bytes | bytearray) -> int:
        self._regions.append(bytearray(data))
        return (len(self._regions) - 1) << _SHIFT

    def _region(self, addr: int, size: int) -> tuple[bytearray, int]:
        idx, off = addr >> _SHIFT, addr & _OFF
        if idx < _PKT or idx >= len(self._regions):
            raise InterpError(f"access to {addr:#x}: not memory the program may touch")
        buf = self._regions[idx]
        if off + size > len(buf):
            raise InterpError(f"access of {size} bytes at offset {off} of a {len(buf)}-byte region")
        return buf, off

    def load(self, addr: int, size: int) -> int:
        if addr >> _SHIFT == _CTX:
            return self._ctx_load(addr & _OFF)
        buf, off = self._region(addr, size)
        return int.from_bytes(buf[off : off + size], "little")

    def store(self, addr: int, size: int, value: int) -> None:
        buf, off = self._region(addr, size)
        buf[off : off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def read(self, addr: int, size: int) -> bytes:
        buf, off = self._region(addr, size)
        return bytes(buf[off : off + size])

    def _ctx_load(self, off: int) -> int:
        # struct xdp_md: the verifier turns data, data_end and data_meta into pointers
        if off in (0, 8):
            return self._pkt
        if off == 4:
            return self._pkt + self._pkt_len
        if off == 12:
            return 1  # ingress_ifindex
        return 0

    # ------------------------------------------------------------------ maps

    def _kernel_value(self, m: _MapDesc, key: bytes) -> bytes | None:
        size = self.ncpus * round_up8(m.value_size) if m.type in _PERCPU else m.value_size
        buf = ffi.new("char[]", size)
        ret = lib.bpf_map_lookup_elem(m.fd, ffi.from_buffer(key), buf)
        if ret == -errno.ENOENT:
            return None
        if ret < 0:
            raise InterpError(f"reading map {m.name}: {errno.errorcode.get(-ret, ret)}")
        data = ffi.buffer(buf, size)[:]
        if m.type in _PERCPU:
            stride = round_up8(m.value_size)
            data = data[self.cpu * stride : self.cpu * stride + m.value_size]
        return data

    def _value(self, fd: int, key: bytes) -> int:
        """The address of the value for ``key``, or 0: the interpreter's copy,
        fetched from the kernel at first use."""
        m = self._map(fd)
        if m.type in _ARRAYS and int.from_bytes(key[:4], "little") >= m.max_entries:
            return 0
        if (fd, key) not in self._values:
            data = self._kernel_value(m, key)
            self._values[(fd, key)] = self._new_region(data) if data is not None else 0
        return self._values[(fd, key)]

    # ------------------------------------------------------------------- run

    def run(self, frame: bytes) -> Run:
        self._regions: list[bytearray] = [bytearray()] * (_PKT)
        self._values: dict[tuple[int, bytes], int] = {}
        self._pkt = self._new_region(frame)
        self._pkt_len = len(frame)
        self._now, self._mono = clock.sample(self._clock)
        self._run = Run(0, 0)
        if self.trace is not None:
            self.trace.clear()
        self._run.action = self._call(0, [_CTX << _SHIFT, 0, 0, 0, 0])
        return self._run

    def _call(self, pc: int, args: list[int]) -> int:
        """Runs the function at ``pc`` with r1-r5 = ``args`` in a fresh frame;
        returns its r0."""
        r = [0] * 11
        r[1:6] = args
        r[10] = self._new_region(bytes(_STACK)) + _STACK
        code = self.code
        run = self._run
        n = 0
        while True:
            op, regs, off, imm = code[pc]
            if self.trace is not None:
                self.trace.append(pc)
            dst, src = regs & 0xF, regs >> 4
            cls = op & 0x07
            n += 1
            pc += 1
            if cls in (0x07, 0x04):  # ALU64, ALU
                self._alu(r, op, dst, src, imm, cls == 0x07)
            elif cls in (0x05, 0x06):  # JMP, JMP32
                jop = op & 0xF0
                if jop == 0x00:  # ja
                    pc += off
                elif jop == 0x80:  # call
                    run.insns += n
                    n = 0
                    r[0] = self._do_call(pc, src, imm, r)
                    for i in range(1, 6):
                        r[i] = 0
                elif jop == 0x90:  # exit
                    run.insns += n
                    return r[0]
                else:
                    a = r[dst]
                    b = r[src] if op & 0x08 else imm & _M64
                    if cls == 0x06:
                        a &= _M32
                        b &= _M32
                    if self._cond(jop, a, b, cls == 0x06):
                        pc += off
            elif cls == 0x01:  # ldx
                size = _SIZES[op & 0x18]
                r[dst] = self.load((r[src] + off) & _M64, size)
            elif cls == 0x03:  # stx
                size = _SIZES[op & 0x18]
                addr = (r[dst] + off) & _M64
                if op & 0xE0 == 0xC0:
                    self._atomic(r, addr, size, src, imm)
                else:
                    self.store(addr, size, r[src])
            elif cls == 0x02:  # st
                self.store((r[dst] + off) & _M64, _SIZES[op & 0x18], imm)
            elif op == 0x18:  # ld_imm64
                hi = code[pc][3]
                pc += 1
                if src == 1:  # map by fd
                    r[dst] = (_MAPS << _SHIFT) | imm
                elif src == 2:  # map value by fd: .rodata, .bss
                    r[dst] = self._value(imm, bytes(4)) + (hi & _M32)
                elif src == 4:  # a callback: the function's instruction
                    r[dst] = (_FUNCS << _SHIFT) | (pc - 1 + imm)
                else:
                    r[dst] = ((hi & _M32) << 32) | (imm & _M32)
            else:
                raise InterpError(f"instruction {pc - 1}: opcode {op:#x} not modelled")

    def _alu(self, r: list[int], op: int, dst: int, src: int, imm: int, wide: bool) -> None:
        aop = op & 0xF0
        if aop == 0xD0:  # endianness: to_le is a truncation on this host, to_be a swap
            nbytes = imm // 8
            v = r[dst] & ((1 << imm) - 1)
            if op & 0x08:
                v = int.from_bytes(v.to_bytes(nbytes, "little"), "big")
            r[dst] = v
            return
        mask = _M64 if wide else _M32
        bits = 64 if wide else 32
        a = r[dst] & mask
        b = (r[src] if op & 0x08 else imm) & mask
        if aop == 0x00:
            v = a + b
        elif aop == 0x10:
            v = a - b
        elif aop == 0x20:
            v = a * b
        elif aop == 0x30:
            v = a // b if b else 0
        elif aop == 0x40:
            v = a | b
        elif aop == 0x50:
            v = a & b
        elif aop == 0x60:
            v = a << (b & (bits - 1))
        elif aop == 0x70:
            v = a >> (b & (bits - 1))
        elif aop == 0x80:
            v = -a
        elif aop == 0x90:
            v = a % b if b else a
        elif aop == 0xA0:
            v = a ^ b
        elif aop == 0xB0:
            v = b
        elif aop == 0xC0:
            sa = _s64(a) if wide else _s32(a)
            v = sa >> (b & (bits - 1))
        else:
            raise InterpError(f"ALU opcode {op:#x} not modelled")
        r[dst] = v & mask

    @staticmethod
    def _cond(jop: int, a: int, b: int, narrow: bool) -> bool:
        if jop in _UNSIGNED:
            return _UNSIGNED[jop](a, b)
        if jop in _SIGNED:
            return _SIGNED[jop](*((_s32(a), _s32(b)) if narrow else (_s64(a), _s64(b))))
        raise InterpError(f"jump opcode {jop:#x} not modelled")

    def _atomic(self, r: list[int], addr: int, size: int, src: int, imm: int) -> None:
        mask = (1 << (8 * size)) - 1
        old = self.load(addr, size)
        val = r[src] & mask
        aop = imm & 0xF0
        if imm == 0xE1:  # xchg
            self.store(addr, size, val)
            r[src] = old
            return
        if imm == 0xF1:  # cmpxchg
            if old == r[0] & mask:
                self.store(addr, size, val)
            r[0] = old
            return
        if aop == 0x00:
            new = old + val
        elif aop == 0x40:
            new = old | val
        elif aop == 0x50:
            new = old & val
        elif aop == 0xA0:
            new = old ^ val
        else:
            raise InterpError(f"atomic operation {imm:#x} not modelled")
        self.store(addr, size, new)
        if imm & 0x01:  # fetch
            r[src] = old

    def _do_call(self, pc: int, src: int, imm: int, r: list[int]) -> int:
        if src == 1:  # bpf-to-bpf: r6-r9 are the callee's to keep
            saved = r[6:10]
            ret = self._call(pc + imm, r[1:6])
            r[6:10] = saved
            return ret
        if src != 0:
            raise InterpError(f"call kind {src} (kfunc) not modelled")
        run = self._run
        run.helpers[HELPER_NAMES.get(imm, str(imm))] += 1
        if imm == H_LOOKUP:
            m = self._map(r[1] & _OFF)
            run.lookups[m.name] += 1
            return self._value(m.fd, self.read(r[2], m.key_size))
        if imm == H_UPDATE:
            m = self._map(r[1] & _OFF)
            key = self.read(r[2], m.key_size)
            if m.type not in _ARRAYS and (r[4] & 1) and self._value(m.fd, key):  # BPF_NOEXIST
                return -errno.EEXIST & _M64
            self._values[(m.fd, key)] = self._new_region(self.read(r[3], m.value_size))
            return 0
        if imm == H_DELETE:
            m = self._map(r[1] & _OFF)
            self._values[(m.fd, self.read(r[2], m.key_size))] = 0
            return 0
        if imm == H_JIFFIES:
            return self._now
        if imm == H_KTIME:
            return self._mono
        if imm == H_CPU:
            return self.cpu
        if imm == H_TAIL_CALL:
            # an empty slot: the program goes on; a program in it would run
            # instead, and its path is not this one's
            m = self._map(r[2] & _OFF)
            if self._kernel_value(m, (r[3] & _M32).to_bytes(4, "little")) is not None:
                raise InterpError(f"a tail call into the program in {m.name}[{r[3] & _M32}] is not modelled")
            return -errno.ENOENT & _M64
        if imm == H_RB_RESERVE:
            return self._new_region(bytes(r[2]))
        if imm == H_RB_SUBMIT:
            return 0
        if imm == H_LOOP:
            fn = r[2]
            if fn >> _SHIFT != _FUNCS:
                raise InterpError("bpf_loop without a callback")
            nr, ctx, i = r[1] & _M32, r[3], 0
            while i < nr:
                ret = self._call(fn & _OFF, [i, ctx, 0, 0, 0])
                i += 1
                if ret & _M64 == 1:
                    break
            return i
        raise InterpError(f"helper {imm} not modelled")


def path(obj: Object, frame: bytes, prog: str = PROG_NAME) -> Run:
    """The path ``frame`` takes through program ``prog`` of the loaded ``obj``."""
    return Interp(obj, prog).run(frame)


def opcodes(obj: Object, frame: bytes, prog: str = PROG_NAME) -> list[int]:
    """The opcodes ``frame`` executes in order: two programs whose paths
    give equal lists run the same instructions, whatever their addresses."""
    it = Interp(obj, prog, trace=True)
    it.run(frame)
    assert it.trace is not None
    return [it.code[pc][0] for pc in it.trace]


__all__ = ["Interp", "InterpError", "Run", "opcodes", "path"]
