// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* baseline.bpf.c - the smallest XDP programs, for three jobs: reference
 * points that benchmarks subtract (xdp_pass, xdp_drop); the traffic
 * generator's transmitter (xdp_tx), which BPF_PROG_TEST_RUN with live frames
 * runs to push each test frame out of the generator's interface; and
 * xdp_vary, which makes one test run a flood of new tuples.
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

/* the program xdp_vary hands each frame to */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} vary_next SEC(".maps");

/* A test run without live frames keeps the frame from one run to the next,
 * so bumping a UDP/IPv4 frame's source port (carrying into the source
 * address's low byte) before each run makes repeat=N run N distinct tuples
 * back to back, as a NIC's batches deliver a flood, with no syscall between
 * them. Its own cost is measured with xdp_pass behind it and subtracted.
 */
SEC("xdp")
int xdp_vary(struct xdp_md *ctx)
{
	__u8 *data = (void *)(long)ctx->data;
	__u8 *data_end = (void *)(long)ctx->data_end;

	if (data + 36 > data_end)
		return XDP_ABORTED;
	if (++data[35] == 0 && ++data[34] == 0)
		data[29]++;
	bpf_tail_call(ctx, &vary_next, 0);
	return XDP_ABORTED;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
