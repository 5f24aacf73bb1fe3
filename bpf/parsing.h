/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* parsing.h - header parsing helpers for the XDP program.
 *
 * Included by: kernel only. Each helper takes a cursor, bounds-checks the
 * header it reads against data_end right before use, advances the cursor and
 * returns the next protocol, or -1 when the frame is truncated or malformed.
 */
#ifndef XDPFLOW_PARSING_H
#define XDPFLOW_PARSING_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "xdpflow.h"

/* pos: the next header; end: where the current IP packet ends (the frame
 * end until an IP header says otherwise). Headers must lie before both:
 * data_end for the verifier, end so that Ethernet padding is never parsed.
 */
struct hdr_cursor {
	void *pos;
	void *end;
};

struct vlan_hdr {
	__be16 tci;
	__be16 encap_proto;
};

struct ipv6_opt_hdr_min {
	__u8 nexthdr;
	__u8 hdrlen; /* 8-octet units, not counting the first 8 */
};

struct ipv6_frag_hdr_min {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off; /* offset << 3 | flags */
	__be32 id;
};

#define IP_OFFSET_MASK 0x1fff

static __always_inline int is_vlan(__be16 proto)
{
	return proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD);
}

/* Ethernet plus up to XF_VLAN_MAX stacked tags; returns the inner ethertype
 * (network order). A frame with more tags than that is malformed for us.
 */
static __always_inline int parse_ethhdr(struct hdr_cursor *nh, void *data_end)
{
	struct ethhdr *eth = nh->pos;
	struct vlan_hdr *vh;
	__be16 proto;

	if ((void *)(eth + 1) > data_end)
		return -1;
	proto = eth->h_proto;
	vh = (void *)(eth + 1);

#pragma unroll
	for (int i = 0; i < XF_VLAN_MAX; i++) {
		if (!is_vlan(proto))
			break;
		if ((void *)(vh + 1) > data_end)
			return -1;
		proto = vh->encap_proto;
		vh++;
	}
	if (is_vlan(proto))
		return -1;
	nh->pos = vh;
	return proto;
}

/* IPv4 with options; *l4_ok is cleared for non-first fragments, which carry
 * no L4 header. Returns the IP protocol.
 */
static __always_inline int parse_iphdr(struct hdr_cursor *nh, void *data_end,
				       struct iphdr **iphp, int *l4_ok)
{
	struct iphdr *iph = nh->pos;
	__u32 hdrsize, tot;

	if ((void *)(iph + 1) > data_end)
		return -1;
	hdrsize = iph->ihl * 4;
	if (iph->version != 4 || hdrsize < sizeof(*iph))
		return -1;
	tot = bpf_ntohs(iph->tot_len);
	/* the IP length is what flows count, so it must lie within the frame */
	if (tot < hdrsize || (void *)iph + tot > data_end)
		return -1;

	*l4_ok = !(iph->frag_off & bpf_htons(IP_OFFSET_MASK));
	nh->pos = (void *)iph + hdrsize;
	nh->end = (void *)iph + tot;
	*iphp = iph;
	return iph->protocol;
}

static __always_inline int ipv6_is_ext(__u8 nexthdr)
{
	return nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
	       nexthdr == IPPROTO_DSTOPTS || nexthdr == IPPROTO_FRAGMENT;
}

/* IPv6 plus up to XF_IPV6_EXT_MAX extension headers; a chain longer than
 * that is malformed for us. Returns the upper-layer protocol. *l4_ok is 1,
 * 0 for a later fragment (no L4 header), or 2 for a first fragment (an L4
 * header, and a fragment header before it).
 */
static __always_inline int parse_ip6hdr(struct hdr_cursor *nh, void *data_end,
					struct ipv6hdr **ip6hp, int *l4_ok)
{
	struct ipv6hdr *ip6h = nh->pos;
	void *pos;
	__u8 nexthdr;

	if ((void *)(ip6h + 1) > data_end)
		return -1;
	if (ip6h->version != 6)
		return -1;
	nh->end = (void *)(ip6h + 1) + bpf_ntohs(ip6h->payload_len);
	if (nh->end > data_end)
		return -1;

	nexthdr = ip6h->nexthdr;
	pos = ip6h + 1;
	*l4_ok = 1;

#pragma unroll
	for (int i = 0; i < XF_IPV6_EXT_MAX; i++) {
		if (!ipv6_is_ext(nexthdr))
			break;
		if (nexthdr == IPPROTO_FRAGMENT) {
			struct ipv6_frag_hdr_min *fh = pos;

			if ((void *)(fh + 1) > data_end || (void *)(fh + 1) > nh->end)
				return -1;
			nexthdr = fh->nexthdr;
			pos = fh + 1;
			/* a later fragment's payload holds no headers: its
			 * protocol is what the fragment header names */
			if (fh->frag_off & bpf_htons(0xfff8)) {
				*l4_ok = 0;
				goto done;
			}
			*l4_ok = 2; /* a first fragment: headers, but a fragment */
		} else {
			struct ipv6_opt_hdr_min *oh = pos;

			if ((void *)(oh + 1) > data_end || (void *)(oh + 1) > nh->end)
				return -1;
			nexthdr = oh->nexthdr;
			pos += (oh->hdrlen + 1) * 8;
		}
	}
	if (ipv6_is_ext(nexthdr) || pos > nh->end)
		return -1;
done:
	nh->pos = pos;
	*ip6hp = ip6h;
	return nexthdr;
}

#endif /* XDPFLOW_PARSING_H */
