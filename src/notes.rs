//! Reading note files: turns the files and folders a user names into note
//! texts ([`NewNote`]s) ready for `crate::store`.
//!
//! It finds note files (`.md`, `.markdown`, `.txt`) in folders, checks a
//! file's size before reading it, insists on UTF-8 (saying where it is not),
//! strips a BOM, normalises CRLF to LF, and splits text into sections: a
//! Markdown file at its headings, and any section longer than
//! [`ImportOptions::max_section_chars`] at paragraph, then sentence or line,
//! then word boundaries (never inside a UTF-8 character). It also carries
//! out the note commands through the store's methods: import, removal all
//! or none ([`remove`]), text given as arguments or on standard input
//! ([`text_from_args`]), the note list as `hone note list` shows it
//! ([`list_text`]), and an edit that supersedes a note ([`supersede`], also
//! used for corrections).
//!
//! It must NOT: know SQL (the store's methods read and write), deduplicate
//! notes (the store does that by hash), write, move or delete any file,
//! follow a symlink loop forever, or print to the terminal (it returns text
//! for the caller to print).

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::store::NewNote;

/// Default for [`ImportOptions::max_file_bytes`]: 8 MiB.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;
/// Default for [`ImportOptions::max_section_chars`].
pub const DEFAULT_MAX_SECTION_CHARS: usize = 4000;
/// File extensions (compared without case) picked up when walking a folder.
pub const NOTE_EXTENSIONS: &[&str] = &["md", "markdown", "txt"];

/// Limits for importing note files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportOptions {
    /// A larger file is refused with [`NoteError::TooLarge`] before reading.
    pub max_file_bytes: u64,
    /// Longer sections are split into parts of at most this many characters
    /// (Unicode scalar values). 0 is treated as 1.
    pub max_section_chars: usize,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            max_section_chars: DEFAULT_MAX_SECTION_CHARS,
        }
    }
}

/// Why a note file or input could not be read. Every message names the file
/// (or input) and what to do.
#[derive(Debug, thiserror::Error)]
pub enum NoteError {
    #[error("{} does not exist; check the spelling, or give the full path", path.display())]
    NotFound { path: PathBuf },

    #[error(
        "cannot read {}: {source}; check that it is there and that you are allowed to read it (ls -l shows its owner and mode)",
        path.display()
    )]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "{} is a folder, not a note file; give a .md, .markdown or .txt file, or import the whole folder",
        path.display()
    )]
    NotAFile { path: PathBuf },

    #[error(
        "{} is {}, over the {} limit for one note file; split it into smaller files or raise --max-file-size",
        path.display(),
        human_size(*bytes),
        human_size(*limit)
    )]
    TooLarge {
        path: PathBuf,
        bytes: u64,
        limit: u64,
    },

    /// `line` is 1-based; `byte_offset` is the 0-based offset of the first
    /// bad byte from the start of the file.
    #[error(
        "{} is not valid UTF-8 at line {line} (byte {byte_offset}); convert it to UTF-8, e.g. iconv -f latin1 -t utf-8 OLD > NEW",
        path.display()
    )]
    InvalidUtf8 {
        path: PathBuf,
        line: usize,
        byte_offset: usize,
    },

    #[error(
        "{} is UTF-16 text, not UTF-8; convert it to UTF-8, e.g. iconv -f utf-16 -t utf-8 OLD > NEW",
        path.display()
    )]
    Utf16 { path: PathBuf },

    /// Like [`NoteError::InvalidUtf8`], for text that is not a file
    /// (`what` is e.g. "argument" or "standard input").
    #[error(
        "{what} is not valid UTF-8 at line {line} (byte {byte_offset}); give the text as UTF-8 (e.g. convert it with iconv -f latin1 -t utf-8)"
    )]
    InvalidUtf8Input {
        what: String,
        line: usize,
        byte_offset: usize,
    },
}

/// `1536` → `"1.5 KiB"`, `52428800` → `"50.0 MiB"`.
fn human_size(bytes: u64) -> String {
    const K: f64 = 1024.0;
    let b = bytes as f64;
    if bytes < 1024 {
        format!("{bytes} bytes")
    } else if b < K * K {
        format!("{:.1} KiB", b / K)
    } else if b < K * K * K {
        format!("{:.1} MiB", b / (K * K))
    } else {
        format!("{:.1} GiB", b / (K * K * K))
    }
}

fn io_error(path: &Path, source: io::Error) -> NoteError {
    if source.kind() == io::ErrorKind::NotFound {
        NoteError::NotFound {
            path: path.to_path_buf(),
        }
    } else {
        NoteError::Read {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Whether `path` has one of the [`NOTE_EXTENSIONS`].
pub fn is_note_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| NOTE_EXTENSIONS.iter().any(|n| e.eq_ignore_ascii_case(n)))
}

fn is_markdown(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("md") || e.eq_ignore_ascii_case("markdown"))
}

/// The files to import from what the user named: a file is kept as given
/// (whatever its extension); a folder is walked recursively in name order,
/// skipping hidden entries (`.name`), keeping only note files
/// ([`NOTE_EXTENSIONS`]), following symlinks but never into a folder already
/// walked. A file reached twice is listed once.
pub fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, NoteError> {
    let mut walker = Walker::default();
    for path in paths {
        let meta = fs::metadata(path).map_err(|e| io_error(path, e))?;
        if meta.is_dir() {
            walker.walk(path)?;
        } else {
            walker.push(path.clone());
        }
    }
    Ok(walker.files)
}

