"""libbpf through cffi: objects, programs and maps as Python objects.

ABI mode (``ffi.dlopen("libbpf.so.1")``) rather than API mode: it needs no
compiler or libbpf headers where the package is installed, only the runtime
library every distribution ships. The price is that each struct declared
below must match libbpf 1.x's layout exactly; all of them are ``sz``-prefixed
opts structs that libbpf versions-checks at run time, and the layouts were
taken from libbpf 1.1's headers.

Failures raise ``XdpflowError`` (an ``OSError``) with errno; a map lookup miss
raises ``KeyError(key)`` as a mapping should.
"""

from __future__ import annotations

import errno
import mmap as _mmap
import os
from collections.abc import Iterator, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Self

from xdpflow.errors import VerifierError, XdpflowError, os_error

if TYPE_CHECKING:
    import cffi  # the built declarations need only its backend: the package (~3 ms) loads to parse C

# Every libbpf function and struct used here, as libbpf 1.x declares them.
# `make build` compiles these declarations (and the product's, see
# dataplane/abi.py) into generated modules with scripts/ffigen.py, so a
# command does not parse C at start-up; an unbuilt tree parses them here.
CDEF = """
    typedef uint8_t __u8;
    typedef uint16_t __u16;
    typedef uint32_t __u32;
    typedef uint64_t __u64;
    typedef int32_t __s32;
    typedef int64_t __s64;
    typedef uint16_t __be16;
    typedef uint32_t __be32;

    struct bpf_object;
    struct bpf_program;
    struct bpf_map;
    struct ring_buffer;

    struct bpf_object_open_opts {
        size_t sz;
        const char *object_name;
        bool relaxed_maps;
        const char *pin_root_path;
        uint32_t _stub;
        const char *kconfig;
        const char *btf_custom_path;
        char *kernel_log_buf;
        size_t kernel_log_size;
        uint32_t kernel_log_level;
    };

    struct bpf_test_run_opts {
        size_t sz;
        const void *data_in;
        void *data_out;
        uint32_t data_size_in;
        uint32_t data_size_out;
        const void *ctx_in;
        void *ctx_out;
        uint32_t ctx_size_in;
        uint32_t ctx_size_out;
        uint32_t retval;
        int repeat;
        uint32_t duration;
        uint32_t flags;
        uint32_t cpu;
        uint32_t batch_size;
    };

    struct bpf_map_batch_opts {
        size_t sz;
        uint64_t elem_flags;
        uint64_t flags;
    };

    struct ring_buffer_opts {
        size_t sz;
    };

    struct xdp_md {
        uint32_t data;
        uint32_t data_end;
        uint32_t data_meta;
        uint32_t ingress_ifindex;
        uint32_t rx_queue_index;
        uint32_t egress_ifindex;
    };

    struct bpf_prog_info {
        uint32_t type;
        uint32_t id;
        uint8_t tag[8];
        uint32_t jited_prog_len;
        uint32_t xlated_prog_len;
        uint64_t jited_prog_insns;
        uint64_t xlated_prog_insns;
        uint64_t load_time;
        uint32_t created_by_uid;
        uint32_t nr_map_ids;
        uint64_t map_ids;
        char name[16];
        uint32_t ifindex;
        uint32_t gpl_compatible;
        uint64_t netns_dev;
        uint64_t netns_ino;
    };

    struct bpf_map_info {
        uint32_t type;
        uint32_t id;
        uint32_t key_size;
        uint32_t value_size;
        uint32_t max_entries;
        uint32_t map_flags;
        char name[16];
    };

    typedef int (*libbpf_print_fn_t)(int level, const char *, void *ap);
    libbpf_print_fn_t libbpf_set_print(libbpf_print_fn_t fn);
    int libbpf_num_possible_cpus(void);

    struct bpf_object *bpf_object__open_file(const char *path,
                                             const struct bpf_object_open_opts *opts);
    int bpf_object__load(struct bpf_object *obj);
    void bpf_object__close(struct bpf_object *obj);
    struct bpf_map *bpf_object__find_map_by_name(const struct bpf_object *obj,
                                                 const char *name);
    struct bpf_program *bpf_object__find_program_by_name(const struct bpf_object *obj,
                                                         const char *name);
    struct bpf_map *bpf_object__next_map(const struct bpf_object *obj,
                                         const struct bpf_map *map);
    struct bpf_program *bpf_object__next_program(const struct bpf_object *obj,
                                                 struct bpf_program *prog);

    const char *bpf_map__name(const struct bpf_map *map);
    int bpf_map__fd(const struct bpf_map *map);
    int bpf_map__type(const struct bpf_map *map);
    int bpf_map__set_type(struct bpf_map *map, int type);
    uint32_t bpf_map__map_flags(const struct bpf_map *map);
    int bpf_map__set_map_flags(struct bpf_map *map, uint32_t flags);
    uint32_t bpf_map__max_entries(const struct bpf_map *map);
    int bpf_map__set_max_entries(struct bpf_map *map, uint32_t max_entries);
    uint32_t bpf_map__key_size(const struct bpf_map *map);
    uint32_t bpf_map__value_size(const struct bpf_map *map);
    int bpf_map__set_pin_path(struct bpf_map *map, const char *path);
    const char *bpf_map__pin_path(const struct bpf_map *map);
    int bpf_map__reuse_fd(struct bpf_map *map, int fd);
    const void *bpf_map__initial_value(struct bpf_map *map, size_t *psize);
    int bpf_map__set_autocreate(struct bpf_map *map, bool autocreate);

    const char *bpf_program__name(const struct bpf_program *prog);
    int bpf_program__fd(const struct bpf_program *prog);
    int bpf_program__set_autoload(struct bpf_program *prog, bool autoload);
    const void *bpf_program__insns(const struct bpf_program *prog);
    size_t bpf_program__insn_cnt(const struct bpf_program *prog);

    int bpf_map_lookup_elem(int fd, const void *key, void *value);
    int bpf_map_update_elem(int fd, const void *key, const void *value, uint64_t flags);
    int bpf_map_delete_elem(int fd, const void *key);
    int bpf_map_lookup_and_delete_elem(int fd, const void *key, void *value);
    int bpf_map_create(int map_type, const char *map_name, uint32_t key_size, uint32_t value_size,
                       uint32_t max_entries, const void *opts);
    int bpf_map_get_next_key(int fd, const void *key, void *next_key);
    int bpf_map_lookup_batch(int fd, void *in_batch, void *out_batch, void *keys,
                             void *values, uint32_t *count,
                             const struct bpf_map_batch_opts *opts);
    int bpf_map_lookup_and_delete_batch(int fd, void *in_batch, void *out_batch,
                                        void *keys, void *values, uint32_t *count,
                                        const struct bpf_map_batch_opts *opts);
    int bpf_map_update_batch(int fd, const void *keys, const void *values,
                             uint32_t *count, const struct bpf_map_batch_opts *opts);
    int bpf_map_delete_batch(int fd, const void *keys, uint32_t *count,
                             const struct bpf_map_batch_opts *opts);
    int bpf_obj_pin(int fd, const char *pathname);
    int bpf_obj_get(const char *pathname);
    struct bpf_obj_get_opts {
        size_t sz;
        uint32_t file_flags;
    };
    int bpf_obj_get_opts(const char *pathname, const struct bpf_obj_get_opts *opts);
    int bpf_obj_get_info_by_fd(int bpf_fd, void *info, uint32_t *info_len);
    int bpf_prog_get_fd_by_id(uint32_t id);
    int bpf_map_get_fd_by_id(uint32_t id);
    int bpf_prog_test_run_opts(int prog_fd, struct bpf_test_run_opts *opts);

    struct bpf_link_create_opts {
        size_t sz;
        uint32_t flags;
        void *iter_info;
        uint32_t iter_info_len;
        uint32_t target_btf_id;
        uint64_t _union[4];
    };
    struct bpf_link_update_opts {
        size_t sz;
        uint32_t flags;
        uint32_t old_prog_fd;
    };
    struct bpf_link_info {
        uint32_t type;
        uint32_t id;
        uint32_t prog_id;
        uint32_t _pad;
        uint32_t xdp_ifindex;
        uint32_t _union[7];
    };
    int bpf_link_create(int prog_fd, int target_fd, int attach_type,
                        const struct bpf_link_create_opts *opts);
    int bpf_link_update(int link_fd, int new_prog_fd, const struct bpf_link_update_opts *opts);
    int bpf_link_detach(int link_fd);
    int bpf_link_get_next_id(uint32_t start_id, uint32_t *next_id);
    int bpf_link_get_fd_by_id(uint32_t id);
    int bpf_program__set_attach_target(struct bpf_program *prog, int attach_prog_fd,
                                       const char *attach_func_name);

    typedef int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size);
    struct ring_buffer *ring_buffer__new(int map_fd, ring_buffer_sample_fn sample_cb,
                                         void *ctx, const struct ring_buffer_opts *opts);
    void ring_buffer__free(struct ring_buffer *rb);
    int ring_buffer__poll(struct ring_buffer *rb, int timeout_ms);
    int ring_buffer__consume(struct ring_buffer *rb);
    """


