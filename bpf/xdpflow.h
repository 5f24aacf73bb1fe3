/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* xdpflow.h - every struct and constant that crosses the kernel/user boundary.
 *
 * Included by: the XDP program (bpf/xdpflow.bpf.c) and the Python controller,
 * which feeds this file to cffi at run time (xdpflow/abi.py). cffi understands
 * only declarations, so this file holds nothing but fixed-width UAPI types,
 * explicit padding, enums and "#define NAME <integer>" lines; everything else
 * starting with '#' is skipped by the Python side.
 */
#ifndef XDPFLOW_H
#define XDPFLOW_H

#include <linux/types.h>

/* map sizes; the controller may override max_entries before load */
#define XF_FLOWS_DEFAULT 262144
#define XF_BLOCK_MAX 131072 /* per blocklist trie (family x direction) */
#define XF_RULES_MAX 524288 /* rule index space shared by the four tries */
#define XF_EVENTS_BYTES 262144

/* parser bounds: the verifier needs them, fuzzed frames probe them */
#define XF_VLAN_MAX 2
#define XF_IPV6_EXT_MAX 6

/* IPv4 blocklist: a three-level table, like a router's DIR-16-8-8 FIB:
 * an array indexed by the /16 (L1), the /24s below it (L2) and a hash of
 * hosts (L3). An entry is rule index + 1 (0: no rule) in its low bits, the
 * answer unless a flag sends the lookup down: XF_BL_D24 (L1 only) "a /17-/24
 * rule lies inside: look up the /24", XF_BL_HOSTS "a /25-/32 rule lies
 * inside: look up the host". L2 is an array of 256-entry chunks, one per /16
 * that needs one (L1 then holds XF_BL_D24 | XF_BL_CHUNK | chunk number, and
 * every /24 slot the complete answer), so the second level is an array load
 * too; /16s beyond XF_BL4_CHUNKS fall back to a hash of /24s (L1 holds
 * XF_BL_D24 | the /16's own answer). A /16 holding host rules gets a chunk
 * too (without one it skips L2). Hosts: a /24 slot of a chunk that carries
 * XF_BL_HOSTS may name, in the parallel array L2H (same index), a 256-entry
 * chunk of L3C holding every host's complete answer (chunk number + 1; 0:
 * none); otherwise, and in every table an older program reads, the hosts
 * are in the L3 hash, which always holds them all.
 */
#define XF_BL4_L1_SIZE 65536
#define XF_BL4_CHUNKS 4096
#define XF_BL4_L2C_SIZE 1048576 /* XF_BL4_CHUNKS x 256 */
#define XF_BL4_HCHUNKS 4096     /* /24s whose hosts get an L3C chunk */
#define XF_BL4_L3C_SIZE 1048576 /* XF_BL4_HCHUNKS x 256 */
#define XF_BL4_L2_MAX 1048576
#define XF_BL4_L3_MAX 1048576
#define XF_BL_D24 2147483648
#define XF_BL_HOSTS 1073741824
#define XF_BL_CHUNK 536870912
#define XF_BL_RULE_MASK 536870911

/* IPv6 blocklist: an array indexed by the top 16 bits (L0) and, per
 * direction, one hash of deeper regions at /24, /32, ... /128 (8-bit steps;
 * a rule between steps is expanded to the next one). An entry holds rule
 * index + 1 (0: none) of the longest rule covering its whole region, and
 * above XF_BL6_NEXT_SHIFT the prefix length of the next region to look up
 * (0: nothing longer lies inside). The lookup jumps straight to the levels
 * where longer rules branch, so traffic outside every rule's /16 costs one
 * array load, and no lookup walks a trie.
 */
