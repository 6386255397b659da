//! The SQLite memory of hone: one database file (`hone.db`) holding the
//! question/answer exchanges (with where each answer came from, and the
//! feedback on it), the user's notes (with the notes they superseded),
//! candidate notes waiting for the user, the models the user registered by
//! path, and a few settings.
//!
//! This module owns the schema (versioned with `PRAGMA user_version`, see
//! [`MIGRATIONS`]), creates the file privately (mode 0600, folder 0700 on
//! Unix) before SQLite touches it, and turns SQLite failures into
//! [`StoreError`]s that name the file and the fix.
//!
//! It must NOT: read note files or parse Markdown (that is `crate::notes`),
//! load or run models, print to the terminal, decide where the database lives
//! (the caller passes the path, e.g. from `HONE_HOME`), expose rusqlite types
//! in its public API, or ever modify a file that is not a hone database.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Row, TransactionBehavior};
use serde::{Deserialize, Serialize};

/// How long an operation waits for another process's lock before giving up
/// with [`StoreError::Locked`].
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The schema, one SQL batch per version: `MIGRATIONS[0]` takes a database
/// from version 0 (empty) to 1, and so on. Each batch runs in its own
/// transaction together with the `user_version` bump. Never edit a batch that
/// has shipped; append a new one instead.
pub const MIGRATIONS: &[&str] = &[
    // v1
    "CREATE TABLE exchanges (
        id INTEGER PRIMARY KEY,
        created_at TEXT NOT NULL,
        session_id TEXT,
        kind TEXT NOT NULL,
        prompt TEXT NOT NULL,
        answer TEXT NOT NULL,
        model TEXT NOT NULL,
        adapter TEXT,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        load_ms REAL,
        prompt_ms REAL,
        generate_ms REAL,
        stop_reason TEXT,
        sampling TEXT
    );
    CREATE INDEX exchanges_session ON exchanges(session_id, id);
    CREATE INDEX exchanges_created_at ON exchanges(created_at);

    CREATE TABLE notes (
        id INTEGER PRIMARY KEY,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        source TEXT,
        section TEXT,
        content TEXT NOT NULL,
        sha256 TEXT NOT NULL UNIQUE,
        bytes INTEGER NOT NULL,
        learned_at TEXT
    );
    CREATE INDEX notes_unlearned ON notes(id) WHERE learned_at IS NULL;
    CREATE INDEX notes_source ON notes(source);

    CREATE TABLE models (
        name TEXT PRIMARY KEY,
        path TEXT NOT NULL,
        architecture TEXT NOT NULL,
        sha256 TEXT,
        bytes INTEGER NOT NULL,
        registered_at TEXT NOT NULL
    );

    CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );",
    // v2: LoRA adapter versions (the weights live in files under adapters/).
    "CREATE TABLE adapters (
        version INTEGER PRIMARY KEY,
        parent INTEGER,
        created_at TEXT NOT NULL,
        model TEXT NOT NULL,
        model_sha256 TEXT NOT NULL,
        architecture TEXT NOT NULL,
        config TEXT NOT NULL,
        data TEXT,
        data_sha256 TEXT,
        loss_curve TEXT,
        steps INTEGER NOT NULL DEFAULT 0,
        tokens INTEGER NOT NULL DEFAULT 0,
        seconds REAL,
        params INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        file TEXT NOT NULL,
        active INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX adapters_model ON adapters(model_sha256, version);",
    // v3: learning cycles, their self-edits with provenance, and the base model's answers to
    // the general anchoring prompts.
    "CREATE TABLE learn_cycles (
        id INTEGER PRIMARY KEY,
        started_at TEXT NOT NULL,
        finished_at TEXT,
        model TEXT NOT NULL,
        model_sha256 TEXT NOT NULL,
        status TEXT NOT NULL,
        notes TEXT NOT NULL,
        options TEXT NOT NULL,
        parent_adapter INTEGER,
        candidate_adapter INTEGER,
        activated INTEGER NOT NULL DEFAULT 0,
        train_tokens INTEGER NOT NULL DEFAULT 0,
        gate TEXT,
        reason TEXT
    );
    CREATE TABLE learn_items (
        id INTEGER PRIMARY KEY,
        cycle INTEGER NOT NULL,
        note_id INTEGER NOT NULL,
        note_sha256 TEXT NOT NULL,
        strategy TEXT NOT NULL,
        generator TEXT NOT NULL,
        prompt_version TEXT,
        sampling TEXT,
        role TEXT NOT NULL,
        prompt TEXT,
        completion TEXT NOT NULL,
        verdict TEXT NOT NULL,
        reason TEXT,
        created_at TEXT NOT NULL
    );
    CREATE INDEX learn_items_cycle ON learn_items(cycle, note_id);
    CREATE INDEX learn_items_note ON learn_items(note_id);
    CREATE TABLE anchors (
        model_sha256 TEXT NOT NULL,
        prompt TEXT NOT NULL,
        answer TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (model_sha256, prompt)
    );
    ALTER TABLE notes ADD COLUMN learn_attempts INTEGER NOT NULL DEFAULT 0;",
    // v4: the sha256 of each adapter file as written, checked whenever it is loaded or chosen
    // (NULL for versions saved before v4: those are checked for finite weights only).
    "ALTER TABLE adapters ADD COLUMN sha256 TEXT;",
    // v5: full-text search over the notes (`retrieve`), kept in step by triggers.
    "CREATE VIRTUAL TABLE notes_fts USING fts5(
        content, content='notes', content_rowid='id', tokenize='porter unicode61'
    );
    INSERT INTO notes_fts(rowid, content) SELECT id, content FROM notes;
    CREATE TRIGGER notes_fts_insert AFTER INSERT ON notes BEGIN
        INSERT INTO notes_fts(rowid, content) VALUES (new.id, new.content);
    END;
    CREATE TRIGGER notes_fts_delete AFTER DELETE ON notes BEGIN
        INSERT INTO notes_fts(notes_fts, rowid, content) VALUES ('delete', old.id, old.content);
    END;
    CREATE TRIGGER notes_fts_update AFTER UPDATE OF content ON notes BEGIN
        INSERT INTO notes_fts(notes_fts, rowid, content) VALUES ('delete', old.id, old.content);
        INSERT INTO notes_fts(rowid, content) VALUES (new.id, new.content);
    END;",
    // v6: the self-edit writer (`learn::writer`, `teach`): its adapter versions, kept apart from
    // the answering adapters so that no writer can ever answer, its training rounds, and every
    // sampled self-edit with its reward.
    "CREATE TABLE writer_versions (
        version INTEGER PRIMARY KEY,
        parent INTEGER,
        created_at TEXT NOT NULL,
        model TEXT NOT NULL,
        model_sha256 TEXT NOT NULL,
        architecture TEXT NOT NULL,
        config TEXT NOT NULL,
        data TEXT,
        data_sha256 TEXT,
        loss_curve TEXT,
        steps INTEGER NOT NULL DEFAULT 0,
        tokens INTEGER NOT NULL DEFAULT 0,
        seconds REAL,
        params INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        file TEXT NOT NULL,
        active INTEGER NOT NULL DEFAULT 0,
        sha256 TEXT
    );
    CREATE INDEX writer_versions_model ON writer_versions(model_sha256, version);
    CREATE TABLE writer_rounds (
        id INTEGER PRIMARY KEY,
        started_at TEXT NOT NULL,
        finished_at TEXT,
        model TEXT NOT NULL,
        model_sha256 TEXT NOT NULL,
        source TEXT NOT NULL,
        options TEXT NOT NULL,
        status TEXT NOT NULL,
        parent_writer INTEGER,
        writer INTEGER,
        notes INTEGER NOT NULL DEFAULT 0,
        kept INTEGER NOT NULL DEFAULT 0,
        mean_reward REAL,
        holdout_reward REAL,
        probe_agreement REAL,
        wall_s REAL
    );
    CREATE TABLE writer_samples (
        id INTEGER PRIMARY KEY,
        round INTEGER NOT NULL,
        note_key TEXT NOT NULL,
        note_sha256 TEXT NOT NULL,
        role TEXT NOT NULL,
        k INTEGER NOT NULL,
        seed INTEGER,
        text TEXT NOT NULL,
        items INTEGER NOT NULL,
        accuracy REAL NOT NULL,
        loglik REAL NOT NULL,
        reward REAL,
        probe_accuracy REAL,
        probe_loglik REAL,
        probe_reward REAL,
        chosen INTEGER NOT NULL DEFAULT 0,
        reason TEXT,
        created_at TEXT NOT NULL
    );
    CREATE INDEX writer_samples_round ON writer_samples(round, note_key);",
    // v7: notes removed after a cycle learned them (`forget`). The weights still hold such a
    // note until the adapter is rebuilt without it: its text is kept only so that answers resting
    // on it can be held back, and the rebuild erases it (and the note's self-edits).
    "CREATE TABLE forgotten_notes (
        id INTEGER PRIMARY KEY,
        note_id INTEGER NOT NULL,
        model_sha256 TEXT NOT NULL,
        first_cycle INTEGER NOT NULL,
        removed_at TEXT NOT NULL,
        reason TEXT NOT NULL,
        content TEXT NOT NULL,
        rebuilt_at TEXT,
        rebuilt_cycle INTEGER,
        UNIQUE (note_id, model_sha256)
    );
    CREATE VIRTUAL TABLE forgotten_fts USING fts5(
        content, content='forgotten_notes', content_rowid='id', tokenize='porter unicode61'
    );
    CREATE TRIGGER forgotten_fts_insert AFTER INSERT ON forgotten_notes BEGIN
        INSERT INTO forgotten_fts(rowid, content) VALUES (new.id, new.content);
    END;
    CREATE TRIGGER forgotten_fts_delete AFTER DELETE ON forgotten_notes BEGIN
        INSERT INTO forgotten_fts(forgotten_fts, rowid, content) VALUES ('delete', old.id, old.content);
    END;
    CREATE TRIGGER forgotten_fts_update AFTER UPDATE OF content ON forgotten_notes BEGIN
        INSERT INTO forgotten_fts(forgotten_fts, rowid, content) VALUES ('delete', old.id, old.content);
        INSERT INTO forgotten_fts(rowid, content) VALUES (new.id, new.content);
    END;",
    // v8: notes that stay true. An edited or corrected note is a new note that `supersedes` the
    // old one (which is removed, and forgotten when learned). Each answer records where it came
    // from (`answered_from`: notes in the prompt, the adapter's weights, or the base model; the
    // notes it cited; the learned note it was about), so feedback on it can reach that note.
    // Feedback on answers, and candidate notes from what the user says (kept only when the user
    // says so, or when `candidates.auto_keep` is on).
    "ALTER TABLE notes ADD COLUMN supersedes INTEGER;
    ALTER TABLE exchanges ADD COLUMN answered_from TEXT;
    ALTER TABLE exchanges ADD COLUMN cited_notes TEXT;
    ALTER TABLE exchanges ADD COLUMN about_note INTEGER;
    CREATE TABLE feedback (
        id INTEGER PRIMARY KEY,
        exchange_id INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        rating TEXT NOT NULL CHECK (rating IN ('good', 'bad')),
        correction TEXT,
        note_id INTEGER,
        requeued_note INTEGER
    );
    CREATE INDEX feedback_exchange ON feedback(exchange_id);
    CREATE TABLE note_candidates (
        id INTEGER PRIMARY KEY,
        created_at TEXT NOT NULL,
        content TEXT NOT NULL,
        source TEXT NOT NULL,
        session_id TEXT,
        exchange_id INTEGER,
        status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'kept', 'discarded')),
        note_id INTEGER,
        decided_at TEXT
    );
    CREATE INDEX note_candidates_status ON note_candidates(status, id);",
    // v9: the base model's distribution over each anchoring answer (its top few tokens per
    // position), and its mean loss over a held-out one (the gate's drift baseline), kept with
    // the answer so that no later cycle runs the answer again (`learn::records::soft_blob`,
    // `learn::records::nll_blob`; NULL: not kept yet).
    "ALTER TABLE anchors ADD COLUMN soft BLOB;
    ALTER TABLE anchors ADD COLUMN base_nll BLOB;",
];

