// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* count.bpf.c - how many entries a hash map holds, without reading them.
 *
 * `status` used to count a flow table by reading it whole (0.7 s for
 * 1,000,000 flows); the kernel already keeps the count (kfunc
 * bpf_map_sum_elem_count, Linux 6.6+). The controller loads this object
 * with `table` reusing the pinned map's fd (libbpf then takes the pinned
 * map's definition, whatever it is), test-runs it once and reads the count
 * from the frame. A separate object, so a kernel without the kfunc refuses
 * this one only, and the controller falls back to reading the table.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* a stand-in with the kernel's name: libbpf matches the kfunc's prototype by
 * kind and name, and a forward declaration does not satisfy libbpf 1.1 */
struct bpf_map {
	int unused;
};

extern __s64 bpf_map_sum_elem_count(const struct bpf_map *map) __ksym;

#define TABLE(name)                                                            \
	struct {                                                               \
		__uint(type, BPF_MAP_TYPE_HASH);                               \
		__uint(max_entries, 1);                                        \
		__uint(key_size, 4);                                           \
		__uint(value_size, 4);                                         \
	} name SEC(".maps")

/* an interface's two flow tables, so one load counts both */
TABLE(table_a);
TABLE(table_b);

/* the frame's first 16 bytes become the two counts */
SEC("xdp")
int xdpflow_count(struct xdp_md *ctx)
{
	void *data_end = (void *)(long)ctx->data_end;
	__s64 *out = (void *)(long)ctx->data;

	if ((void *)(out + 2) > data_end)
		return XDP_ABORTED;
	out[0] = bpf_map_sum_elem_count((const struct bpf_map *)&table_a);
	out[1] = bpf_map_sum_elem_count((const struct bpf_map *)&table_b);
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
