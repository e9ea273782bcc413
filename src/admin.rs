//! Destructive administration (reset, nuke) and the guard that protects it.
//!
//! `db-reset` empties every application table and `db-nuke` drops the whole
//! `public` schema. Both go through one guard, [`prepare`], which evaluates
//! the rules below in order, before anything is written, and refuses with
//! [`Error::ProtectedEnvironment`] naming the first rule that fires:
//!
//! 1. [`GuardRule::EnvironmentIsProduction`]: `APP_ENV`, `RUST_ENV` or
//!    `NODE_ENV` is `production` (case-insensitive). Checked before connecting.
//! 2. [`GuardRule::DatabaseIsProduction`]: the database's environment stamp
//!    (written by `db-migrate`, see [`crate::migrate`]) is `production`. Read
//!    on a read-only connection.
//! 3. [`GuardRule::UrlLooksLikeProduction`]: see [`production_url_reason`];
//!    overridden only by [`GuardOptions::allow_production_looking_url`].
//! 4. [`GuardRule::RemoteServer`]: where libpq connects
//!    ([`DatabaseUrl::host`]: `hostaddr` and `PGHOSTADDR` first, then the host
//!    name and `PGHOST`; a `service` or `PGSERVICE` is unknown, so never local)
//!    is neither loopback nor a unix socket and [`GuardOptions::allow_remote`]
//!    is not set.
//! 5. [`GuardRule::ConnectedTargetMismatch`]: what the server reports after
//!    connecting (`current_database()`, `session_user`, `inet_server_port()`,
//!    `inet_server_addr()`) disagrees with the URL: another database, user,
//!    port or transport, or a loopback URL that reached a server whose address
//!    is not loopback (a tunnel, proxy or port mapping; accepted only with
//!    [`GuardOptions::allow_remote`], since the server may then be remote).
//!
//! No option overrides rules 1 and 2. Rules 3 and 4 need no connection, so
//! when the server cannot be reached they still refuse with their own rule.
//! After the guard, [`Prepared::confirm`] asks for the database name
//! ([`Confirmation`]) and only the resulting [`Confirmed`] can
//! [`execute`](Confirmed::execute); the write runs in one transaction that
//! checks rule 2 again.
//!
//! ```no_run
//! use workflow_db::admin::{self, Confirmation, GuardOptions, Operation};
//!
//! let url = workflow_db::Config::from_env()?.database_url;
//! let prepared = admin::prepare(Operation::Reset, &url, &GuardOptions::from_env())?;
//! print!("{}", prepared.plan());
//! let database = url.database();
//! let done = prepared.confirm(Confirmation::Flag(Some(&database)))?.execute()?;
//! println!("emptied {} table(s)", done.tables.len());
//! # Ok::<(), workflow_db::Error>(())
//! ```

use std::fmt;
use std::io::{BufRead, Write};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Nullable, Text};
use serde::Serialize;

use crate::config::{DatabaseUrl, ENVIRONMENT_VARS, Environment, Host};
use crate::error::{Error, Result};
use crate::migrate::{self, quote_ident};
use crate::pool;

pub use crate::error::GuardRule;

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: an error (connection, query, invalid seed, ...).
pub const EXIT_ERROR: u8 = 1;
/// Exit code: invalid command line (clap's usage error).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: refused by guard rules 1 to 5; nothing was changed.
pub const EXIT_REFUSED: u8 = 3;
/// Exit code: not confirmed (missing or wrong `--confirm`, or the typed name
/// did not match); nothing was changed.
pub const EXIT_NOT_CONFIRMED: u8 = 4;
/// Exit code: `db-migrate --check` found pending, out-of-order, edited or
/// unknown migrations, or schema drift.
pub const EXIT_CHECK_FAILED: u8 = 5;
/// Exit code: `db-check` found broken engine invariants (error-level
/// violations; warnings alone exit 0).
pub const EXIT_INVARIANTS_BROKEN: u8 = 6;

/// The documented exit code of an admin binary failing with `error`.
pub fn exit_code(error: &Error) -> u8 {
    match error {
        Error::ProtectedEnvironment {
            rule: GuardRule::NotConfirmed,
            ..
        } => EXIT_NOT_CONFIRMED,
        Error::ProtectedEnvironment { .. } => EXIT_REFUSED,
        _ => EXIT_ERROR,
    }
}

fn refuse(rule: GuardRule, message: impl Into<String>) -> Error {
    Error::ProtectedEnvironment {
        rule,
        message: message.into(),
    }
}

