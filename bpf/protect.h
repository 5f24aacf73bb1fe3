/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* protect.h - count frames per protected destination host.
 *
 * Included by: bpf/xdpflow.bpf.c only (kernel only), after the maps and
 * struct pkt. The tables are described in xdpflow.h and written by
 * xdpflow/dataplane/protect.py.
 *
 * Called at the end of the program, so a frame is counted whatever its
 * fate. A host already in prot_hosts is counted without looking at the
 * prefixes again (it was inside one when it was inserted; the controller
 * deletes hosts a new set no longer covers).
 */
#ifndef XDPFLOW_PROTECT_H
#define XDPFLOW_PROTECT_H

/* in p->prot: track() inserted the frame's flow */
#define PROT_NEW_FLOW 0x10000

/* The group of the longest protected prefix holding addr (0: none), given
 * its /16's entry v. */
static __always_inline __u32 prot_group(__u32 slot, __u32 fam, const __u8 *addr,
					 __u32 v)
{
	__u32 mask = v >> 16, hk = slot;
	struct xf_prot_head *h;
	struct xf_paddr_key k;
	__u64 a0, a1;
	__u32 *hit;

	if (!mask)
		return v & XF_PGROUP_MASK;
	h = bpf_map_lookup_elem(&prot_head, &hk);
	if (!h)
		return v & XF_PGROUP_MASK;
	__builtin_memcpy(&a0, addr, 8);
	__builtin_memcpy(&a1, addr + 8, 8);
#pragma unroll
	for (int i = XF_PLEVELS - 1; i >= 0; i--) {
		if (!(mask & (1U << i)))
			continue;
		/* the masks nest, so masking the previous level's key is enough */
		a0 &= h->lmask[fam][i][0];
		a1 &= h->lmask[fam][i][1];
		k.tag = (slot * 2 + fam) * XF_PLEVELS + i;
		__builtin_memcpy(k.addr, &a0, 8);
		__builtin_memcpy(k.addr + 8, &a1, 8);
		hit = bpf_map_lookup_elem(&prot_addr, &k);
		if (hit)
			return *hit;
	}
	return v & XF_PGROUP_MASK;
}

/* whether the filter's bit for addr's region is set (see xdpflow.h) */
static __always_inline int prot_filter(__u32 slot, __u32 fam, const __u8 *a)
{
	struct xf_prot_head *h = bpf_map_lookup_elem(&prot_head, &slot);
	__u32 x, bit, word, t;
	__u64 top, *w;

	if (!h)
		return 1;
	if (fam) {
		__builtin_memcpy(&top, a, 8);
		top = bpf_be64_to_cpu(top) >> ((64 - h->pf_len[1]) & 63);
	} else {
		__builtin_memcpy(&t, a, 4);
		top = bpf_ntohl(t) >> ((32 - h->pf_len[0]) & 31);
	}
	x = (__u32)top ^ (__u32)(top >> 32);
	bit = (__u32)(x * (__u32)XF_PF6_MULT) >> XF_PF6_SHIFT;
	word = slot * XF_PPF_WORDS + (bit >> 6);
	w = bpf_map_lookup_elem(&prot_pf, &word);
	return w && ((*w >> (bit & 63)) & 1);
}

/* what one frame adds to its host's counters (packets and bytes aside) */
struct prot_frame {
	__u32 syn, udp, icmp, frags, new_flows;
};

/* Add one frame to a host's counters: a host slot (struct xf_host_slot)
 * and a group's overflow record (struct xf_host_cnt) name them alike. */
#define PROT_ADD(c, p, f)                                                      \
	do {                                                                   \
		(c)->packets++;                                                \
		(c)->bytes += (p)->len;                                        \
		(c)->syn += (f)->syn;                                          \
		(c)->udp += (f)->udp;                                          \
		(c)->icmp += (f)->icmp;                                        \
		(c)->frags += (f)->frags;                                      \
		(c)->new_flows += (f)->new_flows;                              \
	} while (0)

/* Count one frame if it is IP to a protected host. Called last (see the
 * call site), so it parses the headers again itself; a global function, so
 * the verifier checks it once. Per-CPU values: no atomics (see
 * xdpflow.bpf.c).
 */
