// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* xdpflow.bpf.c - count, track and block at the XDP hook.
 *
 * Per frame: parse Ethernet/VLAN/IPv4/IPv6/L4, drop sources (or
 * destinations) on the blocklist, update the flow's entry in an LRU table,
 * and account the frame in the per-CPU interface counters.
 *
 * No atomics on the counters: XDP runs in softirq context, one CPU per frame
 * and without preemption, so per-CPU values need no locking.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "parsing.h"
#include "xdpflow.h"

#ifndef EEXIST
#define EEXIST 17
#endif

/* the whole .rodata: one struct so the controller can write it by type */
const volatile struct xf_knobs knobs = {
	.events_per_sec = XF_EVENTS_PER_SEC,
	.prot_mask = XF_PHOSTS_DEFAULT - 1,
	.flow_budget = XF_FLOW_BUDGET_DEFAULT,
};

/* per interface: pinned under <pin root>/<ifname>/ */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xf_counters);
} counters SEC(".maps");

/* Shared LRU tables with atomic adds by default: measured faster than the
 * per-CPU LRU on one CPU (no per-CPU value to locate) and its memory does not
 * grow with the CPU count; the controller can switch them to per-CPU.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, XF_FLOWS_DEFAULT);
	__type(key, struct xf_flow4);
	__type(value, struct xf_flow_val);
} flows_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, XF_FLOWS_DEFAULT);
	__type(key, struct xf_flow6);
	__type(value, struct xf_flow_val);
} flows_v6 SEC(".maps");

/* new-flow admission control, per CPU: see struct xf_admission */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xf_admission);
} admission SEC(".maps");

/* shared by every interface: pinned under <pin root>/ */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xf_config);
} config SEC(".maps");

/* never read here: the controller's count of the blocklist, see xf_bl_count */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xf_bl_count);
} bl_count SEC(".maps");

/* One BTF-defined map; the families below name their shapes */
#define XF_MAP(name, maptype, n, flags, ktype, vtype)                          \
	struct {                                                               \
		__uint(type, maptype);                                         \
		__uint(max_entries, n);                                        \
		__uint(map_flags, flags);                                      \
		__type(key, ktype);                                            \
		__type(value, vtype);                                          \
	} name SEC(".maps")

#define BLOCKLIST_TRIE(name, keytype)                                          \
	XF_MAP(name, BPF_MAP_TYPE_LPM_TRIE, XF_BLOCK_MAX, BPF_F_NO_PREALLOC,   \
	       keytype, __u32)

/* every rule lives in its trie: the store the controller reads back; no
 * frame walks it */
BLOCKLIST_TRIE(bl4_src, struct xf_lpm4);
BLOCKLIST_TRIE(bl4_dst, struct xf_lpm4);
BLOCKLIST_TRIE(bl6_src, struct xf_lpm6);
BLOCKLIST_TRIE(bl6_dst, struct xf_lpm6);

/* The IPv4 path never walks a trie: a walk over 10k prefixes costs ~60 ns,
 * one level of this table a few. The controller computes it from the rules.
 */
#define BL4_LEVEL(name, maptype, size, flags)                                  \
	XF_MAP(name, maptype, size, flags, __u32, __u32)

/* the arrays are mmapable: the controller reads and writes them as memory */
BL4_LEVEL(bl4_l1_src, BPF_MAP_TYPE_ARRAY, XF_BL4_L1_SIZE, BPF_F_MMAPABLE);
BL4_LEVEL(bl4_l2c_src, BPF_MAP_TYPE_ARRAY, XF_BL4_L2C_SIZE, BPF_F_MMAPABLE);
BL4_LEVEL(bl4_l2_src, BPF_MAP_TYPE_HASH, XF_BL4_L2_MAX, BPF_F_NO_PREALLOC);
BL4_LEVEL(bl4_l3_src, BPF_MAP_TYPE_HASH, XF_BL4_L3_MAX, BPF_F_NO_PREALLOC);
BL4_LEVEL(bl4_l2h_src, BPF_MAP_TYPE_ARRAY, XF_BL4_L2C_SIZE, BPF_F_MMAPABLE);
BL4_LEVEL(bl4_l3c_src, BPF_MAP_TYPE_ARRAY, XF_BL4_L3C_SIZE, BPF_F_MMAPABLE);
BL4_LEVEL(bl4_l1_dst, BPF_MAP_TYPE_ARRAY, XF_BL4_L1_SIZE, BPF_F_MMAPABLE);
BL4_LEVEL(bl4_l2c_dst, BPF_MAP_TYPE_ARRAY, XF_BL4_L2C_SIZE, BPF_F_MMAPABLE);
BL4_LEVEL(bl4_l2_dst, BPF_MAP_TYPE_HASH, XF_BL4_L2_MAX, BPF_F_NO_PREALLOC);
BL4_LEVEL(bl4_l3_dst, BPF_MAP_TYPE_HASH, XF_BL4_L3_MAX, BPF_F_NO_PREALLOC);
BL4_LEVEL(bl4_l2h_dst, BPF_MAP_TYPE_ARRAY, XF_BL4_L2C_SIZE, BPF_F_MMAPABLE);
BL4_LEVEL(bl4_l3c_dst, BPF_MAP_TYPE_ARRAY, XF_BL4_L3C_SIZE, BPF_F_MMAPABLE);