/// Host fragments that mark a production (managed or hosted) server for rule 3,
/// besides any host, database or user containing `prod`. Matched
/// case-insensitively anywhere in the host (or unix-socket directory).
pub const PRODUCTION_HOST_MARKERS: &[&str] = &[
    ".com",
    "rds.amazonaws",
    "amazonaws.com.cn",
    ".postgres.database.azure",
    ".database.azure",
    "/cloudsql/",
    ".supabase.co",
    ".neon.tech",
    ".aivencloud.",
    ".cockroachlabs.cloud",
    ".railway.app",
    ".rlwy.net",
    ".render.com",
    ".crunchybridge.",
    ".timescale.",
    ".tembo.io",
    ".xata.sh",
    ".flycast",
    ".ondigitalocean.",
];

/// Why the URL looks like production (rule 3), or None. Looks at where
/// libpq connects ([`DatabaseUrl::host`]: `hostaddr`, service, host,
/// `PG*` variables) and at the host name when a `hostaddr` overrides it, the
/// database name and the user, never at the password.
pub fn production_url_reason(url: &DatabaseUrl) -> Option<String> {
    let host = url.host();
    let mut hosts = vec![host.to_string()];
    if let Some(name) = url.host_name().filter(|name| name != host.as_str()) {
        hosts.push(name);
    }
    for shown in hosts {
        let host_lc = shown.to_ascii_lowercase();
        if host_lc.contains("prod") {
            return Some(format!("the host {shown} contains \"prod\""));
        }
        if let Some(marker) = PRODUCTION_HOST_MARKERS
            .iter()
            .find(|m| host_lc.contains(*m))
        {
            return Some(format!(
                "the host {shown} contains {marker:?} (a hosted or managed server)"
            ));
        }
    }
    let database = url.database();
    if database.to_ascii_lowercase().contains("prod") {
        return Some(format!("the database name {database:?} contains \"prod\""));
    }
    match url.user() {
        Some(user) if user.to_ascii_lowercase().contains("prod") => {
            Some(format!("the user {user:?} contains \"prod\""))
        }
        _ => None,
    }
}

/// What the guard may be told to allow. Rules 1 and 2 have no option.
#[derive(Debug, Clone, Default)]
pub struct GuardOptions {
    /// Allow a server that is neither loopback nor a unix socket (rule 4,
    /// `--allow-remote`).
    pub allow_remote: bool,
    /// Allow a URL that looks like production (rule 3,
    /// `--allow-production-looking-url`). Never needed for local databases.
    pub allow_production_looking_url: bool,
    /// `APP_ENV`, `RUST_ENV`, `NODE_ENV`: the variables that are set, with their values (rule 1).
    pub environment_vars: Vec<(String, String)>,
}

impl GuardOptions {
    /// No overrides; the environment variables of this process.
    pub fn from_env() -> Self {
        Self::from_lookup(|var| std::env::var(var).ok())
    }

    /// No overrides; the environment variables through `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        GuardOptions {
            environment_vars: ENVIRONMENT_VARS
                .iter()
                .filter_map(|var| lookup(var).map(|value| ((*var).to_owned(), value)))
                .collect(),
            ..GuardOptions::default()
        }
    }
}

/// The destructive operation being guarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// Empty every application table; keep schema, bookkeeping and stamp.
    Reset,
    /// Drop everything in the `public` schema.
    Nuke,
}

impl Operation {
    /// The binary's name.
    pub const fn command(self) -> &'static str {
        match self {
            Operation::Reset => "db-reset",
            Operation::Nuke => "db-nuke",
        }
    }

    const fn verb(self) -> &'static str {
        match self {
            Operation::Reset => "empty every table of",
            Operation::Nuke => "drop the whole schema of",
        }
    }
}

/// Rule 1: refuses when an environment variable says production.
pub fn check_environment(options: &GuardOptions, operation: Operation) -> Result<()> {
    match options
        .environment_vars
        .iter()
        .find(|(_, value)| Environment::from_name(value).is_production())
    {
        Some((var, value)) => Err(refuse(
            GuardRule::EnvironmentIsProduction,
            format!(
                "{var}={value:?} says this is a production environment. {} never runs in production \
                 and no flag overrides this; run it from a development shell (unset {var}) \
                 against a development database.",
                operation.command()
            ),
        )),
        None => Ok(()),
    }
}