def _load_ffi() -> Any:
    try:
        from xdpflow.bindings._libbpf_ffi import ffi as built  # type: ignore[import-not-found]

        return built
    except ImportError:
        import cffi

        parsed = cffi.FFI()
        parsed.cdef(CDEF)
        return parsed


ffi: Any = _load_ffi()

lib: Any = ffi.dlopen("libbpf.so.1")


def declare_types(declarations: str) -> Any:
    """A new FFI that knows this binding's types (``__u32``...) plus
    ``declarations``: the product's ABI is declared there, explicitly, and
    handed to ``Map``/``Object.map`` as ``types``. The binding's own FFI is
    never extended, so what a module can use does not depend on what some
    other module imported first. (An unbuilt tree's path: a built one loads
    the same declarations compiled, see dataplane/abi.py.)
    """
    import cffi

    types = cffi.FFI()
    types.cdef(CDEF)
    types.cdef(declarations)
    return types


# libbpf prints to stderr by default; our exceptions carry what matters, and
# the verifier log comes back through kernel_log_buf instead.
if not os.environ.get("XDPFLOW_LIBBPF_DEBUG"):
    lib.libbpf_set_print(ffi.NULL)

# linux/bpf.h map types and flags used here
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PROG_ARRAY = 3
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_RINGBUF = 27
BPF_F_NO_PREALLOC = 1 << 0
BPF_F_MMAPABLE = 1 << 10
PERCPU_TYPES = {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH}
ARRAY_TYPES = {BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY}

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
BPF_F_REPLACE = 1 << 2

# program types, attach types and link types used here
BPF_PROG_TYPE_XDP = 6
BPF_PROG_TYPE_EXT = 28
BPF_XDP = 37
BPF_LINK_TYPE_XDP = 6

_ENOTSUPP = 524  # the kernel-internal errno some map types return for batch ops
_BATCH_UNSUPPORTED = {errno.EINVAL, errno.EOPNOTSUPP, _ENOTSUPP}

_possible_cpus: int | None = None


def possible_cpus() -> int:
    """Number of possible CPUs: the length of every per-CPU value."""
    global _possible_cpus
    if _possible_cpus is None:
        n = lib.libbpf_num_possible_cpus()
        if n < 0:
            raise os_error(-n, "counting possible CPUs")
        _possible_cpus = n
    return _possible_cpus


def _check(ret: int, what: str, hint: str | None = None) -> int:
    if ret < 0:
        raise os_error(-ret, what, hint)
    return ret


def _errno_or(default: int) -> int:
    return ffi.errno or default


def round_up8(n: int) -> int:
    return (n + 7) & ~7


# --------------------------------------------------------------------------
# maps


class OwnedFd:
    """An object that owns one fd: ``close()`` (also on leaving a ``with``
    block, and when collected) closes it once."""

    fd: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class MapInfo(NamedTuple):
    id: int
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


def map_info(fd: int) -> MapInfo:
    """Kernel's view of the map behind ``fd``. Raises XdpflowError."""
    info = ffi.new("struct bpf_map_info *")
    ln = ffi.new("uint32_t *", ffi.sizeof(info[0]))
    _check(lib.bpf_obj_get_info_by_fd(fd, info, ln), "reading map info")
    return MapInfo(
        id=info.id,
        name=ffi.string(info.name).decode(),
        type=info.type,
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        flags=info.map_flags,
    )


BPF_F_RDONLY = 1 << 3


def obj_get(path: str) -> int:
    """Open a pinned object; returns a new fd. On a read-only bpffs the fd is
    read-only (lookups work, updates fail with EPERM). Raises XdpflowError."""
    fd = lib.bpf_obj_get(path.encode())
    if fd == -errno.EROFS:
        opts = ffi.new("struct bpf_obj_get_opts *", {"sz": ffi.sizeof("struct bpf_obj_get_opts")})
        opts.file_flags = BPF_F_RDONLY
        fd = lib.bpf_obj_get_opts(path.encode(), opts)
    if fd < 0:
        err = -fd
        hint = None
        if err == errno.ENOENT:
            hint = "nothing is pinned there (is xdpflow attached, and is bpffs mounted?)"
        raise os_error(err, f"opening pinned {path}", hint)
    return int(fd)


