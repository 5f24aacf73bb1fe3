// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* probe.bpf.c - `xdpflow doctor`'s probes: tiny programs that show whether
 * this kernel loads, tail-calls, links, test-runs and extends XDP programs
 * the way xdpflow (and libxdp's dispatcher) need. Never attached for real.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} probe_jmp SEC(".maps");

SEC("xdp")
int probe_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

/* XDP_PASS only if the tail call into probe_jmp's slot 0 happened */
SEC("xdp")
int probe_tail(struct xdp_md *ctx)
{
	bpf_tail_call(ctx, &probe_jmp, 0);
	return XDP_DROP;
}

/* a global function, as libxdp's dispatcher has one per slot: what an
 * extension (freplace) program replaces
 */
__attribute__((noinline)) int probe_slot(struct xdp_md *ctx)
{
	volatile int ret = XDP_DROP;

	if (!ctx)
		return XDP_ABORTED;
	return ret;
}

SEC("xdp")
int probe_target(struct xdp_md *ctx)
{
	return probe_slot(ctx);
}

SEC("freplace/probe_slot")
int probe_ext(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