/// The schema version this build of hone writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Everything that can go wrong with the database. Every message names the
/// file and says what the user can do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Home(#[from] crate::home::HomeError),

    #[error(
        "cannot create the folder {} for the hone database: {source}; check the permissions of its parent folder or set HONE_HOME to another folder",
        path.display()
    )]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "cannot open database {}: {source}; make sure the file and its folder are readable and writable by you (ls -l shows the owner and mode), or set HONE_HOME to another folder",
        path.display()
    )]
    Open {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },

    #[error(
        "{} is not a hone database (SQLite said: file is not a database); move it aside or set HONE_HOME to another folder",
        path.display()
    )]
    NotADatabase { path: PathBuf },

    #[error(
        "database {} is locked by another process (waited {}); close the other hone process or try again",
        path.display(),
        fmt_wait(*waited)
    )]
    Locked { path: PathBuf, waited: Duration },

    #[error(
        "database {} has schema version {found}, but this hone only knows versions up to {known}; it was written by a newer hone, so upgrade hone (the file was left unchanged)",
        path.display()
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },

    #[error(
        "could not upgrade database {} to schema version {version}: {source}; the database was left at version {}. This is a bug in hone, please report it with this message",
        path.display(),
        version - 1
    )]
    Migration {
        path: PathBuf,
        version: i64,
        #[source]
        source: rusqlite::Error,
    },

    #[error(
        "database {} is damaged ({detail}); restore it from a backup, or move it aside to start a fresh memory",
        path.display()
    )]
    Corrupt { path: PathBuf, detail: String },

    #[error(
        "cannot write to database {}: the disk is full; free some space and try again",
        path.display()
    )]
    DiskFull { path: PathBuf },
    #[error(
        "cannot read or write database {}: the system refused ({detail}), as on a full disk, over a file-size limit or quota, or on a failing disk; the last transaction was not committed; free some space and try again",
        path.display()
    )]
    SystemIo { path: PathBuf, detail: String },

    #[error(
        "database {} is read-only; make it writable for you (chmod u+w) or set HONE_HOME to another folder",
        path.display()
    )]
    ReadOnly { path: PathBuf },

    #[error("{what} is empty (only whitespace); write some text to store as a note")]
    EmptyNote { what: String },

    #[error(
        "cannot read the size of {}: {source}; check that the folder is still there and readable",
        path.display()
    )]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "database error in {}: {source}; this is probably a bug in hone, please report it with this message",
        path.display()
    )]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
}

fn fmt_wait(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

/// Maps a rusqlite error to the matching [`StoreError`] for the database at
/// `path`.
fn classify(path: &Path, waited: Duration, e: rusqlite::Error) -> StoreError {
    let path = path.to_path_buf();
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => StoreError::NotADatabase { path },
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            StoreError::Locked { path, waited }
        }
        Some(ErrorCode::DatabaseCorrupt) => StoreError::Corrupt {
            path,
            detail: format!("SQLite said: {e}"),
        },
        Some(ErrorCode::DiskFull) => StoreError::DiskFull { path },
        // The system refused a read or write (EFBIG from a file-size limit, EIO, a quota).
        Some(ErrorCode::SystemIoFailure) => StoreError::SystemIo {
            path,
            detail: e.to_string(),
        },
        Some(ErrorCode::ReadOnly) => StoreError::ReadOnly { path },
        Some(ErrorCode::CannotOpen | ErrorCode::PermissionDenied) => StoreError::Open {
            path,
            source: Box::new(e),
        },
        _ => StoreError::Sqlite { path, source: e },
    }
}

/// The current time as RFC 3339 UTC with milliseconds, e.g.
/// `2025-01-31T12:00:00.123Z`: the format of every `*_at` column.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// One question and its answer, to be recorded. `created_at` is stamped by
/// [`Store::record_exchange`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NewExchange {
    pub session_id: Option<String>,
    /// `"ask"` or `"chat"`.
    pub kind: String,
    pub prompt: String,
    pub answer: String,
    pub model: String,
    /// Adapter version used, or `None` for the base model.
    pub adapter: Option<String>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub load_ms: Option<f64>,
    pub prompt_ms: Option<f64>,
    pub generate_ms: Option<f64>,
    pub stop_reason: Option<String>,
    /// Sampling settings as JSON.
    pub sampling: Option<String>,
}

/// A recorded exchange, as read back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exchange {
    pub id: i64,
    /// RFC 3339 UTC.
    pub created_at: String,
    pub session_id: Option<String>,
    pub kind: String,
    pub prompt: String,
    pub answer: String,
    pub model: String,
    pub adapter: Option<String>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub load_ms: Option<f64>,
    pub prompt_ms: Option<f64>,
    pub generate_ms: Option<f64>,
    pub stop_reason: Option<String>,
    pub sampling: Option<String>,
}

/// A note to be added (produced by `crate::notes` or built from CLI input).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NewNote {
    pub content: String,
    /// A file path, `"cli"` or `"chat"`.
    pub source: Option<String>,
    /// Heading or `"part 2/5"`; `None` for a whole note.
    pub section: Option<String>,
}

/// A stored note.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Note {
    pub id: i64,
    pub created_at: String,
    pub updated_at: String,
    pub source: Option<String>,
    pub section: Option<String>,
    /// The text as stored (trailing whitespace removed).
    pub content: String,
    /// Hex SHA-256 of `content`.
    pub sha256: String,
    /// Length of `content` in bytes.
    pub bytes: u64,
    /// `None` until a learning cycle used the note.
    pub learned_at: Option<String>,
}