#define XF_BL6_L0_SIZE 65536
#define XF_BL6_DEEP_MAX 1048576
#define XF_BL6_NEXT_SHIFT 24
#define XF_BL6_RULE_MASK 16777215
#define XF_BL6_LEVELS 14 /* /24 .. /128 */
/* The deeper regions live in a set-associative hash laid out in an array
 * (bl6_tab_*, probed with a few loads and compares, where a BPF hash lookup
 * of the 24-byte key costs ~20 ns): the bucket of a region is
 * xf_bl6_bucket_of(); a region whose bucket is full goes to the BPF hash
 * bl6_deep_* instead, and its bucket's ovf says "look there too". A slot
 * with plen 0 is free; the controller writes a slot's plen last and clears
 * it first, and reuses a slot only in a later change.
 */
#define XF_BL6_WAYS 4
#define XF_BL6_BUCKET_BITS 17
#define XF_BL6_BUCKETS 131072 /* 2^XF_BL6_BUCKET_BITS */
#define XF_BL6_M1 0x9E3779B97F4A7C15
#define XF_BL6_M2 0xC2B2AE3D27D4EB4F
#define XF_BL6_M3 0xFF51AFD7ED558CCD
/* ... and a filter in front of the deep hash: one bit per hashed /32 that a
 * rule of /25 or longer overlaps. In a /16 whose longer rules all start at
 * /32 or deeper, a clear bit means the walk would find nothing. */
#define XF_PF6_WORDS 16384 /* 2^20 bits */
#define XF_PF6_MULT 2654435761
#define XF_PF6_SHIFT 12
/* The program reads the filter no more (a program attached by an older
 * version still does, so the controller keeps it up to date). In front of
 * the walk it reads instead one slot of a direct-mapped table (bl6_l1_*)
 * for the region at its /16's first level, when that level is /48 or
 * shorter. Such a region, as 48 bits (the address's top 48 bits masked to
 * the level), is multiplied by XF_BL6_L1_MULT modulo 2^48, which maps
 * 48-bit values one to one: the top XF_BL6_L1_BITS bits of the product pick
 * the slot and the other 31 are the tag, so a tag names exactly one region.
 * A slot's high half is its region's tag | XF_BL6_L1_LIVE; its low half is
 * the region's entry, from which the walk goes on below it. A slot two
 * regions share holds XF_BL6_L1_WALK in its low half (the walk starts from
 * L0, as before), and an empty slot or one that names another region means
 * the region does not exist: nothing longer than L0 covers the address. The
 * controller writes a slot in one 8-byte store.
 */
#define XF_BL6_L1_BITS 17
#define XF_BL6_L1_SIZE 131072 /* 2^XF_BL6_L1_BITS */
#define XF_BL6_L1_MULT 0xD6E8FEB86659 /* odd; spreads runs of /32s and /48s */
#define XF_BL6_L1_TAG 2147483647 /* the product's low 31 bits */
#define XF_BL6_L1_LIVE 2147483648
#define XF_BL6_L1_WALK 4294967295

/* default event budget per CPU per second */
#define XF_EVENTS_PER_SEC 1000

/* default new-flow budget per CPU per second and interface (admission
 * control, see struct xf_admission); 0 means unlimited */
#define XF_FLOW_BUDGET_DEFAULT 250000

/* Interface counters: every frame lands in exactly one class (non_ip,
 * parse_errors, ipv4, ipv6), exactly one action (passed, dropped, sunk), and
 * when it is IP, exactly one L4 protocol (tcp, udp, icmp, other). The rest
 * are side counters.
 */
enum xf_counter {
	/* the total: never written by the program (a frame's class already
	 * counts it); readers sum the four classes into it */
	XF_CNT_PACKETS = 0,
	XF_CNT_PASSED = 1,
	XF_CNT_DROPPED = 2, /* by the blocklist */
	XF_CNT_SUNK = 3,    /* dropped after accounting, sink mode */
	XF_CNT_MONITORED = 4, /* would have been dropped, monitor mode */
	XF_CNT_PARSE_ERRORS = 5,
	XF_CNT_NON_IP = 6,
	XF_CNT_IPV4 = 7,
	XF_CNT_IPV6 = 8,
	XF_CNT_TCP = 9,
	XF_CNT_UDP = 10,
	XF_CNT_ICMP = 11, /* ICMP and ICMPv6 */
	XF_CNT_OTHER = 12,
	XF_CNT_FLOW_INSERT_FAILED = 13,
	XF_CNT_EVENTS_SUPPRESSED = 14, /* over the per-CPU event budget */
	XF_CNT_EVENTS_LOST = 15,       /* ring buffer full */
	XF_CNT_MAX = 16,
};

