//! What the data directory holds, as the reading commands show it: `hone status` (the model,
//! its active adapter, the database, counts and sizes: [`Overview`]), `hone models` (known,
//! pulled and registered models: [`models_table`]) and `hone history` (recent exchanges:
//! [`history_text`]), gathered from the store, the registry and the adapters and rendered as
//! the text and JSON the command line prints.
//!
//! It must not change anything (these commands work on a read-only data directory), load a
//! model, or print: it returns text and JSON values for the caller to print.

use crate::home::Home;
use crate::registry;
use crate::store::{Exchange, Stats, Store, StoreError};
use crate::sys::human_bytes;
use serde_json::{json, Value};
use std::fmt::{self, Write as _};
use std::path::PathBuf;

/// `hone status`: the data directory, the model a command would use, its active adapter, and
/// the database's counts and sizes.
#[derive(Debug, Clone)]
pub struct Overview {
    pub home: PathBuf,
    pub database: PathBuf,
    pub stats: Stats,
    pub model_name: Option<String>,
    pub model_path: Option<String>,
    pub model_bytes: Option<u64>,
    /// Why no model is usable, when none is.
    pub model_error: Option<String>,
    /// The active adapter version of the model, if any (the same lookup `ask` does).
    pub adapter: Option<i64>,
}

impl Overview {
    /// Gathers the overview of `home` for the model `requested` (else the default model).
    pub fn gather(
        home: &Home,
        store: &Store,
        requested: Option<&str>,
    ) -> Result<Overview, StoreError> {
        let stats = store.stats()?;
        let model = registry::resolve(home, store, requested).map_err(anyhow::Error::from);
        let (model_name, model_path, model_bytes, model_error) = match &model {
            Ok(c) => (
                Some(c.name.clone()),
                Some(c.path.display().to_string()),
                std::fs::metadata(&c.path).ok().map(|m| m.len()),
                None,
            ),
            Err(e) => (None, None, None, Some(format!("{e:#}"))),
        };
        let adapter = model
            .as_ref()
            .ok()
            .and_then(|c| crate::adapters::active_version_of(store, c));
        Ok(Overview {
            home: home.root().to_path_buf(),
            database: home.db_path(),
            stats,
            model_name,
            model_path,
            model_bytes,
            model_error,
            adapter,
        })
    }

    /// `hone status --json`.
    pub fn to_json(&self) -> Value {
        let s = &self.stats;
        json!({
            "version": crate::VERSION,
            "home": self.home,
            "model": self.model_name, "model_path": self.model_path,
            "model_bytes": self.model_bytes, "model_error": self.model_error,
            "adapter": self.adapter,
            "database": self.database, "db_bytes": s.db_bytes,
            "schema_version": s.schema_version,
            "notes": s.notes, "exchanges": s.exchanges, "registered_models": s.models,
        })
    }
}

impl fmt::Display for Overview {
    /// `hone status`'s lines, each ending in a newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "hone {}", crate::VERSION)?;
        writeln!(f, "data directory  {}", self.home.display())?;
        match (&self.model_name, &self.model_error) {
            (Some(n), _) => writeln!(
                f,
                "model           {n} ({}, {})",
                self.model_path.clone().unwrap_or_default(),
                human_bytes(self.model_bytes.unwrap_or(0))
            )?,
            (None, Some(e)) => writeln!(f, "model           none usable: {e}")?,
            _ => {}
        }
        match self.adapter {
            Some(v) => writeln!(
                f,
                "adapter         v{v} (active; `hone ask --base` answers without it)"
            )?,
            None => writeln!(f, "adapter         none (the base model answers)")?,
        }
        writeln!(
            f,
            "database        {} ({}, schema v{})",
            self.database.display(),
            human_bytes(self.stats.db_bytes),
            self.stats.schema_version
        )?;
        writeln!(f, "notes           {}", self.stats.notes)?;
        writeln!(f, "exchanges       {}", self.stats.exchanges)
    }
}

/// `hone models`: the known models (pulled or not) and the registered ones, one line each, the
/// one a command would use (`current`) marked as the default.
pub fn models_table(home: &Home, store: &Store, current: Option<&str>) -> anyhow::Result<String> {
    let mut out = format!("{:<30} {:>9}  {:<8} ABOUT\n", "NAME", "SIZE", "STATE");
    let mark = |name: &str| {
        if current == Some(name) {
            " (default)"
        } else {
            ""
        }
    };
    for m in crate::manifest::all()? {
        let state = if crate::pull::is_pulled(home, &m) {
            "pulled"
        } else {
            "-"
        };
        let size = human_bytes(m.bytes);
        let (name, about) = (&m.name, &m.description);
        let _ = writeln!(
            out,
            "{name:<30} {size:>9}  {state:<8} {about}{}",
            mark(name)
        );
    }
    for r in store.registered_models()? {
        let size = human_bytes(r.bytes);
        let (name, path) = (&r.name, &r.path);
        let _ = writeln!(
            out,
            "{name:<30} {size:>9}  {:<8} {path}{}",
            "file",
            mark(name)
        );
    }
    Ok(out)
}

/// `hone history`: the exchanges newest first, one JSON object per line with `json`, else two
/// lines of prompt and answer (whitespace folded, cut to 100 and 200 characters) under a
/// header line each, or a hint when there are none.
pub fn history_text(exchanges: &[Exchange], json: bool) -> String {
    let mut out = String::new();
    if json {
        for e in exchanges {
            let _ = writeln!(
                out,
                "{}",
                json!({"id": e.id, "created_at": e.created_at, "kind": e.kind, "model": e.model,
                       "adapter": e.adapter, "prompt": e.prompt, "answer": e.answer,
                       "prompt_tokens": e.prompt_tokens, "completion_tokens": e.completion_tokens})
            );
        }
        return out;
    }
    if exchanges.is_empty() {
        out.push_str("no exchanges yet: try `hone ask \"...\"` or `hone chat`\n");
    }
    let short = |s: &str, n: usize| -> String {
        let one = s.split_whitespace().collect::<Vec<_>>().join(" ");
        if one.chars().count() > n {
            format!("{}…", one.chars().take(n).collect::<String>())
        } else {
            one
        }
    };
    for e in exchanges {
        let _ = writeln!(
            out,
            "#{} {} {} {} ({}+{} tokens)\n  > {}\n  < {}",
            e.id,
            &e.created_at[..e.created_at.len().min(19)],
            e.kind,
            e.model,
            e.prompt_tokens,
            e.completion_tokens,
            short(&e.prompt, 100),
            short(&e.answer, 200)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_data_directory_says_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path().to_path_buf());
        let store = Store::open_home(&home, false).unwrap();
        let o = Overview::gather(&home, &store, Some("no-such-model")).unwrap();
        assert!(o.model_name.is_none() && o.model_error.is_some());
        let text = o.to_string();
        assert!(text.contains("model           none usable: "), "{text}");
        assert!(
            text.ends_with("notes           0\nexchanges       0\n"),
            "{text}"
        );
        assert_eq!(o.to_json()["notes"], 0);
        assert_eq!(
            history_text(&[], false),
            "no exchanges yet: try `hone ask \"...\"` or `hone chat`\n"
        );
        assert_eq!(history_text(&[], true), "");
    }
}
