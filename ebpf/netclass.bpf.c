// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * netclass: put each egress packet into the HTB class of the QoS class of the container
 * that sent it.
 *
 * Attached by isolation/netclass.py as a cls_bpf filter in direct-action mode at the root
 * of our HTB qdisc, on an interface inside the sender's network namespace: the socket's
 * cgroup is known only there (once a packet has crossed a veth into another netns, the
 * kernel no longer tells us who sent it).
 *
 * The decision, in order:
 *   1. cgroup_classes[bpf_skb_cgroup_id(skb)]: the cgroup v2 id of the sending socket (what
 *      the agent classifies; the id is the inode number of the cgroup2 directory).
 *   2. the socket's cgroup v1 net_cls classid, where a net_cls hierarchy sets one, if its
 *      major is our HTB handle (netclass_config[0]; 0 accepts any non-zero classid).
 *   3. otherwise TC_ACT_UNSPEC: "no opinion", so HTB sends the packet to its default class.
 *      Never TC_ACT_OK with tc_classid 0: HTB reads that as its own handle, i.e. the
 *      direct queue, which is not shaped at all.
 *
 * The object is built by ebpf/build.py and committed (ebpf/objects/netclass.bpf.o); only
 * the UAPI headers and libbpf's bpf_helpers.h are needed to build it, no kernel headers.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

/* cgroup v2 id -> full HTB classid (major:minor). Written by the agent, pinned in bpffs so
 * that an agent restart adopts the live classification instead of dropping it. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u32);
} cgroup_classes SEC(".maps");

/* [0] = the HTB handle major the net_cls fallback must match (0: any non-zero classid). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} netclass_config SEC(".maps");

/* Per-CPU decision counters, so "why is this traffic in the default class" has an answer:
 * [0] matched by cgroup v2 id, [1] matched by net_cls classid, [2] unclassified. */
enum { HIT_CGROUP2 = 0, HIT_NET_CLS = 1, MISS = 2, NR_COUNTERS = 3 };

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NR_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} netclass_counters SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *n = bpf_map_lookup_elem(&netclass_counters, &which);

	if (n)
		*n += 1; /* per-CPU slot: no atomic needed */
}

SEC("tc")
int netclass(struct __sk_buff *skb)
{
	__u64 cgroup_id = bpf_skb_cgroup_id(skb);
	__u32 *classid = 0;
	__u32 zero = 0;
	__u32 *major;
	__u32 net_cls;

	if (cgroup_id)
		classid = bpf_map_lookup_elem(&cgroup_classes, &cgroup_id);
	if (classid && *classid) {
		skb->tc_classid = *classid;
		count(HIT_CGROUP2);
		return TC_ACT_OK;
	}

	net_cls = bpf_get_cgroup_classid(skb);
	if (net_cls) {
		major = bpf_map_lookup_elem(&netclass_config, &zero);
		if (!major || !*major || (net_cls >> 16) == *major) {
			skb->tc_classid = net_cls;
			count(HIT_NET_CLS);
			return TC_ACT_OK;
		}
	}

	count(MISS);
	return TC_ACT_UNSPEC;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
