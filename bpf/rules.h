/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* rules.h - multi-field rules: classify a frame, apply the best rule.
 *
 * Included by: bpf/xdpflow.bpf.c only (kernel only), after the maps and
 * the blocklist helpers it uses. The tables are described in xdpflow.h and
 * compiled by xdpflow/rules/compile.py.
 *
 * Per frame, no loop over rules: one lookup per constrained field gives a
 * bitmap of the rules that accept the frame's value; the summaries are
 * ANDed first (traffic outside every rule usually stops there), then the
 * surviving words. Bits are in rank order within 64-bit words, so the first
 * set, unexpired bit of a word is that word's best; the lowest rank over the
 * words wins.
 */
#ifndef XDPFLOW_RULES_H
#define XDPFLOW_RULES_H

/* what the rules made of a frame */
enum {
	RJ_NONE = 0,  /* no rule: the blocklist and the rest apply */
	RJ_ALLOW = 1, /* a rule let it through: skip the blocklist */
	RJ_DROP = 2,  /* the best rule drops it (monitor mode aside) */
	RJ_DONE = 3,  /* judged here: *action is the verdict */
};

/* Trailing zeros without a branch: a branchy version gives the verifier
 * 64 constant results, each its own state (a constant map key is tracked
 * precisely), and 20 words of that do not verify.
 */