#[derive(Default)]
struct Walker {
    files: Vec<PathBuf>,
    seen_files: HashSet<PathBuf>,
    seen_dirs: HashSet<PathBuf>,
}

impl Walker {
    fn push(&mut self, path: PathBuf) {
        let key = fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if self.seen_files.insert(key) {
            self.files.push(path);
        }
    }

    fn walk(&mut self, dir: &Path) -> Result<(), NoteError> {
        let canonical = fs::canonicalize(dir).map_err(|e| io_error(dir, e))?;
        if !self.seen_dirs.insert(canonical) {
            return Ok(()); // a symlink loop, or a folder given twice
        }
        let mut entries: Vec<(OsString, PathBuf)> = fs::read_dir(dir)
            .and_then(|rd| {
                rd.map(|entry| entry.map(|e| (e.file_name(), e.path())))
                    .collect()
            })
            .map_err(|e| io_error(dir, e))?;
        entries.sort();
        for (name, path) in entries {
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let meta = match fs::metadata(&path) {
                Ok(m) => m,
                // A dangling symlink inside a folder: nothing to import.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error(&path, e)),
            };
            if meta.is_dir() {
                self.walk(&path)?;
            } else if meta.is_file() && is_note_file(&path) {
                self.push(path);
            }
        }
        Ok(())
    }
}

/// Reads one note file and splits it into notes (see the module doc). The
/// size is checked from the file's metadata before anything is read. A file
/// with no text gives an empty `Vec`. Each note's `source` is `path` as given
/// (lossily displayed); its `section` is the heading, `"Heading (part 2/3)"`,
/// `"part 2/3"`, or `None` for a whole file.
pub fn read_note_file(path: &Path, opts: &ImportOptions) -> Result<Vec<NewNote>, NoteError> {
    let meta = fs::metadata(path).map_err(|e| io_error(path, e))?;
    if meta.is_dir() {
        return Err(NoteError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let limit = opts.max_file_bytes;
    let too_large = |bytes| NoteError::TooLarge {
        path: path.to_path_buf(),
        bytes,
        limit,
    };
    if meta.len() > limit {
        return Err(too_large(meta.len()));
    }
    // Never read more than the limit, even if the file grew since (or its
    // metadata does not tell its size, like a pipe).
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    fs::File::open(path)
        .and_then(|f| f.take(limit.saturating_add(1)).read_to_end(&mut bytes))
        .map_err(|e| io_error(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }

    let text = match std::str::from_utf8(&bytes) {
        Ok(text) => text,
        Err(e) => {
            if bytes.starts_with(&[0xFF, 0xFE]) || bytes.starts_with(&[0xFE, 0xFF]) {
                return Err(NoteError::Utf16 {
                    path: path.to_path_buf(),
                });
            }
            let (line, byte_offset) = utf8_error_position(&bytes, e);
            return Err(NoteError::InvalidUtf8 {
                path: path.to_path_buf(),
                line,
                byte_offset,
            });
        }
    };
    let text = normalise(text);
    let source = path.to_string_lossy();
    Ok(notes_from_text(
        &text,
        Some(&source),
        is_markdown(path),
        opts,
    ))
}

/// Validates text given on the command line or standard input (`what` names
/// it in the error, e.g. "argument"), strips a BOM and normalises CRLF to
/// LF. Empty text is returned as is: the store refuses empty notes.
pub fn note_from_bytes(bytes: &[u8], what: &str) -> Result<String, NoteError> {
    match std::str::from_utf8(bytes) {
        Ok(text) => Ok(normalise(text)),
        Err(e) => {
            let (line, byte_offset) = utf8_error_position(bytes, e);
            Err(NoteError::InvalidUtf8Input {
                what: what.to_string(),
                line,
                byte_offset,
            })
        }
    }
}

/// Splits already-decoded text into notes, exactly as [`read_note_file`]
/// does for a file's contents (`markdown` selects splitting at headings).
/// Useful for long text given on the command line or in chat.
pub fn notes_from_text(
    text: &str,
    source: Option<&str>,
    markdown: bool,
    opts: &ImportOptions,
) -> Vec<NewNote> {
    let sections = if markdown {
        split_headings(text)
    } else {
        vec![Section {
            label: None,
            text,
            heading: false,
        }]
    };
    let mut notes = Vec::new();
    for section in sections {
        let body = if section.heading {
            section.text.split_once('\n').map_or("", |(_, body)| body)
        } else {
            section.text
        };
        if body.trim().is_empty() {
            continue;
        }
        let text = trim_leading_blank_lines(section.text).trim_end();
        let parts = split_long(text, opts.max_section_chars);
        let n = parts.len();
        for (i, content) in parts.into_iter().enumerate() {
            let section = if n == 1 {
                section.label.clone()
            } else {
                let part = format!("part {}/{n}", i + 1);
                Some(match &section.label {
                    Some(label) => format!("{label} ({part})"),
                    None => part,
                })
            };
            notes.push(NewNote {
                content,
                source: source.map(str::to_string),
                section,
            });
        }
    }
    notes
}

/// (1-based line, 0-based byte offset) of the first invalid byte.
fn utf8_error_position(bytes: &[u8], e: std::str::Utf8Error) -> (usize, usize) {
    let offset = e.valid_up_to();
    let line = bytes
        .get(..offset)
        .map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count())
        + 1;
    (line, offset)
}

fn normalise(text: &str) -> String {
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(text);
    text.replace("\r\n", "\n")
}

struct Section<'a> {
    /// Heading text without the `#`s, or `None` (before the first heading,
    /// or an empty heading).
    label: Option<String>,
    /// The section's text, starting with its heading line if it has one.
    text: &'a str,
    heading: bool,
}

/// Splits Markdown at ATX headings (`#` to `######` followed by a space or
/// the end of the line), ignoring `#` lines inside fenced code blocks.
fn split_headings(text: &str) -> Vec<Section<'_>> {
    let mut sections = Vec::new();
    let mut start = 0;
    let mut label = None;
    let mut heading = false;
    let mut fence: Option<(u8, usize)> = None;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let line_start = offset;
        offset += line.len();
        let content = line.trim_end_matches('\n');
        if let Some((ch, len)) = fence {
            if let Some((c, n, rest)) = fence_marker(content) {
                if c == ch && n >= len && rest.trim().is_empty() {
                    fence = None;
                }
            }
            continue;
        }
        if let Some((c, n, _)) = fence_marker(content) {
            fence = Some((c, n));
            continue;
        }
        if let Some(h) = heading_text(content) {
            if line_start > start || heading {
                sections.push(Section {
                    label: label.take(),
                    text: &text[start..line_start],
                    heading,
                });
            }
            start = line_start;
            label = (!h.is_empty()).then(|| h.to_string());
            heading = true;
        }
    }
    if start < text.len() || heading {
        sections.push(Section {
            label,
            text: &text[start..],
            heading,
        });
    }
    sections
}