/// Rule 2: refuses when the database's environment stamp is production.
pub fn check_stamp(stamp: Option<&str>, database: &str, operation: Operation) -> Result<()> {
    match stamp {
        Some(s) if Environment::from_name(s).is_production() => Err(refuse(
            GuardRule::DatabaseIsProduction,
            format!(
                "database {database:?} is stamped {s:?} (table __workflow_db_metadata, written by db-migrate \
                 in production). {} refuses it whatever the local environment says, and no flag overrides \
                 this. If it really is a disposable copy, re-stamp it explicitly first: \
                 db-env set development --confirm {database}",
                operation.command()
            ),
        )),
        _ => Ok(()),
    }
}

/// Rules 3 and 4, which need no connection.
pub fn check_url(url: &DatabaseUrl, options: &GuardOptions, operation: Operation) -> Result<()> {
    if !options.allow_production_looking_url {
        if let Some(reason) = production_url_reason(url) {
            return Err(refuse(
                GuardRule::UrlLooksLikeProduction,
                format!(
                    "the URL looks like production: {reason}. {} refuses it. Point DATABASE_URL at a local \
                     development database; if this server really is disposable, say so with \
                     --allow-production-looking-url (see docs/admin.md).",
                    operation.command()
                ),
            ));
        }
    }
    let host = url.host();
    if !host.is_local() && !options.allow_remote {
        let why = match host {
            Host::Service(_) => {
                " (a connection service: the server is whatever pg_service.conf says)"
            }
            _ => "",
        };
        return Err(refuse(
            GuardRule::RemoteServer,
            format!(
                "the server {host} is neither loopback nor a unix socket{why}. {} only touches a remote \
                 server when told so explicitly: add --allow-remote if this is a disposable database.",
                operation.command()
            ),
        ));
    }
    Ok(())
}

/// What the server says about the connection (rule 5).
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct ServerFacts {
    /// `current_database()`.
    #[diesel(sql_type = Text)]
    pub database: String,
    /// `session_user`.
    #[diesel(sql_type = Text)]
    pub user: String,
    /// `inet_server_port()`: None over a unix socket.
    #[diesel(sql_type = Nullable<Integer>)]
    pub tcp_port: Option<i32>,
    /// The `port` setting (the socket file's number over a unix socket).
    #[diesel(sql_type = Integer)]
    pub port_setting: i32,
    /// `host(inet_server_addr())`: the server's address on this connection;
    /// None over a unix socket.
    #[diesel(sql_type = Nullable<Text>)]
    pub server_addr: Option<String>,
}

/// Reads [`ServerFacts`] on `conn`.
pub fn server_facts(conn: &mut PgConnection) -> Result<ServerFacts> {
    Ok(diesel::sql_query(
        "SELECT current_database()::text AS database, session_user::text AS user, \
         inet_server_port() AS tcp_port, current_setting('port')::int AS port_setting, \
         host(inet_server_addr()) AS server_addr",
    )
    .get_result(conn)?)
}