/* The IPv6 table (see XF_BL6_* in xdpflow.h), computed by the controller. */
#define BL6_L0(name)                                                           \
	XF_MAP(name, BPF_MAP_TYPE_ARRAY, XF_BL6_L0_SIZE, BPF_F_MMAPABLE, __u32, \
	       __u32)

#define BL6_DEEP(name)                                                         \
	XF_MAP(name, BPF_MAP_TYPE_HASH, XF_BL6_DEEP_MAX, BPF_F_NO_PREALLOC,    \
	       struct xf_bl6_key, __u32)

#define BL6_TAB(name)                                                          \
	XF_MAP(name, BPF_MAP_TYPE_ARRAY, XF_BL6_BUCKETS, BPF_F_MMAPABLE, __u32, \
	       struct xf_bl6_bucket)

#define BL6_FILTER(name)                                                       \
	XF_MAP(name, BPF_MAP_TYPE_ARRAY, XF_PF6_WORDS, BPF_F_MMAPABLE, __u32,  \
	       __u64)

#define BL6_L1(name)                                                           \
	XF_MAP(name, BPF_MAP_TYPE_ARRAY, XF_BL6_L1_SIZE, BPF_F_MMAPABLE, __u32, \
	       __u64)

BL6_L0(bl6_l0_src);
BL6_TAB(bl6_tab_src);
BL6_DEEP(bl6_deep_src);
BL6_FILTER(bl6_pf_src);
BL6_L1(bl6_l1_src);
BL6_L0(bl6_l0_dst);
BL6_TAB(bl6_tab_dst);
BL6_DEEP(bl6_deep_dst);
BL6_FILTER(bl6_pf_dst);
BL6_L1(bl6_l1_dst);

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XF_RULES_MAX);
	__type(key, __u32);
	__type(value, __u64);
} rule_hits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, XF_EVENTS_BYTES);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xf_ratelimit);
} event_budget SEC(".maps");

/* per interface: the program frames xdpflow passes go to next (--then);
 * slot 0, empty when nothing is chained
 */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} next_prog SEC(".maps");

/* multi-field rules (bpf/rules.h): two slots of every table, see xdpflow.h */
#define RULE_ARRAY(name, n, vtype)                                             \
	XF_MAP(name, BPF_MAP_TYPE_ARRAY, n, 0, __u32, vtype)

RULE_ARRAY(rl_head, 2, struct xf_rule_head);
RULE_ARRAY(rl_pool, 2, struct xf_rule_pool);
RULE_ARRAY(rl_sport, 2, struct xf_rule_tport);
RULE_ARRAY(rl_dport, 2, struct xf_rule_tport);
RULE_ARRAY(rl_proto, 2, struct xf_rule_t16);
RULE_ARRAY(rl_len, 2, struct xf_rule_t16);
RULE_ARRAY(rl_l1, 2, struct xf_rule_tl1);
RULE_ARRAY(rl_c24, 2, struct xf_rule_tchunk);
RULE_ARRAY(rl_c32, 2, struct xf_rule_tchunk);
_Static_assert(XF_RC24_CHUNKS == XF_RC32_CHUNKS, "rl_c24 and rl_c32 share a type");
RULE_ARRAY(rl_act, 2 * XF_RULE_BITS, struct xf_rule_act);
RULE_ARRAY(rule_defs, 2 * XF_RULE_CAP, struct xf_rule_def);

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XF_RADDR_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct xf_raddr_key);
	__type(value, __u64);
} rl_addr SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2 * XF_RULE_CAP);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct xf_riface_key);
	__type(value, __u64);
} rl_iface SEC(".maps");

/* counter slots stay with a rule across rule-set changes */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XF_RCOUNTERS);
	__type(key, __u32);
	__type(value, struct xf_rule_cnt);
} rule_counters SEC(".maps");

RULE_ARRAY(rl_gcra, XF_RRATE_SETS, struct xf_rate_set);

/* protected destinations (bpf/protect.h): two slots, see xdpflow.h */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * 2 * XF_PL1_SIZE);
	__type(key, __u32);
	__type(value, __u32);
} prot_l1 SEC(".maps");

RULE_ARRAY(prot_head, 2, struct xf_prot_head);
RULE_ARRAY(prot_pf, 2 * XF_PPF_WORDS, __u64);

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XF_PADDR_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct xf_paddr_key);
	__type(value, __u32);
} prot_addr SEC(".maps");

