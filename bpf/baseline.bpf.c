// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* baseline.bpf.c - the smallest XDP programs, for two jobs: reference points
 * that benchmarks subtract (xdp_pass, xdp_drop), and the traffic generator's
 * transmitter (xdp_tx), which BPF_PROG_TEST_RUN with live frames runs to
 * push each test frame out of the generator's interface.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

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
	return XDP_TX;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