struct xf_datarec {
	__u64 packets;
	__u64 bytes;
};

/* value of the one-entry per-CPU "counters" array */
struct xf_counters {
	struct xf_datarec c[16]; /* indexed by enum xf_counter */
};

/* flow keys: one LRU table per family, so a v4 key cannot meet a v6 key */
struct xf_flow4 {
	__be32 saddr;
	__be32 daddr;
	__be16 sport; /* ICMP: type */
	__be16 dport; /* ICMP: code */
	__u8 proto;
	__u8 pad[3];
};

struct xf_flow6 {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct xf_flow_val {
	__u64 packets;
	__u64 bytes;      /* IP bytes: v4 total length, v6 40 + payload length */
	__u64 first_seen; /* jiffies: see struct xf_clock */
	__u64 last_seen;
	__u32 tcp_flags; /* OR of every TCP flags byte seen */
	__u32 pad;
	__u64 rec_start; /* jiffies of the first packet counted since the
			  * exporter's last active-timeout export (which
			  * swaps it for 0 with "xdpflow_take"); 0: none */
};

/* One flow for the test-run-only "xdpflow_take" program; its frame is an
 * array of these. The controller fills key and family; the program
 * exchanges the flow's rec_start with 0 (in every CPU's slot of a per-CPU
 * table) and writes back what it took and the counts read right after.
 */
#define XF_TAKE_MAX 32 /* entries per frame: 32 x 88 bytes fit a test run */

struct xf_take {
	__u8 key[40];    /* in: struct xf_flow4 or struct xf_flow6 */
	__u32 family;    /* in: 4 or 6 */
	__u32 found;     /* out: 1 if the flow is in its table */
	__u64 rec_start; /* out: the earliest stamp taken, 0: none */
	__u64 packets;   /* out: the flow's totals right after the exchange */
	__u64 bytes;
	__u64 last_seen;
	__u32 tcp_flags;
	__u32 pad;
};

/* blocklist rule keys (LPM tries: the IPv6 lookup structure, and the store of
 * every rule); the value is a __u32 rule index into rule_hits */
struct xf_lpm4 {
	__u32 prefixlen;
	__u8 addr[4];
};

struct xf_lpm6 {
	__u32 prefixlen;
	__u8 addr[16];
};

/* a deeper IPv6 region: the address's top plen bits as two host-order
 * halves, the rest zero */
struct xf_bl6_key {
	__u64 hi;
	__u64 lo;
	__u32 plen;
	__u32 pad;
};

struct xf_bl6_slot {
	__u64 hi;
	__u64 lo;
	__u32 plen; /* 0: free */
	__u32 val;  /* as an entry of bl6_deep_* */
};

struct xf_bl6_bucket {
	struct xf_bl6_slot s[XF_BL6_WAYS];
	__u32 ovf; /* some region of this bucket is in bl6_deep_* */
	__u32 pad;
};

/* run-time switches in the shared "config" array, written by the controller */
enum xf_config_flags {
	XF_CFG_MONITOR = 1,   /* count would-be drops, pass them */
	XF_CFG_BL4_SRC = 2,   /* the blocklist holds v4 source rules */
	XF_CFG_BL4_DST = 4,
	XF_CFG_BL6_SRC = 8,
	XF_CFG_BL6_DST = 16,
	XF_CFG_RULES = 32,      /* the active rule set holds rules */
	XF_CFG_RULES_SLOT = 64, /* the active rule set is slot 1 (else 0) */
	XF_CFG_PROTECT = 128,   /* count frames to protected hosts */
	XF_CFG_PROTECT_SLOT = 256, /* the active protected set is slot 1 */
};

struct xf_config {
	__u32 flags;
	__u32 hz;         /* jiffies per second, measured by the controller */
	__u32 generation; /* bumped by every blocklist change: names the rule
			   * index assignment an event's rule refers to */
	__u32 rule_fields; /* xf_rule_field mask of rule-set slot s in bits
			    * 8s..8s+6, written before the slot's flip: the
			    * program has it without a header lookup */
};

/* How many rules the blocklist's tries hold, as its writer left them (the
 * tries keep no count, and reading 10^5 of them is most of `status`).
 * Valid only while generation equals xf_config.generation: the writer
 * marks it stale before a change and tags it after; a writer that knows
 * nothing of it bumps the generation, and readers count the tries.
 */
struct xf_bl_count {
	__u32 generation;
	__u32 valid; /* 0 while a change is under way */
	__u64 rules;
};

/* load-time knobs: the program's whole .rodata, set before load */
struct xf_knobs {
	__u32 sink;         /* drop every frame after accounting it */
	__u32 shared_flows; /* flow tables are LRU_HASH with atomics (default),
			     * else LRU_PERCPU_HASH with plain adds */
	__u32 events_per_sec;
	__u32 prot_mask; /* prot_hosts slots per CPU - 1 (a power of two) */
	__u32 flow_budget; /* new flows per CPU per second; 0: unlimited */
};

/* Timestamps are jiffies: bpf_jiffies64() is a load, where a clock read
 * costs ~10 ns a frame. The "xdpflow_clock" program writes this pair into
 * its test-run frame so the controller can map jiffies to CLOCK_MONOTONIC.
 */
struct xf_clock {
	__u64 jiffies;
	__u64 mono_ns; /* CLOCK_MONOTONIC, read at the same moment */
};

enum xf_event_type {
	XF_EV_NEW_FLOW = 1,
	XF_EV_BLOCKED = 2,
	XF_EV_MONITORED = 3,
	XF_EV_RULE = 4, /* a rule matched: rule = its id, pad = its action */
};

/* xf_event.pad of an XF_EV_RULE event: enum xf_rule_action, | this when the
 * the rule dropped the frame (drop, or rate-limit excess), or would have in
 * monitor mode */
#define XF_EV_RULE_DROPPED 0x80

struct xf_event {
	__u64 ts; /* jiffies */
	__u32 ifindex;
	__u32 rule; /* blocklist rule index (blocked/monitored); rule id (rule) */
	__u32 len;  /* frame length */
	__u8 type;  /* enum xf_event_type */
	__u8 family; /* 4 or 6 */
	__u8 proto;
	__u8 pad;   /* XF_EV_RULE: the rule's action, see XF_EV_RULE_DROPPED */
	__be16 sport;
	__be16 dport;
	__u8 saddr[16]; /* IPv4 in the first 4 bytes */
	__u8 daddr[16];
	__u32 generation; /* config generation the rule index belongs to */
};

/* per-CPU event budget state */
struct xf_ratelimit {
	__u64 window; /* start of the current second, jiffies */
	__u64 count;
};

/* Per-CPU value of the per-interface "admission" array: new-flow admission
 * control. A CPU inserts at most knobs.flow_budget flows per second into the
 * interface's tables; past that, frames that would create a flow are
 * counted here, not tracked (the interface counters count them as usual).
 */
struct xf_admission {
	__u64 window;  /* start of the current second, jiffies */
	__u64 inserts; /* flows inserted in it */
	__u64 untracked_packets;
	__u64 untracked_bytes; /* IP bytes, as flows count them */
	__u64 first_untracked; /* jiffies; 0: none yet */
	__u64 last_untracked;
};

/* What the flow exporter has sent of a flow, kept by the controller in a
 * pinned hash next to each flow table (same key), so a restarted exporter
 * sends only what it had not sent yet.
 */
struct xf_exported {
	__u64 packets;
	__u64 bytes;
	__u64 at; /* jiffies of the last export */
};

/* the traffic generator's knobs (bpf/baseline.bpf.c .rodata): each copy
 * xdp_tx sends gets the big-endian 16-bit field at vary_offset set to
 * vary_base + (copy number % vary_count), so one test run makes many flows
 */
struct xf_gen_knobs {
	__u32 vary_offset; /* 0: send copies unchanged */
	__u32 vary_count;
	__u32 vary_base;
	__u32 pad;
};

/* Multi-field rules (bpf/rules.h; compiled by xdpflow/rules/compile.py).
 * Every rule owns a bit; per field, a table maps a frame's value to a class:
 * an index into the pool of bitmaps (bit set: that rule accepts the value).
 * Everything below exists twice, one rule-set SLOT each: the controller
 * writes the inactive slot, then flips XF_CFG_RULES_SLOT.
 * The arrays the program indexes by a frame's values (the field tables,
 * rl_l1, rl_c24, rl_c32, rl_pool) hold one element per slot, an array
 * indexed by value: one lookup reaches all of it, where a lookup per entry
 * costs a key stored and loaded again, and a call as the compiler sees it
 * (every register it clobbers spilled). Other per-slot arrays are indexed
 * slot * size + value; address tables by fd = family_is_v6 * 2 + is_dst.
 */
#define XF_RULE_CAP 1024     /* rules per set */
#define XF_RULE_WORDS 20     /* bitmap words: 1,024 rules + group alignment */
#define XF_RULE_BITS 1280
#define XF_RCLASS_MAX 16384  /* bitmaps per slot (class ids are 16 bits) */
#define XF_RPORT_SIZE 65537  /* ports, and XF_RNO_L4 */
#define XF_RNO_L4 65536      /* the "port" of a frame without an L4 header */
#define XF_RL1_SIZE 65536    /* address top 16 bits, per slot and fd */
#define XF_RADDR_MAX 524288  /* address level entries, both slots */
#define XF_RLEVELS 8
/* IPv4 addresses (rl_l1 of fd 0 and 1) are read as arrays, DIR-16-8-8: an
 * entry with XF_RL_CHUNK names, in bits 16-30, a 256-entry chunk of the next
 * level (rl_c24 by the third byte, rl_c32 by the fourth); bits 0-15 are the
 * class. Chunks are numbered per slot, both directions sharing them.
 * Every entry of the field tables (rl_sport, rl_dport, rl_proto, rl_len,
 * rl_l1, rl_c24, rl_c32, rl_addr, rl_iface) is 64 bits: the low half as
 * described, the high half the summary (words with a rule) of the class it
 * names, 0 in an entry naming a chunk; so the words a frame can match are
 * known before any bitmap is loaded. */
#define XF_RL_CHUNK 0x80000000
#define XF_RC24_CHUNKS 2048  /* /16s with rule prefixes longer than /16 */
#define XF_RC32_CHUNKS 2048  /* /24s with rule prefixes longer than /24 */
#define XF_RCOUNTERS 2048    /* counter slots: rules of both sets */
#define XF_RRATE_SETS 32768  /* rate-limit state: 2-way sets, 65,536 sources */
#define XF_RATE_SHIFT 24     /* rate-limit clock: jiffies << 24 (0.24 ns a unit at HZ 250) */

/* fields some rule of the set constrains: the others are skipped */
enum xf_rule_field {
	XF_RF_SRC = 1,
	XF_RF_DST = 2,
	XF_RF_PROTO = 4, /* proto << 8 | TCP flags */
	XF_RF_SPORT = 8, /* also set by rules that read L4 at all */
	XF_RF_DPORT = 16,
	XF_RF_LEN = 32,
	XF_RF_IFACE = 64,
};

enum xf_rule_action {
	XF_RA_PASS = 1,
	XF_RA_DROP = 2,
	XF_RA_MONITOR = 3,
	XF_RA_RATE = 4,
};

/* per slot: what the set needs; rl_l1 entries are class | level mask << 16,
 * level i of a family probes prefixes masked by lmask[family][i] */
struct xf_rule_head {
	__u32 fields;  /* enum xf_rule_field */
	__u32 nrules;
	__u32 bl_rank; /* rules of lower rank are judged before the blocklist */
	__u32 next_id; /* the next rule id the controller hands out */
	__u32 iface_default; /* class of an interface no rule names */
	__u32 iface_default_sum; /* and its summary */
	__u32 pad[2];
	__u64 lmask[2][8][2]; /* v4, v6 x XF_RLEVELS x 16 address bytes */
};

struct xf_rule_bits {
	__u32 summary; /* bit i set iff w[i] != 0 */
	__u32 pad;
	__u64 w[20];   /* XF_RULE_WORDS */
};

/* one slot's element of each per-slot array (see above) */
struct xf_rule_pool {
	struct xf_rule_bits b[XF_RCLASS_MAX]; /* by class; 2.6 MB */
};
struct xf_rule_t16 {
	__u64 e[65536];          /* rl_proto (proto << 8 | flags), rl_len */
};
struct xf_rule_tport {
	__u64 e[XF_RPORT_SIZE];  /* rl_sport, rl_dport */
};
struct xf_rule_tl1 {
	__u64 e[4 * XF_RL1_SIZE]; /* rl_l1: fd * XF_RL1_SIZE + top 16 bits */
};
struct xf_rule_tchunk {
	__u64 e[XF_RC24_CHUNKS * 256]; /* rl_c24, rl_c32: chunk * 256 + byte */
};

/* per slot and bit */
struct xf_rule_act {
	__u32 id;
	__u32 rank;    /* priority order over the whole set */
	__u32 counter; /* index into rule_counters */
	__u8 action;   /* enum xf_rule_action */
	__u8 pad;
	__u16 bit;     /* this record's own bit (the verifier tracks it
			* better read from here than computed) */
	__u64 expires;  /* jiffies; 0: never */
	/* rate limits in clock units of 2^-XF_RATE_SHIFT jiffy: the program
	 * has the frame's jiffies already, where a clock read cost ~14 ns */
	__u64 pkt_cost;  /* per packet (0: no pps limit) */
	__u64 byte_cost; /* per frame byte, << 10 (0: no bit/s limit) */
	__u64 burst;     /* how far ahead of now a source may get */
};

/* per-CPU value of rule_counters */
struct xf_rule_cnt {
	__u64 packets;
	__u64 bytes; /* frame bytes */
	__u64 limited; /* rate-limit excess, dropped (or monitored) */
	__u64 pad;
};

struct xf_raddr_key {
	__u32 tag; /* (slot * 4 + fd) * XF_RLEVELS + level */
	__u8 addr[16]; /* masked; IPv4 in the first 4 bytes */
};

struct xf_riface_key {
	__u32 slot;
	__u32 ifindex;
};

/* GCRA state of one source under one rate-limit rule, in a 2-way set of
 * an array found by hashing (rule, source): one array load where a hash
 * map lookup of the 24-byte key cost ~40 ns per limited frame. */
struct xf_rate_way {
	__u64 tag;     /* hash of (rule id, family, source) | 1; 0: empty */
	__u64 tat_pkt; /* theoretical arrival time, jiffies << XF_RATE_SHIFT */
	__u64 tat_byte;
};

struct xf_rate_set {
	struct xf_rate_way way[2];
};

/* the rule store, per slot: what `rule list` shows */
struct xf_rule_def {
	__u32 id;
	__u32 counter;
	__u64 expires_at; /* Unix seconds; 0: never */
	char text[496];   /* the rule's canonical rules-file words */
};

/* Protected destinations (issue 12; bpf/protect.h, written by
 * xdpflow/dataplane/protect.py). Every frame to a host inside a protected
 * prefix is counted per host, whatever its fate, so a spoofed flood that
 * churns the flow table is still seen. The prefix lookup walks no trie:
 * prot_l1[(slot * 2 + family_is_v6) * XF_PL1_SIZE + top 16 bits] holds the
 * group of the longest prefix of /16 or shorter covering that /16 (0: none)
 * in its low 16 bits and, above them, a mask of the levels (prefix lengths
 * below /16, at most XF_PLEVELS per family, longer prefixes expanded to the
 * next level) holding a prefix inside it; those are probed longest first in
 * prot_addr, masked by prot_head[slot].lmask. Like the rules, everything
 * exists twice: the controller writes the inactive slot, then flips
 * XF_CFG_PROTECT_SLOT.
 */
#define XF_PHOSTS_DEFAULT 65536 /* host slots per CPU; sized at attach */
#define XF_PGROUPS 1024         /* group ids 1 .. 1023 */
#define XF_PL1_SIZE 65536
#define XF_PLEVELS 8
#define XF_PADDR_MAX 262144     /* level entries, both slots */
#define XF_PGROUP_MASK 65535
/* ... and a filter in front of the host table and the levels, per slot:
 * one bit per hashed region that a prefix longer than /16 overlaps; a
 * region is the address's top pf_len bits (the shortest such prefix, at
 * most /32 for IPv4, /64 for IPv6), hashed as XF_PF6_* after folding to 32
 * bits. A /16 whose entry has levels but no group of its own is mostly not
 * protected (IPv6 unicast shares a few /16s): a clear bit ends the lookup
 * after one more array load. */
#define XF_PPF_WORDS 16384 /* 2^20 bits */

struct xf_prot_head {
	__u64 digest; /* of the group set the slot holds */
	__u32 pf_len[2]; /* v4, v6: the filter's region prefix length */
	__u64 lmask[2][8][2]; /* v4, v6 x XF_PLEVELS x 16 address bytes */
};

struct xf_paddr_key {
	__u32 tag; /* (slot * 2 + family_is_v6) * XF_PLEVELS + level */
	__u8 addr[16]; /* masked; IPv4 in the first 4 bytes */
};

/* Per-CPU value of prot_hosts, a per-CPU array used as an open-addressed
 * table: a host lives in the first of the XF_PPROBES slots from a hash of
 * its address that holds it, or takes the first free one (family 0). Each
 * CPU fills its own slots, so no locking; and no hash-map lookup per frame
 * (a BPF hash lookup with this key measured ~35 ns, over the 25 ns budget
 * on its own). The controller sums a host's slots over CPUs. */
#define XF_PPROBES 4

struct xf_host_slot {
	__u8 family; /* 4 or 6; 0: free */
	__u8 pad[3];
	__u8 addr[16]; /* IPv4 in the first 4 bytes, the rest zero */
	__u32 group;
	__u32 pad2[2];
	__u64 packets;
	__u64 bytes;
	__u64 new_flows;
	__u64 syn;
	__u64 udp;
	__u64 icmp;
	__u64 frags;
};

/* per-CPU value of prot_overflow (per group: frames to hosts that found
 * their slots taken) */
struct xf_host_cnt {
	__u64 packets;
	__u64 bytes;     /* frame bytes */
	__u64 new_flows; /* flows the flow table took in, and frames over
			  * the new-flow budget that would have made one */
	__u64 syn;       /* TCP SYN without ACK */
	__u64 udp;
	__u64 icmp;      /* ICMP and ICMPv6 */
	__u64 frags;     /* IPv4 MF or offset, IPv6 fragment header */
	__u32 group;     /* set in the inserting CPU's value only; 0 elsewhere */
	__u32 pad;
};

#endif /* XDPFLOW_H */
