// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* test_next.bpf.c - tests only: a next program for `attach --then`.
 *
 * Counts every frame it gets in a per-CPU counter (no atomics: one CPU per
 * frame in softirq) and passes it.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} seen SEC(".maps");

SEC("xdp")
int test_next(struct xdp_md *ctx)
{
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(&seen, &zero);

	if (n)
		*n += 1;
	return XDP_PASS;
}

/* a program the kernel refuses as a tail-call target of xdpflow */
SEC("xdp.frags")
int test_next_frags(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