class Map(OwnedFd, MutableMapping[Any, Any]):
    """A BPF map as a mutable mapping.

    Keys and values are cffi objects of the types given at construction
    (``"struct xf_flow4"``, ``"__u32"``...); integer-typed keys and values are
    plain ``int``. Per-CPU maps return a list with one value per possible CPU;
    ``sum()`` adds them up. A miss raises ``KeyError(key)``; failed system calls
    raise ``XdpflowError`` (``MapFullError`` when the map is full).

    Iteration walks the kernel's keys with get_next_key; keys deleted by the
    program meanwhile are skipped, so concurrent deletes can make it miss or
    repeat a key, never fail.

    The Map owns its fd: use it as a context manager or call ``close()``.
    """

    def __init__(
        self, fd: int, key_type: str, value_type: str, name: str | None = None, types: cffi.FFI | None = None
    ) -> None:
        self.fd = fd
        # the FFI that declares key_type and value_type (declare_types() makes one)
        self.types = types or ffi
        self.info = map_info(fd)
        self.name = name or self.info.name
        self.key_type = key_type
        self.value_type = value_type
        self.percpu = self.info.type in PERCPU_TYPES
        self.is_array = self.info.type in ARRAY_TYPES
        ks, vs = self.types.sizeof(key_type), self.types.sizeof(value_type)
        if ks != self.info.key_size or vs != self.info.value_size:
            raise XdpflowError(
                errno.EINVAL,
                f"map {self.name}: key/value sizes {self.info.key_size}/{self.info.value_size} "
                f"do not match {key_type}/{value_type} ({ks}/{vs}); "
                "the pinned map comes from another xdpflow version: detach and attach again",
            )
        self._key_int = self._is_int(key_type)
        self._value_int = self._is_int(value_type)
        # per-CPU values come back as ncpu slots of value_stride bytes each
        self.ncpu = possible_cpus() if self.percpu else 1
        self.value_stride = round_up8(vs) if self.percpu else vs

    def _is_int(self, ctype: str) -> bool:
        return self.types.typeof(ctype).kind == "primitive"

    @classmethod
    def from_pin(cls, path: str, key_type: str, value_type: str, types: cffi.FFI | None = None) -> Map:
        """Open the map pinned at ``path``. Raises XdpflowError."""
        fd = obj_get(path)
        try:
            return cls(fd, key_type, value_type, name=os.path.basename(path), types=types)
        except BaseException:
            os.close(fd)
            raise

    # buffers ------------------------------------------------------------

    def _kbuf(self, key: Any) -> Any:
        if self._key_int:
            if not isinstance(key, int):
                raise TypeError(f"map {self.name} takes integer keys, not {type(key).__name__}")
            return self.types.new(f"{self.key_type} *", key)
        return self._as_buf(key, self.key_type, "key")

    def _as_buf(self, obj: Any, ctype: str, what: str) -> Any:
        if isinstance(obj, self.types.CData):
            t = self.types.typeof(obj)
            if t.kind == "pointer":
                return obj
            buf = self.types.new(f"{ctype} *")
            self.types.memmove(buf, self.types.addressof(obj), self.types.sizeof(ctype))
            return buf
        if isinstance(obj, (bytes, bytearray, memoryview)):
            if len(obj) != self.types.sizeof(ctype):
                raise ValueError(f"map {self.name}: a {what} is {self.types.sizeof(ctype)} bytes, got {len(obj)}")
            buf = self.types.new(f"{ctype} *")
            self.types.memmove(buf, bytes(obj), len(obj))
            return buf
        raise TypeError(f"map {self.name}: cannot use {type(obj).__name__} as {ctype}")

    def _key_out(self, buf: Any) -> Any:
        if self._key_int:
            return int(buf[0])
        out = self.types.new(f"{self.key_type} *")
        self.types.memmove(out, buf, self.types.sizeof(self.key_type))
        return out

    def _vbuf_new(self, n: int = 1) -> Any:
        return self.types.new("char[]", n * self.ncpu * self.value_stride)

    def _value_out(self, raw: Any, offset: int = 0) -> Any:
        """Decode one value (all CPUs of it) starting at byte ``offset`` of raw."""
        vals = []
        vs = self.types.sizeof(self.value_type)
        for cpu in range(self.ncpu):
            p = raw + offset + cpu * self.value_stride
            if self._value_int:
                vals.append(int(self.types.cast(f"{self.value_type} *", p)[0]))
            else:
                v = self.types.new(f"{self.value_type} *")
                self.types.memmove(v, p, vs)
                vals.append(v)
        return vals if self.percpu else vals[0]

    def _value_in(self, value: Any) -> Any:
        if not self.percpu:
            if self._value_int:
                return self.types.new(f"{self.value_type} *", value)
            return self._as_buf(value, self.value_type, "value")
        values = list(value) if isinstance(value, (list, tuple)) else [value] * self.ncpu
        if len(values) != self.ncpu:
            raise ValueError(f"map {self.name}: per-CPU value needs {self.ncpu} items, got {len(values)}")
        raw = self._vbuf_new()
        vs = self.types.sizeof(self.value_type)
        for cpu, v in enumerate(values):
            src = (
                self.types.new(f"{self.value_type} *", v)
                if self._value_int
                else self._as_buf(v, self.value_type, "value")
            )
            self.types.memmove(raw + cpu * self.value_stride, src, vs)
        return raw

    # single-element operations --------------------------------------------

    def lookup(self, key: Any) -> Any:
        """Value for key, or None when absent. Raises XdpflowError."""
        raw = self._vbuf_new()
        ret = lib.bpf_map_lookup_elem(self.fd, self._kbuf(key), raw)
        if ret == -errno.ENOENT:
            return None
        _check(ret, f"looking up a key in map {self.name}")
        return self._value_out(raw)

    def lookup_and_delete(self, key: Any) -> Any:
        """Remove key and return its value in one step (None when absent), so
        no update between a read and a delete is lost. Raises XdpflowError.
        """
        raw = self._vbuf_new()
        ret = lib.bpf_map_lookup_and_delete_elem(self.fd, self._kbuf(key), raw)
        if ret == -errno.ENOENT:
            return None
        _check(ret, f"taking a key out of map {self.name}")
        return self._value_out(raw)

    def lookup_and_delete_raw(self, key: Any) -> bytes | None:
        """lookup_and_delete() returning the raw value buffer (``ncpu`` slots
        of ``value_stride`` bytes) for decoding in bulk. Raises XdpflowError."""
        raw = self._vbuf_new()
        ret = lib.bpf_map_lookup_and_delete_elem(self.fd, self._kbuf(key), raw)
        if ret == -errno.ENOENT:
            return None
        _check(ret, f"taking a key out of map {self.name}")
        return ffi.buffer(raw)[:]

    @classmethod
    def create(
        cls, map_type: int, name: str, key_type: str, value_type: str, max_entries: int, types: cffi.FFI | None = None
    ) -> Map:
        """A new map made from user space (not by a BPF object). Raises XdpflowError."""
        t = types or ffi
        fd = lib.bpf_map_create(
            map_type, name.encode(), t.sizeof(key_type), t.sizeof(value_type), max_entries, ffi.NULL
        )
        if fd < 0:
            raise os_error(-fd, f"creating map {name}")
        try:
            return cls(fd, key_type, value_type, name=name, types=types)
        except BaseException:
            os.close(fd)
            raise

    def __getitem__(self, key: Any) -> Any:
        v = self.lookup(key)
        if v is None:
            raise KeyError(key)
        return v

    def put(self, key: Any, value: Any, flags: int = BPF_ANY) -> None:
        """Store value at key with BPF_ANY/BPF_NOEXIST/BPF_EXIST semantics
        (``m[key] = value`` is ``put(key, value)``; ``update()`` is the
        mapping's own, taking a mapping or pairs).

        Raises MapFullError when the map is full, KeyError for BPF_EXIST on a
        missing key, XdpflowError(EEXIST) for BPF_NOEXIST on a present one.
        """
        ret = lib.bpf_map_update_elem(self.fd, self._kbuf(key), self._value_in(value), flags)
        if ret == -errno.ENOENT and flags == BPF_EXIST:
            raise KeyError(key)
        if ret == -errno.E2BIG:
            raise os_error(
                errno.E2BIG,
                f"adding to map {self.name}",
                f"it is full ({self.info.max_entries} entries)",
            )
        _check(ret, f"updating map {self.name}")

    def __setitem__(self, key: Any, value: Any) -> None:
        self.put(key, value, BPF_ANY)

    def __delitem__(self, key: Any) -> None:
        ret = lib.bpf_map_delete_elem(self.fd, self._kbuf(key))
        if ret == -errno.ENOENT:
            raise KeyError(key)
        _check(ret, f"deleting from map {self.name}")

    def __contains__(self, key: object) -> bool:
        return self.lookup(key) is not None

    def _next_key(self, prev: Any) -> Any:
        nxt = self.types.new(f"{self.key_type} *")
        ret = lib.bpf_map_get_next_key(self.fd, prev if prev is not None else self.types.NULL, nxt)
        if ret == -errno.ENOENT:
            return None
        _check(ret, f"iterating map {self.name}")
        return nxt

    def __iter__(self) -> Iterator[Any]:
        prev = None
        while True:
            nxt = self._next_key(prev)
            if nxt is None:
                return
            yield self._key_out(nxt)
            prev = nxt

    def __len__(self) -> int:
        if self.is_array:
            return self.info.max_entries
        n = 0
        prev = None
        while (prev := self._next_key(prev)) is not None:
            n += 1
        return n

    def items(self) -> list[tuple[Any, Any]]:  # type: ignore[override]
        """Every (key, value) pair, read with batch lookups where the kernel has them."""
        return self.lookup_batch()

    def sum(self, key: Any) -> Any:
        """Per-CPU maps: the value for key summed over CPUs (ints, or struct fields)."""
        return sum_percpu(self[key])

    # batch operations -------------------------------------------------------

    def lookup_batch(self, chunk: int = 4096, delete: bool = False) -> list[tuple[Any, Any]]:
        """All entries as (key, value) pairs, read ``chunk`` at a time; with
        ``delete``, also removes them. Raises XdpflowError.
        """
        raw = self.lookup_batch_raw(chunk, delete)
        if raw is None:
            return self._items_slow(delete)
        keys, vals, n = raw
        ks, stride = self.info.key_size, self.ncpu * self.value_stride
        kbuf = self.types.from_buffer(keys)
        vbuf = self.types.from_buffer(vals)
        return [
            (self._key_out(self.types.cast(f"{self.key_type} *", kbuf + i * ks)), self._value_out(vbuf, i * stride))
            for i in range(n)
        ]

    def lookup_batch_raw(
        self, chunk: int = 8192, delete: bool = False, limit: int | None = None
    ) -> tuple[bytes, bytes, int] | None:
        """All entries as two packed buffers: ``n`` keys of key_size bytes and
        ``n`` values of ``possible_cpus x round_up(value_size, 8)`` bytes
        (per-CPU maps) or value_size bytes. For decoding in bulk (numpy).
        With ``limit``, stops after that many entries (the first ones of an
        array).

        Returns None where the kernel has no batch op for this map type
        (EINVAL/ENOTSUPP on the first call). Raises XdpflowError.
        """
        ks = self.info.key_size
        stride = self.ncpu * self.value_stride
        if limit is not None:
            chunk = max(1, min(chunk, limit))
        keys = self.types.new("char[]", chunk * ks)
        vals = self.types.new("char[]", chunk * stride)
        # the batch cursor is opaque: a key for arrays, a bucket for hashes
        cursor_len = max(ks, 8)
        in_b = self.types.new("char[]", cursor_len)
        out_b = self.types.new("char[]", cursor_len)
        count = self.types.new("uint32_t *")
        opts = ffi.new("struct bpf_map_batch_opts *", {"sz": ffi.sizeof("struct bpf_map_batch_opts")})
        fn = lib.bpf_map_lookup_and_delete_batch if delete else lib.bpf_map_lookup_batch
        first = True
        kparts: list[bytes] = []
        vparts: list[bytes] = []
        n = 0
        while True:
            count[0] = chunk if limit is None else min(chunk, limit - n)
            if count[0] == 0:
                return b"".join(kparts), b"".join(vparts), n
            ret = fn(self.fd, self.types.NULL if first else in_b, out_b, keys, vals, count, opts)
            if ret < 0 and -ret in _BATCH_UNSUPPORTED and first:
                return None
            if ret < 0 and -ret == errno.ENOSPC and not delete:
                # one hash bucket holds more entries than chunk: start over, bigger
                return self.lookup_batch_raw(chunk * 4, delete, limit)
            if ret < 0 and -ret != errno.ENOENT:
                _check(ret, f"batch-reading map {self.name}")
            got = count[0]
            if got:
                kparts.append(self.types.buffer(keys, got * ks)[:])
                vparts.append(self.types.buffer(vals, got * stride)[:])
                n += got
            if ret < 0:  # ENOENT: that was the last batch
                return b"".join(kparts), b"".join(vparts), n
            self.types.memmove(in_b, out_b, cursor_len)
            first = False

    def lookup_batch_into(self, keys: Any, values: Any, chunk: int = 65536) -> int | None:
        """Every entry of a hash map, written by the kernel straight into
        ``keys`` and ``values``: writable buffers (numpy arrays, bytearrays)
        with room for ``max_entries + chunk`` keys and values, laid out as
        lookup_batch_raw() returns them, without its copies. Returns how many
        entries were read, or None where the kernel has no batch op for this
        map type (or one bucket holds more than ``chunk`` entries): then
        lookup_batch_raw() reads it. Raises XdpflowError.
        """
        ks = self.info.key_size
        stride = self.ncpu * self.value_stride
        kbuf = self.types.from_buffer("char[]", keys, require_writable=True)
        vbuf = self.types.from_buffer("char[]", values, require_writable=True)
        if len(kbuf) < (self.info.max_entries + chunk) * ks or len(vbuf) < (self.info.max_entries + chunk) * stride:
            raise ValueError(f"buffers for {self.info.max_entries} + {chunk} entries of map {self.name} needed")
        cursor_len = max(ks, 8)  # opaque: a bucket for hashes
        in_b = self.types.new("char[]", cursor_len)
        out_b = self.types.new("char[]", cursor_len)
        count = self.types.new("uint32_t *")
        opts = ffi.new("struct bpf_map_batch_opts *", {"sz": ffi.sizeof("struct bpf_map_batch_opts")})
        n = 0
        while True:
            # an entry inserted meanwhile may take n past max_entries: the slack absorbs one batch
            count[0] = min(chunk, self.info.max_entries + chunk - n)
            if count[0] == 0:
                return n
            ret = lib.bpf_map_lookup_batch(
                self.fd, self.types.NULL if n == 0 else in_b, out_b, kbuf + n * ks, vbuf + n * stride, count, opts
            )
            if ret < 0 and (-ret in _BATCH_UNSUPPORTED and n == 0 or -ret == errno.ENOSPC):
                return None  # no batch op here, or a bucket holds more than chunk: lookup_batch_raw copes
            if ret < 0 and -ret != errno.ENOENT:
                _check(ret, f"batch-reading map {self.name}")
            n += count[0]
            if ret < 0:  # ENOENT: that was the last batch
                return n
            self.types.memmove(in_b, out_b, cursor_len)

    def _items_slow(self, delete: bool) -> list[tuple[Any, Any]]:
        out = []
        for k in list(self):
            v = self.lookup(k)
            if v is None:  # deleted by the program meanwhile
                continue
            out.append((k, v))
            if delete:
                self.pop(k, None)
        return out

    def update_batch(self, keys: Sequence[Any], values: Sequence[Any], flags: int = BPF_ANY) -> None:
        """Store many entries; per-key calls where batch ops are missing.

        Raises MapFullError when the map fills part-way; entries before the
        failing one stay written.
        """
        n = len(keys)
        if n != len(values):
            raise ValueError("update_batch: keys and values differ in length")
        if n == 0:
            return
        ks = self.info.key_size
        stride = self.ncpu * self.value_stride
        kraw = self.types.new("char[]", n * ks)
        vraw = self.types.new("char[]", n * stride)
        for i, (k, v) in enumerate(zip(keys, values)):
            self.types.memmove(kraw + i * ks, self._kbuf(k), ks)
            self.types.memmove(vraw + i * stride, self._value_in(v), stride)
        self.update_batch_raw(kraw, vraw, n, flags)

    def update_batch_raw(self, keys: Any, values: Any, n: int, flags: int = BPF_ANY) -> None:
        """Store ``n`` entries from packed cffi buffers laid out as
        ``lookup_batch_raw`` returns them. Raises XdpflowError/MapFullError.
        """
        if n == 0:
            return
        count = self.types.new("uint32_t *", n)
        opts = ffi.new(
            "struct bpf_map_batch_opts *",
            {"sz": ffi.sizeof("struct bpf_map_batch_opts"), "elem_flags": flags},
        )
        ret = lib.bpf_map_update_batch(self.fd, keys, values, count, opts)
        if ret < 0 and -ret in _BATCH_UNSUPPORTED and count[0] == 0:
            ks, stride = self.info.key_size, self.ncpu * self.value_stride
            kb, vb = self.types.cast("char *", keys), self.types.cast("char *", values)
            for i in range(n):
                ret = lib.bpf_map_update_elem(self.fd, kb + i * ks, vb + i * stride, flags)
                if ret < 0:
                    break
        if ret == -errno.E2BIG:
            raise os_error(errno.E2BIG, f"adding to map {self.name}", f"it is full ({self.info.max_entries} entries)")
        _check(ret, f"batch-updating map {self.name}")

    def delete_batch(self, keys: Sequence[Any]) -> None:
        """Delete many keys; a missing key is an error (XdpflowError ENOENT)."""
        n = len(keys)
        if n == 0:
            return
        ks = self.info.key_size
        kraw = self.types.new("char[]", n * ks)
        for i, k in enumerate(keys):
            self.types.memmove(kraw + i * ks, self._kbuf(k), ks)
        self.delete_batch_raw(kraw, n)

    def delete_batch_raw(self, keys: Any, n: int) -> None:
        """Delete ``n`` keys packed in a cffi buffer. Raises XdpflowError."""
        if n == 0:
            return
        count = self.types.new("uint32_t *", n)
        opts = ffi.new("struct bpf_map_batch_opts *", {"sz": ffi.sizeof("struct bpf_map_batch_opts")})
        ret = lib.bpf_map_delete_batch(self.fd, keys, count, opts)
        if ret < 0 and -ret in _BATCH_UNSUPPORTED and count[0] == 0:
            ks = self.info.key_size
            kb = self.types.cast("char *", keys)
            for i in range(n):
                ret = lib.bpf_map_delete_elem(self.fd, kb + i * ks)
                if ret < 0:
                    break
        _check(ret, f"batch-deleting from map {self.name}")

    def mmap(self) -> _mmap.mmap | None:
        """The values of an array created with BPF_F_MMAPABLE, mapped shared
        into this process (writable unless the fd is read-only): value ``i``
        at byte ``i * mmap_stride``. Reads and writes are plain memory
        accesses, where a batch syscall copies one element at a time.

        Returns None for any other map (such as an array pinned by an object
        built without the flag). Raises XdpflowError when mapping fails.
        """
        if self.info.type != BPF_MAP_TYPE_ARRAY or not self.info.flags & BPF_F_MMAPABLE:
            return None
        size = self.info.max_entries * self.mmap_stride
        try:
            return _mmap.mmap(self.fd, size, _mmap.MAP_SHARED, _mmap.PROT_READ | _mmap.PROT_WRITE)
        except PermissionError:
            return _mmap.mmap(self.fd, size, _mmap.MAP_SHARED, _mmap.PROT_READ)
        except OSError as e:
            raise os_error(e.errno or errno.EINVAL, f"mapping map {self.name} into memory") from e

    @property
    def mmap_stride(self) -> int:
        """Bytes from one value to the next in ``mmap()``: the kernel keeps
        array elements 8-byte aligned."""
        return round_up8(self.info.value_size)

    def clear(self) -> None:
        """Remove every entry; keys the program deletes meanwhile are ignored."""
        if self.is_array:
            raise XdpflowError(errno.EINVAL, f"map {self.name} is an array: its entries cannot be deleted")
        for k in list(self):
            self.pop(k, None)

    def pin(self, path: str) -> None:
        _check(lib.bpf_obj_pin(self.fd, path.encode()), f"pinning map {self.name} at {path}", _pin_hint(path))


