/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* protect.h - count frames per protected destination host.
 *
 * Included by: bpf/xdpflow.bpf.c only (kernel only), after the maps and
 * struct pkt. The tables are described in xdpflow.h and written by
 * xdpflow/dataplane/protect.py.
 *
 * Called right after parsing, before the rules and the blocklist, so a frame
 * is counted whatever its fate. A host already in prot_hosts is counted
 * without looking at the prefixes again (it was inside one when it was
 * inserted; the controller deletes hosts a new set no longer covers).
 */
#ifndef XDPFLOW_PROTECT_H
#define XDPFLOW_PROTECT_H

/* p->prot after xf_protect: the frame was counted in its host's entry, or
 * (the table was full) in its group's overflow record: the group id */
#define PROT_HOST 0x10000

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
	__u32 syn, udp, icmp, frags;
};

static __always_inline void prot_add(struct xf_host_cnt *c, struct pkt *p,
				     const struct prot_frame *f)
{
	c->packets++;
	c->bytes += p->len;
	c->syn += f->syn;
	c->udp += f->udp;
	c->icmp += f->icmp;
	c->frags += f->frags;
}

/* The first frame to a host: find its group, insert it, or count it in the
 * group's overflow record when the table is full. Off the hit path. */
static __always_inline void prot_insert(struct pkt *p, struct xf_host_key *key,
					__u32 slot, __u32 fam, __u32 v,
					const struct prot_frame *f)
{
	struct xf_host_cnt nv, *hc;
	__u32 g = prot_group(slot, fam, key->addr, v);
	long err;

	if (!g)
		return;
	nv.packets = 1;
	nv.bytes = p->len;
	nv.new_flows = 0;
	nv.syn = f->syn;
	nv.udp = f->udp;
	nv.icmp = f->icmp;
	nv.frags = f->frags;
	nv.group = g;
	nv.pad = 0;
	err = bpf_map_update_elem(&prot_hosts, key, &nv, BPF_NOEXIST);
	if (!err) {
		p->prot = PROT_HOST;
		return;
	}
	/* another CPU inserted it meanwhile; else the table is full */
	if (err == -EEXIST) {
		hc = bpf_map_lookup_elem(&prot_hosts, key);
		if (hc) {
			prot_add(hc, p, f);
			p->prot = PROT_HOST;
			return;
		}
	}
	hc = bpf_map_lookup_elem(&prot_overflow, &g);
	if (hc)
		prot_add(hc, p, f);
	p->prot = g;
}

/* Count one IP frame if its destination is protected. A global function,
 * so the verifier checks it once; plain arguments: meta = IP protocol |
 * fragment << 8 | l4_ok << 9 | L4 header offset << 16. Per-CPU values:
 * no atomics (see xdpflow.bpf.c).
 */
__attribute__((noinline)) int xf_protect(struct xdp_md *ctx, struct pkt *p,
					 __u32 flags, __u32 meta)
{
	__u32 slot = (flags & XF_CFG_PROTECT_SLOT) ? 1 : 0, fam, key1, proto;
	struct prot_frame f = {};
	struct xf_host_key key;
	struct xf_host_cnt *hc;
	void *data, *data_end;
	const __u8 *a;
	__u8 *tf;
	__u32 *e;

	if (!p)
		return 0;
	fam = p->family == 4 ? 0 : 1;
	a = fam ? p->k6.daddr : (const __u8 *)&p->k4.daddr;
	key1 = (slot * 2 + fam) * XF_PL1_SIZE + ((__u32)a[0] << 8 | a[1]);
	e = bpf_map_lookup_elem(&prot_l1, &key1);
	/* outside every protected /16: the common frame ends here */
	if (!e || !*e)
		return 0;
	/* in a /16 that only longer prefixes touch, and not near one */
	if (!(*e & XF_PGROUP_MASK) && !prot_filter(slot, fam, a))
		return 0;

	key.family = p->family;
	key.pad[0] = key.pad[1] = key.pad[2] = 0;
	if (fam) {
		__builtin_memcpy(key.addr, p->k6.daddr, 16);
	} else {
		__builtin_memcpy(key.addr, &p->k4.daddr, 4);
		__builtin_memset(key.addr + 4, 0, 12);
	}
	proto = meta & 0xff;
	f.frags = (meta >> 8) & 1;
	if (proto == IPPROTO_UDP) {
		f.udp = 1;
	} else if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
		f.icmp = 1;
	} else if (proto == IPPROTO_TCP && (meta & 0x200)) {
		/* the flags byte; a truncated header is not a SYN */
		data = (void *)(long)ctx->data;
		data_end = (void *)(long)ctx->data_end;
		tf = data + ((meta >> 16) & 0x3fff) + 13;
		if ((void *)(tf + 1) <= data_end && (*tf & 0x12) == 0x02)
			f.syn = 1;
	}

	/* a host already counted was inside a protected prefix when it was
	 * inserted: no prefix lookup */
	hc = bpf_map_lookup_elem(&prot_hosts, &key);
	if (hc) {
		prot_add(hc, p, &f);
		p->prot = PROT_HOST;
		return 0;
	}
	prot_insert(p, &key, slot, fam, *e, &f);
	return 0;
}

/* A new flow to a counted host: where track() inserted it. */
__attribute__((noinline)) int xf_protect_flow(struct pkt *p)
{
	struct xf_host_key key = {};
	struct xf_host_cnt *hc;
	__u32 g;

	if (!p || !p->prot)
		return 0;
	if (p->prot & PROT_HOST) {
		key.family = p->family;
		if (p->family == 4)
			__builtin_memcpy(key.addr, &p->k4.daddr, 4);
		else
			__builtin_memcpy(key.addr, p->k6.daddr, 16);
		hc = bpf_map_lookup_elem(&prot_hosts, &key);
	} else {
		g = p->prot & XF_PGROUP_MASK;
		hc = bpf_map_lookup_elem(&prot_overflow, &g);
	}
	/* a host deleted in between loses this one */
	if (hc)
		hc->new_flows++;
	return 0;
}

#endif /* XDPFLOW_PROTECT_H */
