//! The adapter reader: safetensors header and extents, hone's metadata, finite weights.
fn run(data: &[u8]) {
    let _ = hone::adapters::parse_file(std::path::Path::new("fuzz.safetensors"), data);
}

fn main() {
    hone_fuzz::drive(run);
}
