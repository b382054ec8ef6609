//! The binaries' allocator: mimalloc (request bodies and tensors are allocated on the HTTP
//! threads and freed on device threads and the other way round, where glibc's malloc spent about
//! a tenth of the HTTP threads' time; see docs/BENCHMARKS.md). ONNX Runtime keeps its own.
//!
//! mimalloc 3 keeps freed memory for a second (`purge_delay`, 1000 ms) and purges it only when
//! the thread that owns it allocates again, so a burst of big bodies or images left the process's
//! resident memory hundreds of MiB high long after it was freed (scripts/hostile.py: +295 MiB
//! with every hostile class at once, +201 MiB with prompt purging). A pod's memory limit counts
//! that memory. Purging at once (0 ms) costs every request page faults instead: its body and
//! tensor buffers are handed back and faulted in again, about a quarter of the HTTP threads' CPU
//! for a 49 KB binary request. The server purges after 10 ms: the binary CNN bench runs 16%
//! faster than at 0, and every hostile class at once peaks at +199 MiB against +171 MiB at 0
//! (docs/BENCHMARKS.md). `MIMALLOC_PURGE_DELAY` overrides it.

/// The allocator for `#[global_allocator]` in the server and the bench.
pub type Allocator = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_e` (libmimalloc-sys 0.1.49, pinned in
/// Cargo.toml because this number is only valid for that header).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed memory is kept for reuse before it goes back to the OS.
pub const PURGE_DELAY_MS: std::ffi::c_long = 10;

/// Hands freed memory back to the OS after [`PURGE_DELAY_MS`], unless `MIMALLOC_PURGE_DELAY` is
/// set. Call it first thing in `main`.
pub fn return_freed_memory_promptly() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's option values; any value is valid for this option.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, PURGE_DELAY_MS) }
    }
}

/// The purge delay in force, in milliseconds.
#[allow(clippy::useless_conversion)] // c_long is i64 here, i32 on some platforms
pub fn purge_delay_ms() -> i64 {
    // SAFETY: reads one of mimalloc's option values.
    i64::from(unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) })
}

/// Hands the C heap's free pages back to the operating system. ONNX Runtime allocates through
/// the C library's malloc, not this allocator, and glibc keeps what a dropped session freed in
/// its arenas: after unloading the bundled EfficientNet, RSS stayed 15% over its value before
/// the load (tests/cli.rs, `unload_gives_the_models_memory_back`). Called after a model is
/// stopped; a no-op on other C libraries.
pub fn trim_c_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointer and only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[allow(clippy::useless_conversion)] // c_long is i64 here, i32 on some platforms
    fn the_purge_delay_option_is_the_one_named_and_is_set() {
        // mimalloc 3's default for purge_delay is 1000 ms: the number names that option.
        assert_eq!(super::purge_delay_ms(), 1000);
        super::return_freed_memory_promptly();
        assert_eq!(super::purge_delay_ms(), i64::from(super::PURGE_DELAY_MS));
    }
}