/// What [`Store::add_note`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoteAdded {
    /// A new note with this id.
    Added(i64),
    /// The same text was already stored under this id; nothing was written.
    Duplicate(i64),
}

impl NoteAdded {
    /// The id of the note, new or existing.
    pub fn id(self) -> i64 {
        match self {
            NoteAdded::Added(id) | NoteAdded::Duplicate(id) => id,
        }
    }
}

/// Where a recorded answer came from (schema v8; unknown for older exchanges).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExchangeSources {
    pub id: i64,
    pub kind: String,
    pub session_id: Option<String>,
    /// "notes", "adapter" or "base"; None for an exchange recorded before v8.
    pub answered_from: Option<String>,
    /// The notes in the prompt, which the answer cited.
    pub cited: Vec<i64>,
    /// The learned note the answer from the weights rests on.
    pub about: Option<i64>,
}

/// Feedback on one answer, to be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewFeedback<'a> {
    pub exchange_id: i64,
    /// "good" or "bad".
    pub rating: &'a str,
    /// The user's correction, when they gave one.
    pub correction: Option<&'a str>,
    /// The note the correction became.
    pub note_id: Option<i64>,
    /// The learned note put back in the learning queue.
    pub requeued_note: Option<i64>,
}

/// Feedback as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feedback {
    /// "good" or "bad".
    pub rating: String,
    pub correction: Option<String>,
    /// The note a correction became.
    pub note_id: Option<i64>,
}

/// A candidate note: something the user said about themselves, waiting to be kept or discarded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    pub id: i64,
    pub created_at: String,
    pub content: String,
    /// "chat" or "serve".
    pub source: String,
    pub session_id: Option<String>,
    pub exchange_id: Option<i64>,
    /// "pending", "kept" or "discarded".
    pub status: String,
    /// The note it became, when kept.
    pub note_id: Option<i64>,
}

const CANDIDATE_COLUMNS: &str =
    "id, created_at, content, source, session_id, exchange_id, status, note_id";

fn candidate_from_row(r: &Row<'_>) -> rusqlite::Result<Candidate> {
    Ok(Candidate {
        id: r.get(0)?,
        created_at: r.get(1)?,
        content: r.get(2)?,
        source: r.get(3)?,
        session_id: r.get(4)?,
        exchange_id: r.get(5)?,
        status: r.get(6)?,
        note_id: r.get(7)?,
    })
}

/// A model the user registered by path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredModel {
    pub name: String,
    pub path: String,
    pub architecture: String,
    pub sha256: Option<String>,
    pub bytes: u64,
    /// RFC 3339 UTC, see [`now_rfc3339`].
    pub registered_at: String,
}

/// Counts and sizes, for `hone status`-like output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub notes: u64,
    pub exchanges: u64,
    pub models: u64,
    /// Size of the database file plus its `-wal` file.
    pub db_bytes: u64,
    pub schema_version: i64,
}

/// The open database. One per process is enough; it is `Send` but not `Sync`.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
    busy_timeout: Duration,
}

const EXCHANGE_COLUMNS: &str = "id, created_at, session_id, kind, prompt, answer, model, adapter, \
     prompt_tokens, completion_tokens, load_ms, prompt_ms, generate_ms, stop_reason, sampling";

const NOTE_COLUMNS: &str =
    "id, created_at, updated_at, source, section, content, sha256, bytes, learned_at";

const MODEL_COLUMNS: &str = "name, path, architecture, sha256, bytes, registered_at";

