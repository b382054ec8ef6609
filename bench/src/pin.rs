//! `--server-cores` and `--client-cores`: the cores the server's threads (and the in-process
//! ceiling it is compared with) run on, and the cores the load generator runs on. Linux threads
//! inherit their creator's CPU mask, so pinning the thread that starts a runtime pins the
//! runtime's workers, its blocking threads, the device threads and ONNX Runtime's own pool.
//! Unset (the default), nothing is pinned.

use std::sync::OnceLock;

struct Cores {
    server: Vec<usize>,
    client: Vec<usize>,
}

static CORES: OnceLock<Cores> = OnceLock::new();

/// A core list: `0`, `0-3`, `0,2,4-5`.
pub fn parse(list: &str) -> Result<Vec<usize>, String> {
    let mut cores = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| format!("{list:?}: {s:?} is not a core number"))
        };
        match part.split_once('-') {
            Some((a, b)) => cores.extend(num(a)?..=num(b)?),
            None => cores.push(num(part)?),
        }
    }
    if cores.is_empty() || cores.iter().any(|&c| c >= libc::CPU_SETSIZE as usize) {
        return Err(format!("{list:?}: no usable core numbers"));
    }
    Ok(cores)
}

/// Sets the split and moves the calling thread (the load generator's) to the client cores.
pub fn set(server: Vec<usize>, client: Vec<usize>) -> Result<(), String> {
    if server.iter().any(|c| client.contains(c)) {
        return Err("--server-cores and --client-cores overlap".into());
    }
    let cores = CORES.get_or_init(|| Cores { server, client });
    pin(&cores.client)
}

/// How many cores the server has, when pinned.
pub fn server_cores() -> Option<usize> {
    CORES.get().map(|c| c.server.len())
}

/// `threads` for an in-process ceiling: pinned, no more than the server has cores.
pub fn threads(threads: usize) -> usize {
    server_cores().map_or(threads, |n| threads.min(n))
}

/// Moves the calling thread to the server's cores (a no-op when nothing is pinned).
pub fn server_thread() {
    if let Some(c) = CORES.get() {
        if let Err(e) = pin(&c.server) {
            eprintln!("ortserve-bench: {e}");
        }
    }
}

/// Runs `f` on the server's cores (an in-process ceiling, whose ONNX Runtime threads start
/// there too), then moves the calling thread back to the client's.
pub fn on_server_cores<T>(f: impl FnOnce() -> T) -> T {
    let Some(c) = CORES.get() else {
        return f();
    };
    server_thread();
    let out = f();
    if let Err(e) = pin(&c.client) {
        eprintln!("ortserve-bench: {e}");
    }
    out
}

fn pin(cores: &[usize]) -> Result<(), String> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET takes indexes below CPU_SETSIZE
    // (checked in `parse`); sched_setaffinity(0, ..) applies to the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cores {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(format!(
                "pinning to cores {cores:?}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn core_lists_parse() {
        assert_eq!(super::parse("0").unwrap(), [0]);
        assert_eq!(super::parse("0-2,5").unwrap(), [0, 1, 2, 5]);
        assert!(super::parse("x").is_err());
        assert!(super::parse("").is_err());
    }
}