/* per CPU, slots found by hashing: see struct xf_host_slot. A full table
 * is counted (prot_overflow), where an LRU would evict a victim silently.
 * Sized at attach, with knobs.prot_mask. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XF_PHOSTS_DEFAULT);
	__type(key, __u32);
	__type(value, struct xf_host_slot);
} prot_hosts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XF_PGROUPS);
	__type(key, __u32);
	__type(value, struct xf_host_cnt);
} prot_overflow SEC(".maps");

/* what one frame turned out to be */
struct pkt {
	__u32 len;      /* frame length */
	__u32 iplen;    /* IP length, counted by flows */
	__u32 tcp_flags;
	__u32 prot;     /* XF_CFG_PROTECT* of the frame's config | PROT_NEW_FLOW */
	__u64 now;      /* jiffies, once read (0: not yet) */
	/* the frame's counters and verdict, kept here in memory: as local
	 * values clang set all four again before every bounds check that
	 * can jump to out: (~40 instructions per frame) */
	__u32 cls;
	__u32 l4cnt;
	__u32 act;
	int action;
	__u8 family;
	/* 8-byte aligned, so an IPv6 address is read as two 64-bit loads:
	 * at the flow key's natural alignment (2) clang reads it a byte at a
	 * time, ~30 instructions per half */
	union {
		struct xf_flow4 k4;
		struct xf_flow6 k6;
	} __attribute__((aligned(8)));
};

static __always_inline void count(struct xf_counters *c, __u32 idx, __u32 len)
{
	if (idx < XF_CNT_MAX) {
		c->c[idx].packets++;
		c->c[idx].bytes += len;
	}
}

#include "protect.h"

static __always_inline __u32 l4_class(int proto)
{
	switch (proto) {
	case IPPROTO_TCP:
		return XF_CNT_TCP;
	case IPPROTO_UDP:
		return XF_CNT_UDP;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		return XF_CNT_ICMP;
	default:
		return XF_CNT_OTHER;
	}
}

/* Ports, ICMP type/code or nothing. Returns -1 for a truncated header. */
static __always_inline int parse_l4(struct hdr_cursor *nh, void *data_end,
				    int proto, int l4_ok, __be16 *sport,
				    __be16 *dport, __u32 *tcp_flags)
{
	if (!l4_ok)
		return 0;

	if (proto == IPPROTO_TCP) {
		struct tcphdr *th = nh->pos;

		if ((void *)(th + 1) > data_end || (void *)(th + 1) > nh->end)
			return -1;
		if (th->doff < 5 || (void *)th + th->doff * 4 > nh->end)
			return -1;
		*sport = th->source;
		*dport = th->dest;
		*tcp_flags = ((__u8 *)th)[13];
	} else if (proto == IPPROTO_UDP) {
		struct udphdr *uh = nh->pos;

		if ((void *)(uh + 1) > data_end || (void *)(uh + 1) > nh->end)
			return -1;
		*sport = uh->source;
		*dport = uh->dest;
	} else if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
		__u8 *ic = nh->pos;

		if ((void *)(ic + 2) > data_end || (void *)(ic + 2) > nh->end)
			return -1;
		*sport = bpf_htons(ic[0]);
		*dport = bpf_htons(ic[1]);
	}
	return 0;
}

/* Longest-prefix match of a host-order address in one direction's table:
 * returns rule index + 1, or 0.
 */
static __always_inline __u32 bl4_lookup(void *l1, void *l2c, void *l2, void *l3,
					 void *l2h, void *l3c, __u32 addr)
{
	__u32 key = addr >> 16;
	__u32 *e = bpf_map_lookup_elem(l1, &key);
	__u32 v;

	if (!e)
		return 0;
	v = *e;
	if (!(v & (XF_BL_D24 | XF_BL_HOSTS)))
		return v;
	if (v & XF_BL_CHUNK) {
		/* the /16's chunk: one slot per /24, each a complete answer */
		key = ((v & XF_BL_RULE_MASK) << 8) | ((addr >> 8) & 0xff);
		e = bpf_map_lookup_elem(l2c, &key);
		if (!e)
			return 0;
		v = *e;
		if (v & XF_BL_HOSTS) {
			/* the /24's hosts in an array chunk, when they have
			 * one: a load instead of a hash lookup (~20 ns) */
			__u32 *h = bpf_map_lookup_elem(l2h, &key);

			if (h && *h) {
				key = ((*h - 1) << 8) | (addr & 0xff);
				e = bpf_map_lookup_elem(l3c, &key);
				return e ? *e : 0;
			}
		}
	} else if (v & XF_BL_D24) {
		/* every /24 holding a longer rule has an entry */
		key = addr >> 8;
		e = bpf_map_lookup_elem(l2, &key);
		if (!e)
			return v & XF_BL_RULE_MASK;
		v = *e;
	}
	if (!(v & XF_BL_HOSTS))
		return v & XF_BL_RULE_MASK;
	key = addr;
	e = bpf_map_lookup_elem(l3, &key);
	return e ? *e : v & XF_BL_RULE_MASK;
}

static __always_inline __u32 bl4_match(__u32 flags, struct xf_flow4 *k)
{
	__u32 r;

	if (flags & XF_CFG_BL4_SRC) {
		r = bl4_lookup(&bl4_l1_src, &bl4_l2c_src, &bl4_l2_src,
			       &bl4_l3_src, &bl4_l2h_src, &bl4_l3c_src,
			       bpf_ntohl(k->saddr));
		if (r)
			return r;
	}
	if (flags & XF_CFG_BL4_DST)
		return bl4_lookup(&bl4_l1_dst, &bl4_l2c_dst, &bl4_l2_dst,
				  &bl4_l3_dst, &bl4_l2h_dst, &bl4_l3c_dst,
				  bpf_ntohl(k->daddr));
	return 0;
}

