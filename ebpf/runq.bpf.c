// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * runq: run-queue latency per cgroup, and who ran on the CPU while a task waited.
 *
 * Loaded by ebpf/runq.py (CoreRunqSource) through ebpf/libbpf.py. CO-RE: built once
 * against a vmlinux.h that ebpf/build.py generates from the build host's BTF, relocated by
 * libbpf at load time against the running kernel's BTF, so a node needs no headers.
 *
 * What is measured (the same definition as runqlat-style tools):
 *   A wait starts when a task becomes runnable: sched_wakeup / sched_wakeup_new, or a
 *   sched_switch that takes it off the CPU while it is still runnable (preempted, or
 *   TASK_RUNNING). The wait ends at the sched_switch that puts it on a CPU. The start
 *   stamp lives in task storage and is cleared when the task is switched out asleep, so
 *   a stale stamp can never turn a long sleep into a "wait" (host-capabilities, eBPF).
 *
 * runq_hist: key (cgroup2 id, v1 cpu cgroup id) of the waiting task, value: count, total
 *   ns and a log2 histogram in microseconds (slot i = [2^i, 2^(i+1)) us, slot 0 also holds
 *   waits under 1 us, slot 26 is open-ended; slots 27..31 stay zero and only exist so
 *   that an "& 31" proves the index to the verifier). One map keyed by the pair costs one
 *   hash lookup per wait instead of two; user space sums the pairs by the key it wants
 *   (cgroup2 on a v2 host, the v1 cpu group on a v1/hybrid host where the runtime only
 *   uses v1). The ids are kernfs node ids, i.e. st_ino of the cgroup directories.
 *
 * runq_blame: key (victim pair, runner pair), value ns. Meaning: "for how long did tasks
 *   of the runner's cgroup occupy the CPU on which a task of the victim's cgroup was
 *   waiting, during that wait". Each CPU keeps its recent history as segments: a segment
 *   is a maximal run of consecutive tasks from one cgroup pair (a switch between two tasks
 *   of the same cgroup does not open a new one). When a waiting task is switched in, its
 *   wait [stamp, now] is intersected with the open segment (the cgroup being switched
 *   out) and with up to RING closed segments before it, and each overlap is added to
 *   (victim, that segment's runner). So a wait spanning several runners is split by
 *   their run times. Approximations, all on the side of attributing less, never to an
 *   innocent group:
 *   - only the CPU where the wait ended is looked at: the part of a wait spent queued on
 *     another CPU before a migration is credited to whoever ran on the final CPU then;
 *   - history older than the RING closed segments is not attributed;
 *   - time when the CPU was idle (the wakeup itself: IPI, idle exit) is not attributed;
 *   - "ran on the CPU" is what the scheduler chose; it does not say the runner was
 *     favoured unfairly (that is the detector's judgement, not this map's).
 *
 * runq_events: per-CPU counts of the handled events ([0] switches, [1] wakeups) and of
 *   updates that failed because a map was full ([2]), for overhead measurement and health.
 *
 * Cost (host-capabilities "Overhead"): direct BTF reads instead of bpf_probe_read, task
 * storage instead of a pid hash, per-CPU values (no atomics), one hash lookup per wait for
 * the histogram and one per overlapping segment for the blame.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#define NR_SLOTS 32 /* 27 used (qos_model.signals.RUNQ_BUCKETS); power of two for the mask */
#define LAST_SLOT 26
#define RING 8 /* closed segments kept per CPU; power of two */
#define TASK_RUNNING_STATE 0

enum { EV_SWITCH = 0, EV_WAKEUP = 1, EV_FULL = 2, NR_EVENTS = 3 };

struct cg_pair {
	__u64 cg2; /* cgroup2 id (0: the idle task) */
	__u64 cg1; /* v1 cpu controller cgroup id (0: none) */
};

struct runq_hist {
	__u64 count;
	__u64 total_ns;
	__u64 slots[NR_SLOTS];
};

struct blame_key {
	struct cg_pair victim;
	struct cg_pair runner;
};

struct segment {
	struct cg_pair who;
	__u64 start;
	__u64 end;
};

struct cpu_history {
	struct cg_pair cur; /* what runs on this CPU now */
	__u64 cur_start;    /* since when (0: not seen yet) */
	__u32 head;         /* next ring slot to write */
	__u32 pad;
	struct segment ring[RING];
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64); /* ns when the task became runnable, 0 when not waiting */
} runq_stamp SEC(".maps");