/// The text of an ATX heading line, without the `#`s and optional closing
/// `#`s.
fn heading_text(line: &str) -> Option<&str> {
    let hashes = line.bytes().take_while(|&b| b == b'#').count();
    if hashes == 0 || hashes > 6 {
        return None;
    }
    let rest = &line[hashes..];
    if !(rest.is_empty() || rest.starts_with([' ', '\t'])) {
        return None; // "#hashtag", "#!/bin/sh"
    }
    let text = rest.trim();
    let without_closing = text.trim_end_matches('#');
    Some(if without_closing.is_empty() {
        ""
    } else if without_closing.ends_with([' ', '\t']) {
        without_closing.trim_end()
    } else {
        text
    })
}

/// A code fence line: (fence char, fence length, rest of the line).
fn fence_marker(line: &str) -> Option<(u8, usize, &str)> {
    let trimmed = line.trim_start_matches(' ');
    if line.len() - trimmed.len() > 3 {
        return None;
    }
    let c = *trimmed.as_bytes().first()?;
    if c != b'`' && c != b'~' {
        return None;
    }
    let n = trimmed.bytes().take_while(|&b| b == c).count();
    (n >= 3).then(|| (c, n, &trimmed[n..]))
}

fn trim_leading_blank_lines(s: &str) -> &str {
    let mut line_start = 0;
    for (i, c) in s.char_indices() {
        if c == '\n' {
            line_start = i + 1;
        } else if !c.is_whitespace() {
            return &s[line_start..];
        }
    }
    ""
}

/// Splits `text` into parts of at most `limit` chars, preferring to cut at a
/// blank line, then at a line end or sentence end, then at whitespace, and
/// only then inside a word (but never inside a char, and not next to a
/// joiner or combining mark when that can be helped). Cuts that would leave
/// a part shorter than a third of the limit are used only when there is no
/// better one.
fn split_long(text: &str, limit: usize) -> Vec<String> {
    let limit = limit.max(1);
    let mut parts = Vec::new();
    let mut rest = trim_leading_blank_lines(text);
    while !rest.is_empty() {
        let Some((max_end, _)) = rest.char_indices().nth(limit) else {
            parts.push(rest.trim_end().to_string());
            break;
        };
        let min_end = rest.char_indices().nth(limit / 3).map_or(0, |(i, _)| i);
        let (end, next) = find_cut(rest, max_end, min_end);
        let chunk = rest[..end].trim_end();
        if !chunk.is_empty() {
            parts.push(chunk.to_string());
        }
        rest = trim_leading_blank_lines(&rest[next..]);
    }
    parts
}

/// Where to cut `rest` (which has more chars than fit before `max_end`):
/// `(end of this part, start of the next)`, with `0 < end <= max_end` and
/// `end <= next`.
fn find_cut(rest: &str, max_end: usize, min_end: usize) -> (usize, usize) {
    // Cuts before this would leave only whitespace in the part.
    let first_text = rest.find(|c: char| !c.is_whitespace()).unwrap_or(0);
    let skip_blanks = |from: usize| {
        from + rest[from..]
            .bytes()
            .take_while(|&b| b == b' ' || b == b'\t')
            .count()
    };
    // Best (latest) cut per level: paragraph, line or sentence, whitespace.
    let mut best: [Option<(usize, usize)>; 3] = [None; 3];
    // Scan one char past max_end: a boundary right at max_end is fine.
    let scan_end = rest[max_end..]
        .chars()
        .next()
        .map_or(max_end, |c| max_end + c.len_utf8());
    let mut after: Option<char> = None;
    for (i, c) in rest[..scan_end].char_indices().rev() {
        let len = c.len_utf8();
        let mut note = |level: usize, end: usize, next: usize| {
            if end > first_text && end <= max_end && best[level].is_none() {
                best[level] = Some((end, next));
            }
        };
        if c == '\n' {
            let next_line_blank = rest[i + 1..]
                .chars()
                .take_while(|&c| c != '\n')
                .all(char::is_whitespace);
            if next_line_blank {
                note(0, i, i + 1);
            }
            note(1, i, i + 1);
        } else if matches!(c, '.' | '!' | '?') && matches!(after, Some(' ' | '\t')) {
            note(1, i + len, skip_blanks(i + len));
        } else if matches!(c, '\u{3002}' | '\u{FF01}' | '\u{FF1F}') {
            // 。！？ end a sentence without a following space.
            note(1, i + len, skip_blanks(i + len));
        } else if c.is_whitespace() {
            note(2, i, skip_blanks(i + len));
        }
        if best.iter().all(Option::is_some) {
            break;
        }
        after = Some(c);
    }
    if let Some(cut) = best.iter().flatten().find(|(end, _)| *end >= min_end) {
        return *cut;
    }
    if let Some(cut) = best.iter().flatten().next() {
        return *cut;
    }
    let end = hard_cut(rest, max_end);
    (end, end)
}