/* Longest-prefix match of an IPv6 address in one direction's table:
 * returns rule index + 1, or 0. Each entry found is the complete answer for
 * its region; a miss means nothing longer covers the address.
 */
/* the entry of region k: from its bucket in tab, or from the overflow
 * hash when the bucket says some of its regions are there; NULL: none */
static __always_inline __u32 *bl6_find(void *tab, void *deep, __u64 hi,
				       __u64 lo, __u32 plen)
{
	__u64 x = (hi * XF_BL6_M1) ^ (lo * XF_BL6_M2) ^ plen;
	struct xf_bl6_key k;
	__u32 idx;
	struct xf_bl6_bucket *b;

	x ^= x >> 32;
	idx = (x * XF_BL6_M3) >> (64 - XF_BL6_BUCKET_BITS);
	b = bpf_map_lookup_elem(tab, &idx);
	if (!b)
		return NULL;
#pragma unroll
	for (int w = 0; w < XF_BL6_WAYS; w++) {
		/* plen first: the controller writes it last (see XF_BL6_WAYS);
		 * most slots are free or of another level */
		if (*(volatile __u32 *)&b->s[w].plen != plen)
			continue;
		if (!((*(volatile __u64 *)&b->s[w].hi ^ hi) |
		      (*(volatile __u64 *)&b->s[w].lo ^ lo)))
			return &b->s[w].val;
	}
	if (!*(volatile __u32 *)&b->ovf)
		return NULL;
	/* the key on the stack only here: the probes above keep it in
	 * registers */
	k.hi = hi;
	k.lo = lo;
	k.plen = plen;
	k.pad = 0;
	return bpf_map_lookup_elem(deep, &k);
}

/* The walk below L0 from the region length next (v: the L0 entry), in the
 * arrays of one direction. */
static __always_inline __u32 bl6_deeper(void *tab, void *deep, __u64 hi,
					 __u64 lo, __u32 v)
{
	__u32 next = v >> XF_BL6_NEXT_SHIFT;
	__u64 khi, klo;
	__u32 *e;

#pragma unroll
	for (int i = 0; i < XF_BL6_LEVELS; i++) {
		if (next < 64) {
			khi = hi & ~(~0ULL >> next);
			klo = 0;
		} else if (next == 64) {
			khi = hi;
			klo = 0;
		} else if (next < 128) {
			khi = hi;
			klo = lo & ~(~0ULL >> (next - 64));
		} else {
			khi = hi;
			klo = lo;
		}
		e = bl6_find(tab, deep, khi, klo, next);
		if (!e)
			break;
		v = *(volatile __u32 *)e;
		next = v >> XF_BL6_NEXT_SHIFT;
		if (!next)
			break;
	}
	return v & XF_BL6_RULE_MASK;
}

/* A global function: the verifier checks the unrolled walk once, not once
 * per path of the program around it (that multiplied to most of the
 * program's verification budget once the rules came after it). Only
 * addresses whose /16 and /32 hold longer rules pay its call.
 */
__attribute__((noinline)) __u32 bl6_walk(__u32 dst, __u64 hi, __u64 lo,
					  __u32 v)
{
	if (dst)
		return bl6_deeper(&bl6_tab_dst, &bl6_deep_dst, hi, lo, v);
	return bl6_deeper(&bl6_tab_src, &bl6_deep_src, hi, lo, v);
}

static __always_inline __u32 bl6_lookup(void *l0, void *l1, __u32 dst,
					 const __u8 *addr)
{
	/* addr is in struct pkt's aligned key */
	const __u64 *a = __builtin_assume_aligned(addr, 8);
	__u64 hi = bpf_be64_to_cpu(a[0]);
	__u32 key = hi >> 48;
	__u32 *e = bpf_map_lookup_elem(l0, &key);
	__u32 v, next, w, tag;
	__u64 *c, slot, y;

	if (!e)
		return 0;
	v = *e;
	next = v >> XF_BL6_NEXT_SHIFT;
	if (!next)
		return v & XF_BL6_RULE_MASK;
	if (next <= 48) {
		/* the slot of the region at the first level (see
		 * XF_BL6_L1_*): one load instead of the walk's first probe,
		 * and no walk where that region does not exist. The region
		 * times MULT sits 16 bits up in y: the slot is its top bits,
		 * the tag the 31 below them. */
		y = (hi & (~0ULL << (64 - next))) * XF_BL6_L1_MULT;
		key = y >> (64 - XF_BL6_L1_BITS);
		tag = (__u32)(y >> 16) | XF_BL6_L1_LIVE;
		c = bpf_map_lookup_elem(l1, &key);
		if (!c)
			return v & XF_BL6_RULE_MASK;
		slot = *(volatile __u64 *)c;
		w = slot;
		if (w != XF_BL6_L1_WALK) {
			if ((__u32)(slot >> 32) != tag)
				return v & XF_BL6_RULE_MASK;
			v = w;
			if (!(v >> XF_BL6_NEXT_SHIFT))
				return v & XF_BL6_RULE_MASK;
		}
	}
	return bl6_walk(dst, hi, bpf_be64_to_cpu(a[1]), v);
}

