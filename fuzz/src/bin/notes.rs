//! Note import: UTF-8 check with line numbers, splitting by heading and paragraph, from bytes
//! as `hone note add -` reads them and from a file as `hone note import` does.
fn run(data: &[u8]) {
    let opts = hone::notes::ImportOptions {
        max_section_chars: 200,
        ..hone::notes::ImportOptions::default()
    };
    if let Ok(text) = hone::notes::note_from_bytes(data, "fuzz input") {
        let _ = hone::notes::notes_from_text(&text, Some("fuzz"), true, &opts);
        let _ = hone::notes::notes_from_text(&text, Some("fuzz"), false, &opts);
    }
    let f = hone_fuzz::temp_file(data);
    let md = f.path().with_extension("md");
    if std::fs::copy(f.path(), &md).is_ok() {
        let _ = hone::notes::read_note_file(&md, &opts);
        let _ = std::fs::remove_file(&md);
    }
}

fn main() {
    hone_fuzz::drive(run);
}