def probe_map(map_type: int, key_size: int, value_size: int, max_entries: int) -> None:
    """Create and close a map of this kind: whether the kernel has it.
    Raises XdpflowError with the kernel's errno."""
    fd = lib.bpf_map_create(map_type, b"xf_probe", key_size, value_size, max_entries, ffi.NULL)
    if fd < 0:
        raise os_error(-fd, f"creating a map of type {map_type}")
    os.close(fd)


def sum_percpu(values: list[Any]) -> Any:
    """Sum a per-CPU value list: ints add up; structs add field by field.

    Struct fields that are arrays of structs (``struct xf_counters``) are
    summed element by element; the result is a new cffi struct.
    """
    if not values:
        return 0
    if isinstance(values[0], int):
        return sum(values)
    ptype = ffi.typeof(values[0])  # a ctype object works across FFIs
    ctype = ptype.item
    out = ffi.new(ptype)
    for v in values:
        _add_into(out[0], v[0], ctype)
    return out


def _add_into(dst: Any, src: Any, ctype: Any) -> None:
    for name, field in ctype.fields:
        t = field.type
        if t.kind == "primitive":
            setattr(dst, name, getattr(dst, name) + getattr(src, name))
        elif t.kind == "array" and t.item.kind == "struct":
            d, s = getattr(dst, name), getattr(src, name)
            for i in range(t.length):
                _add_into(d[i], s[i], t.item)
        elif t.kind == "array":
            d, s = getattr(dst, name), getattr(src, name)
            for i in range(t.length):
                d[i] += s[i]
        elif t.kind == "struct":
            _add_into(getattr(dst, name), getattr(src, name), t)