/// Whether `addr` (as `host(inet)` prints it) is a loopback address.
fn is_loopback_addr(addr: &str) -> bool {
    addr.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// Rule 5: refuses when `facts` disagree with `url`. A loopback URL that
/// reached a server on another address passes only with
/// [`GuardOptions::allow_remote`]; a [`Host::Service`] URL has no transport or
/// port to compare.
pub fn check_facts(url: &DatabaseUrl, facts: &ServerFacts, options: &GuardOptions) -> Result<()> {
    let mismatch = |what: String| {
        Err(refuse(
            GuardRule::ConnectedTargetMismatch,
            format!(
                "{what}, so the connection may not reach the database you think (a PG* variable, a \
                 pooler alias or a port mapping in between?). Nothing was changed; connect directly with \
                 a URL that names the real host, port and database."
            ),
        ))
    };
    if facts.database != url.database() {
        return mismatch(format!(
            "the URL names database {:?} but the server reports current_database() = {:?}",
            url.database(),
            facts.database
        ));
    }
    if let Some(user) = url.user() {
        if user != facts.user {
            return mismatch(format!(
                "the URL names user {user:?} but the server reports session_user = {:?}",
                facts.user
            ));
        }
    }
    let host = url.host();
    match (&host, facts.server_addr.as_deref()) {
        (Host::Service(_), _) => return Ok(()),
        (Host::Tcp(_), Some(addr))
            if host.is_local() && !is_loopback_addr(addr) && !options.allow_remote =>
        {
            return mismatch(format!(
                "the URL names the loopback host {host} but the server reports inet_server_addr() = \
                 {addr}, not a loopback address: a tunnel, proxy or port mapping leads to another \
                 machine or container, which may be remote (--allow-remote accepts that)"
            ));
        }
        (Host::Socket(dir), Some(addr)) => {
            return mismatch(format!(
                "the URL names the unix socket {dir} but the server reports a TCP connection to \
                 inet_server_addr() = {addr}"
            ));
        }
        _ => {}
    }
    let port = i32::from(url.port());
    match (host, facts.tcp_port) {
        (Host::Tcp(_), None) => mismatch(format!(
            "the URL names TCP host {} but the server reports a unix-socket connection",
            url.host()
        )),
        (Host::Tcp(_), Some(p)) if p != port => mismatch(format!(
            "the URL names port {port} but the server reports inet_server_port() = {p}"
        )),
        (Host::Socket(dir), Some(_)) => mismatch(format!(
            "the URL names the unix socket {dir} but the server reports a TCP connection"
        )),
        (Host::Socket(_), None) if facts.port_setting != port => mismatch(format!(
            "the URL names port {port} but the server behind the socket listens on {}",
            facts.port_setting
        )),
        _ => Ok(()),
    }
}

/// One table and its row count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, QueryableByName)]
pub struct TableRows {
    /// The table's name (in schema `public`).
    #[diesel(sql_type = Text)]
    pub table: String,
    /// Its rows when counted.
    #[diesel(sql_type = BigInt)]
    pub rows: i64,
}

#[derive(QueryableByName)]
struct TextRow {
    #[diesel(sql_type = Text)]
    value: String,
}

/// Tables of `public` with their exact row counts; bookkeeping (`__`-prefixed)
/// tables only when `bookkeeping` is set.
fn tables_with_rows(conn: &mut PgConnection, bookkeeping: bool) -> Result<Vec<TableRows>> {
    let names: Vec<TextRow> = diesel::sql_query(
        "SELECT tablename::text AS value FROM pg_tables WHERE schemaname = 'public' \
         AND ($1 OR NOT starts_with(tablename, '__')) ORDER BY tablename",
    )
    .bind::<diesel::sql_types::Bool, _>(bookkeeping)
    .load(conn)?;
    names
        .into_iter()
        .map(|TextRow { value: table }| {
            let sql = format!(
                "SELECT $1 AS table, count(*) AS rows FROM public.{}",
                quote_ident(&table)
            );
            Ok(diesel::sql_query(sql)
                .bind::<Text, _>(&table)
                .get_result::<TableRows>(conn)?)
        })
        .collect()
}

/// Objects of `public` other than tables (types, functions, views, sequences).
fn other_objects(conn: &mut PgConnection) -> Result<Vec<String>> {
    let rows: Vec<TextRow> = diesel::sql_query(
        "SELECT value FROM ( \
           SELECT 'type ' || t.typname AS value FROM pg_type t \
             JOIN pg_namespace n ON n.oid = t.typnamespace \
             LEFT JOIN pg_class c ON c.oid = t.typrelid \
             WHERE n.nspname = 'public' AND (t.typtype IN ('e', 'd', 'r') OR c.relkind = 'c') \
           UNION ALL \
           SELECT 'function ' || p.oid::regprocedure::text FROM pg_proc p \
             JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public' \
           UNION ALL \
           SELECT CASE c.relkind WHEN 'v' THEN 'view ' WHEN 'm' THEN 'materialized view ' \
                  ELSE 'sequence ' END || c.relname FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'public' AND c.relkind IN ('v', 'm', 'S') \
         ) o ORDER BY value",
    )
    .load(conn)?;
    Ok(rows.into_iter().map(|r| r.value).collect())
}

/// What a reset or nuke will touch (or touched), to print before confirming.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// The operation.
    pub operation: Operation,
    /// Host, port and database (never the password).
    pub target: String,
    /// The user connected as.
    pub user: String,
    /// The database's environment stamp.
    pub stamp: Option<String>,
    /// The tables emptied (reset) or dropped (nuke), with their row counts.
    pub tables: Vec<TableRows>,
    /// Other objects dropped (nuke only): types, functions, views, sequences.
    pub other_objects: Vec<String>,
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The target itself is printed once, before the guard runs (a
        // refusal names no target of its own); the plan adds what the
        // connection found.
        writeln!(
            f,
            "connected as user {}, environment stamp: {}",
            self.user,
            self.stamp.as_deref().unwrap_or("none")
        )?;
        match self.operation {
            Operation::Reset => writeln!(
                f,
                "tables to empty ({}; schema, migration bookkeeping and environment stamp are kept):",
                self.tables.len()
            )?,
            Operation::Nuke => writeln!(
                f,
                "schema public to drop with everything in it ({} table(s), {} other object(s)); \
                 run db-migrate afterwards to rebuild it:",
                self.tables.len(),
                self.other_objects.len()
            )?,
        }
        for t in &self.tables {
            writeln!(f, "  table {:<32} {:>10} rows", t.table, t.rows)?;
        }
        for o in &self.other_objects {
            writeln!(f, "  {o}")?;
        }
        Ok(())
    }
}

