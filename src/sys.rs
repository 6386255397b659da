//! Small facts about the process and the machine: peak resident memory, CPU threads, and
//! setting how many threads the compute kernels use.
//!
//! It must not decide policy (when to learn, how much memory to allow); it only measures and
//! applies what it is told.

/// Peak resident set size of this process so far, in bytes (None where the OS won't say).
pub fn peak_rss_bytes() -> Option<u64> {
    // SAFETY: getrusage fills the struct we pass; nothing else is touched.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return None;
    }
    let v = usage.ru_maxrss as u64;
    // Linux reports kilobytes, macOS bytes.
    if cfg!(target_os = "macos") {
        Some(v)
    } else {
        Some(v * 1024)
    }
}

/// Current resident set size in bytes (Linux only).
pub fn current_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(1) as u64)
}

/// Logical CPUs available to this process.
pub fn available_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Sets the number of compute threads. Must run before the first tensor operation: candle
/// reads these variables once, when its thread pools start.
pub fn set_threads(n: usize) {
    let n = n.max(1).to_string();
    // Edition 2021: set_var is safe; we call it at start-up before any thread is spawned.
    std::env::set_var("RAYON_NUM_THREADS", &n);
    std::env::set_var("CANDLE_NUM_THREADS", &n);
}

/// Bytes as "98.4 MB" (powers of 1000, as file managers show them) or MiB where asked.
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b} B")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn peak_rss_is_reported_and_grows() {
        let before = super::peak_rss_bytes().unwrap();
        let v = vec![1u8; 64 << 20];
        std::hint::black_box(&v);
        let after = super::peak_rss_bytes().unwrap();
        assert!(before > 0);
        assert!(after >= before + (32 << 20), "{before} -> {after}");
    }
}