def _pin_hint(path: str) -> str:
    return f"is bpffs mounted on {os.path.dirname(path) or '/'} (mount -t bpf bpf /sys/fs/bpf)?"


# --------------------------------------------------------------------------
# programs


class TestRun(NamedTuple):
    retval: int
    duration_ns: int
    data: bytes


class ProgInfo(NamedTuple):
    id: int
    type: int
    name: str
    tag: str
    load_time_ns: int  # since boot
    map_ids: tuple[int, ...]


def prog_info(fd: int) -> ProgInfo:
    """Kernel's view of the program behind ``fd``. Raises XdpflowError."""
    info = ffi.new("struct bpf_prog_info *")
    ln = ffi.new("uint32_t *", ffi.sizeof(info[0]))
    _check(lib.bpf_obj_get_info_by_fd(fd, info, ln), "reading program info")
    n = info.nr_map_ids
    ids: tuple[int, ...] = ()
    if n:
        arr = ffi.new("uint32_t[]", n)
        info2 = ffi.new("struct bpf_prog_info *")
        info2.nr_map_ids = n
        info2.map_ids = int(ffi.cast("uintptr_t", arr))
        ln[0] = ffi.sizeof(info2[0])
        _check(lib.bpf_obj_get_info_by_fd(fd, info2, ln), "reading program map ids")
        ids = tuple(arr[i] for i in range(min(n, info2.nr_map_ids)))
    return ProgInfo(
        id=info.id,
        type=info.type,
        name=ffi.string(info.name).decode(),
        tag=bytes(info.tag).hex(),
        load_time_ns=info.load_time,
        map_ids=ids,
    )


