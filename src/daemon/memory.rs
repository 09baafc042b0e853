//! How a daemon's (or a port-forward's) allocator keeps and returns memory.
//!
//! A tunnel carrying bulk allocates and frees buffers of up to 256 KiB at a
//! high rate (a raw stream's read buffer goes with its bytes into the SSH
//! send queue; the hub's socket reads gulp into a buffer freed when the
//! socket is drained). glibc's defaults hand the top of the heap back to
//! the system as soon as half a megabyte or so is free there, and the next
//! buffer is then faulted in page by page, zeroed by the kernel: measured
//! on a 1 GiB download through the hub-served port-forward, the agent took
//! about 74,000 page faults per GiB and the hub 10,000–17,000, a tenth of
//! the agent's CPU; `towerctl port-forward` through the gateway, whose
//! HTTP/2 reads run ahead of its client by up to a stream's window, took
//! ~190,000 per GiB downloaded, about a third of its CPU. [`tune`] lets a
//! daemon (and the port-forward) keep up to [`KEEP_FREE`] at the
//! top of each heap while it works (and sends only allocations of
//! [`MMAP_FROM`] or more to their own mappings); [`trimmer`] gives what is
//! held back once a daemon has gone quiet (or at least every
//! [`TRIM_AT_LEAST_EVERY`] periods), so idle memory stays as small as
//! before and a transfer is not made to fault its buffers in again.

use std::time::Duration;

/// Free memory a heap keeps at its top before returning it: more than a
/// stream's window, which a receiver may hold in flight and free at once
/// (with 4 MiB, one window's worth freed handed the top back and the next
/// window faulted it in again: the agent took 10,000–110,000 faults per
/// GiB uploaded).
pub const KEEP_FREE: usize = 4 * crate::tunnel::flow::STREAM_WINDOW as usize;
/// Allocations this large or larger get their own mapping.
pub const MMAP_FROM: usize = 1 << 20;
/// How often [`trimmer`] looks.
pub const TRIM_EVERY: Duration = Duration::from_secs(10);
/// Free memory held in the heaps above which [`trimmer`] returns it.
pub const TRIM_ABOVE: usize = 1 << 20;
/// A period in which the daemon used less CPU than this is quiet.
pub const QUIET_CPU: Duration = Duration::from_millis(200);
/// Busy periods after which [`trimmer`] trims anyway.
pub const TRIM_AT_LEAST_EVERY: u32 = 6;

/// Sets the allocator's thresholds for a daemon (see the module). Call it
/// before the runtime starts its threads. Returns whether the allocator
/// took them (always false off glibc, whose defaults stay).
pub fn tune() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets allocator parameters; the values are
        // in range for a c_int.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_FROM as libc::c_int) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, KEEP_FREE as libc::c_int) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Free bytes the allocator holds in its heaps (not counting memory
/// already returned), or `None` where that cannot be read.
pub fn held_free() -> Option<usize> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 takes no arguments and returns a plain struct.
        Some(unsafe { libc::mallinfo2() }.fordblks)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// Returns free heap memory to the system when more than `above` bytes of
/// it are held. Returns whether anything was returned.
pub fn trim_if_holding(above: usize) -> bool {
    match held_free() {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim is safe to call at any time from any thread.
        Some(free) if free > above => unsafe { libc::malloc_trim(0) == 1 },
        _ => false,
    }
}

/// CPU time this process has used, user and system.
fn cpu_used() -> Option<Duration> {
    // SAFETY: getrusage writes into the struct we pass.
    let u = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut u) != 0 {
            return None;
        }
        u
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    Some(tv(u.ru_utime) + tv(u.ru_stime))
}

/// Whether to trim after a period in which the daemon used `cpu`, with
/// `busy` periods gone by since the last trim: in a quiet period, or
/// when it has been busy for [`TRIM_AT_LEAST_EVERY`] periods (a daemon
/// that never goes quiet still gives back what it does not use).
fn due(cpu: Option<Duration>, busy: u32) -> bool {
    match cpu {
        Some(c) => c < QUIET_CPU || busy + 1 >= TRIM_AT_LEAST_EVERY,
        None => true,
    }
}

