//! Shared driver of the fuzz targets: under AFL (`--features afl`) the input comes from
//! `afl::fuzz!`; otherwise every file named on the command line is run once, so a crash found
//! by AFL can be replayed (and a corpus checked) with a plain build.

/// Runs `f` on the fuzzer's inputs, or on each file given as an argument.
pub fn drive(f: fn(&[u8])) {
    #[cfg(feature = "afl")]
    {
        afl::fuzz!(|data: &[u8]| f(data));
    }
    #[cfg(not(feature = "afl"))]
    {
        for p in std::env::args().skip(1) {
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{p}: {e}"));
            f(&bytes);
        }
    }
}

/// A file on a tmpfs (when there is one) holding `data`, for readers that take a path.
pub fn temp_file(data: &[u8]) -> tempfile::NamedTempFile {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let mut f = tempfile::NamedTempFile::new_in(dir).expect("temp file");
    std::io::Write::write_all(&mut f, data).expect("write temp file");
    f
}