class Program(OwnedFd):
    """A loaded BPF program; owns a dup of its fd."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name

    @classmethod
    def from_pin(cls, path: str) -> Program:
        fd = obj_get(path)
        return cls(fd, os.path.basename(path))

    @classmethod
    def from_id(cls, prog_id: int) -> Program:
        fd = lib.bpf_prog_get_fd_by_id(prog_id)
        if fd < 0:
            raise os_error(-fd, f"opening program id {prog_id}")
        return cls(fd, f"id {prog_id}")

    @property
    def info(self) -> ProgInfo:
        return prog_info(self.fd)

    @property
    def id(self) -> int:
        return self.info.id

    def pin(self, path: str) -> None:
        _check(lib.bpf_obj_pin(self.fd, path.encode()), f"pinning program at {path}", _pin_hint(path))

    def test_run(
        self,
        data: bytes,
        repeat: int = 1,
        *,
        ingress_ifindex: int = 0,
        live_frames: bool = False,
        batch_size: int = 0,
        data_out: bool = True,
    ) -> TestRun:
        """Run the program on ``data`` with BPF_PROG_TEST_RUN.

        ``repeat`` runs it that many times (the kernel reports the mean
        duration). ``live_frames`` sends the frames the program returns XDP_TX
        or XDP_REDIRECT for out for real (BPF_F_TEST_XDP_LIVE_FRAMES), which
        needs ``ingress_ifindex``. Raises XdpflowError.
        """
        opts = ffi.new("struct bpf_test_run_opts *")
        opts.sz = ffi.sizeof("struct bpf_test_run_opts")
        din = ffi.from_buffer(data)
        opts.data_in = din
        opts.data_size_in = len(data)
        out = None
        if data_out and not live_frames:
            out = ffi.new("char[]", max(len(data) + 256, 4096))
            opts.data_out = out
            opts.data_size_out = len(out)
        opts.repeat = repeat
        ctx = None
        if ingress_ifindex or live_frames:
            ctx = ffi.new("struct xdp_md *")
            ctx.data_end = len(data)
            ctx.ingress_ifindex = ingress_ifindex
            opts.ctx_in = ctx
            opts.ctx_size_in = ffi.sizeof("struct xdp_md")
        if live_frames:
            opts.flags = BPF_F_TEST_XDP_LIVE_FRAMES
            opts.batch_size = batch_size
        _check(lib.bpf_prog_test_run_opts(self.fd, opts), f"test-running program {self.name}")
        got = ffi.buffer(out, opts.data_size_out)[:] if out is not None else b""
        return TestRun(retval=opts.retval, duration_ns=opts.duration, data=got)


# --------------------------------------------------------------------------
# links


class LinkInfo(NamedTuple):
    id: int
    type: int
    prog_id: int
    ifindex: int  # XDP links: the device's index now (0: the device is gone)


class Link(OwnedFd):
    """A BPF link (an attachment held by a file descriptor or a pin); owns
    its fd. Closing the last fd of an unpinned link detaches the program."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def xdp(cls, prog_fd: int, ifindex: int, flags: int = 0) -> Link:
        """Attach ``prog_fd`` to device ``ifindex`` through a new XDP link;
        ``flags`` are XDP_FLAGS_*_MODE. Raises XdpflowError: EBUSY when a
        program is attached without a link (netlink) or another link holds
        the device; EINVAL/EOPNOTSUPP where the kernel or mode has no links.
        """
        opts = ffi.new("struct bpf_link_create_opts *", {"sz": ffi.sizeof("struct bpf_link_create_opts")})
        opts.flags = flags
        fd = lib.bpf_link_create(prog_fd, ifindex, BPF_XDP, opts)
        if fd < 0:
            err = -fd
            hint = None
            if err == errno.EBUSY:
                hint = "another program is attached to the device; detach it first"
            raise os_error(err, f"creating an XDP link on interface index {ifindex}", hint)
        return cls(int(fd))

    @classmethod
    def from_pin(cls, path: str) -> Link:
        """Open the link pinned at ``path``. Raises XdpflowError (ENOENT)."""
        return cls(obj_get(path))

    @classmethod
    def from_id(cls, link_id: int) -> Link:
        fd = lib.bpf_link_get_fd_by_id(link_id)
        if fd < 0:
            raise os_error(-fd, f"opening link id {link_id}")
        return cls(int(fd))

    @property
    def info(self) -> LinkInfo:
        """The kernel's view of the link. Raises XdpflowError."""
        info = ffi.new("struct bpf_link_info *")
        ln = ffi.new("uint32_t *", ffi.sizeof(info[0]))
        _check(lib.bpf_obj_get_info_by_fd(self.fd, info, ln), "reading link info")
        ifindex = info.xdp_ifindex if info.type == BPF_LINK_TYPE_XDP else 0
        return LinkInfo(id=info.id, type=info.type, prog_id=info.prog_id, ifindex=ifindex)

    def update(self, new_prog_fd: int, old_prog_fd: int | None = None) -> None:
        """Swap the link's program for ``new_prog_fd`` atomically; with
        ``old_prog_fd`` only if that one still runs (else EPERM).
        Raises XdpflowError."""
        opts = ffi.new("struct bpf_link_update_opts *", {"sz": ffi.sizeof("struct bpf_link_update_opts")})
        if old_prog_fd is not None:
            opts.flags = BPF_F_REPLACE
            opts.old_prog_fd = old_prog_fd
        _check(lib.bpf_link_update(self.fd, new_prog_fd, opts), "replacing the program of an XDP link")

    def pin(self, path: str) -> None:
        _check(lib.bpf_obj_pin(self.fd, path.encode()), f"pinning link at {path}", _pin_hint(path))

    def detach(self) -> None:
        """Detach the program now, whoever else holds the link. Raises XdpflowError."""
        _check(lib.bpf_link_detach(self.fd), "detaching an XDP link")


