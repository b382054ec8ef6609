//! Where the CPU went during one measured line, from `/proc`: this process's threads grouped
//! as the server's HTTP threads (the tokio threads of the server under test), the load generator
//! (the thread that drives the load), and everything else in the process (device worker threads
//! and ONNX Runtime's own pool threads); plus the machine's idle cores and what other processes
//! used, from `/proc/stat`. All in cores (1.0: one core busy for the whole line). Also how often
//! the server's threads went to sleep (`voluntary_ctxt_switches`): each sleep is a hand-off that
//! another thread has to wake. Linux only, like the load generator.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

/// Threads of the servers under test (registered as their runtimes start them).
static HTTP_THREADS: Mutex<Option<HashSet<i32>>> = Mutex::new(None);

/// Call on each thread of a server's runtime as it starts (`on_thread_start`).
pub fn register_http_thread() {
    let tid = gettid();
    HTTP_THREADS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashSet::new)
        .insert(tid);
}

/// Call on each thread of a server's runtime as it stops (`on_thread_stop`), so that a later
/// thread that gets the same id is not counted as an HTTP thread.
pub fn unregister_http_thread() {
    let tid = gettid();
    if let Some(set) = HTTP_THREADS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_mut()
    {
        set.remove(&tid);
    }
}

fn gettid() -> i32 {
    // SAFETY: gettid(2) takes no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// Cores used over a line, by group.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuSplit {
    /// The server's HTTP threads: hyper, axum, parsing, the batcher task.
    pub http: f64,
    /// The rest of this process: device worker threads and ONNX Runtime's pool threads.
    pub device: f64,
    /// The load generator's thread.
    pub loadgen: f64,
    /// Idle cores on the machine.
    pub idle: f64,
    /// Cores other processes used, and time the hypervisor took (steal).
    pub others: f64,
    /// Times per second that the server's threads (HTTP and device groups) blocked and had to
    /// be woken: waits on a channel, a condition, epoll or a futex.
    pub server_sleeps: f64,
}

/// A reading to subtract from a later one.
pub struct Snapshot {
    at: Instant,
    /// Per thread of this process: CPU ticks (user + system), and voluntary context switches.
    threads: HashMap<i32, (u64, u64)>,
    /// Machine-wide: (busy ticks, idle ticks).
    machine: (u64, u64),
    /// The thread that took the snapshot: the load generator.
    loadgen: i32,
}

/// Reads `/proc` now; `None` where it cannot be read.
pub fn snapshot() -> Option<Snapshot> {
    Some(Snapshot {
        at: Instant::now(),
        threads: thread_ticks()?,
        machine: machine_ticks()?,
        loadgen: gettid(),
    })
}

impl Snapshot {
    /// What was used between `self` and `later`.
    pub fn until(&self, later: &Snapshot) -> CpuSplit {
        let hz = ticks_per_second();
        let wall = later.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let cores = |ticks: u64| ticks as f64 / hz / wall;
        let http = HTTP_THREADS.lock().unwrap_or_else(|e| e.into_inner());
        let is_http = |tid: &i32| http.as_ref().is_some_and(|s| s.contains(tid));
        let (mut h, mut d, mut l, mut sleeps) = (0u64, 0u64, 0u64, 0u64);
        for (tid, &(t1, s1)) in &later.threads {
            // A thread that started during the line used all its ticks in it.
            let (t0, s0) = self.threads.get(tid).copied().unwrap_or((0, 0));
            let used = t1.saturating_sub(t0);
            if *tid == self.loadgen {
                l += used;
                continue;
            }
            if is_http(tid) {
                h += used;
            } else {
                d += used;
            }
            sleeps += s1.saturating_sub(s0);
        }
        let busy = later.machine.0.saturating_sub(self.machine.0);
        let idle = later.machine.1.saturating_sub(self.machine.1);
        CpuSplit {
            http: cores(h),
            device: cores(d),
            loadgen: cores(l),
            idle: cores(idle),
            others: cores(busy.saturating_sub(h + d + l)),
            server_sleeps: sleeps as f64 / wall,
        }
    }
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// utime + stime, and voluntary context switches, of every thread of this process.
fn thread_ticks() -> Option<HashMap<i32, (u64, u64)>> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir("/proc/self/task").ok()? {
        let entry = entry.ok()?;
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // A thread may end between the listing and the read.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let sleeps = std::fs::read_to_string(entry.path().join("status"))
            .ok()
            .and_then(|s| voluntary_switches(&s))
            .unwrap_or(0);
        if let Some(t) = stat_ticks(&stat) {
            out.insert(tid, (t, sleeps));
        }
    }
    Some(out)
}

/// utime + stime from a `stat` line. The command name (field 2) is in parentheses and may hold
/// spaces, so the fields are counted after its closing parenthesis: state is field 3, utime 14,
/// stime 15.
fn stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `voluntary_ctxt_switches` from a thread's `status`.
fn voluntary_switches(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
}

/// (busy, idle) ticks of the whole machine from `/proc/stat`'s `cpu` line: idle counts idle and
/// iowait; busy counts user, nice, system, irq, softirq and steal.
fn machine_ticks() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 8 {
        return None;
    }
    let idle = v[3] + v[4];
    let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    Some((busy, idle))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Held by a test that measures this process's threads and by a test that runs a server in
    /// this process (whose threads count as HTTP threads), so that they do not run side by side.
    pub(crate) static PROCESS_CPU: Mutex<()> = Mutex::new(());

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let line = "4242 (odd ) name) R 1 2 3 4 5 6 7 8 9 10 17 5 0 0 20 0 1 0";
        assert_eq!(stat_ticks(line), Some(22));
    }

    #[test]
    fn a_busy_thread_shows_up_as_load_generator_cores() {
        let _alone = PROCESS_CPU.lock().unwrap_or_else(|e| e.into_inner());
        let before = snapshot().expect("/proc is readable");
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed().as_millis() < 300 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        let split = before.until(&snapshot().expect("/proc is readable"));
        // This thread spun the whole time; ticks are 10 ms, and the machine is shared.
        assert!(split.loadgen > 0.2, "{split:?}");
        assert!(split.http < 0.2, "{split:?}");
    }

    #[test]
    fn a_thread_that_sleeps_counts_its_sleeps() {
        let status = "Name:\tx\nvoluntary_ctxt_switches:\t42\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(voluntary_switches(status), Some(42));
        // A thread of this process other than the one that takes the snapshots (which counts as
        // the load generator) sleeps 20 times, then waits, still alive, for the second snapshot.
        let start = Instant::now();
        let before = snapshot().expect("/proc is readable");
        let (slept_tx, slept_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let sleeper = std::thread::spawn(move || {
            for _ in 0..20 {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            slept_tx.send(()).unwrap();
            let _ = done_rx.recv();
        });
        slept_rx.recv().unwrap();
        let split = before.until(&snapshot().expect("/proc is readable"));
        let elapsed = start.elapsed().as_secs_f64();
        done_tx.send(()).unwrap();
        sleeper.join().unwrap();
        assert!(
            split.server_sleeps * elapsed >= 20.0,
            "{split:?} over {elapsed} s"
        );
    }
}