/* Not preallocated: a preallocated per-CPU hash costs max_entries x value x CPUs of
 * memory up front, too much on a large node for entries that are mostly never used. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 8192);
	__type(key, struct cg_pair);
	__type(value, struct runq_hist);
} runq_hist SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 32768);
	__type(key, struct blame_key);
	__type(value, __u64);
} runq_blame SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct cpu_history);
} runq_cpu SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NR_EVENTS);
	__type(key, __u32);
	__type(value, __u64);
} runq_events SEC(".maps");

/* Kernels before 5.14 called the field "state" (a long). */
struct task_struct___pre514 {
	long state;
} __attribute__((preserve_access_index));

static __always_inline void count_event(__u32 which)
{
	__u64 *n = bpf_map_lookup_elem(&runq_events, &which);

	if (n)
		*n += 1;
}

static __always_inline int still_runnable(bool preempt, struct task_struct *prev)
{
	if (preempt)
		return 1;
	if (bpf_core_field_exists(prev->__state))
		return BPF_CORE_READ(prev, __state) == TASK_RUNNING_STATE;
	return BPF_CORE_READ((struct task_struct___pre514 *)prev, state) == TASK_RUNNING_STATE;
}

static __always_inline void cgroups_of(struct task_struct *task, struct cg_pair *out)
{
	struct css_set *cset;
	struct cgroup_subsys_state *css;

	out->cg2 = 0;
	out->cg1 = 0;
	if (task->pid == 0) /* idle: runs nobody's work */
		return;
	cset = task->cgroups;
	if (!cset)
		return;
	/* Direct BTF loads: faulting loads read 0, and they cost far less than probe reads. */
	out->cg2 = cset->dfl_cgrp->kn->id;
	if (bpf_core_enum_value_exists(enum cgroup_subsys_id, cpu_cgrp_id)) {
		css = cset->subsys[bpf_core_enum_value(enum cgroup_subsys_id, cpu_cgrp_id)];
		if (css)
			out->cg1 = css->cgroup->kn->id;
	}
}

/* floor(log2(v)) without __builtin_clzll, which crashes clang-14's BPF backend. */
static __always_inline __u64 log2_floor(__u64 v)
{
	__u64 r = 0;

	if (v >> 32) {
		v >>= 32;
		r += 32;
	}
	if (v >> 16) {
		v >>= 16;
		r += 16;
	}
	if (v >> 8) {
		v >>= 8;
		r += 8;
	}
	if (v >> 4) {
		v >>= 4;
		r += 4;
	}
	if (v >> 2) {
		v >>= 2;
		r += 2;
	}
	if (v >> 1)
		r += 1;
	return r;
}

static __always_inline void record_wait(struct cg_pair *victim, __u64 wait_ns)
{
	struct runq_hist *h = bpf_map_lookup_elem(&runq_hist, victim);
	__u64 slot;

	if (!h) {
		struct runq_hist zero = {};

		if (bpf_map_update_elem(&runq_hist, victim, &zero, BPF_NOEXIST) &&
		    !bpf_map_lookup_elem(&runq_hist, victim)) {
			count_event(EV_FULL);
			return;
		}
		h = bpf_map_lookup_elem(&runq_hist, victim);
		if (!h)
			return;
	}
	slot = log2_floor(wait_ns / 1000);
	if (slot > LAST_SLOT)
		slot = LAST_SLOT;
	asm volatile("%0 &= 31" : "+r"(slot)); /* clang drops a C mask; the verifier needs it */
	h->count += 1;
	h->total_ns += wait_ns;
	h->slots[slot] += 1;
}