static __always_inline __u32 ctz64(__u64 x)
{
	__u64 v = (x & -x) - 1;

	v = v - ((v >> 1) & 0x5555555555555555ULL);
	v = (v & 0x3333333333333333ULL) + ((v >> 2) & 0x3333333333333333ULL);
	v = (v + (v >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
	return (__u32)((v * 0x0101010101010101ULL) >> 56) & 63;
}

/* probing one address level (bpf_loop: the verifier walks one level, not
 * every combination of eight) */
struct rl_probe {
	__u64 a0, a1;
	__u32 tag;  /* (slot * 4 + fd) * XF_RLEVELS */
	__u32 fam;
	__u32 slot;
	__u32 mask; /* levels holding entries in this /16 */
	__u32 cls;
	__u32 pad;
};

static long rl_probe_level(__u32 n, void *ctx)
{
	struct rl_probe *pr = ctx;
	__u32 i = (XF_RLEVELS - 1 - n) & (XF_RLEVELS - 1);
	struct xf_raddr_key k;
	struct xf_rule_head *h;
	__u32 *hit;

	if (!(pr->mask & (1U << i)))
		return 0;
	h = bpf_map_lookup_elem(&rl_head, &pr->slot);
	if (!h)
		return 1;
	/* levels from the longest down; the masks nest, so masking the
	 * previous level's key is enough */
	pr->a0 &= h->lmask[pr->fam & 1][i][0];
	pr->a1 &= h->lmask[pr->fam & 1][i][1];
	k.tag = pr->tag + i;
	__builtin_memcpy(k.addr, &pr->a0, 8);
	__builtin_memcpy(k.addr + 8, &pr->a1, 8);
	hit = bpf_map_lookup_elem(&rl_addr, &k);
	if (!hit)
		return 0;
	pr->cls = *hit;
	return 1;
}

/* Class of an address: the longest rule CIDR holding it (see xdpflow.h).
 * a0, a1: the address's 16 bytes as they lie in memory (IPv4: 4, then 0).
 * Most addresses are answered by the /16 array alone.
 */
static __always_inline __u32 rl_addr_class(__u32 slot, __u32 fd, __u64 a0,
					   __u64 a1)
{
	__u32 top = (__u32)(a0 & 0xff) << 8 | (__u32)((a0 >> 8) & 0xff);
	__u32 key = (slot * 4 + fd) * XF_RL1_SIZE + top;
	__u32 *e = bpf_map_lookup_elem(&rl_l1, &key);
	struct rl_probe pr;

	if (!e)
		return 0;
	pr.cls = *e & 0xffff;
	pr.mask = *e >> 16;
	if (!pr.mask)
		return pr.cls;
	pr.a0 = a0;
	pr.a1 = a1;
	pr.tag = (slot * 4 + fd) * XF_RLEVELS;
	pr.fam = fd >> 1;
	pr.slot = slot;
	bpf_loop(XF_RLEVELS, rl_probe_level, &pr, 0);
	return pr.cls;
}

static __always_inline struct xf_rule_bits *rl_bits(__u32 slot, __u32 cls)
{
	__u32 key = slot * XF_RCLASS_MAX + (cls & (XF_RCLASS_MAX - 1));

	return bpf_map_lookup_elem(&rl_pool, &key);
}

static __always_inline __u32 rl_table(void *map, __u32 slot, __u32 size,
				      __u32 idx)
{
	__u32 key = slot * size + idx;
	__u32 *e = bpf_map_lookup_elem(map, &key);

	return e ? *e : 0;
}

/* GCRA (virtual scheduling): conforming iff the source's theoretical
 * arrival time is at most burst ahead of now. A lost cmpxchg race lets the
 * frame through: another CPU moved the same clock meanwhile.
 */
static __always_inline int gcra(__u64 *tat, __u64 now, __u64 cost, __u64 burst)
{
	__u64 old = *tat, t = old > now ? old : now;

	if (t - now > burst)
		return 0;
	__sync_val_compare_and_swap(tat, old, t + cost);
	return 1;
}

static __always_inline int rate_ok(struct xf_rule_act *r, struct pkt *p,
				   __u64 s0, __u64 s1)
{
	struct xf_rate_key k = { .rule = r->id, .family = p->family };
	__u64 now = bpf_ktime_get_ns();
	__u64 bcost = (p->len * r->byte_ns) >> 10;
	struct xf_rate_val *v, nv;

	__builtin_memcpy(k.addr, &s0, 8);
	__builtin_memcpy(k.addr + 8, &s1, 8);
	v = bpf_map_lookup_elem(&rl_rate, &k);
	if (!v) {
		nv.tat_pkt = now + r->pkt_ns;
		nv.tat_byte = now + bcost;
		bpf_map_update_elem(&rl_rate, &k, &nv, BPF_NOEXIST);
		return 1;
	}
	if (r->pkt_ns && !gcra(&v->tat_pkt, now, r->pkt_ns, r->burst_ns))
		return 0;
	if (r->byte_ns && !gcra(&v->tat_byte, now, bcost, r->burst_ns))
		return 0;
	return 1;
}

/* the frame's class per field (0: unconstrained) and the words left */
struct rl_scan {
	__u32 cls[7];
	__u32 slot;
	__u32 rest; /* summary bits of the words not looked at yet */
	__u32 best_rank;
	__u32 best; /* bit + 1, or 0 */
	__u32 pad;
	__u64 now; /* jiffies, read once a rule with a TTL is met */
};

/* One candidate word (the lowest left): its first set bit whose rule has
 * not expired competes by rank. Bits are in rank order within a word.
 */
static long rl_scan_word(__u32 n, void *ctx)
{
	struct rl_scan *sc = ctx;
	struct xf_rule_bits *b;
	struct xf_rule_act *r;
	__u64 w = ~0ULL;
	__u32 i, key;

	if (!sc->rest)
		return 1;
	i = ctz64(sc->rest);
	sc->rest &= sc->rest - 1;
	if (i >= XF_RULE_WORDS)
		return 1;
	for (int f = 0; f < 7; f++) {
		b = rl_bits(sc->slot, sc->cls[f]);
		if (!b)
			return 1;
		w &= b->w[i];
	}
	for (int j = 0; j < 64 && w; j++) {
		key = sc->slot * XF_RULE_BITS + i * 64 + ctz64(w);
		r = bpf_map_lookup_elem(&rl_act, &key);
		if (!r)
			return 0;
		if (r->expires) {
			if (!sc->now)
				sc->now = bpf_jiffies64();
			if (sc->now >= r->expires) {
				w &= w - 1;
				continue;
			}
		}
		if (r->rank < sc->best_rank) {
			sc->best_rank = r->rank;
			sc->best = r->bit + 1;
		}
		return 0;
	}
	return 0;
}

static __always_inline __u32 popcount32(__u32 v)
{
	v = v - ((v >> 1) & 0x55555555);
	v = (v & 0x33333333) + ((v >> 2) & 0x33333333);
	v = (v + (v >> 4)) & 0x0f0f0f0f;
	return (v * 0x01010101) >> 24;
}

/* The best rule for a frame: its bit + 1, or 0. A global function (the
 * verifier checks it once), so plain arguments: slot; proto << 8 | TCP
 * flags | IP length << 16; sport | dport << 32 (XF_RNO_L4 without L4).
 */
__attribute__((noinline)) __u32 xf_rl_classify(struct pkt *p, __u32 slot,
					       __u32 proto_len, __u64 ports,
					       __u32 ifindex)
{
	struct xf_rule_bits *bs, *bd;
	struct rl_scan sc = {};
	struct xf_rule_head *h;
	__u64 sa0 = 0, sa1 = 0, da0 = 0, da1 = 0;
	__u32 fields, fd = 0, proto_key = proto_len & 0xffff;
	__u32 iplen = proto_len >> 16;
	__u32 sport = ports & 0x1ffff, dport = (ports >> 32) & 0x1ffff;

	if (!p)
		return 0;
	slot &= 1;
	sc.slot = slot;
	if (p->family == 4) {
		sa0 = p->k4.saddr; /* network order bytes, in memory order */
		da0 = p->k4.daddr;
	} else {
		__builtin_memcpy(&sa0, p->k6.saddr, 8);
		__builtin_memcpy(&sa1, p->k6.saddr + 8, 8);
		__builtin_memcpy(&da0, p->k6.daddr, 8);
		__builtin_memcpy(&da1, p->k6.daddr + 8, 8);
		fd = 2;
	}

	h = bpf_map_lookup_elem(&rl_head, &slot);
	if (!h)
		return 0;
	fields = h->fields;

	/* Classes first, bitmaps after: an unconstrained field takes class 0
	 * (every rule). The address fields come first: most traffic stops
	 * there.
	 */
	if (fields & XF_RF_SRC)
		sc.cls[0] = rl_addr_class(slot, fd, sa0, sa1);
	if (fields & XF_RF_DST)
		sc.cls[1] = rl_addr_class(slot, fd + 1, da0, da1);
	bs = rl_bits(slot, sc.cls[0]);
	bd = rl_bits(slot, sc.cls[1]);
	if (!bs || !bd)
		return 0;
	sc.rest = bs->summary & bd->summary;
	if (!sc.rest)
		return 0;
	if (fields & XF_RF_PROTO)
		sc.cls[2] = rl_table(&rl_proto, slot, 65536, proto_key & 0xffff);
	if (fields & XF_RF_SPORT)
		sc.cls[3] = rl_table(&rl_sport, slot, XF_RPORT_SIZE, sport);
	if (fields & XF_RF_DPORT)
		sc.cls[4] = rl_table(&rl_dport, slot, XF_RPORT_SIZE, dport);
	if (fields & XF_RF_LEN)
		sc.cls[5] = rl_table(&rl_len, slot, 65536, iplen);
	if (fields & XF_RF_IFACE) {
		struct xf_riface_key ik = { .slot = slot, .ifindex = ifindex };
		__u32 *e = bpf_map_lookup_elem(&rl_iface, &ik);

		sc.cls[6] = e ? *e : h->iface_default;
	}
	for (int f = 2; f < 7; f++) {
		bs = rl_bits(slot, sc.cls[f]);
		if (!bs)
			return 0;
		sc.rest &= bs->summary;
	}
	if (!sc.rest)
		return 0;
	/* one call per word that survived: usually one or two */
	sc.best_rank = ~0U;
	bpf_loop(popcount32(sc.rest), rl_scan_word, &sc, 0);
	return sc.best;
}

/* The rules step for one IP frame: parse L4 (a frame without an L4 header
 * matches only rules that need none), classify, then account and apply
 * the best rule. Returns RJ_NONE, RJ_ALLOW, or RJ_DROP (drop or rate-limit
 * excess; the caller applies monitor mode).
 *
 * A global function, so the verifier checks it once instead of once per
 * path through the program; hence plain arguments: off = L4 header offset
 * | IP packet end offset << 16, meta = IP protocol | l4_ok << 8.
 */
__attribute__((noinline)) int xf_rules(struct xdp_md *ctx, struct pkt *p,
				       __u32 flags, __u32 meta, __u32 off)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 slot = (flags & XF_CFG_RULES_SLOT) ? 1 : 0, sport, dport, bit, key;
	int ipproto = meta & 0xff, l4_ok = (meta >> 8) & 1;
	struct hdr_cursor nh;
	struct xf_rule_act *best;
	struct xf_rule_head *h;
	struct xf_rule_cnt *cnt;
	__be16 sp = 0, dp = 0;
	__u32 tf = 0, iplen;
	__u64 s0 = 0, s1 = 0;

	if (!p)
		return RJ_NONE;
	/* bounded well below 64k, or the verifier cannot range-check the
	 * header reads; XDP frames are far shorter */
	nh.pos = data + (off & 0x3fff);
	nh.end = data + (off >> 16);
	if (!l4_ok || parse_l4(&nh, data_end, ipproto, l4_ok, &sp, &dp, &tf) < 0) {
		sport = dport = XF_RNO_L4;
		tf = 0;
	} else {
		sport = bpf_ntohs(sp);
		dport = bpf_ntohs(dp);
	}
	iplen = p->iplen > 65535 ? 65535 : p->iplen;
	bit = xf_rl_classify(p, slot,
			     (__u32)ipproto << 8 |
				     (ipproto == IPPROTO_TCP ? tf & 0xff : 0) |
				     iplen << 16,
			     (__u64)sport | (__u64)dport << 32,
			     ctx->ingress_ifindex);
	if (!bit)
		return RJ_NONE;
	key = slot * XF_RULE_BITS + bit - 1;
	best = bpf_map_lookup_elem(&rl_act, &key);
	h = bpf_map_lookup_elem(&rl_head, &slot);
	if (!best || !h)
		return RJ_NONE;

	/* the blocklist sits at rank bl_rank: a rule after it applies only
	 * to frames it does not list (RJ_NONE lets the caller block them) */
	if (best->rank >= h->bl_rank) {
		if (p->family == 4) {
			if ((flags & (XF_CFG_BL4_SRC | XF_CFG_BL4_DST)) &&
			    bl4_match(flags, &p->k4))
				return RJ_NONE;
		} else if ((flags & (XF_CFG_BL6_SRC | XF_CFG_BL6_DST)) &&
			   bl6_match(flags, &p->k6)) {
			return RJ_NONE;
		}
	}

	cnt = bpf_map_lookup_elem(&rule_counters, &best->counter);
	if (cnt) {
		cnt->packets++;
		cnt->bytes += p->len;
	}
	switch (best->action) {
	case XF_RA_PASS:
	case XF_RA_MONITOR:
		return RJ_ALLOW;
	case XF_RA_RATE:
		if (p->family == 4) {
			s0 = p->k4.saddr;
		} else {
			__builtin_memcpy(&s0, p->k6.saddr, 8);
			__builtin_memcpy(&s1, p->k6.saddr + 8, 8);
		}
		if (rate_ok(best, p, s0, s1))
			return RJ_ALLOW;
		if (cnt)
			cnt->limited++;
		return RJ_DROP;
	default:
		return RJ_DROP;
	}
}

/* the call site's part: monitor mode turns a drop into a counted pass,
 * untracked, as it does for blocklisted frames */
static __always_inline int rules_judge(struct xdp_md *ctx, struct xf_counters *c,
				       struct pkt *p, __u32 flags,
				       struct hdr_cursor *nh, int ipproto,
				       int l4_ok, int *action, __u32 *act)
{
	void *data = (void *)(long)ctx->data;
	__u32 off = (__u32)(nh->pos - data) | (__u32)(nh->end - data) << 16;
	int rj = xf_rules(ctx, p, flags, (ipproto & 0xff) | (l4_ok ? 256 : 0), off);

	if (rj != RJ_DROP)
		return rj;
	if (flags & XF_CFG_MONITOR) {
		count(c, XF_CNT_MONITORED, p->len);
		*action = XDP_PASS;
	} else {
		*act = XF_CNT_DROPPED;
		*action = XDP_DROP;
	}
	return RJ_DONE;
}

#endif /* XDPFLOW_RULES_H */