/// A cut inside a word at `max_end`, moved back (a little) so as not to
/// separate a char from a following combining mark, variation selector or
/// zero-width joiner, or from a preceding joiner.
fn hard_cut(rest: &str, max_end: usize) -> usize {
    let mut end = max_end;
    for _ in 0..32 {
        let next = rest[end..].chars().next();
        let prev = rest[..end].chars().next_back();
        if !(next.is_some_and(is_extending) || prev == Some('\u{200D}')) {
            return end;
        }
        match prev {
            Some(p) if end > p.len_utf8() => end -= p.len_utf8(),
            _ => break,
        }
    }
    // No good place nearby: cut at the limit anyway (still between chars).
    max_end
}

/// Chars that belong with the char before them.
fn is_extending(c: char) -> bool {
    matches!(c,
        '\u{200D}'                      // zero-width joiner
        | '\u{0300}'..='\u{036F}'       // combining diacritics
        | '\u{1AB0}'..='\u{1AFF}'
        | '\u{1DC0}'..='\u{1DFF}'
        | '\u{20D0}'..='\u{20FF}'
        | '\u{FE00}'..='\u{FE0F}'       // variation selectors
        | '\u{FE20}'..='\u{FE2F}'
        | '\u{1F3FB}'..='\u{1F3FF}'     // skin tones
        | '\u{E0020}'..='\u{E007F}'     // tags
        | '\u{E0100}'..='\u{E01EF}')
}

/// Files that become more notes than this get a warning (one note per section).
pub const MANY_SECTIONS: usize = 200;

/// What `import` stored, and the files it could not read.
#[derive(Debug, Clone, Default)]
pub struct ImportReport {
    /// Note files found.
    pub files: usize,
    pub added: usize,
    pub duplicates: usize,
    /// Files left out, each with the reason and the fix (invalid UTF-8, too large, unreadable).
    pub failed: Vec<(PathBuf, String)>,
    /// Files that became more than [`MANY_SECTIONS`] notes, with how many.
    pub many_sections: Vec<(PathBuf, usize)>,
}

impl ImportReport {
    /// Nothing was stored (or found already stored) and some file failed: the command fails.
    pub fn failed_entirely(&self) -> bool {
        self.added + self.duplicates == 0 && !self.failed.is_empty()
    }

    /// The error `hone note import` fails with when nothing was imported: the one file's
    /// reason, or every file's.
    pub fn failure(&self) -> Option<String> {
        if !self.failed_entirely() {
            return None;
        }
        if let [(_, why)] = self.failed.as_slice() {
            return Some(why.clone());
        }
        let mut s = format!(
            "no note was imported: none of the {} files could be read:",
            self.failed.len()
        );
        for (_, why) in &self.failed {
            s.push_str("\n  ");
            s.push_str(why);
        }
        Some(s)
    }
}

/// Why an import stored nothing.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("no .md, .markdown or .txt files under the given paths")]
    NoFiles,
    #[error(transparent)]
    Note(#[from] NoteError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Imports the note files under `paths` (`hone note import`). A file that cannot be read
/// (invalid UTF-8, too large, unreadable) is left out and reported, and the others are
/// imported; the notes of the readable files are stored in one transaction. A path that does not
/// exist stops the import before anything is stored.
pub fn import(
    store: &mut crate::store::Store,
    paths: &[PathBuf],
    opts: &ImportOptions,
) -> Result<ImportReport, ImportError> {
    let files = collect_files(paths)?;
    if files.is_empty() {
        return Err(ImportError::NoFiles);
    }
    let mut report = ImportReport {
        files: files.len(),
        ..ImportReport::default()
    };
    let mut items = Vec::new();
    for f in &files {
        match read_note_file(f, opts) {
            Ok(notes) => {
                if notes.len() > MANY_SECTIONS {
                    report.many_sections.push((f.clone(), notes.len()));
                }
                items.extend(notes);
            }
            Err(e) => report.failed.push((f.clone(), e.to_string())),
        }
    }
    let results = store.add_notes(&items)?;
    report.added = results
        .iter()
        .filter(|r| matches!(r, crate::store::NoteAdded::Added(_)))
        .count();
    report.duplicates = results.len() - report.added;
    Ok(report)
}

impl std::fmt::Display for ImportReport {
    /// What `hone note import` prints: the summary line, then a line per file left out and per
    /// file that became very many notes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let read = self.files - self.failed.len();
        write!(
            f,
            "imported {read} files: {} new notes, {} already stored",
            self.added, self.duplicates
        )?;
        if !self.failed.is_empty() {
            write!(
                f,
                "\n{} of {} files could not be imported (the others were):",
                self.failed.len(),
                self.files
            )?;
            for (_, why) in &self.failed {
                write!(f, "\n  {why}")?;
            }
        }
        for (path, n) in &self.many_sections {
            write!(
                f,
                "\nwarning: {} became {n} notes (one per heading or {}-character section); many small notes are learned slowly and retrieved one at a time. To keep it as fewer notes, use fewer headings (or save it as .txt, which is not split at headings), or remove it with `hone note rm --source {}`",
                path.display(),
                DEFAULT_MAX_SECTION_CHARS,
                path.display()
            )?;
        }
        Ok(())
    }
}