/// `application_name` of the admin binaries' connection.
pub const ADMIN_APPLICATION_NAME: &str = "workflow-db-admin";

/// A target that passed guard rules 1 to 5, with its read-only connection
/// and its [`Plan`]. Nothing has been written.
pub struct Prepared {
    conn: PgConnection,
    database: String,
    plan: Plan,
}

impl fmt::Debug for Prepared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prepared")
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

/// Runs guard rules 1 to 5 for `operation` on `url` (see the module docs),
/// on a connection kept read-only, and collects the [`Plan`]. Writes nothing.
pub fn prepare(
    operation: Operation,
    url: &DatabaseUrl,
    options: &GuardOptions,
) -> Result<Prepared> {
    check_environment(options, operation)?;
    let url_verdict = check_url(url, options, operation);
    let connected = pool::connect_as(url, ADMIN_APPLICATION_NAME).and_then(|mut conn| {
        conn.batch_execute("SET default_transaction_read_only = on")?;
        Ok(conn)
    });
    let mut conn = match connected {
        Ok(conn) => conn,
        // Rules 3 and 4 need no connection: report them rather than the network.
        Err(e) => return url_verdict.and(Err(e)),
    };
    let stamp = migrate::environment_stamp(&mut conn)?;
    check_stamp(stamp.as_deref(), &url.database(), operation)?;
    url_verdict?;
    let facts = server_facts(&mut conn)?;
    check_facts(url, &facts, options)?;
    let (tables, other_objects) = match operation {
        Operation::Reset => (tables_with_rows(&mut conn, false)?, Vec::new()),
        Operation::Nuke => (
            tables_with_rows(&mut conn, true)?,
            other_objects(&mut conn)?,
        ),
    };
    Ok(Prepared {
        conn,
        database: facts.database,
        plan: Plan {
            operation,
            target: url.target(),
            user: facts.user,
            stamp,
            tables,
            other_objects,
        },
    })
}

/// How the user confirms a destructive operation: by the database's name.
pub enum Confirmation<'a> {
    /// Non-interactive: the value of `--confirm` (None when not given); it
    /// must equal the target database's name.
    Flag(Option<&'a str>),
    /// Interactive: the prompt goes to `output`, the answer is read from
    /// `input` (a terminal in the binaries, a byte slice in tests). Anything
    /// but the database's name cancels; an empty line means no.
    Interactive {
        /// Where the answer is read.
        input: &'a mut dyn BufRead,
        /// Where the prompt is written.
        output: &'a mut dyn Write,
    },
}

impl fmt::Debug for Confirmation<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Confirmation::Flag(v) => f.debug_tuple("Flag").field(v).finish(),
            Confirmation::Interactive { .. } => f.write_str("Interactive"),
        }
    }
}

/// Checks `confirmation` against `database` (the name the server reported).
pub fn check_confirmation(
    database: &str,
    operation: Operation,
    confirmation: Confirmation<'_>,
) -> Result<()> {
    let cancelled = |message: String| Err(refuse(GuardRule::NotConfirmed, message));
    match confirmation {
        Confirmation::Flag(Some(name)) if name == database => Ok(()),
        Confirmation::Flag(Some(name)) => cancelled(format!(
            "--confirm {name:?} does not match the target database {database:?}; nothing was changed."
        )),
        Confirmation::Flag(None) => cancelled(format!(
            "not running on a terminal, so {} cannot ask; pass --confirm {database} to confirm \
             non-interactively. Nothing was changed.",
            operation.command()
        )),
        Confirmation::Interactive { input, output } => {
            let prompt = write!(
                output,
                "This will {} database {database:?}. Type the database name to continue \
                 (anything else cancels) [No]: ",
                operation.verb()
            )
            .and_then(|()| output.flush());
            let mut answer = String::new();
            let read = prompt.and_then(|()| input.read_line(&mut answer));
            if read.is_ok() && answer.trim() == database {
                Ok(())
            } else {
                cancelled(format!(
                    "cancelled: the answer was not the database name {database:?}; nothing was changed."
                ))
            }
        }
    }
}

