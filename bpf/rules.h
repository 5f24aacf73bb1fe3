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

/* Classification state, shared with the scan's bpf_loop callback. */
struct rl_scan {
	__u32 cls[7]; /* the frame's class per field (0: unconstrained) */
	__u32 slot;
	__u32 rest;   /* summary bits of the words not looked at yet */
	__u32 best_rank;
	__u32 best;   /* bit + 1, or 0 */
	__u32 word;   /* the word being looked at */
	__u64 w;      /* its candidates not ruled out yet */
	__u64 now;    /* the frame's jiffies, for rules with a TTL */
};

/* Class of an address (its bytes in a0, a1 as they lie in memory), as a
 * table entry (class in bits 0-15, its summary above bit 32): the longest
 * rule CIDR holding it (see xdpflow.h). Most addresses are answered by the
 * /16 array alone; the levels in use below it are probed longest first,
 * unrolled.
 */
static __always_inline __u64 rl_addr_class(__u32 slot, __u64 a0, __u64 a1,
					   __u32 fd)
{
	struct xf_rule_head *h;
	__u32 top = (__u32)(a0 & 0xff) << 8 | (__u32)((a0 >> 8) & 0xff);
	struct xf_rule_tl1 *l1 = bpf_map_lookup_elem(&rl_l1, &slot);
	struct xf_rule_tchunk *t;
	struct xf_raddr_key k;
	__u32 mask, fam = (fd >> 1) & 1, c;
	__u64 *hit, v;

	if (!l1)
		return 0;
	v = l1->e[(fd & 3) * XF_RL1_SIZE + top];
	if (fd < 2) {
		/* IPv4: arrays, one load per level (rl_c24 by the third
		 * byte, rl_c32 by the fourth); a hash lookup of the 20-byte
		 * key cost ~40 ns */
		if (!(v & XF_RL_CHUNK))
			return v;
		t = bpf_map_lookup_elem(&rl_c24, &slot);
		if (!t)
			return 0;
		c = (v >> 16) & (XF_RC24_CHUNKS - 1);
		v = t->e[c * 256 + ((a0 >> 16) & 0xff)];
		if (!(v & XF_RL_CHUNK))
			return v;
		t = bpf_map_lookup_elem(&rl_c32, &slot);
		if (!t)
			return 0;
		c = (v >> 16) & (XF_RC32_CHUNKS - 1);
		return t->e[c * 256 + ((a0 >> 24) & 0xff)];
	}
	mask = (v >> 16) & 0xffff;
	if (!mask)
		return v;
	h = bpf_map_lookup_elem(&rl_head, &slot);
	if (!h)
		return v;
#pragma unroll
	for (int i = XF_RLEVELS - 1; i >= 0; i--) {
		if (!(mask & (1U << i)))
			continue;
		/* the masks nest, so masking the previous level's key is enough */
		a0 &= h->lmask[fam][i][0];
		a1 &= h->lmask[fam][i][1];
		k.tag = (slot * 4 + fd) * XF_RLEVELS + i;
		__builtin_memcpy(k.addr, &a0, 8);
		__builtin_memcpy(k.addr + 8, &a1, 8);
		hit = bpf_map_lookup_elem(&rl_addr, &k);
		if (hit)
			return *hit;
	}
	return v;
}

static __always_inline struct xf_rule_bits *rl_bits(struct xf_rule_pool *pool,
						    __u32 cls)
{
	return &pool->b[cls & (XF_RCLASS_MAX - 1)];
}

/* a field table's entry: class | summary << 32 (0: no entry, no rule);
 * t is the slot's element, of n entries */