impl Store {
    /// Opens (creating if needed) the database at `path`, waiting up to
    /// [`DEFAULT_BUSY_TIMEOUT`] for other processes' locks.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_with_timeout(path, DEFAULT_BUSY_TIMEOUT)
    }

    /// Like [`Store::open`], with the lock wait given (for every later
    /// operation too).
    pub fn open_with_timeout(path: &Path, busy_timeout: Duration) -> Result<Store, StoreError> {
        create_private_file(path)?;
        let err = |e| classify(path, busy_timeout, e);

        // No CREATE flag (the file exists now) and no URI flag (a path is a path).
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = Connection::open_with_flags(path, flags).map_err(err)?;
        conn.busy_timeout(busy_timeout).map_err(err)?;

        // Read-only checks first, so that a foreign or too-new file is never
        // written to (not even its journal mode).
        let found = user_version(&conn).map_err(err)?;
        check_version(path, found)?;

        // WAL lets readers and one writer work at once. (On file systems
        // without shared memory SQLite keeps its old mode; that still works.)
        let _mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(err)?;
        // What the user deletes (a note, its self-edits) is overwritten, not left in free pages.
        conn.pragma_update(None, "secure_delete", "ON")
            .map_err(err)?;

        migrate(&mut conn, path, busy_timeout)?;

        Ok(Store {
            conn,
            path: path.to_path_buf(),
            busy_timeout,
        })
    }

    /// Opens the database of the data directory `home`, creating both when missing. With
    /// `reading` (a command that only reads) an existing database that cannot be opened for
    /// writing (a read-only mount, another owner's folder) is opened read-only instead; the
    /// first error is reported when that fails too.
    pub fn open_home(home: &crate::home::Home, reading: bool) -> Result<Store, StoreError> {
        let opened = || -> Result<Store, StoreError> {
            home.ensure()?;
            Store::open(&home.db_path())
        };
        let first = match opened() {
            Ok(store) => return Ok(store),
            Err(e) => e,
        };
        if !reading || !home.db_path().is_file() {
            return Err(first);
        }
        Store::open_read_only(&home.db_path()).map_err(|_| first)
    }

    /// Opens an existing database for reading only (a read-only data directory or file):
    /// nothing is created, migrated or written. When SQLite cannot open the WAL database
    /// read-only (its shared-memory file cannot be made in a read-only folder), the file is
    /// opened as immutable: what is in the main file is read, as it is.
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        let busy_timeout = DEFAULT_BUSY_TIMEOUT;
        let err = |e| classify(path, busy_timeout, e);
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let open_plain = || -> rusqlite::Result<(Connection, i64)> {
            let conn = Connection::open_with_flags(path, flags)?;
            conn.busy_timeout(busy_timeout)?;
            let v = user_version(&conn)?;
            // Reading a table proves the WAL index could be opened too.
            conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))?;
            Ok((conn, v))
        };
        let (conn, found) = match open_plain() {
            Ok(x) => x,
            Err(_) => {
                let mut uri = String::from("file:");
                for c in path.to_string_lossy().chars() {
                    match c {
                        '?' => uri.push_str("%3f"),
                        '#' => uri.push_str("%23"),
                        '%' => uri.push_str("%25"),
                        c => uri.push(c),
                    }
                }
                uri.push_str("?immutable=1");
                let conn = Connection::open_with_flags(&uri, flags | OpenFlags::SQLITE_OPEN_URI)
                    .map_err(err)?;
                let v = user_version(&conn).map_err(err)?;
                (conn, v)
            }
        };
        check_version(path, found)?;
        if found < SCHEMA_VERSION {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: format!(
                    "it has schema version {found} and can only be read, not updated to version {SCHEMA_VERSION}; run hone once where the data directory can be written"
                ),
            });
        }
        Ok(Store {
            conn,
            path: path.to_path_buf(),
            busy_timeout,
        })
    }

    /// The database file's path.
    /// The connection, for modules that own their tables' SQL (e.g. `learn::records`).
    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    pub(crate) fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version of the open database (equal to [`SCHEMA_VERSION`]
    /// once opened).
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        user_version(&self.conn).map_err(|e| self.err(e))
    }

    fn err(&self, e: rusqlite::Error) -> StoreError {
        classify(&self.path, self.busy_timeout, e)
    }

    // ----- exchanges -----

    /// Records one exchange, stamped with the current time; returns its id.
    pub fn record_exchange(&self, e: &NewExchange) -> Result<i64, StoreError> {
        self.conn
            .execute(
                "INSERT INTO exchanges (created_at, session_id, kind, prompt, answer, model, \
                 adapter, prompt_tokens, completion_tokens, load_ms, prompt_ms, generate_ms, \
                 stop_reason, sampling) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                rusqlite::params![
                    now_rfc3339(),
                    e.session_id,
                    e.kind,
                    e.prompt,
                    e.answer,
                    e.model,
                    e.adapter,
                    e.prompt_tokens,
                    e.completion_tokens,
                    e.load_ms,
                    e.prompt_ms,
                    e.generate_ms,
                    e.stop_reason,
                    e.sampling,
                ],
            )
            .map_err(|e| self.err(e))?;
        Ok(self.conn.last_insert_rowid())
    }

    /// The `limit` most recent exchanges, newest first.
    pub fn recent_exchanges(&self, limit: usize) -> Result<Vec<Exchange>, StoreError> {
        let sql = format!("SELECT {EXCHANGE_COLUMNS} FROM exchanges ORDER BY id DESC LIMIT ?1");
        self.query_all(&sql, [sql_limit(Some(limit))], exchange_from_row)
    }

    /// Records where answer `id` came from: `answered_from` ("notes": the `cited` notes were in
    /// the prompt; "adapter": the weights, `about` the learned note it rests on; "base").
    pub fn set_exchange_sources(
        &self,
        id: i64,
        answered_from: &str,
        cited: &[i64],
        about: Option<i64>,
    ) -> Result<(), StoreError> {
        let cited = serde_json::to_string(cited).unwrap_or_else(|_| "[]".into());
        self.conn
            .execute(
                "UPDATE exchanges SET answered_from = ?2, cited_notes = ?3, about_note = ?4 WHERE id = ?1",
                rusqlite::params![id, answered_from, cited, about],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Where answer `id` came from (see [`Store::set_exchange_sources`]); None when there is no
    /// such exchange.
    pub fn exchange_sources(&self, id: i64) -> Result<Option<ExchangeSources>, StoreError> {
        self.conn
            .query_row(
                "SELECT id, kind, session_id, answered_from, cited_notes, about_note \
                 FROM exchanges WHERE id = ?1",
                [id],
                |r| {
                    let cited: Option<String> = r.get(4)?;
                    Ok(ExchangeSources {
                        id: r.get(0)?,
                        kind: r.get(1)?,
                        session_id: r.get(2)?,
                        answered_from: r.get(3)?,
                        cited: cited
                            .and_then(|c| serde_json::from_str(&c).ok())
                            .unwrap_or_default(),
                        about: r.get(5)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Stores feedback on exchange `exchange_id`; returns its id.
    pub fn add_feedback(&self, f: &NewFeedback<'_>) -> Result<i64, StoreError> {
        self.conn
            .execute(
                "INSERT INTO feedback (exchange_id, created_at, rating, correction, note_id, requeued_note) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                rusqlite::params![
                    f.exchange_id,
                    now_rfc3339(),
                    f.rating,
                    f.correction,
                    f.note_id,
                    f.requeued_note
                ],
            )
            .map_err(|e| self.err(e))?;
        Ok(self.conn.last_insert_rowid())
    }

    /// The feedback given on exchange `exchange_id`, oldest first.
    pub fn feedback_on(&self, exchange_id: i64) -> Result<Vec<Feedback>, StoreError> {
        self.query_all(
            "SELECT rating, correction, note_id FROM feedback WHERE exchange_id = ?1 ORDER BY id",
            [exchange_id],
            |r| {
                Ok(Feedback {
                    rating: r.get(0)?,
                    correction: r.get(1)?,
                    note_id: r.get(2)?,
                })
            },
        )
    }

    // ----- candidate notes -----

    /// Stores a pending candidate note; a pending candidate with the same text is not stored
    /// twice (its id is returned).
    pub fn add_candidate(
        &self,
        content: &str,
        source: &str,
        session: Option<&str>,
        exchange: Option<i64>,
    ) -> Result<i64, StoreError> {
        let found: Option<i64> = self
            .conn
            .query_row(
                "SELECT id FROM note_candidates WHERE status = 'pending' AND content = ?1",
                [content],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        if let Some(id) = found {
            return Ok(id);
        }
        self.conn
            .execute(
                "INSERT INTO note_candidates (created_at, content, source, session_id, exchange_id) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![now_rfc3339(), content, source, session, exchange],
            )
            .map_err(|e| self.err(e))?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Candidate notes with `status` ("pending", "kept", "discarded"), newest first.
    pub fn candidates(
        &self,
        status: &str,
        limit: Option<usize>,
    ) -> Result<Vec<Candidate>, StoreError> {
        self.query_all(
            &format!("SELECT {CANDIDATE_COLUMNS} FROM note_candidates WHERE status = ?1 ORDER BY id DESC LIMIT ?2"),
            rusqlite::params![status, sql_limit(limit)],
            candidate_from_row,
        )
    }

    /// The candidate with this id, if any.
    pub fn candidate(&self, id: i64) -> Result<Option<Candidate>, StoreError> {
        self.conn
            .query_row(
                &format!("SELECT {CANDIDATE_COLUMNS} FROM note_candidates WHERE id = ?1"),
                [id],
                candidate_from_row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Keeps a pending candidate as a note (source: where it was said), in one transaction;
    /// None when there is no pending candidate `id`.
    pub fn keep_candidate(&self, id: i64) -> Result<Option<NoteAdded>, StoreError> {
        let run = || -> rusqlite::Result<Option<NoteAdded>> {
            let tx =
                rusqlite::Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
            let c: Option<(String, String)> = tx
                .query_row(
                    "SELECT content, source FROM note_candidates WHERE id = ?1 AND status = 'pending'",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((content, source)) = c else {
                return Ok(None);
            };
            let added = insert_note(&tx, content.trim_end(), Some(&source), None)?;
            tx.execute(
                "UPDATE note_candidates SET status = 'kept', note_id = ?2, decided_at = ?3 WHERE id = ?1",
                rusqlite::params![id, added.id(), now_rfc3339()],
            )?;
            tx.commit()?;
            Ok(Some(added))
        };
        run().map_err(|e| self.err(e))
    }

    /// Discards a pending candidate; false when there is no pending candidate `id`.
    pub fn discard_candidate(&self, id: i64) -> Result<bool, StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE note_candidates SET status = 'discarded', decided_at = ?2 \
                 WHERE id = ?1 AND status = 'pending'",
                rusqlite::params![id, now_rfc3339()],
            )
            .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }

    // ----- notes -----

    /// Adds one note. The text is stored without its trailing whitespace and
    /// deduplicated by the SHA-256 of that text.
    pub fn add_note(
        &self,
        content: &str,
        source: Option<&str>,
        section: Option<&str>,
    ) -> Result<NoteAdded, StoreError> {
        let content = content.trim_end();
        if content.trim_start().is_empty() {
            return Err(StoreError::EmptyNote {
                what: "the note".to_string(),
            });
        }
        insert_note(&self.conn, content, source, section).map_err(|e| self.err(e))
    }

    /// Adds many notes in one transaction: either all are stored (or found to
    /// be duplicates) or, on any error, none is.
    pub fn add_notes(&mut self, items: &[NewNote]) -> Result<Vec<NoteAdded>, StoreError> {
        let (path, timeout) = (self.path.clone(), self.busy_timeout);
        let err = |e| classify(&path, timeout, e);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let content = item.content.trim_end();
            if content.trim_start().is_empty() {
                // Dropping `tx` rolls everything back.
                return Err(StoreError::EmptyNote {
                    what: describe_item(i, items.len(), item),
                });
            }
            let added = insert_note(
                &tx,
                content,
                item.source.as_deref(),
                item.section.as_deref(),
            )
            .map_err(err)?;
            out.push(added);
        }
        tx.commit().map_err(err)?;
        Ok(out)
    }

    /// Notes, newest first; all of them if `limit` is `None`.
    pub fn list_notes(&self, limit: Option<usize>) -> Result<Vec<Note>, StoreError> {
        let sql = format!("SELECT {NOTE_COLUMNS} FROM notes ORDER BY id DESC LIMIT ?1");
        self.query_all(&sql, [sql_limit(limit)], note_from_row)
    }

    /// `limit` notes, newest first, after skipping the `offset` newest.
    pub fn list_notes_page(&self, limit: usize, offset: usize) -> Result<Vec<Note>, StoreError> {
        let sql = format!("SELECT {NOTE_COLUMNS} FROM notes ORDER BY id DESC LIMIT ?1 OFFSET ?2");
        self.query_all(
            &sql,
            [sql_limit(Some(limit)), sql_limit(Some(offset))],
            note_from_row,
        )
    }

    /// The note with this id, if any.
    pub fn get_note(&self, id: i64) -> Result<Option<Note>, StoreError> {
        let sql = format!("SELECT {NOTE_COLUMNS} FROM notes WHERE id = ?1");
        self.conn
            .query_row(&sql, [id], note_from_row)
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Deletes a note; `false` if there was none with this id. A note that a cycle already
    /// learned into an active line of adapters is recorded in `forgotten_notes` in the same
    /// transaction (one row per model), so that answers resting on it are held back and the next
    /// cycle rebuilds the adapter without it (`crate::forget`).
    pub fn remove_note(&self, id: i64) -> Result<bool, StoreError> {
        self.remove_note_because(id, "removed")
    }

    /// [`Store::remove_note`] with the reason recorded (`removed`, `edited`, `corrected`).
    pub fn remove_note_because(&self, id: i64, reason: &str) -> Result<bool, StoreError> {
        let run = || -> rusqlite::Result<usize> {
            let tx =
                rusqlite::Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
            let n = delete_note(&tx, id, reason)?;
            tx.commit()?;
            Ok(n)
        };
        let n = run().map_err(|e| self.err(e))?;
        Ok(n > 0)
    }

    /// Replaces note `old` with `content` (`hone note edit`, a correction): in one transaction
    /// the new text is stored as a new note that `supersedes` the old one (queued for learning
    /// as every new note), and the old one is removed as [`Store::remove_note_because`] removes
    /// it with `reason`, so what was learned from it is forgotten. None when there is no note
    /// `old` (nothing changed). When another note already holds the same text, that note is
    /// kept (`Duplicate`) and the old one is still removed; the same text as `old` itself
    /// changes nothing and returns `Duplicate(old)`.
    pub fn supersede_note(
        &self,
        old: i64,
        content: &str,
        source: Option<&str>,
        reason: &str,
    ) -> Result<Option<NoteAdded>, StoreError> {
        let content = content.trim_end();
        if content.trim_start().is_empty() {
            return Err(StoreError::EmptyNote {
                what: "the new text".to_string(),
            });
        }
        let run = || -> rusqlite::Result<Option<NoteAdded>> {
            let tx =
                rusqlite::Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
            let section: Option<Option<String>> = tx
                .query_row("SELECT section FROM notes WHERE id = ?1", [old], |r| {
                    r.get(0)
                })
                .optional()?;
            let Some(section) = section else {
                return Ok(None);
            };
            let added = insert_note(&tx, content, source, section.as_deref())?;
            match added {
                NoteAdded::Duplicate(id) if id == old => return Ok(Some(added)),
                NoteAdded::Added(id) => {
                    tx.execute("UPDATE notes SET supersedes = ?2 WHERE id = ?1", [id, old])?;
                }
                NoteAdded::Duplicate(_) => {}
            }
            delete_note(&tx, old, reason)?;
            tx.commit()?;
            Ok(Some(added))
        };
        run().map_err(|e| self.err(e))
    }

    /// The note that note `id` superseded (its text replaced that note's), if any.
    pub fn superseded_by(&self, id: i64) -> Result<Option<i64>, StoreError> {
        self.conn
            .query_row("SELECT supersedes FROM notes WHERE id = ?1", [id], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .optional()
            .map(Option::flatten)
            .map_err(|e| self.err(e))
    }

    /// Puts a learned note back in the learning queue (a `/bad` on an answer from its learned
    /// knowledge): not learned, no failed attempts. False when there is no such note.
    pub fn requeue_note(&self, id: i64) -> Result<bool, StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE notes SET learned_at = NULL, learn_attempts = 0, updated_at = ?2 WHERE id = ?1",
                rusqlite::params![id, now_rfc3339()],
            )
            .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }

    /// The ids of the notes imported from `source` (a path as `hone note import` named it).
    pub fn note_ids_from_source(&self, source: &str) -> Result<Vec<i64>, StoreError> {
        self.query_all(
            "SELECT id FROM notes WHERE source = ?1 ORDER BY id",
            [source],
            |r| r.get(0),
        )
    }

    /// Whether a note holds exactly this text (without trailing whitespace).
    pub fn has_note_text(&self, content: &str) -> Result<bool, StoreError> {
        let sha = crate::digest::sha256_hex(content.trim_end().as_bytes());
        self.conn
            .query_row("SELECT 1 FROM notes WHERE sha256 = ?1", [sha], |_| Ok(()))
            .optional()
            .map(|r| r.is_some())
            .map_err(|e| self.err(e))
    }

    /// How many notes are stored.
    pub fn count_notes(&self) -> Result<u64, StoreError> {
        self.count("notes")
    }

    // ----- models -----

    /// Registers a model, replacing any with the same name.
    pub fn register_model(&self, m: &RegisteredModel) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO models \
                 (name, path, architecture, sha256, bytes, registered_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                rusqlite::params![
                    m.name,
                    m.path,
                    m.architecture,
                    m.sha256,
                    m.bytes,
                    m.registered_at
                ],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The registered model with this name, if any.
    pub fn registered_model(&self, name: &str) -> Result<Option<RegisteredModel>, StoreError> {
        let sql = format!("SELECT {MODEL_COLUMNS} FROM models WHERE name = ?1");
        self.conn
            .query_row(&sql, [name], model_from_row)
            .optional()
            .map_err(|e| self.err(e))
    }

    /// All registered models, by name.
    pub fn registered_models(&self) -> Result<Vec<RegisteredModel>, StoreError> {
        let sql = format!("SELECT {MODEL_COLUMNS} FROM models ORDER BY name");
        self.query_all(&sql, [], model_from_row)
    }

    /// Forgets a registered model (the file is not touched); `false` if there
    /// was none with this name.
    pub fn unregister_model(&self, name: &str) -> Result<bool, StoreError> {
        let n = self
            .conn
            .execute("DELETE FROM models WHERE name = ?1", [name])
            .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }

    // ----- settings -----

    /// The value of a setting, if set.
    pub fn get_setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Sets (or replaces) a setting.
    pub fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO settings (key, value) VALUES (?1, ?2) \
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [key, value],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    // ----- maintenance -----

    /// Counts and sizes.
    pub fn stats(&self) -> Result<Stats, StoreError> {
        Ok(Stats {
            notes: self.count("notes")?,
            exchanges: self.count("exchanges")?,
            models: self.count("models")?,
            db_bytes: file_len(&self.path)? + file_len(&wal_path(&self.path))?,
            schema_version: self.schema_version()?,
        })
    }

    /// The result of `PRAGMA integrity_check`: `"ok"` for a healthy
    /// database, otherwise SQLite's findings, one per line.
    pub fn integrity_check(&self) -> Result<String, StoreError> {
        let rows: Vec<String> =
            self.query_all("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))?;
        Ok(rows.join("\n"))
    }

    fn count(&self, table: &'static str) -> Result<u64, StoreError> {
        self.conn
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    fn query_all<T, P, F>(&self, sql: &str, params: P, f: F) -> Result<Vec<T>, StoreError>
    where
        P: rusqlite::Params,
        F: FnMut(&Row<'_>) -> rusqlite::Result<T>,
    {
        let run = || -> rusqlite::Result<Vec<T>> {
            let mut stmt = self.conn.prepare_cached(sql)?;
            let rows = stmt.query_map(params, f)?;
            rows.collect()
        };
        run().map_err(|e| self.err(e))
    }

    // ----- adapters and writer versions -----

    /// The version number the next adapter will get.
    pub fn next_adapter_version(&self) -> Result<i64, StoreError> {
        self.next_version(Versions::Adapters)
    }

    /// Records an adapter version (its file is already written); when `activate`, it becomes
    /// the active adapter of its model (one transaction).
    pub fn add_adapter(&mut self, a: &AdapterRecord, activate: bool) -> Result<i64, StoreError> {
        self.add_version(Versions::Adapters, a, activate)
    }

    /// Every adapter version, oldest first.
    pub fn adapters(&self) -> Result<Vec<AdapterRecord>, StoreError> {
        self.versions(Versions::Adapters)
    }

    pub fn adapter(&self, version: i64) -> Result<Option<AdapterRecord>, StoreError> {
        self.version(Versions::Adapters, version)
    }

    /// The active adapter of the model with this sha256, if any.
    pub fn active_adapter(&self, model_sha256: &str) -> Result<Option<AdapterRecord>, StoreError> {
        self.active_version(Versions::Adapters, model_sha256)
    }

    /// Makes `version` the active adapter of its model (None: the base model answers).
    pub fn set_active_adapter(
        &self,
        model_sha256: &str,
        version: Option<i64>,
    ) -> Result<(), StoreError> {
        self.set_active_version(Versions::Adapters, model_sha256, version)
    }

    /// The version number the next writer adapter will get.
    pub fn next_writer_version(&self) -> Result<i64, StoreError> {
        self.next_version(Versions::Writers)
    }

    /// Records a writer version (its file is already written); `activate`: it becomes the
    /// writer of its model.
    pub fn add_writer(&mut self, a: &AdapterRecord, activate: bool) -> Result<i64, StoreError> {
        self.add_version(Versions::Writers, a, activate)
    }

    /// Every writer version, oldest first.
    pub fn writers(&self) -> Result<Vec<AdapterRecord>, StoreError> {
        self.versions(Versions::Writers)
    }

    pub fn writer(&self, version: i64) -> Result<Option<AdapterRecord>, StoreError> {
        self.version(Versions::Writers, version)
    }

    /// The active writer of the model with this sha256, if any.
    pub fn active_writer(&self, model_sha256: &str) -> Result<Option<AdapterRecord>, StoreError> {
        self.active_version(Versions::Writers, model_sha256)
    }

    /// Makes `version` the writer of its model (None: the model writes without an adapter).
    pub fn set_active_writer(
        &self,
        model_sha256: &str,
        version: Option<i64>,
    ) -> Result<(), StoreError> {
        self.set_active_version(Versions::Writers, model_sha256, version)
    }

    fn next_version(&self, t: Versions) -> Result<i64, StoreError> {
        self.conn
            .query_row(
                &format!("SELECT COALESCE(MAX(version), 0) + 1 FROM {}", t.table()),
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))
    }

    fn add_version(
        &mut self,
        t: Versions,
        a: &AdapterRecord,
        activate: bool,
    ) -> Result<i64, StoreError> {
        let path = self.path.clone();
        let timeout = self.busy_timeout;
        let err = |e| classify(&path, timeout, e);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        if activate {
            tx.execute(
                &format!(
                    "UPDATE {} SET active = 0 WHERE model_sha256 = ?1",
                    t.table()
                ),
                [&a.model_sha256],
            )
            .map_err(err)?;
        }
        tx.execute(
            &format!(
                "INSERT INTO {} ({ADAPTER_COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
                t.table()
            ),
            rusqlite::params![
                a.version,
                a.parent,
                a.created_at,
                a.model,
                a.model_sha256,
                a.architecture,
                a.config,
                a.data,
                a.data_sha256,
                a.loss_curve,
                a.steps as i64,
                a.tokens as i64,
                a.seconds,
                a.params as i64,
                a.bytes as i64,
                a.file,
                activate as i64,
                a.sha256,
            ],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(a.version)
    }

    fn versions(&self, t: Versions) -> Result<Vec<AdapterRecord>, StoreError> {
        self.query_all(
            &format!(
                "SELECT {ADAPTER_COLUMNS} FROM {} ORDER BY version",
                t.table()
            ),
            [],
            adapter_from_row,
        )
    }

    fn version(&self, t: Versions, version: i64) -> Result<Option<AdapterRecord>, StoreError> {
        Ok(self
            .query_all(
                &format!(
                    "SELECT {ADAPTER_COLUMNS} FROM {} WHERE version = ?1",
                    t.table()
                ),
                [version],
                adapter_from_row,
            )?
            .pop())
    }

    fn active_version(
        &self,
        t: Versions,
        model_sha256: &str,
    ) -> Result<Option<AdapterRecord>, StoreError> {
        Ok(self
            .query_all(
                &format!(
                    "SELECT {ADAPTER_COLUMNS} FROM {} WHERE model_sha256 = ?1 AND active = 1 \
                     ORDER BY version DESC LIMIT 1",
                    t.table()
                ),
                [model_sha256],
                adapter_from_row,
            )?
            .pop())
    }

    fn set_active_version(
        &self,
        t: Versions,
        model_sha256: &str,
        version: Option<i64>,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                &format!(
                    "UPDATE {} SET active = (version IS ?2) WHERE model_sha256 = ?1",
                    t.table()
                ),
                rusqlite::params![model_sha256, version],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}

/// The two tables of LoRA versions: adapters that answer, and self-edit writers (which never
/// answer).
#[derive(Clone, Copy)]
enum Versions {
    Adapters,
    Writers,
}

impl Versions {
    fn table(self) -> &'static str {
        match self {
            Versions::Adapters => "adapters",
            Versions::Writers => "writer_versions",
        }
    }
}

/// Columns of the adapters table, in [`AdapterRecord`] order.
const ADAPTER_COLUMNS: &str = "version, parent, created_at, model, model_sha256, architecture, \
     config, data, data_sha256, loss_curve, steps, tokens, seconds, params, bytes, file, active, sha256";

/// One adapter version as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterRecord {
    pub version: i64,
    /// The version that was active when this one was trained (rollback goes back to it).
    pub parent: Option<i64>,
    pub created_at: String,
    pub model: String,
    pub model_sha256: String,
    pub architecture: String,
    /// The LoRA and training configuration as JSON.
    pub config: String,
    /// What it was trained on (a description) and that data's sha256.
    pub data: Option<String>,
    pub data_sha256: Option<String>,
    /// Loss per optimiser step as a JSON array.
    pub loss_curve: Option<String>,
    pub steps: u64,
    pub tokens: u64,
    pub seconds: Option<f64>,
    pub params: u64,
    pub bytes: u64,
    /// The weights file, relative to the data directory.
    pub file: String,
    pub active: bool,
    /// sha256 of the file as written (None for versions saved before schema v4).
    #[serde(default)]
    pub sha256: Option<String>,
}

fn adapter_from_row(r: &Row<'_>) -> rusqlite::Result<AdapterRecord> {
    Ok(AdapterRecord {
        version: r.get(0)?,
        parent: r.get(1)?,
        created_at: r.get(2)?,
        model: r.get(3)?,
        model_sha256: r.get(4)?,
        architecture: r.get(5)?,
        config: r.get(6)?,
        data: r.get(7)?,
        data_sha256: r.get(8)?,
        loss_curve: r.get(9)?,
        steps: r.get::<_, i64>(10)? as u64,
        tokens: r.get::<_, i64>(11)? as u64,
        seconds: r.get(12)?,
        params: r.get::<_, i64>(13)? as u64,
        bytes: r.get::<_, i64>(14)? as u64,
        file: r.get(15)?,
        active: r.get::<_, i64>(16)? != 0,
        sha256: r.get(17)?,
    })
}

/// Creates the database's folder (0700) and an empty file (0600) if they do
/// not exist yet, so SQLite never creates them with looser modes. Never
/// truncates or writes an existing file.
fn create_private_file(path: &Path) -> Result<(), StoreError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            let mut builder = fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::DirBuilderExt;
                builder.mode(0o700);
            }
            builder
                .create(parent)
                .map_err(|source| StoreError::CreateDir {
                    path: parent.to_path_buf(),
                    source,
                })?;
        }
    }
    let mut options = fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path).map_err(|source| StoreError::Open {
        path: path.to_path_buf(),
        source: Box::new(source),
    })?;
    Ok(())
}

fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
}

fn check_version(path: &Path, found: i64) -> Result<(), StoreError> {
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found,
            known: SCHEMA_VERSION,
        });
    }
    if found < 0 {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("its schema version is {found}, which no hone ever wrote"),
        });
    }
    Ok(())
}