static __always_inline void blame(struct cg_pair *victim, struct cg_pair *runner, __u64 ns)
{
	struct blame_key key;
	__u64 *v;

	if (runner->cg2 == 0 && runner->cg1 == 0) /* idle or unknown: nobody to blame */
		return;
	key.victim = *victim;
	key.runner = *runner;
	v = bpf_map_lookup_elem(&runq_blame, &key);
	if (v) {
		*v += ns;
		return;
	}
	if (bpf_map_update_elem(&runq_blame, &key, &ns, BPF_NOEXIST)) {
		/* EEXIST: another CPU created the key meanwhile; otherwise the map is full. */
		v = bpf_map_lookup_elem(&runq_blame, &key);
		if (v)
			*v += ns;
		else
			count_event(EV_FULL);
	}
}

static __always_inline int same_pair(struct cg_pair *a, struct cg_pair *b)
{
	return a->cg2 == b->cg2 && a->cg1 == b->cg1;
}

static __always_inline void stamp_runnable(struct task_struct *task, __u64 now)
{
	__u64 *stamp = bpf_task_storage_get(&runq_stamp, task, 0,
					    BPF_LOCAL_STORAGE_GET_F_CREATE);

	if (stamp)
		*stamp = now;
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(runq_wakeup, struct task_struct *p)
{
	count_event(EV_WAKEUP);
	stamp_runnable(p, bpf_ktime_get_ns());
	return 0;
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(runq_wakeup_new, struct task_struct *p)
{
	count_event(EV_WAKEUP);
	stamp_runnable(p, bpf_ktime_get_ns());
	return 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(runq_switch, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	__u64 now = bpf_ktime_get_ns();
	struct cpu_history *hist;
	struct cg_pair victim;
	__u64 *stamp;
	__u64 since;
	__u32 zero = 0;
	int i;

	count_event(EV_SWITCH);

	/* prev: still runnable -> its wait starts now; asleep -> no wait until a wakeup. */
	if (prev->pid != 0) {
		if (still_runnable(preempt, prev)) {
			stamp_runnable(prev, now);
		} else {
			stamp = bpf_task_storage_get(&runq_stamp, prev, 0, 0);
			if (stamp)
				*stamp = 0;
		}
	}

	hist = bpf_map_lookup_elem(&runq_cpu, &zero);
	if (!hist)
		return 0;
	cgroups_of(next, &victim);

	stamp = next->pid ? bpf_task_storage_get(&runq_stamp, next, 0, 0) : 0;
	if (stamp && *stamp) {
		since = *stamp;
		*stamp = 0;
		if (since < now) {
			record_wait(&victim, now - since);
			/* The open segment: whoever is being switched out, since cur_start. */
			if (hist->cur_start) {
				blame(&victim, &hist->cur,
				      now - (since > hist->cur_start ? since : hist->cur_start));
				/* Closed segments, newest first, while they overlap the wait. */
				for (i = 1; i <= RING; i++) {
					struct segment *seg =
						&hist->ring[(hist->head - i) & (RING - 1)];

					if (seg->end <= since || seg->end == 0)
						break;
					blame(&victim, &seg->who,
					      seg->end - (since > seg->start ? since : seg->start));
				}
			}
		}
	}

	/* A new segment when another cgroup pair takes the CPU. */
	if (!hist->cur_start || !same_pair(&hist->cur, &victim)) {
		if (hist->cur_start) {
			struct segment *seg = &hist->ring[hist->head & (RING - 1)];

			seg->who = hist->cur;
			seg->start = hist->cur_start;
			seg->end = now;
			hist->head += 1;
		}
		hist->cur = victim;
		hist->cur_start = now;
	}
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