impl Prepared {
    /// What the operation will touch.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The last check before writing: the confirmation must name the database.
    pub fn confirm(self, confirmation: Confirmation<'_>) -> Result<Confirmed> {
        check_confirmation(&self.database, self.plan.operation, confirmation)?;
        Ok(Confirmed(self))
    }
}

/// A prepared operation that the user confirmed; the only way to write.
#[derive(Debug)]
pub struct Confirmed(Prepared);

impl Confirmed {
    /// Empties the tables (reset) or drops the schema (nuke), in one
    /// transaction that re-checks the environment stamp first. Returns the
    /// plan it carried out.
    pub fn execute(self) -> Result<Plan> {
        let Prepared {
            mut conn,
            database,
            plan,
        } = self.0;
        conn.batch_execute("SET default_transaction_read_only = off")?;
        conn.transaction(|conn| {
            conn.batch_execute("SET LOCAL lock_timeout = '30s'")?;
            let stamp = migrate::environment_stamp(conn)?;
            check_stamp(stamp.as_deref(), &database, plan.operation)?;
            match plan.operation {
                Operation::Reset => truncate_all(conn),
                Operation::Nuke => drop_public_schema(conn),
            }
        })?;
        Ok(plan)
    }
}

/// Empties every table of `public` except the `__` bookkeeping, in one
/// `TRUNCATE .. RESTART IDENTITY`; tables added later are covered. No
/// `CASCADE`: the list holds every table of `public`, so foreign keys among
/// them need none, and a table in another schema that references one of them
/// makes the statement fail (nothing is emptied) instead of being emptied too.
fn truncate_all(conn: &mut PgConnection) -> Result<()> {
    let tables = tables_with_rows(conn, false)?;
    if tables.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = tables
        .iter()
        .map(|t| format!("public.{}", quote_ident(&t.table)))
        .collect();
    conn.batch_execute(&format!(
        "TRUNCATE TABLE {} RESTART IDENTITY",
        list.join(", ")
    ))?;
    Ok(())
}

/// Drops `public` with everything in it and recreates it empty with the
/// same owner, privileges and comment.
fn drop_public_schema(conn: &mut PgConnection) -> Result<()> {
    let owner: TextRow = diesel::sql_query(
        "SELECT nspowner::regrole::text AS value FROM pg_namespace WHERE nspname = 'public'",
    )
    .get_result(conn)?;
    let mut restore: Vec<String> = diesel::sql_query(
        "SELECT format('GRANT %s ON SCHEMA public TO %s%s', a.privilege_type, \
                CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END, \
                CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END) AS value \
         FROM pg_namespace n, aclexplode(n.nspacl) a \
         WHERE n.nspname = 'public' AND a.grantee <> n.nspowner",
    )
    .load::<TextRow>(conn)?
    .into_iter()
    .map(|v| v.value)
    .collect();
    restore.extend(
        diesel::sql_query(
            "SELECT format('COMMENT ON SCHEMA public IS %L', d.description) AS value \
             FROM pg_namespace n JOIN pg_description d ON d.objoid = n.oid \
             AND d.classoid = 'pg_namespace'::regclass WHERE n.nspname = 'public'",
        )
        .load::<TextRow>(conn)?
        .into_iter()
        .map(|v| v.value),
    );
    conn.batch_execute(&format!(
        "DROP SCHEMA public CASCADE; CREATE SCHEMA public; ALTER SCHEMA public OWNER TO {}; {};",
        owner.value,
        restore.join("; ")
    ))?;
    Ok(())
}

/// Changes the database's environment stamp: the explicit, name-bound way to
/// lower a `production` stamp (`db-env set`). `confirm_database` must equal
/// `current_database()`. Returns the stamp before.
pub fn set_environment_stamp(
    conn: &mut PgConnection,
    environment: &Environment,
    confirm_database: &str,
) -> Result<Option<String>> {
    let database = server_facts(conn)?.database;
    if confirm_database != database {
        return Err(refuse(
            GuardRule::NotConfirmed,
            format!(
                "--confirm {confirm_database:?} does not match the connected database {database:?}; \
                 the stamp was not changed."
            ),
        ));
    }
    conn.transaction(|conn| {
        let before = migrate::environment_stamp(conn)?;
        migrate::write_stamp(conn, environment.as_str())?;
        Ok(before)
    })
}