/// Applies the pending migrations, each in its own write transaction. The
/// version is re-read inside the transaction, so two processes opening a new
/// database at once cannot both apply the same batch. Taking the write lock
/// even when nothing is pending also makes a database that another process
/// keeps locked fail here, at open, with [`StoreError::Locked`].
fn migrate(conn: &mut Connection, path: &Path, timeout: Duration) -> Result<(), StoreError> {
    let err = |e| classify(path, timeout, e);
    loop {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let found = user_version(&tx).map_err(err)?;
        check_version(path, found)?;
        let Some(batch) = usize::try_from(found).ok().and_then(|i| MIGRATIONS.get(i)) else {
            tx.commit().map_err(err)?;
            return Ok(());
        };
        let version = found + 1;
        let migration_err = |source| StoreError::Migration {
            path: path.to_path_buf(),
            version,
            source,
        };
        tx.execute_batch(batch)
            .map_err(|e| match classify(path, timeout, e) {
                StoreError::Sqlite { source, .. } => migration_err(source),
                other => other,
            })?;
        tx.pragma_update(None, "user_version", version)
            .map_err(err)?;
        tx.commit().map_err(err)?;
    }
}

fn insert_note(
    conn: &Connection,
    content: &str,
    source: Option<&str>,
    section: Option<&str>,
) -> rusqlite::Result<NoteAdded> {
    let sha = crate::digest::sha256_hex(content.as_bytes());
    let now = now_rfc3339();
    let inserted = conn.execute(
        "INSERT INTO notes (created_at, updated_at, source, section, content, sha256, bytes) \
         VALUES (?1, ?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT(sha256) DO NOTHING",
        rusqlite::params![now, source, section, content, sha, content.len() as u64],
    )?;
    if inserted > 0 {
        Ok(NoteAdded::Added(conn.last_insert_rowid()))
    } else {
        let id = conn.query_row("SELECT id FROM notes WHERE sha256 = ?1", [&sha], |r| {
            r.get(0)
        })?;
        Ok(NoteAdded::Duplicate(id))
    }
}