static __always_inline __u32 bl6_match(__u32 flags, struct xf_flow6 *k)
{
	__u32 r;

	if (flags & XF_CFG_BL6_SRC) {
		r = bl6_lookup(&bl6_l0_src, &bl6_l1_src, 0, k->saddr);
		if (r)
			return r;
	}
	if (flags & XF_CFG_BL6_DST)
		return bl6_lookup(&bl6_l0_dst, &bl6_l1_dst, 1, k->daddr);
	return 0;
}

/* New-flow and blocklist events, at most knobs.events_per_sec per CPU per
 * second, so a flood cannot turn into a flood of events. A full ring skips
 * the event; the frame is never held back for it.
 */
static __always_inline int event_allowed(struct xf_counters *c, struct pkt *p,
					 __u64 now, struct xf_config *cfg)
{
	__u32 zero = 0;
	struct xf_ratelimit *rl = bpf_map_lookup_elem(&event_budget, &zero);

	if (!rl || !cfg)
		return 0;
	/* hz is 0 only between load and the controller's first config write */
	if (now - rl->window >= cfg->hz) {
		rl->window = now;
		rl->count = 0;
	}
	if (rl->count >= knobs.events_per_sec) {
		count(c, XF_CNT_EVENTS_SUPPRESSED, p->len);
		return 0;
	}
	rl->count++;
	return 1;
}

static __always_inline void emit(struct xf_counters *c, struct xdp_md *ctx,
				 struct pkt *p, __u8 type, __u32 rule, __u64 now,
				 struct xf_config *cfg, __u8 extra)
{
	struct xf_event *e;

	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(c, XF_CNT_EVENTS_LOST, p->len);
		return;
	}
	e->ts = now;
	e->ifindex = ctx->ingress_ifindex;
	e->rule = rule;
	e->len = p->len;
	e->type = type;
	e->family = p->family;
	e->pad = extra;
	e->generation = cfg->generation;
	if (p->family == 4) {
		e->proto = p->k4.proto;
		e->sport = p->k4.sport;
		e->dport = p->k4.dport;
		__builtin_memset(e->saddr, 0, sizeof(e->saddr));
		__builtin_memset(e->daddr, 0, sizeof(e->daddr));
		__builtin_memcpy(e->saddr, &p->k4.saddr, 4);
		__builtin_memcpy(e->daddr, &p->k4.daddr, 4);
	} else {
		e->proto = p->k6.proto;
		e->sport = p->k6.sport;
		e->dport = p->k6.dport;
		__builtin_memcpy(e->saddr, p->k6.saddr, 16);
		__builtin_memcpy(e->daddr, p->k6.daddr, 16);
	}
	bpf_ringbuf_submit(e, 0);
}

static __always_inline void flow_add(struct xf_flow_val *v, struct pkt *p,
				     __u64 now)
{
	if (knobs.shared_flows) {
		__sync_fetch_and_add(&v->packets, 1);
		__sync_fetch_and_add(&v->bytes, p->iplen);
		if ((v->tcp_flags & p->tcp_flags) != p->tcp_flags)
			__sync_fetch_and_or(&v->tcp_flags, p->tcp_flags);
	} else {
		v->packets++;
		v->bytes += p->iplen;
		v->tcp_flags |= p->tcp_flags;
	}
	/* a racing store from another CPU carries the same coarse time */
	v->last_seen = now;
	/* after the counts: see xdpflow_take for why; mostly a read that
	 * finds the stamp already set */
	if (!v->rec_start)
		v->rec_start = now;
}

/* Whether a frame that found no flow may insert one: at most
 * knobs.flow_budget inserts per CPU per second, so a flood of new tuples
 * costs a lookup and this check per frame, not an insert and an LRU
 * eviction. Frames over the budget are counted, not tracked. Only the miss
 * path comes here: established flows pay nothing.
 */
static __always_inline int admit(struct pkt *p, __u64 now,
				 struct xf_config *cfg)
{
	__u32 zero = 0;
	struct xf_admission *a;

	if (!knobs.flow_budget || !cfg)
		return 1;
	a = bpf_map_lookup_elem(&admission, &zero);
	if (!a)
		return 1;
	/* hz is 0 only between load and the controller's first config write */
	if (now - a->window >= cfg->hz) {
		a->window = now;
		a->inserts = 0;
	}
	if (a->inserts < knobs.flow_budget) {
		a->inserts++;
		return 1;
	}
	a->untracked_packets++;
	a->untracked_bytes += p->iplen;
	if (!a->first_untracked)
		a->first_untracked = now;
	a->last_untracked = now;
	return 0;
}

static __always_inline void track(void *flows, void *key,
				  struct xf_counters *c, struct xdp_md *ctx,
				  struct pkt *p, struct xf_config *cfg)
{
	__u64 now = p->now ? p->now : bpf_jiffies64();
	struct xf_flow_val *v = bpf_map_lookup_elem(flows, key);
	struct xf_flow_val nv;
	long err;