static __always_inline __u64 rl_table(__u64 *t, __u32 n, __u32 idx)
{
	return t && idx < n ? t[idx] : 0;
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

/* murmur3's 64-bit finaliser: every input bit reaches every output bit */
static __always_inline __u64 fmix64(__u64 x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ULL;
	x ^= x >> 33;
	return x;
}

/* Whether a frame conforms to its rate-limit rule: one GCRA clock per source
 * and rule for pps, one for bit/s, in a 2-way set of rl_gcra. A source not
 * found takes the way whose clock is further behind (the idler one): a
 * source being limited has its clock ahead of now, so new sources evict
 * each other, not it. Inlined into xf_rule_apply (off the classifier's call
 * chain, so the two stacks do not add up).
 */
static __always_inline int rate_ok(struct xf_rule_act *r, struct pkt *p)
{
	struct xf_rate_way *w, *w1;
	struct xf_rate_set *set;
	__u64 now, bcost, x, tag, t0, t1;
	__u32 idx;

	if (!r || !p)
		return 1;
	x = (__u64)r->id << 32 | p->family;
	if (p->family == 4) {
		x = fmix64(x ^ (__u64)p->k4.saddr << 8);
	} else {
		const __u64 *a = __builtin_assume_aligned(p->k6.saddr, 8);

		x = fmix64(fmix64(x ^ a[0]) ^ a[1]);
	}
	tag = x | 1;
	idx = (__u32)(x >> 40) & (XF_RRATE_SETS - 1);
	set = bpf_map_lookup_elem(&rl_gcra, &idx);
	if (!set)
		return 1;
	/* the frame's jiffies in finer units: the tolerance is two ticks
	 * at least, and the clocks advance by exact costs, so the long-run
	 * rate is exact */
	now = p->now << XF_RATE_SHIFT;
	bcost = (p->len * r->byte_cost) >> 10;
	w = &set->way[0];
	w1 = &set->way[1];
	if (w->tag != tag) {
		if (w1->tag == tag) {
			w = w1;
		} else {
			t0 = w->tat_pkt > w->tat_byte ? w->tat_pkt : w->tat_byte;
			t1 = w1->tat_pkt > w1->tat_byte ? w1->tat_pkt : w1->tat_byte;
			if (t1 < t0)
				w = w1;
			w->tag = tag;
			w->tat_pkt = now + r->pkt_cost;
			w->tat_byte = now + bcost;
			return 1;
		}
	}
	if (r->pkt_cost && !gcra(&w->tat_pkt, now, r->pkt_cost, r->burst))
		return 0;
	if (r->byte_cost && !gcra(&w->tat_byte, now, bcost, r->burst))
		return 0;
	return 1;
}

/* One step: the first candidate of the current word (taking the next word
 * from the summary when it has none left). Bits are in rank order within a
 * word, so the first candidate whose rule has not expired is the word's
 * best, and the rest of the word is skipped. One step per word, plus one
 * per expired rule met: a flat loop the verifier walks once.
 */
static long rl_scan_step(__u32 n, void *ctx)
{
	struct rl_scan *sc = ctx;
	struct xf_rule_pool *pool;
	struct xf_rule_bits *b;
	struct xf_rule_act *r;
	__u32 i, key;
	__u64 w;

	if (!sc->w) {
		if (!sc->rest)
			return 1;
		i = ctz64(sc->rest);
		sc->rest &= sc->rest - 1;
		if (i >= XF_RULE_WORDS)
			return 1;
		pool = bpf_map_lookup_elem(&rl_pool, &sc->slot);
		if (!pool)
			return 1;
		w = ~0ULL;
		for (int f = 0; f < 7; f++) {
			b = rl_bits(pool, sc->cls[f]);
			w &= b->w[i];
		}
		sc->word = i;
		sc->w = w;
		if (!w)
			return 0;
	}
	key = sc->slot * XF_RULE_BITS + (sc->word & 31) * 64 + ctz64(sc->w);
	r = bpf_map_lookup_elem(&rl_act, &key);
	if (!r)
		return 1;
	if (r->expires) {
		if (sc->now >= r->expires) {
			sc->w &= sc->w - 1;
			return 0;
		}
	}
	if (r->rank < sc->best_rank) {
		sc->best_rank = r->rank;
		sc->best = r->bit + 1;
	}
	sc->w = 0;
	return 0;
}

/* The best rule for a frame: its bit + 1, or 0. proto_len: proto << 8 |
 * TCP flags | IP length << 16; ports: sport | dport << 32 (XF_RNO_L4
 * without L4).
 */
static __always_inline __u32 rl_classify(struct xdp_md *ctx, struct pkt *p,
					 __u32 slot, __u32 fields,
					 __u32 proto_len, __u64 ports)
{
	struct xf_rule_bits *bs, *bd, *b2, *b3, *b4, *b5, *b6;
	struct xf_rule_pool *pool;
	__u32 rest, live, left, c0 = 0, c1 = 0, c2 = 0, c3 = 0, c4 = 0, c5 = 0;
	__u32 c6 = 0, fd = 0, i;
	__u32 proto_key = proto_len & 0xffff, iplen = proto_len >> 16;
	__u32 sport = ports & 0x1ffff, dport = (ports >> 32) & 0x1ffff;
	struct xf_rule_head *h;
	struct xf_rule_act *r;
	struct rl_scan sc;
	__u64 a0, a1, any, e;

	if (!p)
		return 0;
	slot &= 1;
	if (p->family != 4)
		fd = 2;

	/* Each constrained field's class and, in the same entry, the summary
	 * of the words its rules are in; an unconstrained field is class 0
	 * (every rule) and rules nothing out. The fields read from arrays
	 * come first, the addresses last: an IPv6 class may take hash
	 * lookups, and most traffic is ruled out before them. Bitmaps are
	 * loaded only for a frame some word survives.
	 */
	rest = (1U << XF_RULE_WORDS) - 1;
	if (fields & XF_RF_PROTO) {
		e = rl_table(bpf_map_lookup_elem(&rl_proto, &slot), 65536,
			     proto_key & 0xffff);
		c2 = (__u32)e;
		rest &= e >> 32;
	}
	if (fields & XF_RF_SPORT) {
		e = rl_table(bpf_map_lookup_elem(&rl_sport, &slot),
			     XF_RPORT_SIZE, sport);
		c3 = (__u32)e;
		rest &= e >> 32;
	}
	if (fields & XF_RF_DPORT) {
		e = rl_table(bpf_map_lookup_elem(&rl_dport, &slot),
			     XF_RPORT_SIZE, dport);
		c4 = (__u32)e;
		rest &= e >> 32;
	}
	if (fields & XF_RF_LEN) {
		e = rl_table(bpf_map_lookup_elem(&rl_len, &slot), 65536,
			     iplen);
		c5 = (__u32)e;
		rest &= e >> 32;
	}
	if (fields & XF_RF_IFACE) {
		/* read only here: three dependent loads (rxq, dev, ifindex)
		 * that most rule sets do not need */
		struct xf_riface_key ik = { .slot = slot,
					    .ifindex = ctx->ingress_ifindex };
		__u64 *ie = bpf_map_lookup_elem(&rl_iface, &ik);

		if (ie) {
			e = *ie;
		} else {
			h = bpf_map_lookup_elem(&rl_head, &slot);
			if (!h)
				return 0;
			e = (__u64)h->iface_default_sum << 32 | h->iface_default;
		}
		c6 = (__u32)e;
		rest &= e >> 32;
	}
	if (!rest)
		return 0;
	/* addresses as their bytes lie in memory (network order) */
	if (fields & XF_RF_SRC) {
		if (fd) {
			/* struct pkt's keys are 8-byte aligned: two loads,
			 * where a memcpy of bytes took 22 instructions */
			const __u64 *sa =
				__builtin_assume_aligned(p->k6.saddr, 8);

			a0 = sa[0];
			a1 = sa[1];
		} else {
			a0 = p->k4.saddr;
			a1 = 0;
		}
		e = rl_addr_class(slot, a0, a1, fd);
		c0 = e & 0xffff;
		rest &= e >> 32;
		if (!rest)
			return 0;
	}
	if (fields & XF_RF_DST) {
		if (fd) {
			const __u64 *da =
				__builtin_assume_aligned(p->k6.daddr, 8);

			a0 = da[0];
			a1 = da[1];
		} else {
			a0 = p->k4.daddr;
			a1 = 0;
		}
		e = rl_addr_class(slot, a0, a1, fd + 1);
		c1 = e & 0xffff;
		rest &= e >> 32;
		if (!rest)
			return 0;
	}
	pool = bpf_map_lookup_elem(&rl_pool, &slot);
	if (!pool)
		return 0;
	bs = rl_bits(pool, c0);
	bd = rl_bits(pool, c1);
	b2 = rl_bits(pool, c2);
	b3 = rl_bits(pool, c3);
	b4 = rl_bits(pool, c4);
	b5 = rl_bits(pool, c5);
	b6 = rl_bits(pool, c6);

	/* The words where one rule accepts every field: usually none, and
	 * then the frame is done without a scan. Branch-free (x | -x has its
	 * top bit set iff x != 0), so the verifier sees one path, not one per
	 * combination of words.
	 */
	live = 0;
	any = 0;
	left = rest;
#pragma clang loop unroll(disable)
	for (int k = 0; k < XF_RULE_WORDS && left; k++) {
		__u64 x;

		i = ctz64(left);
		left &= left - 1;
		if (i >= XF_RULE_WORDS)
			break;
		x = bs->w[i] & bd->w[i] & b2->w[i] & b3->w[i] & b4->w[i] &
		    b5->w[i] & b6->w[i];
		live |= (__u32)((x | -x) >> 63) << i;
		any |= x;
	}
	live &= rest;
	if (!live)
		return 0;
	/* One live word (the usual case of a frame some rule matches): its
	 * first candidate is the answer unless that rule has expired (the
	 * scan then looks past it). The frame's jiffies come from the program,
	 * read once for the rules and the flow update. */
	if (!(live & (live - 1))) {
		__u32 key = slot * XF_RULE_BITS + (ctz64(live) & 31) * 64 +
			    ctz64(any);

		r = bpf_map_lookup_elem(&rl_act, &key);
		if (r && (!r->expires || p->now < r->expires))
			return r->bit + 1;
	}
	/* one step per live word, plus one per expired rule met on the way */
	sc.slot = slot;
	sc.cls[0] = c0;
	sc.cls[1] = c1;
	sc.cls[2] = c2;
	sc.cls[3] = c3;
	sc.cls[4] = c4;
	sc.cls[5] = c5;
	sc.cls[6] = c6;
	sc.rest = live;
	sc.best = 0;
	sc.w = 0;
	sc.now = p->now;
	sc.word = 0;
	sc.best_rank = ~0U;
	bpf_loop(XF_RULE_BITS + XF_RULE_WORDS, rl_scan_step, &sc, 0);
	return sc.best;
}

/* Classify one IP frame whose L4 fields the program has parsed into *p
 * (meta: IP protocol | has_l4 << 8 | the slot's xf_rule_field mask << 16;
 * a frame without a readable L4 header matches only rules that need none):
 * the best rule's bit + 1, or 0.
 *
 * Global functions, so the verifier checks each once instead of once per
 * path through the program; hence plain arguments. Classification and its
 * effects are two calls from the program, not one inside the other, so
 * their stacks never add up beyond the verifier's 512 bytes.
 */
__attribute__((noinline)) __u32 xf_rl_classify(struct xdp_md *ctx,
					       struct pkt *p, __u32 flags,
					       __u32 meta)
{
	__u32 slot = (flags & XF_CFG_RULES_SLOT) ? 1 : 0, sport, dport, iplen;
	__u32 ipproto = meta & 0xff;

	if (!p)
		return 0;
	if (!(meta & 256)) {
		sport = dport = XF_RNO_L4;
	} else if (p->family == 4) {
		sport = bpf_ntohs(p->k4.sport);
		dport = bpf_ntohs(p->k4.dport);
	} else {
		sport = bpf_ntohs(p->k6.sport);
		dport = bpf_ntohs(p->k6.dport);
	}
	iplen = p->iplen > 65535 ? 65535 : p->iplen;
	return rl_classify(ctx, p, slot, (meta >> 16) & 0x7f,
			   ipproto << 8 |
				   (ipproto == IPPROTO_TCP ? p->tcp_flags & 0xff : 0) |
				   iplen << 16,
			   (__u64)sport | (__u64)dport << 32);
}

/* Apply rule bit + 1 to a classified frame: account it, run its rate
 * limit, report it as an event (budgeted; pass rules stay quiet). Returns
 * RJ_NONE (the blocklist comes first and lists the frame), RJ_ALLOW, or
 * RJ_DROP (drop or rate-limit excess; the caller applies monitor mode).
 */
__attribute__((noinline)) int xf_rule_apply(struct xdp_md *ctx, struct pkt *p,
					    __u32 flags, __u32 bit,
					    __u32 listed)
{
	__u32 slot = (flags & XF_CFG_RULES_SLOT) ? 1 : 0, key, zero = 0;
	struct xf_rule_act *best;
	struct xf_rule_head *h;
	struct xf_rule_cnt *cnt;
	struct xf_counters *c;
	struct xf_config *cfg;
	__u64 now;
	int rj;

	/* a bound, not a mask: XF_RULE_BITS is not a power of two */
	if (!p || !bit || bit > XF_RULE_BITS)
		return RJ_NONE;
	key = slot * XF_RULE_BITS + bit - 1;
	best = bpf_map_lookup_elem(&rl_act, &key);
	if (!best)
		return RJ_NONE;

	/* the blocklist sits at rank bl_rank: a rule after it applies only
	 * to frames it does not list (RJ_NONE lets the caller block them) */
	if (listed) {
		h = bpf_map_lookup_elem(&rl_head, &slot);
		if (!h || best->rank >= h->bl_rank)
			return RJ_NONE;
	}

	cnt = bpf_map_lookup_elem(&rule_counters, &best->counter);
	if (cnt) {
		cnt->packets++;
		cnt->bytes += p->len;
	}
	switch (best->action) {
	case XF_RA_PASS:
		return RJ_ALLOW; /* quiet: allowing is what traffic does */
	case XF_RA_MONITOR:
		rj = RJ_ALLOW;
		break;
	case XF_RA_RATE:
		if (rate_ok(best, p))
			return RJ_ALLOW;
		if (cnt)
			cnt->limited++;
		rj = RJ_DROP;
		break;
	default:
		rj = RJ_DROP;
	}

	c = bpf_map_lookup_elem(&counters, &zero);
	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!c || !cfg)
		return rj;
	now = p->now;
	if (event_allowed(c, p, now, cfg))
		emit(c, ctx, p, XF_EV_RULE, best->id, now, cfg,
		     best->action | (rj == RJ_DROP ? XF_EV_RULE_DROPPED : 0));
	return rj;
}

/* the call site's part: monitor mode turns a drop into a counted pass,
 * untracked, as it does for blocklisted frames */
static __always_inline int rules_judge(struct xdp_md *ctx, struct xf_counters *c,
				       struct pkt *p, __u32 flags, __u32 fields,
				       int ipproto, int has_l4, __u32 listed,
				       int *action, __u32 *act)
{
	__u32 slot = (flags & XF_CFG_RULES_SLOT) ? 8 : 0;
	__u32 bit = xf_rl_classify(ctx, p, flags,
				   (ipproto & 0xff) | (has_l4 ? 256 : 0) |
					   ((fields >> slot) & 0x7f) << 16);
	int rj;

	if (!bit)
		return RJ_NONE;
	rj = xf_rule_apply(ctx, p, flags, bit, listed);

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