__attribute__((noinline)) int xf_protect(struct xdp_md *ctx, struct pkt *p)
{
	void *data_end = (void *)(long)ctx->data_end;
	void *data = (void *)(long)ctx->data;
	struct hdr_cursor nh = { .pos = data, .end = data_end };
	__u32 slot, fam, key1, w[4], h, idx, g;
	struct xf_host_slot *s, *free = NULL;
	struct prot_frame f = {};
	struct xf_host_cnt *oc;
	int ethproto, proto, l4_ok = 0;
	struct ipv6hdr *ip6h;
	struct iphdr *iph;
	__u32 *e, *sa;
	__u8 *a;

	if (!p)
		return 0;
	slot = (p->prot & XF_CFG_PROTECT_SLOT) ? 1 : 0;
	ethproto = parse_ethhdr(&nh, data_end);
	if (ethproto == bpf_htons(ETH_P_IP)) {
		proto = parse_iphdr(&nh, data_end, &iph, &l4_ok);
		if (proto < 0)
			return 0;
		fam = 0;
		w[0] = iph->daddr;
		w[1] = w[2] = w[3] = 0;
		f.frags = !!(iph->frag_off & bpf_htons(0x3fff));
	} else if (ethproto == bpf_htons(ETH_P_IPV6)) {
		proto = parse_ip6hdr(&nh, data_end, &ip6h, &l4_ok);
		if (proto < 0)
			return 0;
		fam = 1;
		__builtin_memcpy(w, &ip6h->daddr, 16);
		f.frags = l4_ok != 1;
	} else {
		return 0;
	}
	a = (__u8 *)w;
	key1 = (slot * 2 + fam) * XF_PL1_SIZE + ((__u32)a[0] << 8 | a[1]);
	e = bpf_map_lookup_elem(&prot_l1, &key1);
	/* outside every protected /16: the common frame ends here */
	if (!e || !*e)
		return 0;
	/* in a /16 that only longer prefixes touch, and not near one */
	if (!(*e & XF_PGROUP_MASK) && !prot_filter(slot, fam, a))
		return 0;

	f.new_flows = !!(p->prot & PROT_NEW_FLOW);
	if (proto == IPPROTO_UDP) {
		f.udp = 1;
	} else if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
		f.icmp = 1;
	} else if (proto == IPPROTO_TCP && l4_ok) {
		/* the flags byte; a truncated header is not a SYN */
		__u8 *tf = nh.pos + 13;

		if ((void *)(tf + 1) <= data_end && (void *)(tf + 1) <= nh.end &&
		    (*tf & 0x12) == 0x02)
			f.syn = 1;
	}

	/* the host's slot on this CPU, or the first free one */
	h = (w[0] ^ w[1] ^ w[2] ^ w[3] ^ fam) * 2654435761U;
	h ^= h >> 15;
#pragma unroll
	for (int i = 0; i < XF_PPROBES; i++) {
		idx = (h + i) & knobs.prot_mask;
		s = bpf_map_lookup_elem(&prot_hosts, &idx);
		if (!s)
			break;
		sa = (__u32 *)s->addr; /* at offset 4: aligned */
		if (s->family == (fam ? 6 : 4) && sa[0] == w[0] &&
		    sa[1] == w[1] && sa[2] == w[2] && sa[3] == w[3]) {
			PROT_ADD(s, p, &f);
			return 0;
		}
		if (!s->family && !free)
			free = s;
	}

	/* a new host: its group, then a free slot or the overflow record */
	g = prot_group(slot, fam, a, *e);
	if (!g)
		return 0;
	if (free) {
		__builtin_memcpy(free->addr, w, 16);
		free->group = g;
		free->packets = 1;
		free->bytes = p->len;
		free->new_flows = f.new_flows;
		free->syn = f.syn;
		free->udp = f.udp;
		free->icmp = f.icmp;
		free->frags = f.frags;
		free->family = fam ? 6 : 4;
		return 0;
	}
	oc = bpf_map_lookup_elem(&prot_overflow, &g);
	if (oc)
		PROT_ADD(oc, p, &f);
	return 0;
}

#endif /* XDPFLOW_PROTECT_H */