	if (v) {
		flow_add(v, p, now);
		return;
	}
	if (!admit(p, now, cfg)) {
		/* protected hosts still see the flood's new tuples */
		p->prot |= PROT_NEW_FLOW;
		return;
	}

	nv.packets = 1;
	nv.bytes = p->iplen;
	nv.first_seen = now;
	nv.last_seen = now;
	nv.tcp_flags = p->tcp_flags;
	nv.pad = 0;
	nv.rec_start = now;
	err = bpf_map_update_elem(flows, key, &nv, BPF_NOEXIST);
	if (!err) {
		p->prot |= PROT_NEW_FLOW;
		if (event_allowed(c, p, now, cfg))
			emit(c, ctx, p, XF_EV_NEW_FLOW, 0, now, cfg, 0);
		return;
	}
	/* another CPU created it between our lookup and update */
	if (err == -EEXIST) {
		v = bpf_map_lookup_elem(flows, key);
		if (v) {
			flow_add(v, p, now);
			return;
		}
	}
	count(c, XF_CNT_FLOW_INSERT_FAILED, p->len);
}

/* A blocklist match: hit counter, event, and drop unless monitoring. The
 * drop needs no L4 header; an event that gets through the budget parses the
 * ports for itself.
 */
static __always_inline int blocked(struct xf_counters *c, struct xdp_md *ctx,
				   struct pkt *p, __u32 rule,
				   struct xf_config *cfg, __u32 *act,
				   struct hdr_cursor *nh, void *data_end,
				   int ipproto, int l4_ok)
{
	__u64 *hits = bpf_map_lookup_elem(&rule_hits, &rule);
	int monitor = cfg && (cfg->flags & XF_CFG_MONITOR);
	__u64 now = bpf_jiffies64();

	if (hits)
		*hits += 1;
	if (event_allowed(c, p, now, cfg)) {
		if (p->family == 4)
			parse_l4(nh, data_end, ipproto, l4_ok, &p->k4.sport,
				 &p->k4.dport, &p->tcp_flags);
		else
			parse_l4(nh, data_end, ipproto, l4_ok, &p->k6.sport,
				 &p->k6.dport, &p->tcp_flags);
		emit(c, ctx, p, monitor ? XF_EV_MONITORED : XF_EV_BLOCKED,
		     rule, now, cfg, 0);
	}
	if (monitor) {
		count(c, XF_CNT_MONITORED, p->len);
		return XDP_PASS;
	}
	*act = XF_CNT_DROPPED;
	return XDP_DROP;
}

/* XF_BENCH_NO_RULES: the same program without the rules engine, built by
 * scripts/bench_rules.py to measure what the engine costs a frame when no
 * rule is configured; never shipped */
#ifndef XF_BENCH_NO_RULES
#include "rules.h"
#endif

enum { J_TRACK, J_OUT, J_L4_ERROR };

/* An IP frame after the blocklist's answer (listed: rule + 1, or 0): the
 * rules, which say whether that answer applies (a rule before it may exempt
 * the frame), then the blocklist's drop, then the L4 header for the flow
 * key (read once: before the rules when they run). full: which of the
 * program's two bodies this is (see xdpflow()); the lean one has no rules
 * engine. Both branches are marked unlikely so the common frame runs
 * straight through. Returns what the program does next.
 */
static __always_inline int judge(struct xdp_md *ctx, struct xf_counters *c,
				 struct xf_config *cfg, struct pkt *p,
				 __u32 flags, struct hdr_cursor *nh,
				 void *data_end, int ipproto, int l4_ok,
				 __u32 listed, __be16 *sport, __be16 *dport,
				 int *action, __u32 *act, const int full)
{
	int l4 = 1; /* not read yet */

#ifndef XF_BENCH_NO_RULES
	if (full && __builtin_expect(flags & XF_CFG_RULES, 0)) {
		int rj;

		l4 = parse_l4(nh, data_end, ipproto, l4_ok, sport, dport,
			      &p->tcp_flags);
		p->now = bpf_jiffies64();
		rj = rules_judge(ctx, c, p, flags, cfg ? cfg->rule_fields : 0,
				 ipproto, l4_ok && l4 >= 0, listed, action,
				 act);
		if (rj == RJ_DONE)
			return J_OUT;
		if (rj == RJ_ALLOW)
			listed = 0;
	}
#endif
	if (__builtin_expect(listed, 0)) {
		*action = blocked(c, ctx, p, listed - 1, cfg, act, nh, data_end,
				  ipproto, l4_ok);
		return J_OUT;
	}
	if (l4 > 0)
		l4 = parse_l4(nh, data_end, ipproto, l4_ok, sport, dport,
			      &p->tcp_flags);
	return l4 < 0 ? J_L4_ERROR : J_TRACK;
}

/* One frame, by the full body (full: with the rules engine and protected
 * groups) or the lean one (neither is configured): see xdpflow(). */