/// Deletes note `id` inside the caller's transaction, recording it in `forgotten_notes` first
/// when a cycle learned it into an activated adapter (one row per model), with `reason`.
fn delete_note(tx: &Connection, id: i64, reason: &str) -> rusqlite::Result<usize> {
    tx.execute(
        "INSERT OR IGNORE INTO forgotten_notes
             (note_id, model_sha256, first_cycle, removed_at, reason, content)
         SELECT n.id, c.model_sha256, MIN(c.id), ?2, ?3, n.content
         FROM notes n
         JOIN learn_items i ON i.note_id = n.id AND i.verdict = 'kept'
         JOIN learn_cycles c ON c.id = i.cycle AND c.activated = 1
         WHERE n.id = ?1
         GROUP BY c.model_sha256",
        rusqlite::params![id, now_rfc3339(), reason],
    )?;
    tx.execute("DELETE FROM notes WHERE id = ?1", [id])
}

fn describe_item(i: usize, n: usize, item: &NewNote) -> String {
    let mut s = format!("note {} of {n}", i + 1);
    match (&item.source, &item.section) {
        (Some(src), Some(sec)) => {
            let _ = write!(s, " (from {src}, section \"{sec}\")");
        }
        (Some(src), None) => {
            let _ = write!(s, " (from {src})");
        }
        (None, Some(sec)) => {
            let _ = write!(s, " (section \"{sec}\")");
        }
        (None, None) => {}
    }
    s
}