/// Why text given as arguments or on standard input is not a note (or question).
#[derive(Debug, thiserror::Error)]
pub enum TextInputError {
    #[error("reading standard input")]
    Stdin(#[source] io::Error),
    #[error(
        "{what} on standard input is over the {mib} MiB limit (the same as for one file of `hone note import`); split it into smaller pieces, or save it as a file and import it (long files are split by heading)"
    )]
    TooLarge { what: String, mib: u64 },
    #[error(transparent)]
    Note(#[from] NoteError),
}

/// Text given as command-line words (joined with spaces), or read from `stdin` when the only
/// word is "-" (at most [`DEFAULT_MAX_FILE_BYTES`], the limit of one imported file; never more
/// is held), refusing invalid UTF-8. `what` names the text in errors ("the note").
pub fn text_from_args(
    parts: &[OsString],
    what: &str,
    stdin: impl Read,
) -> Result<String, TextInputError> {
    let limit = DEFAULT_MAX_FILE_BYTES;
    if parts.len() == 1 && parts[0] == "-" {
        let mut buf = Vec::new();
        // Never hold more than the limit (plus one byte, to know it was passed).
        stdin
            .take(limit + 1)
            .read_to_end(&mut buf)
            .map_err(TextInputError::Stdin)?;
        if buf.len() as u64 > limit {
            return Err(TextInputError::TooLarge {
                what: what.to_string(),
                mib: limit / (1024 * 1024),
            });
        }
        return Ok(note_from_bytes(&buf, "standard input")?);
    }
    let mut out = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        out.extend_from_slice(p.as_encoded_bytes());
    }
    Ok(note_from_bytes(&out, what)?)
}

/// Why `hone note rm` removed nothing.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("there is no note {0} (see `hone note list`); nothing was removed")]
    NoSuchNote(i64),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Removes the notes `ids`, all or none: an unknown id removes nothing (`hone note rm`).
pub fn remove(store: &crate::store::Store, ids: &[i64]) -> Result<(), RemoveError> {
    for id in ids {
        if store.get_note(*id)?.is_none() {
            return Err(RemoveError::NoSuchNote(*id));
        }
    }
    for id in ids {
        store.remove_note(*id)?;
    }
    Ok(())
}

/// Why a note could not be edited or corrected; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("there is no note {0} (see `hone note list`); nothing was changed")]
    NoSuchNote(i64),
    #[error(
        "the new text of note {id} is {}, over the {} limit for one note (the same as for `hone note add`); shorten it, or save it as a file and import it (long files are split by heading)",
        human_size(*bytes),
        human_size(DEFAULT_MAX_FILE_BYTES)
    )]
    TooLarge { id: i64, bytes: u64 },
    #[error("the new text of note {0} is the same as the old; nothing was changed")]
    Unchanged(i64),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// What an edit or a correction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superseded {
    /// The note that was replaced (removed; forgotten from the adapter when learned).
    pub old: i64,
    /// The note that holds the new text: a new note (queued for learning), or an existing one
    /// that already held the same text.
    pub new: crate::store::NoteAdded,
}

/// Replaces note `old` with `text` (see `Store::supersede_note`): the new text becomes a note
/// that supersedes the old one, which is removed with `reason` ("edited", "corrected") in the
/// same transaction so that its learned knowledge is forgotten; the new note is queued for
/// learning. The text obeys the limit of `hone note add` (8 MiB).
pub fn supersede(
    store: &crate::store::Store,
    old: i64,
    text: &str,
    source: Option<&str>,
    reason: &str,
) -> Result<Superseded, EditError> {
    if text.len() as u64 > DEFAULT_MAX_FILE_BYTES {
        return Err(EditError::TooLarge {
            id: old,
            bytes: text.len() as u64,
        });
    }
    match store.supersede_note(old, text, source, reason)? {
        None => Err(EditError::NoSuchNote(old)),
        Some(crate::store::NoteAdded::Duplicate(id)) if id == old => Err(EditError::Unchanged(old)),
        Some(new) => Ok(Superseded { old, new }),
    }
}

/// `hone note edit`: note `id` superseded by `text` (see [`supersede`]), keeping its source.
pub fn edit(store: &crate::store::Store, id: i64, text: &str) -> Result<Superseded, EditError> {
    let note = store.get_note(id)?.ok_or(EditError::NoSuchNote(id))?;
    supersede(store, id, text, note.source.as_deref(), "edited")
}