static __always_inline int frame(struct xdp_md *ctx, struct xf_counters *c,
				 struct xf_config *cfg, __u32 flags,
				 const int full)
{
	void *data_end = (void *)(long)ctx->data_end;
	void *data = (void *)(long)ctx->data;
	struct hdr_cursor nh = { .pos = data, .end = data_end };
	__u32 listed = 0;
	int ethproto, ipproto, l4_ok = 0;
	struct pkt p;

	p.len = data_end - data;
	p.tcp_flags = 0;
	p.now = 0;
	/* XF_BENCH_NO_PROTECT: this program without per-destination counting,
	 * built by scripts/bench_protect.py to measure what counting costs a
	 * frame when no group is installed; never shipped */
#ifndef XF_BENCH_NO_PROTECT
	p.prot = full ? flags & (XF_CFG_PROTECT | XF_CFG_PROTECT_SLOT) : 0;
#else
	p.prot = 0;
#endif
	p.cls = XF_CNT_PARSE_ERRORS;
	p.l4cnt = XF_CNT_MAX;
	p.act = XF_CNT_PASSED;
	p.action = XDP_PASS;

	ethproto = parse_ethhdr(&nh, data_end);
	if (ethproto == bpf_htons(ETH_P_IP)) {
		struct iphdr *iph;

		ipproto = parse_iphdr(&nh, data_end, &iph, &l4_ok);
		if (ipproto < 0)
			goto out;
		p.family = 4;
		p.iplen = bpf_ntohs(iph->tot_len);
		p.k4.saddr = iph->saddr;
		p.k4.daddr = iph->daddr;
		p.k4.sport = 0;
		p.k4.dport = 0;
		p.k4.proto = ipproto;
		p.k4.pad[0] = p.k4.pad[1] = p.k4.pad[2] = 0;
		p.cls = XF_CNT_IPV4;
		p.l4cnt = l4_class(ipproto);

		/* the blocklist's answer first: see judge() */
		if (flags & (XF_CFG_BL4_SRC | XF_CFG_BL4_DST))
			listed = bl4_match(flags, &p.k4);
		switch (judge(ctx, c, cfg, &p, flags, &nh, data_end, ipproto,
			      l4_ok, listed, &p.k4.sport, &p.k4.dport,
			      &p.action, &p.act, full)) {
		case J_OUT:
			goto out;
		case J_L4_ERROR:
			goto l4_error;
		}
		track(&flows_v4, &p.k4, c, ctx, &p, cfg);
	} else if (ethproto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6h;

		ipproto = parse_ip6hdr(&nh, data_end, &ip6h, &l4_ok);
		if (ipproto < 0)
			goto out;
		p.family = 6;
		p.iplen = sizeof(*ip6h) + bpf_ntohs(ip6h->payload_len);
		/* as 64-bit words: the header sits where the frame puts it
		 * (2 bytes past 4-byte alignment behind Ethernet), which
		 * costs nothing on the CPUs XDP runs on, and the copy takes 8
		 * loads and stores where 4-byte words (in6_addr's) took 16 */
		__builtin_memcpy(p.k6.saddr,
				 __builtin_assume_aligned(&ip6h->saddr, 8), 16);
		__builtin_memcpy(p.k6.daddr,
				 __builtin_assume_aligned(&ip6h->daddr, 8), 16);
		p.k6.sport = 0;
		p.k6.dport = 0;
		p.k6.proto = ipproto;
		p.k6.pad[0] = p.k6.pad[1] = p.k6.pad[2] = 0;
		p.cls = XF_CNT_IPV6;
		p.l4cnt = l4_class(ipproto);

		/* the blocklist's answer first: see judge() */
		if (flags & (XF_CFG_BL6_SRC | XF_CFG_BL6_DST))
			listed = bl6_match(flags, &p.k6);
		switch (judge(ctx, c, cfg, &p, flags, &nh, data_end, ipproto,
			      l4_ok, listed, &p.k6.sport, &p.k6.dport,
			      &p.action, &p.act, full)) {
		case J_OUT:
			goto out;
		case J_L4_ERROR:
			goto l4_error;
		}
		track(&flows_v6, &p.k6, c, ctx, &p, cfg);
	} else if (ethproto >= 0) {
		p.cls = XF_CNT_NON_IP;
	}
	goto out;

l4_error:
	p.cls = XF_CNT_PARSE_ERRORS;
	p.l4cnt = XF_CNT_MAX;
out:
	if (knobs.sink && p.action == XDP_PASS) {
		p.action = XDP_DROP;
		p.act = XF_CNT_SUNK;
	}
	/* no total: the classes sum to it (see XF_CNT_PACKETS) */
	count(c, p.cls, p.len);
	count(c, p.act, p.len);
	count(c, p.l4cnt, p.len);
	/* Per protected host, whatever the frame's fate. Last, so that the
	 * common path keeps nothing alive across the call: placed after
	 * parsing, the call site cost every frame 5-9 ns in spills with no
	 * group installed. */
#ifndef XF_BENCH_NO_PROTECT
	if (full && __builtin_expect(p.prot & XF_CFG_PROTECT, 0))
		xf_protect(ctx, &p);
#endif
	/* counted already: a tail call does not come back, and the next
	 * program's verdict is the frame's fate; an empty slot falls through
	 */
	if (p.action == XDP_PASS)
		bpf_tail_call(ctx, &next_prog, 0);
	return p.action;
}