/// Runs for the daemon's life: after each [`TRIM_EVERY`] period that was
/// quiet (under [`QUIET_CPU`] used), and at least every
/// [`TRIM_AT_LEAST_EVERY`] periods, returns what the heaps hold free beyond
/// [`TRIM_ABOVE`]. A transfer is not interrupted by it (measured: a trim
/// inside a 1 GiB download cost the hub ~49,000 page faults), and once
/// quiet, the memory a burst left is back with the system within a period
/// or two.
pub async fn trimmer() {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last = cpu_used();
    let mut busy = 0;
    loop {
        tick.tick().await;
        let now = cpu_used();
        let used = now.zip(last).map(|(n, l)| n.saturating_sub(l));
        last = now;
        if due(used, busy) {
            busy = 0;
            trim_if_holding(TRIM_ABOVE);
        } else {
            busy += 1;
        }
    }
}

/// The memory limit this process runs under, in bytes: the smallest
/// limit of its memory cgroup and the cgroups above it (a container's
/// `resources.limits.memory`, a systemd unit's `MemoryMax=`); `None`
/// without one.
pub fn cgroup_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    cgroup_limit_in(std::path::Path::new("/"), &own, &mounts)
}

/// [`cgroup_limit`] with the file system at `root`, `/proc/self/cgroup`
/// reading `own` and `/proc/self/mountinfo` reading `mounts`. cgroup v2
/// (`0::/PATH`, `memory.max`) and v1 (`N:…memory…:/PATH`,
/// `memory.limit_in_bytes`), each found where it is mounted; `PATH` is
/// taken relative to the mount's own root (a container without a cgroup
/// namespace sees its cgroup mounted from `/docker/ID` or the like), and
/// each directory from there up to the mount point is read.
pub fn cgroup_limit_in(root: &std::path::Path, own: &str, mounts: &str) -> Option<u64> {
    // (fs root of the mount, mount point, v2)
    let mut found: Vec<(String, String, bool)> = Vec::new();
    for line in mounts.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (Some(fs_root), Some(point), Some(kind)) = (left.get(3), left.get(4), right.first())
        else {
            continue;
        };
        let v2 = *kind == "cgroup2";
        let v1_memory = *kind == "cgroup"
            && right
                .get(2)
                .is_some_and(|o| o.split(',').any(|x| x == "memory"));
        if v2 || v1_memory {
            found.push((fs_root.to_string(), point.to_string(), v2));
        }
    }
    let mut least: Option<u64> = None;
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let v2 = controllers.is_empty();
        if !v2 && !controllers.split(',').any(|c| c == "memory") {
            continue;
        }
        let file = if v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        for (fs_root, point, _) in found.iter().filter(|m| m.2 == v2) {
            let rel = path
                .strip_prefix(fs_root.as_str())
                .filter(|r| fs_root == "/" || r.is_empty() || r.starts_with('/'))
                .unwrap_or("");
            let base = root.join(point.trim_start_matches('/'));
            let mut dir = base.join(rel.trim_start_matches('/'));
            loop {
                let limit = std::fs::read_to_string(dir.join(file))
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    // v1's "no limit" is a page-rounded i64::MAX.
                    .filter(|&v| v < 1 << 62);
                if let Some(v) = limit {
                    least = Some(least.map_or(v, |l| l.min(v)));
                }
                if dir == base || !dir.pop() {
                    break;
                }
            }
        }
    }
    least
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Minor page faults taken by this thread so far.
    fn faults() -> i64 {
        // SAFETY: getrusage writes into the struct we pass.
        unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut u), 0);
            u.ru_minflt
        }
    }

    /// Buffers of 256 KiB a round holds at once: a stream's whole window
    /// and a little more, as a receiver holds when its reader lags.
    const IN_FLIGHT: usize = crate::tunnel::flow::STREAM_WINDOW as usize / (256 * 1024) + 2;

    /// Rounds of [`IN_FLIGHT`] 256 KiB buffers in flight at once, written
    /// through and freed, as a tunnel's bulk does. Returns the page faults
    /// taken.
    fn churn(rounds: usize) -> i64 {
        let before = faults();
        for _ in 0..rounds {
            let bufs: Vec<Vec<u8>> = (0..IN_FLIGHT)
                .map(|i| {
                    let mut v = Vec::<u8>::with_capacity(256 * 1024);
                    v.resize(256 * 1024, i as u8 + 1);
                    v
                })
                .collect();
            std::hint::black_box(&bufs);
        }
        faults() - before
    }

    // One test, as the thresholds are the process's: the faults of the
    // allocator's defaults are measured before `tune` changes them.
    #[test]
    fn a_tuned_heap_keeps_bulk_buffers_and_the_trimmer_returns_them() {
        // In a thread of its own, so that it has an arena of its own.
        std::thread::spawn(|| {
            churn(2);
            let untuned = churn(40);
            assert!(tune(), "mallopt refused the thresholds");
            churn(2);
            let tuned = churn(40);
            eprintln!("page faults over 40 rounds: defaults {untuned}, tuned {tuned}");
            // 40 rounds of a window and a half megabyte: with the defaults
            // (and with a 4 MiB threshold) each round gives the top back
            // and faults it in again (~46,000 faults).
            assert!(
                untuned > 5_000,
                "the defaults did not fault ({untuned}): the test no longer shows anything"
            );
            assert!(
                tuned < untuned / 20,
                "tuned {tuned} faults against {untuned}"
            );
            // What the rounds left free is held, and the trimmer returns it.
            let held = held_free().unwrap();
            assert!(held > TRIM_ABOVE, "held {held}");
            assert!(trim_if_holding(TRIM_ABOVE), "nothing was returned");
            assert!(!trim_if_holding(usize::MAX));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn the_trimmer_waits_for_a_quiet_period_but_not_for_ever() {
        let quiet = Some(QUIET_CPU / 2);
        let busy = Some(QUIET_CPU * 20);
        assert!(due(quiet, 0));
        assert!(!due(busy, 0));
        assert!(!due(busy, TRIM_AT_LEAST_EVERY - 2));
        assert!(due(busy, TRIM_AT_LEAST_EVERY - 1));
        assert!(due(None, 0), "without a CPU figure it trims as before");
        // This process's own figure moves with work.
        let before = cpu_used().unwrap();
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        assert!(cpu_used().unwrap() > before);
    }
}

#[cfg(test)]
mod cgroup_tests {
    use super::cgroup_limit_in;

    fn put(root: &std::path::Path, rel: &str, v: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, v).unwrap();
    }

    const V2: &str = "30 24 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";

    #[test]
    fn the_tightest_memory_limit_of_the_cgroup_and_those_above_it_is_read() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        // v2: a pod's limit above the container's "max".
        put(
            root,
            "sys/fs/cgroup/kubepods/pod1/memory.max",
            "268435456\n",
        );
        put(root, "sys/fs/cgroup/kubepods/pod1/ctr/memory.max", "max\n");
        assert_eq!(
            cgroup_limit_in(root, "0::/kubepods/pod1/ctr\n", V2),
            Some(256 << 20)
        );
        // Inside its own namespace the container's cgroup is the root.
        let t2 = tempfile::tempdir().unwrap();
        put(t2.path(), "sys/fs/cgroup/memory.max", "134217728");
        assert_eq!(cgroup_limit_in(t2.path(), "0::/\n", V2), Some(128 << 20));
        // Without one: the cgroup is mounted from its host path, and a
        // directory of the same name below it (a container's own
        // systemd) is not read.
        let t3 = tempfile::tempdir().unwrap();
        put(t3.path(), "sys/fs/cgroup/memory.max", "134217728");
        put(
            t3.path(),
            "sys/fs/cgroup/system.slice/docker-1.scope/memory.max",
            "1048576",
        );
        let mounted =
            "30 24 0:26 /system.slice/docker-1.scope /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup_limit_in(t3.path(), "0::/system.slice/docker-1.scope\n", mounted),
            Some(128 << 20)
        );
        // v1: the memory controller's hierarchy, wherever it is mounted,
        // co-mounted or not; "unlimited" is no limit.
        let t4 = tempfile::tempdir().unwrap();
        let v1 =
            "40 30 0:35 / /sys/fs/cgroup/cpuacct,memory rw - cgroup cgroup rw,cpuacct,memory\n\
                  41 30 0:36 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        put(
            t4.path(),
            "sys/fs/cgroup/cpuacct,memory/a/memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        let own = "9:name=systemd:/\n4:cpuacct,memory:/a\n0::/\n";
        assert_eq!(cgroup_limit_in(t4.path(), own, v1), None);
        put(
            t4.path(),
            "sys/fs/cgroup/cpuacct,memory/a/b/memory.limit_in_bytes",
            "104857600\n",
        );
        let own = "4:cpuacct,memory:/a/b\n0::/\n";
        assert_eq!(cgroup_limit_in(t4.path(), own, v1), Some(100 << 20));
        assert_eq!(cgroup_limit_in(t4.path(), "garbage", v1), None);
        assert_eq!(cgroup_limit_in(t4.path(), own, "garbage"), None);
    }
}
