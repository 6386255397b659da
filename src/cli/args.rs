//! Argument checks shared by the commands (refusing values that would silently do something
//! else than asked), and how an error is printed.

/// A count that must be at least 1 (`--max-steps`, `-n`, `--limit`, ...).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    let v: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number"))?;
    if v == 0 {
        return Err("must be at least 1".into());
    }
    Ok(v)
}

/// Compute threads: at least 1 and at most twice the cores this machine has (more than the
/// cores is said on stderr by `main`: it only slows hone down, but tests use it on purpose).
pub fn threads(s: &str) -> Result<usize, String> {
    let v = at_least_one(s)?;
    let cores = hone::sys::available_cpus();
    if v > 2 * cores {
        return Err(format!(
            "this machine has {cores} cores; more threads than cores only slow hone down (use at most -t {cores})"
        ));
    }
    Ok(v)
}

/// A learning rate: a finite number above 0 and at most 1.
pub fn learning_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    if !(v.is_finite() && v > 0.0 && v <= 1.0) {
        return Err("must be a number above 0 and at most 1, such as 1e-3".into());
    }
    Ok(v)
}

/// A positive finite number (LoRA alpha).
pub fn positive(s: &str) -> Result<f32, String> {
    let v: f32 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err("must be a finite number above 0".into());
    }
    Ok(v)
}

/// Tokens per training sequence: at least 16 (shorter ones hold almost no text).
pub fn seq_len(s: &str) -> Result<usize, String> {
    let v = at_least_one(s).map_err(|_| "must be a number of tokens, at least 16".to_string())?;
    if v < 16 {
        return Err("must be at least 16 tokens".into());
    }
    Ok(v)
}

/// The error and its causes on one line, each said once: a cause whose text the message
/// already contains (an OS error quoted by its context) is not repeated, and backtraces that
/// a library attached to its error (candle with RUST_BACKTRACE=1) are left out.
pub fn error_report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = strip_backtrace(&cause.to_string());
        let msg = msg.trim();
        if msg.is_empty() || out.contains(msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(msg);
    }
    out
}

/// Drops the lines of a Rust backtrace ("  12: symbol" and "at src/x.rs:1:2") from `s`.
pub fn strip_backtrace(s: &str) -> String {
    if !s.contains('\n') {
        return s.to_string();
    }
    let frame = |l: &str| {
        let t = l.trim_start();
        let digits = t.chars().take_while(|c| c.is_ascii_digit()).count();
        (digits > 0 && t[digits..].starts_with(": ") && l.starts_with(' '))
            || (t.starts_with("at ") && l.starts_with("  ") && t.contains(".rs:"))
            || t == "stack backtrace:"
    };
    s.lines()
        .filter(|l| !frame(l))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A size in bytes: `64MiB`, `1.5GiB`, `0` (as `--max-memory` takes them).
pub fn bytes(s: &str) -> Result<u64, String> {
    hone::units::parse_bytes(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_rates_are_checked() {
        assert_eq!(at_least_one("3"), Ok(3));
        assert!(at_least_one("0").is_err());
        assert!(at_least_one("-1").is_err());
        assert!(threads("100000").unwrap_err().contains("cores"));
        assert_eq!(threads("1"), Ok(1));
        assert!(learning_rate("nan").is_err());
        assert!(learning_rate("inf").is_err());
        assert!(learning_rate("0").is_err());
        assert_eq!(learning_rate("2e-3"), Ok(2e-3));
        assert!(positive("nan").is_err());
        assert!(seq_len("0").is_err());
        assert!(seq_len("8").is_err());
        assert_eq!(seq_len("64"), Ok(64));
    }

    #[test]
    fn an_os_error_is_said_once_and_backtraces_are_dropped() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let text = io.to_string();
        #[derive(Debug, thiserror::Error)]
        #[error("cannot open /x: {source}")]
        struct Open {
            source: std::io::Error,
        }
        let e = anyhow::Error::new(Open { source: io }).context("loading model m");
        let r = error_report(&e);
        assert_eq!(r.matches(&text).count(), 1, "{r}");
        assert!(r.starts_with("loading model m: cannot open /x: "), "{r}");
        let bt = "tensor x: shape mismatch\n   0: candle_core::error::Error::bt\n             at /src/error.rs:260:25\n   1: main\n; download it again";
        assert_eq!(
            strip_backtrace(bt),
            "tensor x: shape mismatch\n; download it again"
        );
    }
}