/* the features only the full body has */
#if !defined(XF_BENCH_NO_RULES) && !defined(XF_BENCH_NO_PROTECT)
#define XF_CFG_FULL (XF_CFG_RULES | XF_CFG_PROTECT)
#elif !defined(XF_BENCH_NO_RULES)
#define XF_CFG_FULL XF_CFG_RULES
#elif !defined(XF_BENCH_NO_PROTECT)
#define XF_CFG_FULL XF_CFG_PROTECT
#else
#define XF_CFG_FULL 0
#endif

/* Two bodies, chosen once per frame: the full one when a rule set or a
 * protected group is in force, else the lean one, which is the program as
 * if neither feature were there (same code, same registers). Idle, they
 * cost a frame one test and branch. With one body, keeping their calls and
 * state alive around the hot path cost an idle engine up to 13 instructions
 * a frame (9 on UDP/IPv4) and idle groups 7-8 (counted by
 * xdpflow/testing/interp.py). The verifier walks both bodies.
 */
SEC("xdp")
int xdpflow(struct xdp_md *ctx)
{
	struct xf_counters *c;
	struct xf_config *cfg;
	__u32 flags = 0, zero = 0;

	c = bpf_map_lookup_elem(&counters, &zero);
	if (!c)
		return XDP_PASS;
	cfg = bpf_map_lookup_elem(&config, &zero);
	if (cfg)
		flags = cfg->flags;
	if (__builtin_expect(flags & XF_CFG_FULL, 0))
		return frame(ctx, c, cfg, flags, 1);
	return frame(ctx, c, cfg, flags, 0);
}

/* Test-run only: writes a struct xf_clock into the frame. */
SEC("xdp")
int xdpflow_clock(struct xdp_md *ctx)
{
	void *data_end = (void *)(long)ctx->data_end;
	struct xf_clock *clk = (void *)(long)ctx->data;

	if ((void *)(clk + 1) > data_end)
		return XDP_ABORTED;
	clk->jiffies = bpf_jiffies64();
	clk->mono_ns = bpf_ktime_get_ns();
	return XDP_PASS;
}

/* xdpflow_take: per flow, the exchange and the totals read right after it */
struct take_ctx {
	struct xf_flow6 key; /* the larger key; a v4 key is its prefix */
	__u32 family;
	__u32 found;
	__u64 first;
	__u64 packets;
	__u64 bytes;
	__u64 last;
	__u32 flags;
};

static __always_inline void take_one(struct xf_flow_val *v, struct take_ctx *tc)
{
	__u64 stamp = __sync_lock_test_and_set(&v->rec_start, 0);

	if (stamp && (!tc->first || stamp < tc->first))
		tc->first = stamp;
	tc->packets += v->packets;
	tc->bytes += v->bytes;
	if (v->last_seen > tc->last)
		tc->last = v->last_seen;
	tc->flags |= v->tcp_flags;
	tc->found = 1;
}

static long take_cpu(__u32 cpu, struct take_ctx *tc)
{
	struct xf_flow_val *v;

	if (tc->family == 4)
		v = bpf_map_lookup_percpu_elem(&flows_v4, &tc->key, cpu);
	else
		v = bpf_map_lookup_percpu_elem(&flows_v6, &tc->key, cpu);
	if (!v)
		return 1; /* past the last CPU, or the flow is gone */
	take_one(v, tc);
	return 0;
}

#define XF_CPUS_MAX 8192

/* Test-run only: the frame is an array of struct xf_take. For each flow the
 * exporter sends an active-timeout record of, swap rec_start for 0 and read
 * the totals right after: the record counts those totals and starts at the
 * stamp taken; the next packet sets a fresh stamp for the next record.
 * flow_add() adds before it stamps, so the one race left is a packet whose
 * add lands before our read and whose stamp check after our exchange (both
 * within a few ns): it is counted in this record and stamps the next one.
 */
SEC("xdp")
int xdpflow_take(struct xdp_md *ctx)
{
	void *data_end = (void *)(long)ctx->data_end;
	void *data = (void *)(long)ctx->data;
	struct xf_take *t = data;
	struct take_ctx tc;
	struct xf_flow_val *v;
	int i;

	for (i = 0; i < XF_TAKE_MAX; i++, t++) {
		if ((void *)(t + 1) > data_end)
			break;
		__builtin_memset(&tc, 0, sizeof(tc));
		__builtin_memcpy(&tc.key, t->key, sizeof(tc.key));
		tc.family = t->family;
		if (knobs.shared_flows) {
			if (tc.family == 4)
				v = bpf_map_lookup_elem(&flows_v4, &tc.key);
			else
				v = bpf_map_lookup_elem(&flows_v6, &tc.key);
			if (v)
				take_one(v, &tc);
		} else {
			bpf_loop(XF_CPUS_MAX, take_cpu, &tc, 0);
		}
		t->found = tc.found;
		t->rec_start = tc.first;
		t->packets = tc.packets;
		t->bytes = tc.bytes;
		t->last_seen = tc.last;
		t->tcp_flags = tc.flags;
		t->pad = 0;
	}
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