/// `notes` as `hone note list` prints them, newest first: one JSON object per line with
/// `json`, else one line each (id, date, a learned mark, the first line cut to 70 characters),
/// or a hint when there are none.
pub fn list_text(notes: &[crate::store::Note], json: bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if json {
        for n in notes {
            let _ = writeln!(
                out,
                "{}",
                serde_json::json!({"id": n.id, "created_at": n.created_at, "source": n.source,
                       "section": n.section, "content": n.content,
                       "learned_at": n.learned_at})
            );
        }
    } else if notes.is_empty() {
        out.push_str("no notes yet: add one with `hone note add TEXT`\n");
    } else {
        for n in notes {
            let first: String = n
                .content
                .lines()
                .next()
                .unwrap_or("")
                .chars()
                .take(70)
                .collect();
            let learned = if n.learned_at.is_some() {
                "learned"
            } else {
                ""
            };
            let date = &n.created_at[..n.created_at.len().min(16)];
            let _ = writeln!(out, "{:>5}  {date}  {learned:<7}  {first}", n.id);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(max_section_chars: usize) -> ImportOptions {
        ImportOptions {
            max_section_chars,
            ..ImportOptions::default()
        }
    }

    fn write(dir: &Path, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(&path, content).unwrap();
        path
    }

    fn non_ws(s: &str) -> String {
        s.chars().filter(|c| !c.is_whitespace()).collect()
    }

    #[test]
    fn markdown_splits_at_headings() {
        let dir = tempfile::tempdir().unwrap();
        let text = "Intro line.\n\n# Title\n\n\
                    Text A.\n\n\
                    ## Sub section ##\nText B.\n\
                    ```sh\n# not a heading\n```\n\
                    #hashtag is not a heading\n\n\
                    # Empty\n\n\n\
                    ### Last\nText C.\n";
        let path = write(dir.path(), "n.md", text);
        let notes = read_note_file(&path, &ImportOptions::default()).unwrap();
        let got: Vec<(Option<&str>, &str)> = notes
            .iter()
            .map(|n| (n.section.as_deref(), n.content.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (None, "Intro line."),
                (Some("Title"), "# Title\n\nText A."),
                (
                    Some("Sub section"),
                    "## Sub section ##\nText B.\n```sh\n# not a heading\n```\n#hashtag is not a heading"
                ),
                (Some("Last"), "### Last\nText C."),
            ]
        );
        let source = path.to_string_lossy().into_owned();
        assert!(notes.iter().all(|n| n.source.as_deref() == Some(&*source)));
    }

    #[test]
    fn short_file_without_headings_is_one_note() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "a.md", "\n\nJust a thought.\nTwo lines.\n\n");
        let notes = read_note_file(&path, &ImportOptions::default()).unwrap();
        assert_eq!(notes.len(), 1);
        assert_eq!(notes[0].content, "Just a thought.\nTwo lines.");
        assert_eq!(notes[0].section, None);

        // Plain text: '#' lines are not headings.
        let path = write(dir.path(), "b.txt", "# one\ntwo\n# three\n");
        let notes = read_note_file(&path, &ImportOptions::default()).unwrap();
        assert_eq!(notes.len(), 1);
        assert_eq!(notes[0].section, None);

        let path = write(dir.path(), "empty.md", " \n\n\t\n");
        assert!(read_note_file(&path, &ImportOptions::default())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn long_text_splits_within_limit_at_char_boundaries() {
        let sentence = "Café crème brûlée é😀 très bien. ";
        let mut text = String::from("# Désert 🍰\n\n");
        for p in 0..12 {
            for _ in 0..(p % 4 + 1) {
                text.push_str(sentence);
            }
            text.push_str("\n\n");
        }
        let limit = 80;
        let notes = notes_from_text(&text, Some("x.md"), true, &opts(limit));
        assert!(notes.len() > 3);
        let n = notes.len();
        for (i, note) in notes.iter().enumerate() {
            assert!(note.content.chars().count() <= limit, "{:?}", note.content);
            assert_eq!(
                note.section.as_deref(),
                Some(format!("Désert 🍰 (part {}/{n})", i + 1).as_str())
            );
            // Split at sentence ends, not inside words.
            assert!(note.content.ends_with('.'), "{:?}", note.content);
        }
        assert!(notes[0].content.starts_with("# Désert 🍰\n"));
        let joined: String = notes.iter().map(|n| n.content.as_str()).collect();
        assert_eq!(non_ws(&joined), non_ws(&text));
    }

    #[test]
    fn paragraphs_are_kept_whole_when_they_fit() {
        let para = |c: char| format!("{}\n{}", c.to_string().repeat(20), c.to_string().repeat(20));
        let text = [para('a'), para('b'), para('c'), para('d')].join("\n\n");
        let notes = notes_from_text(&text, None, false, &opts(90));
        let got: Vec<&str> = notes.iter().map(|n| n.content.as_str()).collect();
        assert_eq!(
            got,
            vec![
                format!("{}\n\n{}", para('a'), para('b')),
                format!("{}\n\n{}", para('c'), para('d'))
            ]
        );
        assert_eq!(notes[0].section.as_deref(), Some("part 1/2"));
        assert_eq!(notes[1].section.as_deref(), Some("part 2/2"));
    }

    #[test]
    fn words_longer_than_the_limit_are_cut_between_chars() {
        let text = "é😀ü".repeat(100);
        let notes = notes_from_text(&text, None, false, &opts(7));
        let joined: String = notes.iter().map(|n| n.content.as_str()).collect();
        assert_eq!(joined, text);
        assert!(notes.iter().all(|n| n.content.chars().count() <= 7));

        // A family emoji is not split at its joiners when avoidable.
        let family = "👨\u{200D}👩\u{200D}👧";
        let text = format!("x{}", family.repeat(20));
        let notes = notes_from_text(&text, None, false, &opts(10));
        let joined: String = notes.iter().map(|n| n.content.as_str()).collect();
        assert_eq!(joined, text);
        for n in &notes {
            assert!(n.content.chars().count() <= 10);
            assert!(!n.content.starts_with('\u{200D}'), "{:?}", n.content);
            assert!(!n.content.ends_with('\u{200D}'), "{:?}", n.content);
        }

        // A limit of 0 still makes progress.
        assert_eq!(notes_from_text("ab", None, false, &opts(0)).len(), 2);
    }

    #[test]
    fn huge_single_line_splits_in_linear_time() {
        let text = "mot très long😀 ".repeat(70_000); // ~1.1 MB, no newline
        let start = std::time::Instant::now();
        let notes = notes_from_text(&text, None, true, &ImportOptions::default());
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        assert!(notes
            .iter()
            .all(|n| n.content.chars().count() <= DEFAULT_MAX_SECTION_CHARS));
        let joined: String = notes.iter().map(|n| n.content.as_str()).collect();
        assert_eq!(non_ws(&joined), non_ws(&text));
    }

    #[test]
    fn errors_can_travel_between_threads() {
        fn check<T: Send + Sync + 'static>() {}
        check::<NoteError>();
        check::<crate::store::StoreError>();
    }

    #[test]
    fn crlf_and_bom_are_normalised() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "w.md",
            b"\xEF\xBB\xBF# Head\r\nline one\r\nline two\r\n",
        );
        let notes = read_note_file(&path, &ImportOptions::default()).unwrap();
        assert_eq!(notes.len(), 1);
        assert_eq!(notes[0].content, "# Head\nline one\nline two");
        assert_eq!(notes[0].section.as_deref(), Some("Head"));

        assert_eq!(
            note_from_bytes(b"\xEF\xBB\xBFa\r\nb", "argument").unwrap(),
            "a\nb"
        );
    }

    #[test]
    fn invalid_utf8_reports_line_and_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "latin1.txt", b"line1\nline2\nab\xE9cd\n");
        let err = read_note_file(&path, &ImportOptions::default()).unwrap_err();
        match &err {
            NoteError::InvalidUtf8 {
                line, byte_offset, ..
            } => {
                assert_eq!((*line, *byte_offset), (3, 14));
            }
            other => panic!("expected InvalidUtf8, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("latin1.txt is not valid UTF-8 at line 3 (byte 14)"),
            "{msg}"
        );
        assert!(msg.contains("iconv -f latin1 -t utf-8"), "{msg}");

        let err = note_from_bytes(b"ok\n\xFF", "argument").unwrap_err();
        assert!(matches!(
            err,
            NoteError::InvalidUtf8Input {
                line: 2,
                byte_offset: 3,
                ..
            }
        ));
        assert!(err
            .to_string()
            .starts_with("argument is not valid UTF-8 at line 2"));

        let path = write(dir.path(), "u16.txt", b"\xFF\xFEh\x00i\x00");
        assert!(matches!(
            read_note_file(&path, &ImportOptions::default()),
            Err(NoteError::Utf16 { .. })
        ));
    }

    #[test]
    fn too_large_is_refused_from_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.md");
        let file = fs::File::create(&path).unwrap();
        file.set_len(50 * 1024 * 1024).unwrap(); // sparse: no data written
        drop(file);
        let err = read_note_file(&path, &ImportOptions::default()).unwrap_err();
        match &err {
            NoteError::TooLarge { bytes, limit, .. } => {
                assert_eq!(*bytes, 50 * 1024 * 1024);
                assert_eq!(*limit, DEFAULT_MAX_FILE_BYTES);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("notes.md is 50.0 MiB, over the 8.0 MiB limit for one note file"),
            "{msg}"
        );
        assert!(msg.contains("--max-file-size"), "{msg}");
    }

    #[test]
    fn folders_are_walked_sorted_and_filtered() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("notes");
        write(&root, "b.txt", "b");
        write(&root, "a.md", "a");
        write(&root, "c.rs", "fn main() {}");
        write(&root, ".hidden.md", "h");
        write(&root, ".git/x.md", "x");
        write(&root, "sub/e.MD", "e");
        write(&root, "sub/d.markdown", "d");
        write(&root, "zz/deeper/f.md", "f");
        let outside = write(dir.path(), "script.py", "print()");
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&root, root.join("sub/loop")).unwrap();
            std::os::unix::fs::symlink(root.join("nothing"), root.join("dangling.md")).unwrap();
        }

        let files = collect_files(&[root.clone(), outside.clone(), root.join("a.md")]).unwrap();
        let expected: Vec<PathBuf> = vec![
            root.join("a.md"),
            root.join("b.txt"),
            root.join("sub/d.markdown"),
            root.join("sub/e.MD"),
            root.join("zz/deeper/f.md"),
            outside, // named explicitly: kept despite its extension
        ];
        assert_eq!(files, expected);
    }

    #[test]
    fn nonexistent_paths_are_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.md");
        let err = collect_files(std::slice::from_ref(&missing)).unwrap_err();
        assert!(matches!(&err, NoteError::NotFound { path } if *path == missing));
        assert!(err.to_string().contains("does not exist"));
        assert!(matches!(
            read_note_file(&missing, &ImportOptions::default()),
            Err(NoteError::NotFound { .. })
        ));
        assert!(matches!(
            read_note_file(dir.path(), &ImportOptions::default()),
            Err(NoteError::NotAFile { .. })
        ));
    }

    #[test]
    fn rm_removes_all_or_none_and_the_list_marks_learned_notes() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&dir.path().join("hone.db")).unwrap();
        let a = store
            .add_note("first line\nsecond", None, None)
            .unwrap()
            .id();
        let b = store.add_note("another", None, None).unwrap().id();
        let err = remove(&store, &[a, 999]).unwrap_err();
        assert!(err.to_string().contains("no note 999"), "{err}");
        assert_eq!(store.list_notes(None).unwrap().len(), 2, "nothing removed");
        let text = list_text(&store.list_notes(None).unwrap(), false);
        assert!(
            text.contains("first line\n") && !text.contains("second"),
            "{text}"
        );
        remove(&store, &[a, b]).unwrap();
        assert_eq!(
            list_text(&[], false),
            "no notes yet: add one with `hone note add TEXT`\n"
        );
    }

    #[test]
    fn import_goes_on_past_bad_files_and_warns_about_files_of_many_sections() {
        let dir = tempfile::tempdir().unwrap();
        let store_path = dir.path().join("hone.db");
        let mut store = crate::store::Store::open(&store_path).unwrap();
        let notes = dir.path().join("notes");
        write(&notes, "a.md", "The gate code is 4471.");
        write(&notes, "b.txt", b"caf\xE9 latin-1");
        let big = notes.join("c.md");
        fs::File::create(&big)
            .unwrap()
            .set_len(DEFAULT_MAX_FILE_BYTES + 1)
            .unwrap();
        let many: String = (0..MANY_SECTIONS + 5)
            .map(|i| format!("# Day {i}\nWalked {i} km.\n"))
            .collect();
        write(&notes, "d.md", &many);
        let r = import(
            &mut store,
            std::slice::from_ref(&notes),
            &ImportOptions::default(),
        )
        .unwrap();
        assert_eq!(r.files, 4);
        assert_eq!(r.added, 1 + MANY_SECTIONS + 5);
        assert_eq!(r.failed.len(), 2);
        assert!(!r.failed_entirely());
        let text = r.to_string();
        assert!(text.starts_with("imported 2 files:"), "{text}");
        assert!(text.contains("b.txt is not valid UTF-8"), "{text}");
        assert!(text.contains("c.md is 8.0 MiB"), "{text}");
        assert!(
            text.contains(&format!("d.md became {} notes", MANY_SECTIONS + 5)),
            "{text}"
        );
        // Only bad files: nothing imported, the command fails.
        let bad = dir.path().join("bad");
        write(&bad, "x.txt", b"\xFF\xFE\x00");
        write(&bad, "y.md", b"\xFF");
        let r = import(&mut store, &[bad], &ImportOptions::default()).unwrap();
        assert!(r.failed_entirely(), "{r}");
        let why = r.failure().unwrap();
        assert!(
            why.starts_with("no note was imported: none of the 2 files"),
            "{why}"
        );
        assert!(
            why.contains("x.txt is UTF-16") && why.contains("y.md is not valid UTF-8"),
            "{why}"
        );
    }

    #[test]
    fn edit_supersedes_the_old_note_and_checks_the_new_text() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&dir.path().join("hone.db")).unwrap();
        let a = store
            .add_note("The dentist is on Elm Street.", Some("cli"), None)
            .unwrap()
            .id();
        let e = edit(&store, a, "The dentist moved to Oak Street.").unwrap();
        let crate::store::NoteAdded::Added(b) = e.new else {
            panic!("{e:?}")
        };
        assert_eq!(e.old, a);
        assert!(store.get_note(a).unwrap().is_none());
        let n = store.get_note(b).unwrap().unwrap();
        assert_eq!(n.content, "The dentist moved to Oak Street.");
        assert_eq!(n.source.as_deref(), Some("cli"), "keeps its source");
        assert_eq!(store.superseded_by(b).unwrap(), Some(a));
        let err = edit(&store, a, "x").unwrap_err();
        assert!(err.to_string().contains("no note"), "{err}");
        let err = edit(&store, b, "The dentist moved to Oak Street.").unwrap_err();
        assert!(matches!(err, EditError::Unchanged(_)), "{err}");
        let big = "x".repeat(DEFAULT_MAX_FILE_BYTES as usize + 1);
        let err = edit(&store, b, &big).unwrap_err();
        assert!(err.to_string().contains("over the 8.0 MiB limit"), "{err}");
        assert!(store.get_note(b).unwrap().is_some(), "nothing changed");
    }

    #[test]
    fn text_from_args_joins_words_and_bounds_standard_input() {
        let words = [OsString::from("a"), OsString::from("b")];
        assert_eq!(
            text_from_args(&words, "the note", io::empty()).unwrap(),
            "a b"
        );
        let dash = [OsString::from("-")];
        let big = io::repeat(b'x').take(DEFAULT_MAX_FILE_BYTES + 10);
        let err = text_from_args(&dash, "the note", big).unwrap_err();
        assert!(matches!(err, TextInputError::TooLarge { .. }), "{err}");
        let small = &b"from stdin\r\n"[..];
        assert_eq!(
            text_from_args(&dash, "the note", small).unwrap(),
            "from stdin\n"
        );
    }
}