def link_ids() -> list[int]:
    """Ids of every BPF link in the system. Raises XdpflowError."""
    ids: list[int] = []
    nxt = ffi.new("uint32_t *")
    cur = 0
    while True:
        ret = lib.bpf_link_get_next_id(cur, nxt)
        if ret < 0:
            if ret == -errno.ENOENT:
                return ids
            raise os_error(-ret, "listing BPF links")
        cur = int(nxt[0])
        ids.append(cur)


# --------------------------------------------------------------------------
# objects


class MapSpec:
    """A map of an opened, not yet loaded object: size, pin path, type."""

    def __init__(self, ptr: Any) -> None:
        self._p = ptr
        self.name = ffi.string(lib.bpf_map__name(ptr)).decode()

    @property
    def max_entries(self) -> int:
        return int(lib.bpf_map__max_entries(self._p))

    def set_max_entries(self, n: int) -> None:
        _check(lib.bpf_map__set_max_entries(self._p, n), f"sizing map {self.name} to {n}")

    @property
    def type(self) -> int:
        return int(lib.bpf_map__type(self._p))

    @property
    def key_size(self) -> int:
        return int(lib.bpf_map__key_size(self._p))

    @property
    def value_size(self) -> int:
        return int(lib.bpf_map__value_size(self._p))

    def set_type(self, t: int) -> None:
        _check(lib.bpf_map__set_type(self._p, t), f"setting map {self.name} type")

    @property
    def map_flags(self) -> int:
        return int(lib.bpf_map__map_flags(self._p))

    def set_map_flags(self, flags: int) -> None:
        _check(lib.bpf_map__set_map_flags(self._p, flags), f"setting map {self.name} flags")

    def set_pin_path(self, path: str) -> None:
        """Pin the map at path on load, or reuse the map already pinned there."""
        _check(lib.bpf_map__set_pin_path(self._p, path.encode()), f"setting pin path of map {self.name}")

    def reuse_fd(self, fd: int) -> None:
        _check(lib.bpf_map__reuse_fd(self._p, fd), f"reusing an fd for map {self.name}")

    def initial_value(self, ctype: str, types: cffi.FFI | None = None) -> Any:
        """Typed pointer to the start of the map's initial data (.rodata/.data),
        writable before load. The variable of type ``ctype`` must come first.
        """
        t = types or ffi
        size = ffi.new("size_t *")
        p = lib.bpf_map__initial_value(self._p, size)
        if p == ffi.NULL:
            raise XdpflowError(errno.EINVAL, f"map {self.name} has no initial value")
        if size[0] < t.sizeof(ctype):
            raise XdpflowError(
                errno.EINVAL,
                f"map {self.name} holds {size[0]} bytes, {ctype} is {t.sizeof(ctype)}: "
                "the object and the shared header disagree; rebuild with `make`",
            )
        return t.cast(f"{ctype} *", p)

    def initial_bytes(self) -> Any:
        """The map's initial data as a writable cffi buffer (before load)."""
        size = ffi.new("size_t *")
        p = lib.bpf_map__initial_value(self._p, size)
        if p == ffi.NULL:
            raise XdpflowError(errno.EINVAL, f"map {self.name} has no initial value")
        return ffi.buffer(p, size[0])