/// SQLite treats a negative LIMIT as "no limit".
fn sql_limit(limit: Option<usize>) -> i64 {
    limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX))
}

fn wal_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push("-wal");
    PathBuf::from(s)
}

fn file_len(path: &Path) -> Result<u64, StoreError> {
    match fs::metadata(path) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(source) => Err(StoreError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn exchange_from_row(r: &Row<'_>) -> rusqlite::Result<Exchange> {
    Ok(Exchange {
        id: r.get(0)?,
        created_at: r.get(1)?,
        session_id: r.get(2)?,
        kind: r.get(3)?,
        prompt: r.get(4)?,
        answer: r.get(5)?,
        model: r.get(6)?,
        adapter: r.get(7)?,
        prompt_tokens: r.get(8)?,
        completion_tokens: r.get(9)?,
        load_ms: r.get(10)?,
        prompt_ms: r.get(11)?,
        generate_ms: r.get(12)?,
        stop_reason: r.get(13)?,
        sampling: r.get(14)?,
    })
}

fn note_from_row(r: &Row<'_>) -> rusqlite::Result<Note> {
    Ok(Note {
        id: r.get(0)?,
        created_at: r.get(1)?,
        updated_at: r.get(2)?,
        source: r.get(3)?,
        section: r.get(4)?,
        content: r.get(5)?,
        sha256: r.get(6)?,
        bytes: r.get(7)?,
        learned_at: r.get(8)?,
    })
}

fn model_from_row(r: &Row<'_>) -> rusqlite::Result<RegisteredModel> {
    Ok(RegisteredModel {
        name: r.get(0)?,
        path: r.get(1)?,
        architecture: r.get(2)?,
        sha256: r.get(3)?,
        bytes: r.get(4)?,
        registered_at: r.get(5)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use std::time::Instant;

    fn db(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("home").join("hone.db")
    }

    fn sample_exchange(n: u64) -> NewExchange {
        NewExchange {
            session_id: Some("s1".into()),
            kind: "chat".into(),
            prompt: format!("question {n} é😀"),
            answer: format!("answer {n}"),
            model: "tiny".into(),
            adapter: if n.is_multiple_of(2) {
                Some("v3".into())
            } else {
                None
            },
            prompt_tokens: 10 + n,
            completion_tokens: 20 + n,
            load_ms: Some(1.5),
            prompt_ms: None,
            generate_ms: Some(123.25),
            stop_reason: Some("eos".into()),
            sampling: Some(r#"{"temperature":0.7}"#.into()),
        }
    }

    #[cfg(unix)]
    #[test]
    fn files_and_folder_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = db(&dir);
        let store = Store::open(&path).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        store.add_note("a secret", Some("cli"), None).unwrap();
        let wal = wal_path(&path);
        assert!(wal.exists(), "WAL mode should keep a -wal file while open");
        assert_eq!(mode(&wal), 0o600);
    }

    #[test]
    fn migrations_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = db(&dir);
        {
            let store = Store::open(&path).unwrap();
            assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
            store.set_setting("k", "v").unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(store.get_setting("k").unwrap().as_deref(), Some("v"));
        let mode: String = store
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let fk: i64 = store
            .conn
            .pragma_query_value(None, "foreign_keys", |r| r.get(0))
            .unwrap();
        assert_eq!(fk, 1);
    }

    #[test]
    fn random_bytes_are_not_a_database_and_stay_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hone.db");
        // xorshift: deterministic "random" bytes.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let bytes: Vec<u8> = (0..8192)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        fs::write(&path, &bytes).unwrap();
        let err = Store::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::NotADatabase { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("is not a hone database"), "{msg}");
        assert!(msg.contains("HONE_HOME"), "{msg}");
        assert_eq!(fs::read(&path).unwrap(), bytes);
        assert!(!wal_path(&path).exists());
    }

    #[test]
    fn newer_schema_is_too_new() {
        let dir = tempfile::tempdir().unwrap();
        let path = db(&dir);
        drop(Store::open(&path).unwrap());
        {
            let c = Connection::open(&path).unwrap();
            c.pragma_update(None, "user_version", 99).unwrap();
        }
        let err = Store::open(&path).unwrap_err();
        match &err {
            StoreError::TooNew { found, known, .. } => {
                assert_eq!(*found, 99);
                assert_eq!(*known, SCHEMA_VERSION);
            }
            other => panic!("expected TooNew, got {other:?}"),
        }
        assert!(err.to_string().contains("upgrade hone"));
    }

    #[test]
    fn exclusive_lock_held_elsewhere_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let path = db(&dir);
        drop(Store::open(&path).unwrap());
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let start = Instant::now();
        let err = Store::open_with_timeout(&path, Duration::from_millis(200)).unwrap_err();
        let waited = start.elapsed();
        assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
        assert!(
            waited >= Duration::from_millis(150),
            "gave up after {waited:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("is locked by another process (waited 0.2 s)"),
            "{msg}"
        );
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        other.execute_batch("COMMIT").unwrap();
        Store::open_with_timeout(&path, Duration::from_millis(200)).unwrap();
    }

    #[test]
    fn locked_fresh_rollback_database_is_locked() {
        // Another program holds an exclusive lock on a database not yet in WAL mode.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hone.db");
        let other = Connection::open(&path).unwrap();
        other
            .execute_batch("CREATE TABLE t(x); BEGIN EXCLUSIVE; INSERT INTO t VALUES (1);")
            .unwrap();
        let err = Store::open_with_timeout(&path, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
    }

    #[test]
    fn folder_in_the_way_is_an_open_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hone.db");
        fs::create_dir(&path).unwrap();
        let err = Store::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
        assert!(err.to_string().contains("HONE_HOME"));
    }

    #[test]
    fn duplicate_and_empty_notes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&db(&dir)).unwrap();
        let first = store.add_note("hello é\n", Some("cli"), None).unwrap();
        let NoteAdded::Added(id) = first else {
            panic!("expected Added, got {first:?}")
        };
        assert_eq!(
            store.add_note("hello é  \n\n", Some("chat"), None).unwrap(),
            NoteAdded::Duplicate(id)
        );
        assert!(matches!(
            store.add_note(" \n\t ", None, None),
            Err(StoreError::EmptyNote { .. })
        ));
        let note = store.get_note(id).unwrap().unwrap();
        assert_eq!(note.content, "hello é");
        assert_eq!(note.bytes, "hello é".len() as u64);
        assert_eq!(note.sha256, hex::encode(Sha256::digest("hello é")));
        assert_eq!(note.source.as_deref(), Some("cli"));
        assert_eq!(note.learned_at, None);
        assert_eq!(store.count_notes().unwrap(), 1);
    }

    #[test]
    fn add_notes_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&db(&dir)).unwrap();
        let note = |c: &str| NewNote {
            content: c.into(),
            source: Some("notes.md".into()),
            section: Some("Intro".into()),
        };
        let err = store
            .add_notes(&[note("one"), note("two"), note("   ")])
            .unwrap_err();
        assert!(matches!(err, StoreError::EmptyNote { .. }));
        assert!(
            err.to_string().contains("note 3 of 3 (from notes.md"),
            "{err}"
        );
        assert_eq!(store.count_notes().unwrap(), 0);

        let added = store
            .add_notes(&[note("one"), note("two"), note("one")])
            .unwrap();
        assert!(matches!(added[0], NoteAdded::Added(_)));
        assert!(matches!(added[1], NoteAdded::Added(_)));
        assert_eq!(added[2], NoteAdded::Duplicate(added[0].id()));
        assert_eq!(store.count_notes().unwrap(), 2);
    }

    #[test]
    fn list_get_remove_notes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&db(&dir)).unwrap();
        let a = store.add_note("a", None, None).unwrap().id();
        let b = store.add_note("b", Some("x.md"), Some("H")).unwrap().id();
        let all = store.list_notes(None).unwrap();
        assert_eq!(all.iter().map(|n| n.id).collect::<Vec<_>>(), vec![b, a]);
        assert_eq!(store.list_notes(Some(1)).unwrap().len(), 1);
        assert!(store.remove_note(a).unwrap());
        assert!(!store.remove_note(a).unwrap());
        assert!(store.get_note(a).unwrap().is_none());
        assert_eq!(store.count_notes().unwrap(), 1);
    }

    /// An edit supersedes: a new note linked to the old, the old removed in the same
    /// transaction and recorded as forgotten when a cycle had learned it.
    #[test]
    fn supersede_requeue_feedback_and_candidates() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&db(&dir)).unwrap();
        let old = store
            .add_note("The gym opens at 6.", Some("cli"), None)
            .unwrap()
            .id();
        // Learned by an activated cycle: its removal is recorded for forgetting.
        store
            .conn
            .execute_batch(&format!(
                "INSERT INTO learn_cycles (id, started_at, model, model_sha256, status, notes, options, activated)
                 VALUES (1, 'x', 'm', 'sha', 'done', '[]', '{{}}', 1);
                 INSERT INTO learn_items (cycle, note_id, note_sha256, strategy, generator, role, completion, verdict, created_at)
                 VALUES (1, {old}, 's', 'qa', 'rules', 'train', 'c', 'kept', 'x');
                 UPDATE notes SET learned_at = 'x', learn_attempts = 1 WHERE id = {old};"
            ))
            .unwrap();
        assert_eq!(
            store.supersede_note(999, "x", None, "edited").unwrap(),
            None
        );
        let same = store
            .supersede_note(old, "The gym opens at 6.  ", None, "edited")
            .unwrap();
        assert_eq!(same, Some(NoteAdded::Duplicate(old)), "unchanged text");
        assert!(store.get_note(old).unwrap().is_some());
        let new = store
            .supersede_note(old, "The gym opens at 7.", Some("cli"), "edited")
            .unwrap()
            .unwrap();
        let NoteAdded::Added(new) = new else {
            panic!("{new:?}")
        };
        assert!(store.get_note(old).unwrap().is_none());
        let n = store.get_note(new).unwrap().unwrap();
        assert!(n.learned_at.is_none(), "queued for learning");
        assert_eq!(store.superseded_by(new).unwrap(), Some(old));
        let (reason, content): (String, String) = store
            .conn
            .query_row(
                "SELECT reason, content FROM forgotten_notes WHERE note_id = ?1",
                [old],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(
            (reason.as_str(), content.as_str()),
            ("edited", "The gym opens at 6.")
        );
        assert!(matches!(
            store.supersede_note(new, "  ", None, "edited"),
            Err(StoreError::EmptyNote { .. })
        ));

        // Requeue: learned → back in the queue with no attempts.
        store
            .conn
            .execute(
                "UPDATE notes SET learned_at = 'x', learn_attempts = 2 WHERE id = ?1",
                [new],
            )
            .unwrap();
        assert!(store.requeue_note(new).unwrap());
        assert!(!store.requeue_note(12345).unwrap());
        let attempts: i64 = store
            .conn
            .query_row(
                "SELECT learn_attempts FROM notes WHERE id = ?1",
                [new],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(attempts, 0);
        assert!(store.get_note(new).unwrap().unwrap().learned_at.is_none());

        // An exchange's sources and feedback on it.
        let ex = store.record_exchange(&sample_exchange(1)).unwrap();
        assert_eq!(
            store.exchange_sources(ex).unwrap().unwrap().answered_from,
            None
        );
        store
            .set_exchange_sources(ex, "notes", &[new, 3], None)
            .unwrap();
        let src = store.exchange_sources(ex).unwrap().unwrap();
        assert_eq!(
            (src.answered_from.as_deref(), src.cited),
            (Some("notes"), vec![new, 3])
        );
        assert!(store.exchange_sources(ex + 100).unwrap().is_none());
        store
            .add_feedback(&NewFeedback {
                exchange_id: ex,
                rating: "bad",
                correction: Some("It opens at 8."),
                note_id: Some(new),
                requeued_note: None,
            })
            .unwrap();
        assert_eq!(
            store.feedback_on(ex).unwrap(),
            vec![Feedback {
                rating: "bad".to_string(),
                correction: Some("It opens at 8.".to_string()),
                note_id: Some(new)
            }]
        );
        assert!(store
            .add_feedback(&NewFeedback {
                exchange_id: ex,
                rating: "meh",
                correction: None,
                note_id: None,
                requeued_note: None,
            })
            .is_err());

        // Candidates: pending until kept or discarded, never twice the same pending text.
        let c = store
            .add_candidate("My daughter's name is Noor.", "chat", Some("s"), Some(ex))
            .unwrap();
        assert_eq!(
            store
                .add_candidate("My daughter's name is Noor.", "chat", None, None)
                .unwrap(),
            c
        );
        let d = store
            .add_candidate("I moved the meeting to Friday.", "serve", None, None)
            .unwrap();
        assert_eq!(store.candidates("pending", None).unwrap().len(), 2);
        assert_eq!(store.count_notes().unwrap(), 1, "nothing kept silently");
        let kept = store.keep_candidate(c).unwrap().unwrap();
        assert_eq!(
            store
                .get_note(kept.id())
                .unwrap()
                .unwrap()
                .source
                .as_deref(),
            Some("chat")
        );
        assert_eq!(store.keep_candidate(c).unwrap(), None, "kept once");
        assert!(store.discard_candidate(d).unwrap());
        assert!(!store.discard_candidate(d).unwrap());
        assert!(store.candidates("pending", None).unwrap().is_empty());
        let c = store.candidate(c).unwrap().unwrap();
        assert_eq!((c.status.as_str(), c.note_id), ("kept", Some(kept.id())));
    }

    #[test]
    fn exchanges_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&db(&dir)).unwrap();
        let e1 = sample_exchange(1);
        let e2 = sample_exchange(2);
        let id1 = store.record_exchange(&e1).unwrap();
        let id2 = store.record_exchange(&e2).unwrap();
        let got = store.recent_exchanges(10).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].id, id2);
        assert_eq!(got[1].id, id1);
        for (g, e) in got.iter().zip([&e2, &e1]) {
            let back = NewExchange {
                session_id: g.session_id.clone(),
                kind: g.kind.clone(),
                prompt: g.prompt.clone(),
                answer: g.answer.clone(),
                model: g.model.clone(),
                adapter: g.adapter.clone(),
                prompt_tokens: g.prompt_tokens,
                completion_tokens: g.completion_tokens,
                load_ms: g.load_ms,
                prompt_ms: g.prompt_ms,
                generate_ms: g.generate_ms,
                stop_reason: g.stop_reason.clone(),
                sampling: g.sampling.clone(),
            };
            assert_eq!(&back, e);
            assert!(chrono::DateTime::parse_from_rfc3339(&g.created_at).is_ok());
            assert!(g.created_at.ends_with('Z'));
        }
        assert_eq!(store.recent_exchanges(1).unwrap().len(), 1);
        assert!(store.recent_exchanges(0).unwrap().is_empty());
    }

    #[test]
    fn models_settings_stats_integrity() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&db(&dir)).unwrap();
        let mut m = RegisteredModel {
            name: "tiny".into(),
            path: "/models/tiny.gguf".into(),
            architecture: "llama".into(),
            sha256: None,
            bytes: 1234,
            registered_at: now_rfc3339(),
        };
        store.register_model(&m).unwrap();
        m.sha256 = Some("ab".repeat(32));
        store.register_model(&m).unwrap();
        assert_eq!(store.registered_model("tiny").unwrap(), Some(m.clone()));
        assert_eq!(store.registered_model("nope").unwrap(), None);
        assert_eq!(store.registered_models().unwrap(), vec![m]);

        assert_eq!(store.get_setting("adapter").unwrap(), None);
        store.set_setting("adapter", "v1").unwrap();
        store.set_setting("adapter", "v2").unwrap();
        assert_eq!(store.get_setting("adapter").unwrap().as_deref(), Some("v2"));

        store.add_note("n", None, None).unwrap();
        store.record_exchange(&sample_exchange(1)).unwrap();
        let s = store.stats().unwrap();
        assert_eq!((s.notes, s.exchanges, s.models), (1, 1, 1));
        assert_eq!(s.schema_version, SCHEMA_VERSION);
        assert!(s.db_bytes > 0);
        assert_eq!(store.integrity_check().unwrap(), "ok");
        assert!(store.unregister_model("tiny").unwrap());
        assert!(store.registered_models().unwrap().is_empty());
    }
}
