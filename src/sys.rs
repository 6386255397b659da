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

/// The compute threads [`set_threads`] set for this process (1 when none were set).
pub fn threads_set() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// candle runs its elementwise ops (and quantised kernels) on its own worker pool, synchronised
/// by a barrier after every op. In training those ops are small next to the matrix products
/// (which use rayon with all threads), and waiting at thousands of barriers per step cost about
/// a fifth of the time (measured with perf: 21% in `BarrierGuard::drop`); with one pool thread
/// the ops run inline and the step is ~25% faster. Workers that exist do not spin either. Call
/// it before training (`hone train`, `learn`, `eval`, `bench --train`, the daemon).
pub fn quiet_candle_pool() {
    // Edition 2021: set_var is safe; no compute thread has started yet.
    std::env::set_var("CANDLE_NUM_THREADS", "1");
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
}

/// Makes the calling thread worker 0 of rayon's global pool of `n` threads. Parallel work it
/// starts then runs on it and `n - 1` helpers, instead of being handed to pool threads while
/// it sleeps: with one thread nothing is handed over at all. That handover (a futex wake per
/// operation, hundreds per generated token) is what made decoding collapse when another
/// process kept a core busy (64 -> 16 tokens/s on 1 thread). Call once, at start-up, from the
/// thread that will run the model; later calls (the pool exists) do nothing.
pub fn adopt_compute_pool(n: usize) {
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n.max(1))
        .use_current_thread()
        .build_global();
}

/// Keeps freed memory in the heap for reuse instead of returning it to the kernel. Training and
/// long prompts allocate and free tensors of several MiB thousands of times a second; glibc
/// serves those with fresh `mmap`s, and every page of each then costs a page fault and a
/// zeroing (`hone bench --train`: 125 -> 150 tokens/s with this, same peak RSS, because the
/// freed blocks are reused by the next allocations of the same sizes). Other allocators: no-op.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called at start-up.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Lowers this process's CPU priority (0 = normal, 19 = lowest), for background learning.
pub fn set_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: setpriority takes no pointers; who = 0 means the calling process.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice.clamp(0, 19)) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Restores the default SIGPIPE action, so `hone ... | head` ends quietly like other Unix
/// tools instead of failing on a closed pipe.
pub fn reset_sigpipe() {
    #[cfg(unix)]
    // SAFETY: resetting a signal disposition to its default at start-up.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
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

/// CPUs that are idle right now: all available CPUs minus the ones other processes keep busy,
/// measured from /proc/stat over `window` (Linux; elsewhere all available CPUs). At least 1.
pub fn idle_cpus(window: std::time::Duration) -> usize {
    let n = available_cpus();
    let read = || -> Option<(u64, u64)> {
        let s = std::fs::read_to_string("/proc/stat").ok()?;
        let line = s.lines().next()?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal
        let idle = v.get(3)? + v.get(4).unwrap_or(&0);
        let total: u64 = v.iter().take(8).sum();
        Some((idle, total))
    };
    let (Some((i0, t0)), true) = (read(), cfg!(target_os = "linux")) else {
        return n;
    };
    std::thread::sleep(window);
    let Some((i1, t1)) = read() else {
        return n;
    };
    if t1 <= t0 {
        return n;
    }
    let all = std::fs::read_to_string("/proc/stat")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
                .count()
        })
        .unwrap_or(n)
        .max(1);
    let idle_frac = (i1 - i0) as f64 / (t1 - t0) as f64;
    // Busy CPUs across the machine, but only the ones this process may use count against it.
    let busy = ((1.0 - idle_frac) * all as f64).round() as usize;
    n.saturating_sub(busy.saturating_sub(all - n.min(all)))
        .max(1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn peak_rss_covers_what_is_resident() {
        let v = vec![1u8; 64 << 20];
        std::hint::black_box(&v);
        // The kernel syncs per-thread RSS counters lazily, so compare with a margin.
        let current = super::current_rss_bytes().unwrap();
        let peak = super::peak_rss_bytes().unwrap();
        assert!(current >= 48 << 20, "current {current}");
        assert!(peak >= 48 << 20, "peak {peak}");
    }
}