class Object:
    """A BPF ELF object: opened (pure: maps and programs can be configured),
    then ``load()``-ed into the kernel. Close it, or use it as a context
    manager; maps and programs taken from it hold their own fds.
    """

    LOG_SIZE = 16 * 1024 * 1024

    def __init__(self, path: str) -> None:
        self.path = path
        self._log = ffi.new("char[]", self.LOG_SIZE)
        opts = ffi.new("struct bpf_object_open_opts *")
        opts.sz = ffi.sizeof("struct bpf_object_open_opts")
        opts.kernel_log_buf = self._log
        opts.kernel_log_size = self.LOG_SIZE
        self._opts = opts
        ptr = lib.bpf_object__open_file(path.encode(), opts)
        if ptr == ffi.NULL:
            err = _errno_or(errno.EINVAL)
            hint = "rebuild it with `make`" if err == errno.ENOENT else None
            raise os_error(err, f"opening BPF object {path}", hint)
        self._p = ptr
        self.loaded = False
        self.maps: dict[str, MapSpec] = {}
        m = lib.bpf_object__next_map(ptr, ffi.NULL)
        while m != ffi.NULL:
            spec = MapSpec(m)
            self.maps[spec.name] = spec
            m = lib.bpf_object__next_map(ptr, m)

    def __enter__(self) -> Object:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._p is not None:
            lib.bpf_object__close(self._p)
            self._p = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def map_spec(self, name: str) -> MapSpec:
        try:
            return self.maps[name]
        except KeyError:
            raise XdpflowError(errno.ENOENT, f"{self.path} has no map named {name!r}") from None

    def _prog_ptr(self, name: str) -> Any:
        p = lib.bpf_object__find_program_by_name(self._p, name.encode())
        if p == ffi.NULL:
            raise XdpflowError(errno.ENOENT, f"{self.path} has no program named {name!r}")
        return p

    def set_autoload(self, name: str, autoload: bool) -> None:
        _check(lib.bpf_program__set_autoload(self._prog_ptr(name), autoload), f"setting autoload of {name}")

    def set_attach_target(self, name: str, target_fd: int, func: str) -> None:
        """Make extension (freplace) program ``name`` replace function ``func``
        of the loaded program ``target_fd``. Raises XdpflowError."""
        _check(
            lib.bpf_program__set_attach_target(self._prog_ptr(name), target_fd, func.encode()),
            f"setting the attach target of {name}",
        )

    def load(self) -> None:
        """Create maps (or reuse pinned ones), load and verify programs.

        Raises VerifierError with the verifier log if a program is refused,
        XdpflowError otherwise (EPERM: not root; EINVAL with a pinned map:
        the pinned map does not match this object's definition).
        """
        ret = lib.bpf_object__load(self._p)
        if ret < 0:
            err = -ret
            log = ffi.string(self._log).decode(errors="replace")
            # the verifier refuses with EACCES as often as EINVAL; only EPERM means "not root"
            if log.strip() and err != errno.EPERM:
                raise VerifierError(
                    err,
                    f"the kernel refused to load {os.path.basename(self.path)}: {os.strerror(err)}; "
                    "the verifier log follows (last lines)",
                    log,
                )
            hint = None
            if err == errno.EINVAL and any(lib.bpf_map__pin_path(s._p) != ffi.NULL for s in self.maps.values()):
                hint = (
                    "a pinned map may not match this program's definition (size or type); "
                    "detach the interface and attach again"
                )
            raise os_error(err, f"loading {os.path.basename(self.path)}", hint)
        self.loaded = True

    def program(self, name: str) -> Program:
        fd = lib.bpf_program__fd(self._prog_ptr(name))
        if fd < 0:
            raise XdpflowError(errno.EINVAL, f"program {name} is not loaded")
        return Program(os.dup(fd), name)

    def insns(self, name: str) -> bytes:
        """Program ``name``'s instructions as libbpf holds them: after ``load()``,
        what the kernel was given (subprograms appended, map fds in the
        ``ld_imm64`` instructions). 8 bytes each (struct bpf_insn)."""
        p = self._prog_ptr(name)
        n = lib.bpf_program__insn_cnt(p)
        return bytes(ffi.buffer(lib.bpf_program__insns(p), n * 8))

    def map(self, name: str, key_type: str, value_type: str, types: cffi.FFI | None = None) -> Map:
        spec = self.map_spec(name)
        fd = lib.bpf_map__fd(spec._p)
        if fd < 0:
            raise XdpflowError(errno.EINVAL, f"map {name} is not created (load the object first)")
        dup = os.dup(fd)
        try:
            return Map(dup, key_type, value_type, name=name, types=types)
        except BaseException:
            os.close(dup)
            raise


# --------------------------------------------------------------------------
# ring buffers


class RingBuffer:
    """Consume a BPF_MAP_TYPE_RINGBUF: ``poll()`` calls ``callback(bytes)`` per record."""

    def __init__(self, map_fd: int, callback: Any) -> None:
        self._user_cb = callback
        self._error: BaseException | None = None

        def _cb(ctx: Any, data: Any, size: int) -> int:
            try:
                self._user_cb(ffi.buffer(data, size)[:])
            except BaseException as e:  # surface it from poll(), not inside libbpf
                self._error = e
                return -1
            return 0

        self._cb = ffi.callback("int(void *, void *, size_t)", _cb)
        opts = ffi.new("struct ring_buffer_opts *", {"sz": ffi.sizeof("struct ring_buffer_opts")})
        self._rb = lib.ring_buffer__new(map_fd, self._cb, ffi.NULL, opts)
        if self._rb == ffi.NULL:
            raise os_error(_errno_or(errno.EINVAL), "opening the event ring buffer")

    def poll(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms for records; returns how many were handled."""
        ret = lib.ring_buffer__poll(self._rb, timeout_ms)
        if self._error is not None:
            e, self._error = self._error, None
            raise e
        if ret == -errno.EINTR:
            return 0
        return _check(ret, "polling the event ring buffer")

    def consume(self) -> int:
        """Handle every record available now, without waiting."""
        ret = lib.ring_buffer__consume(self._rb)
        if self._error is not None:
            e, self._error = self._error, None
            raise e
        return _check(ret, "reading the event ring buffer")

    def close(self) -> None:
        if self._rb is not None:
            lib.ring_buffer__free(self._rb)
            self._rb = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
