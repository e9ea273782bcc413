//! Shared plumbing of the `db-*` binaries (feature `cli`): loading `.env`,
//! printing human lines or JSON lines (`--json`), and exit codes.
//!
//! Every binary prints its results on stdout, one line per event; with
//! `--json` each line is one JSON object with an `"event"` field. Errors go
//! to stderr (human) or stdout as an `"error"` event (JSON), and the process
//! exits with the code of [`exit_code`].

use std::fmt::Display;
use std::process::ExitCode;

use serde_json::{Map, Value, json};

use crate::Error;

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: an error (connection, SQL, bad input).
pub const EXIT_ERROR: u8 = 1;
/// Exit code: bad command-line usage (clap's code).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: a guard rule refused a destructive command; nothing changed.
pub const EXIT_REFUSED: u8 = 3;
/// Exit code: the confirmation was declined or did not match; nothing changed.
pub const EXIT_CANCELLED: u8 = 4;
/// Exit code: `--check` found pending migrations, edited migrations or drift.
pub const EXIT_CHECK_FAILED: u8 = 5;

/// Prints events as human lines or JSON lines.
#[derive(Debug, Clone, Copy)]
pub struct Reporter {
    json: bool,
}

impl Reporter {
    /// A reporter printing JSON lines when `json` is set.
    pub fn new(json: bool) -> Self {
        Reporter { json }
    }

    /// Whether output is JSON lines.
    pub fn is_json(&self) -> bool {
        self.json
    }

    /// Prints one result line: `human` as text, or `{"event": event, ..fields}`.
    pub fn event(&self, event: &str, human: impl Display, fields: Value) {
        if self.json {
            println!("{}", Self::object(event, fields));
        } else {
            println!("{human}");
        }
    }

    /// Prints a warning: on stderr as text, or as a `"warning"` JSON line.
    pub fn warn(&self, event: &str, human: impl Display, fields: Value) {
        if self.json {
            let mut fields = fields;
            if let Value::Object(map) = &mut fields {
                map.insert("level".into(), json!("warning"));
            }
            println!("{}", Self::object(event, fields));
        } else {
            eprintln!("warning: {human}");
        }
    }

    /// Prints a failure of `program` and returns its exit code.
    pub fn fail(&self, program: &str, err: &anyhow::Error) -> ExitCode {
        let code = exit_code(err);
        if self.json {
            let mut fields = json!({ "message": format!("{err:#}"), "exit_code": code });
            if let Some(Error::ProtectedEnvironment { rule, .. }) = err.downcast_ref::<Error>() {
                fields["rule"] = json!(rule.name());
            }
            println!("{}", Self::object("error", fields));
        } else {
            eprintln!("{program}: error: {err:#}");
        }
        ExitCode::from(code)
    }

    fn object(event: &str, fields: Value) -> Value {
        let mut map = Map::new();
        map.insert("event".into(), json!(event));
        if let Value::Object(fields) = fields {
            map.extend(fields);
        }
        Value::Object(map)
    }
}

/// The exit code for an error: [`EXIT_REFUSED`] for a guard refusal, else [`EXIT_ERROR`].
pub fn exit_code(err: &anyhow::Error) -> u8 {
    match err.downcast_ref::<Error>() {
        Some(Error::ProtectedEnvironment { rule, .. })
            if *rule == crate::admin::GuardRule::NotConfirmed =>
        {
            EXIT_CANCELLED
        }
        Some(Error::ProtectedEnvironment { .. }) => EXIT_REFUSED,
        _ => EXIT_ERROR,
    }
}

/// Loads `.env` (without overriding the environment), as every binary does first.
pub fn load_dotenv() {
    let _ = dotenvy::dotenv();
}
