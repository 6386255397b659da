//! Sizes in bytes for people and from people: one parser of "600MiB", one printer, and MiB as
//! a number for reports.
//!
//! It must not know what the sizes are for.

/// A size that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("bad size {input:?}: write a number of bytes with an optional unit, e.g. 600MiB, 1.5GiB, 800MB or 1000000")]
pub struct BadSize {
    pub input: String,
}

/// A memory budget flag: a size (see [`parse_bytes`]), or `None` when none is given.
pub fn parse_budget(s: Option<&str>) -> Result<Option<u64>, BadSize> {
    s.map(parse_bytes).transpose()
}

/// `"600MiB"` → bytes. Units (case-insensitive, optional space): B; KiB, MiB, GiB, TiB
/// (powers of 1024); kB, MB, GB, TB (powers of 1000); K, M, G, T alone mean KiB, MiB, GiB,
/// TiB. Fractions are allowed (`1.5GiB`).
pub fn parse_bytes(s: &str) -> Result<u64, BadSize> {
    let bad = || BadSize {
        input: s.to_string(),
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(bad());
    }
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => return Err(bad()),
    };
    if mult == 1.0 && !num.contains('.') {
        return num.parse::<u64>().map_err(|_| bad());
    }
    let v: f64 = num.parse().map_err(|_| bad())?;
    let bytes = (v * mult).round();
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// Bytes for people, in powers of 1024 ("600 MiB", "1.5 GiB").
pub fn format_bytes(b: u64) -> String {
    const K: f64 = 1024.0;
    let v = b as f64;
    if v >= K * K * K {
        format!("{:.1} GiB", v / (K * K * K))
    } else if v >= K * K {
        format!("{:.0} MiB", v / (K * K))
    } else if v >= K {
        format!("{:.0} KiB", v / K)
    } else {
        format!("{b} B")
    }
}

/// Bytes in MiB, for reports and JSON.
pub fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_bytes("600MiB").unwrap(), 600 << 20);
        assert_eq!(parse_bytes("2g").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("800MB").unwrap(), 800_000_000);
        assert!(parse_bytes("12 parsecs").is_err());
        assert_eq!(format_bytes(600 << 20), "600 MiB");
        assert_eq!(mib(3 << 19), 1.5);
    }
}
