//! Shared plumbing of the `db-*` binaries (feature `cli`): the common
//! options, loading `.env`, printing human lines or JSON lines (`--json`),
//! masking passwords in usage errors, exit codes, applying migrations with
//! their progress printed (`db-migrate`, `db-reset --migrate`), and the
//! guarded flow of `db-reset` and `db-nuke`.
//!
//! Every binary prints its results on stdout, one line per event; with
//! `--json` each line is one JSON object whose `"event"` field names it.
//! Errors go to stderr (human) or stdout as an `"error"` event (JSON), and the
//! process exits with [`crate::admin::exit_code`].

use std::fmt::Display;
use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use serde_json::{Map, Value, json};

use crate::admin::{self, Confirmation, GuardOptions, Operation, Plan};
use crate::config::redact_urls_in;
use crate::migrate::{self, MigrationEvent, Migrator};
use crate::{Config, DatabaseUrl, Error};

/// Options every binary takes.
#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs {
    /// Database URL (overrides DATABASE_URL from the environment or .env).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,
    /// Print one JSON object per line instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

impl CommonArgs {
    /// `--database-url` (clap also reads DATABASE_URL into it), else the configuration's.
    pub fn url(&self) -> anyhow::Result<DatabaseUrl> {
        Ok(match &self.database_url {
            Some(url) => DatabaseUrl::parse(url)?,
            None => Config::from_env()?.database_url,
        })
    }

    /// The reporter `--json` asks for.
    pub fn reporter(&self) -> Reporter {
        Reporter::new(self.json)
    }
}

/// Loads `.env` (without overriding the environment) and parses the command
/// line. A usage error exits 2 (help and version 0) with any URL password in
/// the echoed arguments masked.
pub fn parse<A: Parser>() -> A {
    let _ = dotenvy::dotenv();
    match A::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let text = redact_urls_in(&e.render().to_string());
            if e.use_stderr() {
                eprint!("{text}");
            } else {
                print!("{text}");
            }
            std::process::exit(e.exit_code());
        }
    }
}

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

    /// Prints one result line: `human` as text, or `{"event": event, ..fields}`.
    pub fn event(&self, event: &str, human: impl Display, fields: Value) {
        if self.json {
            println!("{}", Self::object(event, fields));
        } else {
            println!("{human}");
        }
    }

    /// Prints a warning: on stderr as text, or as a JSON line with `"level": "warning"`.
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

    /// Ends the program: success, or the error printed (passwords masked)
    /// with its documented exit code.
    pub fn finish(&self, program: &str, result: anyhow::Result<ExitCode>) -> ExitCode {
        let err = match result {
            Ok(code) => return code,
            Err(err) => err,
        };
        let code = err
            .downcast_ref::<Error>()
            .map_or(admin::EXIT_ERROR, admin::exit_code);
        let message = redact_urls_in(&format!("{err:#}"));
        if self.json {
            let mut fields = json!({ "message": message, "exit_code": code });
            match err.downcast_ref::<Error>() {
                Some(Error::ProtectedEnvironment { rule, .. }) => {
                    fields["rule"] = json!(rule.name());
                }
                Some(Error::AmbiguousId { candidates, .. }) => {
                    fields["candidates"] = json!(candidates);
                }
                _ => {}
            }
            println!("{}", Self::object("error", fields));
        } else if code == admin::EXIT_ERROR {
            eprintln!("{program}: error: {message}");
        } else {
            // Guard refusals read "refused by rule ..." on their own.
            eprintln!("{program}: {message}");
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

/// The options of the guarded commands (`db-reset`, `db-nuke`).
#[derive(clap::Args, Debug)]
pub struct GuardArgs {
    /// Print the target and what would be touched, run the guard, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Confirm non-interactively by naming the target database (required without a terminal).
    #[arg(long, value_name = "DATABASE")]
    pub confirm: Option<String>,
    /// Allow a server that is neither loopback nor a unix socket (guard rule 4).
    #[arg(long)]
    pub allow_remote: bool,
    /// Allow a URL that looks like production (guard rule 3); never overrides rules 1 and 2.
    #[arg(long)]
    pub allow_production_looking_url: bool,
}

/// Guard, print the plan, confirm, execute. Returns the executed plan (None for a dry run).
pub fn run_guarded(
    operation: Operation,
    common: &CommonArgs,
    args: &GuardArgs,
) -> anyhow::Result<Option<Plan>> {
    let out = common.reporter();
    let url = common.url()?;
    out.event(
        "target",
        format!("{}: target {}", operation.command(), url.target()),
        json!({ "operation": operation, "target": url.target() }),
    );
    let options = GuardOptions {
        allow_remote: args.allow_remote,
        allow_production_looking_url: args.allow_production_looking_url,
        ..GuardOptions::from_env()
    };
    let prepared = admin::prepare(operation, &url, &options)?;
    let plan = prepared.plan();
    out.event(
        "plan",
        plan.to_string().trim_end(),
        serde_json::to_value(plan)?,
    );
    if args.dry_run {
        out.event(
            "dry_run",
            "dry run: the guard allows this; nothing was changed",
            json!({ "changed": false }),
        );
        return Ok(None);
    }
    let stdin = std::io::stdin();
    let confirmed = match args.confirm.as_deref() {
        Some(name) => prepared.confirm(Confirmation::Flag(Some(name)))?,
        None if stdin.is_terminal() => prepared.confirm(Confirmation::Interactive {
            input: &mut stdin.lock(),
            output: &mut std::io::stderr(),
        })?,
        None => prepared.confirm(Confirmation::Flag(None))?,
    };
    Ok(Some(confirmed.execute()?))
}

/// Creates the database if it is missing and applies the pending migrations,
/// printing each step; ends with a `done` event naming the target. Returns
/// how many migrations were applied.
pub fn run_migrations(out: Reporter, migrator: &Migrator) -> anyhow::Result<usize> {
    let url = migrator.url();
    if migrate::create_database_if_missing(url)? {
        out.event(
            "created_database",
            format!("created database {}", url.database()),
            json!({ "database": url.database() }),
        );
    }
    let applied = migrator.run(|event| match event {
        MigrationEvent::WaitingForLock { holder } => out.warn(
            "waiting_for_lock",
            format!("waiting for the migration lock held by {holder}"),
            json!({ "holder": holder }),
        ),
        MigrationEvent::Applied(m) => out.event(
            "applied",
            format!("applied {} ({} ms)", m.name, m.duration.as_millis()),
            json!({ "version": m.version, "name": m.name, "duration_ms": m.duration.as_millis() as u64 }),
        ),
        MigrationEvent::UnknownApplied { version } => out.warn(
            "unknown_applied",
            format!("applied migration {version} is unknown to this build"),
            json!({ "version": version }),
        ),
        MigrationEvent::Stamped { from, to } => out.event(
            "stamped",
            format!("environment stamp: {} -> {to}", from.as_deref().unwrap_or("none")),
            json!({ "from": from, "to": to }),
        ),
        MigrationEvent::StampKept { stamp, ours } => out.event(
            "stamp_kept",
            format!("environment stamp {stamp} kept (this process runs as {ours})"),
            json!({ "stamp": stamp, "environment": ours }),
        ),
        _ => {}
    })?;
    let human = if applied.is_empty() {
        format!("{}: nothing to migrate, up to date", url.target())
    } else {
        format!("{}: {} migration(s) applied", url.target(), applied.len())
    };
    out.event(
        "done",
        human,
        json!({ "target": url.target(), "applied": applied.len() }),
    );
    Ok(applied.len())
}
