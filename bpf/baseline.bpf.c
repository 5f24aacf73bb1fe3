// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* baseline.bpf.c - the smallest XDP programs, for two jobs: reference points
 * that benchmarks subtract (xdp_pass, xdp_drop), and the traffic generator's
 * transmitter (xdp_tx), which BPF_PROG_TEST_RUN with live frames runs to
 * push each test frame out of the generator's interface.
 */
#include <linux/bpf.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "xdpflow.h"

const volatile struct xf_gen_knobs gen = {};

/* copies sent so far; test runs are single-threaded per generator */
__u32 gen_next;

SEC("xdp")
int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

SEC("xdp")
int xdp_drop(struct xdp_md *ctx)
{
	return XDP_DROP;
}

SEC("xdp")
int xdp_tx(struct xdp_md *ctx)
{
	void *data_end = (void *)(long)ctx->data_end;
	void *data = (void *)(long)ctx->data;
	__u16 *field;
	__u32 n;

	if (!gen.vary_offset)
		return XDP_TX;
	field = data + gen.vary_offset;
	if ((void *)(field + 1) > data_end)
		return XDP_TX;
	n = gen_next;
	gen_next = n + 1 < gen.vary_count ? n + 1 : 0;
	*field = bpf_htons(gen.vary_base + n);
	return XDP_TX;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
