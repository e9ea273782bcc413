//! Configuration from the environment, and the database URL as a secret.
//!
//! The library reads the process environment but never loads `.env`; the
//! binaries, scripts and tests do that (with `dotenvy`) before calling
//! [`Config::from_env`].

use std::fmt;
use std::time::Duration;

use url::Url;

use crate::error::{Error, Result};

/// Default number of connections in the pool (`DB_POOL_SIZE`).
pub const DEFAULT_POOL_SIZE: u32 = 10;
/// Default time an idle connection is kept (`DB_IDLE_TIMEOUT_SECS`).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// Default time to wait for a connection (`DB_CONNECT_TIMEOUT_SECS`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The variables that name the environment, in order of precedence.
pub const ENVIRONMENT_VARS: [&str; 3] = ["APP_ENV", "RUST_ENV", "NODE_ENV"];

/// Settings of the connection pool and the environment, read from variables.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// `DATABASE_URL` (required).
    pub database_url: DatabaseUrl,
    /// `DB_POOL_SIZE`: maximum connections in the pool (default 10).
    pub pool_size: u32,
    /// `DB_IDLE_TIMEOUT_SECS`: idle connections above one are closed after this (default 20 s).
    pub idle_timeout: Duration,
    /// `DB_CONNECT_TIMEOUT_SECS`: how long to wait for a connection (default 10 s).
    pub connect_timeout: Duration,
    /// `APP_ENV` / `RUST_ENV` / `NODE_ENV` (default development).
    pub environment: Environment,
}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `lookup` (a variable name to its value),
    /// so that callers and tests can supply variables without touching the
    /// process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let database_url = match lookup("DATABASE_URL").filter(|v| !v.trim().is_empty()) {
            Some(url) => DatabaseUrl::parse(&url)?,
            None => {
                return Err(Error::MissingEnv {
                    var: "DATABASE_URL",
                    hint: "set it to a PostgreSQL URL such as postgres://user@localhost:5432/workflow_db \
                           (bin/dev-db prints one for a local server)",
                });
            }
        };
        let pool_size = parse_var(&lookup, "DB_POOL_SIZE", "an integer from 1 to 1000", |v| {
            v.parse::<u32>().ok().filter(|n| (1..=1000).contains(n))
        })?
        .unwrap_or(DEFAULT_POOL_SIZE);
        let idle_timeout =
            parse_secs(&lookup, "DB_IDLE_TIMEOUT_SECS")?.unwrap_or(DEFAULT_IDLE_TIMEOUT);
        let connect_timeout =
            parse_secs(&lookup, "DB_CONNECT_TIMEOUT_SECS")?.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        Ok(Config {
            database_url,
            pool_size,
            idle_timeout,
            connect_timeout,
            environment: Environment::from_lookup(&lookup),
        })
    }

    /// A configuration with the defaults for `database_url` (used by tools and tests).
    pub fn new(database_url: DatabaseUrl) -> Self {
        Config {
            database_url,
            pool_size: DEFAULT_POOL_SIZE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            environment: Environment::Development,
        }
    }
}

fn parse_var<T>(
    lookup: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    expected: &'static str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>> {
    match lookup(var) {
        None => Ok(None),
        Some(value) => match parse(value.trim()) {
            Some(v) => Ok(Some(v)),
            None => Err(Error::InvalidEnv {
                var,
                expected,
                value,
            }),
        },
    }
}

fn parse_secs(
    lookup: &impl Fn(&str) -> Option<String>,
    var: &'static str,
) -> Result<Option<Duration>> {
    parse_var(
        lookup,
        var,
        "a whole number of seconds from 1 to 86400",
        |v| {
            v.parse::<u64>()
                .ok()
                .filter(|n| (1..=86_400).contains(n))
                .map(Duration::from_secs)
        },
    )
}

/// The environment the process runs in, from `APP_ENV`, `RUST_ENV` or `NODE_ENV`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Environment {
    /// `development` (the default when no variable is set).
    Development,
    /// `test`.
    Test,
    /// `production`: destructive admin commands are refused.
    Production,
    /// Any other name (`staging`, ...), lower-cased.
    Other(String),
}

impl Environment {
    /// Production if any of `APP_ENV`, `RUST_ENV`, `NODE_ENV` says production
    /// (case-insensitive); otherwise the first one set; otherwise development.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let values: Vec<String> = ENVIRONMENT_VARS
            .iter()
            .filter_map(|var| lookup(var))
            .map(|v| v.trim().to_ascii_lowercase())
            .filter(|v| !v.is_empty())
            .collect();
        if values.iter().any(|v| v == "production") {
            return Environment::Production;
        }
        values
            .first()
            .map_or(Environment::Development, |v| Environment::from_name(v))
    }

    /// The environment named `name` (case-insensitive).
    pub fn from_name(name: &str) -> Self {
        match name.trim().to_ascii_lowercase().as_str() {
            "development" | "" => Environment::Development,
            "test" => Environment::Test,
            "production" => Environment::Production,
            other => Environment::Other(other.to_owned()),
        }
    }

    /// The environment's name, as stored in the database stamp.
    pub fn as_str(&self) -> &str {
        match self {
            Environment::Development => "development",
            Environment::Test => "test",
            Environment::Production => "production",
            Environment::Other(name) => name,
        }
    }

    /// Whether this is production.
    pub fn is_production(&self) -> bool {
        *self == Environment::Production
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a URL points: a TCP host, a unix-socket directory, or a service
/// whose server only libpq knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// A host name or IP address (IPv6 without brackets); a `hostaddr` too.
    Tcp(String),
    /// A unix-socket directory (a `host` starting with `/`, or no host at all).
    Socket(String),
    /// A connection service (`service` parameter or `PGSERVICE`): libpq takes
    /// the server from `pg_service.conf`, so where it connects is unknown
    /// here and never counts as local.
    Service(String),
}

impl Host {
    /// The host name, the socket directory, or the service name.
    pub fn as_str(&self) -> &str {
        match self {
            Host::Tcp(h) | Host::Socket(h) | Host::Service(h) => h,
        }
    }

    /// Loopback (`localhost`, 127.0.0.0/8, `::1`) or a unix socket; never a service.
    pub fn is_local(&self) -> bool {
        match self {
            Host::Socket(_) => true,
            Host::Service(_) => false,
            Host::Tcp(h) => {
                let h = h.to_ascii_lowercase();
                h == "localhost"
                    || h.ends_with(".localhost")
                    || h.parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Tcp(h) if h.contains(':') => write!(f, "[{h}]"),
            Host::Tcp(h) => f.write_str(h),
            Host::Socket(dir) => write!(f, "unix socket {dir}"),
            Host::Service(name) => write!(f, "service {name} (from pg_service.conf)"),
        }
    }
}

/// A PostgreSQL connection URL, kept as a secret.
///
/// `Display` and `Debug` show it with the password replaced by `***`; only
/// [`DatabaseUrl::expose`] returns the real thing, for handing to libpq.
/// Accepts `postgres://` and `postgresql://` URLs, including IPv6 hosts,
/// percent-encoded user info and libpq query parameters (`host`, `port`,
/// `dbname`, `user`, `password`, ...).
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    url: Url,
}

impl DatabaseUrl {
    /// Parses and validates a URL. The error never repeats the input.
    pub fn parse(input: &str) -> Result<Self> {
        let url = Url::parse(input.trim()).map_err(|e| Error::InvalidDatabaseUrl {
            reason: format!(
                "{e}; expected postgres://user:password@host:port/database (libpq key=value strings are not supported)"
            ),
        })?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(Error::InvalidDatabaseUrl {
                reason: format!(
                    "scheme {:?} is not postgres:// or postgresql://",
                    url.scheme()
                ),
            });
        }
        let this = DatabaseUrl { url };
        if this.database().is_empty() {
            return Err(Error::InvalidDatabaseUrl {
                reason:
                    "no database name; add one as the path, e.g. postgres://localhost/workflow_db"
                        .into(),
            });
        }
        Ok(this)
    }

    /// The URL with its password, for connecting. Never print it.
    pub fn expose(&self) -> &str {
        self.url.as_str()
    }

    fn query(&self, key: &str) -> Option<String> {
        self.url
            .query_pairs()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
            .last()
    }

    fn decoded(s: &str) -> String {
        percent_decode(s)
    }

    /// Where libpq connects, reading `PGHOSTADDR`, `PGHOST` and `PGSERVICE`
    /// from the process environment (see [`DatabaseUrl::host_with`]).
    pub fn host(&self) -> Host {
        self.host_with(|var| std::env::var(var).ok())
    }

    /// Where libpq connects, with the environment read through `env` (a
    /// variable name to its value). As in libpq: a connection service
    /// (`service` parameter, then `PGSERVICE`) makes the server unknown
    /// ([`Host::Service`]); otherwise an address (`hostaddr` parameter, then
    /// `PGHOSTADDR`) is where libpq connects, whatever the host name says;
    /// otherwise the host name ([`DatabaseUrl::host_name_with`]); no host at
    /// all means libpq's default unix socket.
    pub fn host_with(&self, env: impl Fn(&str) -> Option<String>) -> Host {
        let env = |var: &str| env(var).filter(|v| !v.is_empty());
        if let Some(service) = self.param("service").or_else(|| env("PGSERVICE")) {
            return Host::Service(service);
        }
        if let Some(addr) = self.param("hostaddr").or_else(|| env("PGHOSTADDR")) {
            return Host::Tcp(addr);
        }
        match self.host_name_with(env) {
            Some(h) if h.starts_with('/') || h.starts_with('@') => Host::Socket(h),
            Some(h) => Host::Tcp(h),
            None => Host::Socket("(libpq default)".into()),
        }
    }

    /// The host name given to libpq: the `host` query parameter, then the
    /// authority, then `PGHOST` (read through `env`). Where libpq connects
    /// unless a `hostaddr` or a service says otherwise (see
    /// [`DatabaseUrl::host_with`]).
    pub fn host_name_with(&self, env: impl Fn(&str) -> Option<String>) -> Option<String> {
        self.param("host")
            .or_else(|| {
                self.url
                    .host_str()
                    .filter(|h| !h.is_empty())
                    .map(|h| Self::decoded(h.trim_start_matches('[').trim_end_matches(']')))
            })
            .or_else(|| env("PGHOST").filter(|h| !h.is_empty()))
    }

    /// [`DatabaseUrl::host_name_with`] on the process environment.
    pub fn host_name(&self) -> Option<String> {
        self.host_name_with(|var| std::env::var(var).ok())
    }

    /// A query parameter, unless empty.
    pub(crate) fn param(&self, key: &str) -> Option<String> {
        self.query(key).filter(|v| !v.is_empty())
    }

    /// The port (`port` query parameter, then the authority, then `PGPORT`,
    /// then 5432, as in libpq).
    pub fn port(&self) -> u16 {
        self.port_with(|var| std::env::var(var).ok())
    }

    /// [`DatabaseUrl::port`] with the environment read through `env`.
    pub fn port_with(&self, env: impl Fn(&str) -> Option<String>) -> u16 {
        self.query("port")
            .and_then(|p| p.parse().ok())
            .or(self.url.port())
            .or_else(|| env("PGPORT").and_then(|p| p.trim().parse().ok()))
            .unwrap_or(5432)
    }

    /// The database name (`dbname` query parameter, then the path).
    pub fn database(&self) -> String {
        self.query("dbname")
            .unwrap_or_else(|| Self::decoded(self.url.path().trim_start_matches('/')))
    }

    /// The user name, if the URL names one (`user` query parameter, then the user info).
    pub fn user(&self) -> Option<String> {
        self.query("user")
            .or_else(|| Some(Self::decoded(self.url.username())))
            .filter(|u| !u.is_empty())
    }

    /// The password the URL carries (user info, then `password` parameter),
    /// for connecting; never to be printed.
    #[cfg(feature = "runtime")]
    pub(crate) fn password(&self) -> Option<String> {
        self.url
            .password()
            .map(Self::decoded)
            .or_else(|| self.param("password"))
    }

    /// Whether the URL carries a password (in the user info or as a parameter).
    pub fn has_password(&self) -> bool {
        self.url.password().is_some() || self.query("password").is_some()
    }

    /// The same server and credentials, another database.
    pub fn with_database(&self, database: &str) -> DatabaseUrl {
        let mut url = self.url.clone();
        url.set_path(&format!("/{}", utf8_percent_encode(database)));
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .filter(|(k, _)| k != "dbname")
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        set_query(&mut url, &pairs);
        DatabaseUrl { url }
    }

    /// The URL with a query parameter added unless already present
    /// (e.g. `application_name`, `connect_timeout`).
    pub fn with_default_param(&self, key: &str, value: &str) -> DatabaseUrl {
        if self.query(key).is_some() {
            return self.clone();
        }
        let mut url = self.url.clone();
        url.query_pairs_mut().append_pair(key, value);
        DatabaseUrl { url }
    }

    /// The URL with the password replaced by `***`, safe to print.
    pub fn redacted(&self) -> String {
        let mut url = self.url.clone();
        if url.password().is_some() {
            // Cannot fail: the URL has an authority since it has a password.
            let _ = url.set_password(Some("***"));
        }
        if self.query("password").is_some() {
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| {
                    let v = if k == "password" {
                        "***".into()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            set_query(&mut url, &pairs);
        }
        url.to_string()
    }

    /// `host:port/database` (or `socket/database`), safe to print.
    pub fn target(&self) -> String {
        match self.host() {
            Host::Socket(dir) => format!("{dir} (unix socket), database {}", self.database()),
            host @ Host::Service(_) => format!("{host}, database {}", self.database()),
            host => format!("{host}:{}, database {}", self.port(), self.database()),
        }
    }
}

fn set_query(url: &mut Url, pairs: &[(String, String)]) {
    if pairs.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn utf8_percent_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("DatabaseUrl")
            .field(&self.redacted())
            .finish()
    }
}

impl std::str::FromStr for DatabaseUrl {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        DatabaseUrl::parse(s)
    }
}

/// `text` with the password of every URL in it (user info or `password=`
/// parameter) replaced by `***`: for messages that may echo user input, such
/// as command-line usage errors.
pub fn redact_urls_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends only where a URL's authority can end: a quote,
        // `@` or `:` may be part of the password, so they do not end it, and
        // the user info ends at the last `@`.
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, '/' | '?' | '#'))
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match (authority.find(':'), authority.rfind('@')) {
            (Some(colon), Some(at)) if colon < at => {
                out.push_str(&authority[..=colon]);
                out.push_str("***");
                out.push_str(&authority[at..]);
            }
            _ => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    redact_password_params(&out)
}

fn redact_password_params(text: &str) -> String {
    const KEY: &str = "password=";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.to_ascii_lowercase().find(KEY) {
        out.push_str(&rest[..i + KEY.len()]);
        let tail = &rest[i + KEY.len()..];
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, '&' | '#'))
            .unwrap_or(tail.len());
        out.push_str("***");
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const SECRET: &str = "s3cret-Pa55";

    fn config(vars: &[(&str, &str)]) -> Result<Config> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    fn url_with_secret() -> String {
        format!("postgres://app:{SECRET}@db.internal:6543/workflows?sslmode=disable")
    }

    #[test]
    fn defaults() {
        let c = config(&[("DATABASE_URL", "postgres://localhost/wf")]).unwrap();
        assert_eq!(c.pool_size, 10);
        assert_eq!(c.idle_timeout, Duration::from_secs(20));
        assert_eq!(c.connect_timeout, Duration::from_secs(10));
        assert_eq!(c.environment, Environment::Development);
    }

    #[test]
    fn overrides() {
        let c = config(&[
            ("DATABASE_URL", "postgres://localhost/wf"),
            ("DB_POOL_SIZE", "25"),
            ("DB_IDLE_TIMEOUT_SECS", "5"),
            ("DB_CONNECT_TIMEOUT_SECS", " 3 "),
            ("APP_ENV", "Staging"),
        ])
        .unwrap();
        assert_eq!(c.pool_size, 25);
        assert_eq!(c.idle_timeout, Duration::from_secs(5));
        assert_eq!(c.connect_timeout, Duration::from_secs(3));
        assert_eq!(c.environment, Environment::Other("staging".into()));
    }

    #[test]
    fn missing_database_url_names_the_variable() {
        for vars in [&[][..], &[("DATABASE_URL", "  ")][..]] {
            let err = config(vars).unwrap_err();
            assert!(matches!(
                err,
                Error::MissingEnv {
                    var: "DATABASE_URL",
                    ..
                }
            ));
            assert!(
                err.to_string().starts_with("DATABASE_URL is not set"),
                "{err}"
            );
        }
    }

    #[test]
    fn invalid_values_name_the_variable_and_what_is_expected() {
        for (var, value) in [
            ("DB_POOL_SIZE", "ten"),
            ("DB_POOL_SIZE", "0"),
            ("DB_POOL_SIZE", "-1"),
            ("DB_IDLE_TIMEOUT_SECS", "1.5"),
            ("DB_CONNECT_TIMEOUT_SECS", "0"),
        ] {
            let err =
                config(&[("DATABASE_URL", "postgres://localhost/wf"), (var, value)]).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!("{var} is invalid: expected ")),
                "{msg}"
            );
            assert!(msg.contains(&format!("{value:?}")), "{msg}");
        }
        for bad in [
            "mysql://localhost/wf",
            "not a url",
            "postgres://localhost",
            "host=localhost dbname=wf",
        ] {
            let err = config(&[("DATABASE_URL", bad)]).unwrap_err();
            assert!(
                matches!(err, Error::InvalidDatabaseUrl { .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn production_if_any_variable_says_so() {
        let env = |vars: &[(&str, &str)]| {
            let map: HashMap<&str, &str> = vars.iter().copied().collect();
            Environment::from_lookup(|k| map.get(k).map(|v| v.to_string()))
        };
        assert_eq!(env(&[]), Environment::Development);
        assert_eq!(env(&[("NODE_ENV", "PRODUCTION")]), Environment::Production);
        assert_eq!(
            env(&[("APP_ENV", "development"), ("RUST_ENV", "production")]),
            Environment::Production
        );
        assert_eq!(
            env(&[("APP_ENV", "test"), ("NODE_ENV", "development")]),
            Environment::Test
        );
    }

    #[test]
    fn password_never_appears_in_display_debug_or_errors() {
        let c = config(&[("DATABASE_URL", &url_with_secret())]).unwrap();
        for shown in [
            format!("{c:?}"),
            format!("{}", c.database_url),
            format!("{:?}", c.database_url),
            c.database_url.redacted(),
            c.database_url.target(),
        ] {
            assert!(!shown.contains(SECRET), "password leaked: {shown}");
        }
        assert!(
            c.database_url
                .redacted()
                .contains("app:***@db.internal:6543")
        );
        assert!(c.database_url.expose().contains(SECRET));

        let as_param = format!("postgres://localhost/wf?password={SECRET}&sslmode=disable");
        let u = DatabaseUrl::parse(&as_param).unwrap();
        assert!(!u.to_string().contains(SECRET) && u.to_string().contains("password=***"));

        // An unparseable URL is not echoed back either.
        let broken = format!("postgres://app:{SECRET}@[::1/wf");
        let err = config(&[("DATABASE_URL", &broken)]).unwrap_err();
        assert!(!format!("{err} {err:?}").contains(SECRET));
        // Nor does an invalid pool size reveal the URL.
        let err =
            config(&[("DATABASE_URL", &url_with_secret()), ("DB_POOL_SIZE", "x")]).unwrap_err();
        assert!(!format!("{err} {err:?}").contains(SECRET));
    }

    #[test]
    fn free_text_redaction_hides_passwords_with_quotes_at_signs_and_colons() {
        for password in [
            "ab'cd",
            "ab\"cd",
            "ab`cd",
            "p@ss:w'rd",
            "a:b@c",
            "x'y\"z@w:v",
        ] {
            for text in [
                format!("error: postgres://u:{password}@h/db failed"),
                format!("'postgres://u:{password}@h:5432/db?sslmode=disable'"),
                format!("\"postgresql://u:{password}@[::1]\" and more"),
                format!("postgres://u:{password}@h"),
                format!("postgres://h/db?user=u&password={password}&sslmode=require"),
            ] {
                // Exactly the password is masked, all of it, and nothing else.
                assert_eq!(redact_urls_in(&text), text.replace(password, "***"));
            }
        }
        assert_eq!(
            redact_urls_in("'postgres://u:ab'cd@h/db'"),
            "'postgres://u:***@h/db'"
        );
        assert_eq!(
            redact_urls_in("postgres://u:p@ss:w'rd@db.internal:6543/x?a=1"),
            "postgres://u:***@db.internal:6543/x?a=1"
        );
        assert_eq!(
            redact_urls_in("postgres://h/db?password=ab'cd&sslmode=require"),
            "postgres://h/db?password=***&sslmode=require"
        );
        assert_eq!(
            redact_urls_in("postgres://user@host:5432/db 'x'"),
            "postgres://user@host:5432/db 'x'"
        );
    }

    #[test]
    fn url_parts_follow_libpq() {
        let u = DatabaseUrl::parse("postgresql://us%40er:p%40ss@[::1]:6000/my%20db").unwrap();
        assert_eq!(u.host(), Host::Tcp("::1".into()));
        assert!(u.host().is_local());
        assert_eq!(u.port(), 6000);
        assert_eq!(u.database(), "my db");
        assert_eq!(u.user().as_deref(), Some("us@er"));

        let u = DatabaseUrl::parse("postgres:///wf?host=/var/run/postgresql&port=5433").unwrap();
        assert_eq!(u.host(), Host::Socket("/var/run/postgresql".into()));
        assert_eq!(u.port(), 5433);
        assert!(u.host().is_local());

        let u = DatabaseUrl::parse("postgres://localhost/ignored?host=db.example.net&dbname=real")
            .unwrap();
        assert_eq!(u.host(), Host::Tcp("db.example.net".into()));
        assert!(!u.host().is_local());
        assert_eq!(u.database(), "real");

        let moved = u.with_database("other");
        assert_eq!(moved.database(), "other");
        assert_eq!(moved.host(), u.host());
    }

    fn env_of<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn hostaddr_wins_over_the_host_name_as_in_libpq() {
        let none = env_of(&[]);
        let u = DatabaseUrl::parse("postgres://localhost/app?hostaddr=203.0.113.5").unwrap();
        assert_eq!(u.host_with(&none), Host::Tcp("203.0.113.5".into()));
        assert!(!u.host_with(&none).is_local());
        assert_eq!(u.host_name_with(&none).as_deref(), Some("localhost"));
        let u = DatabaseUrl::parse("postgres:///app?host=/tmp&hostaddr=10.1.2.3").unwrap();
        assert_eq!(u.host_with(&none), Host::Tcp("10.1.2.3".into()));
        let u = DatabaseUrl::parse("postgres://db.example.net/app?hostaddr=127.0.0.1").unwrap();
        assert!(u.host_with(&none).is_local());
        // An empty hostaddr is no hostaddr.
        let u = DatabaseUrl::parse("postgres://localhost/app?hostaddr=").unwrap();
        assert_eq!(u.host_with(&none), Host::Tcp("localhost".into()));
    }

    #[test]
    fn pghostaddr_and_pghost_apply_as_libpq_applies_them() {
        let loopback = DatabaseUrl::parse("postgres://localhost/app").unwrap();
        let no_host = DatabaseUrl::parse("postgres:///app").unwrap();
        // PGHOSTADDR applies even when the URL names a host (libpq connects to it).
        let addr = env_of(&[("PGHOSTADDR", "203.0.113.5")]);
        assert_eq!(loopback.host_with(&addr), Host::Tcp("203.0.113.5".into()));
        assert!(!loopback.host_with(&addr).is_local());
        // ... but not over a hostaddr in the URL.
        let explicit = DatabaseUrl::parse("postgres://localhost/app?hostaddr=127.0.0.1").unwrap();
        assert_eq!(explicit.host_with(&addr), Host::Tcp("127.0.0.1".into()));
        // PGHOST only when the URL has no host.
        let cloudsql = env_of(&[("PGHOST", "/cloudsql/proj:prod")]);
        assert_eq!(
            no_host.host_with(&cloudsql),
            Host::Socket("/cloudsql/proj:prod".into())
        );
        assert_eq!(loopback.host_with(&cloudsql), Host::Tcp("localhost".into()));
        let remote = env_of(&[("PGHOST", "db.example.net")]);
        assert_eq!(
            no_host.host_with(&remote),
            Host::Tcp("db.example.net".into())
        );
        assert!(!no_host.host_with(&remote).is_local());
        assert_eq!(
            no_host.host_with(env_of(&[("PGHOST", "")])),
            Host::Socket("(libpq default)".into())
        );
        // PGPORT when the URL has no port.
        let port = env_of(&[("PGPORT", "6543")]);
        assert_eq!(no_host.port_with(&port), 6543);
        let with_port = DatabaseUrl::parse("postgres://localhost:5433/app").unwrap();
        assert_eq!(with_port.port_with(&port), 5433);
    }

    #[test]
    fn a_service_makes_the_server_unknown_and_not_local() {
        let none = env_of(&[]);
        let u = DatabaseUrl::parse("postgres://localhost/app?service=billing").unwrap();
        assert_eq!(u.host_with(&none), Host::Service("billing".into()));
        assert!(!u.host_with(&none).is_local());
        let u = DatabaseUrl::parse("postgres:///app").unwrap();
        let env = env_of(&[("PGSERVICE", "billing"), ("PGHOST", "/tmp")]);
        assert_eq!(u.host_with(&env), Host::Service("billing".into()));
        assert!(!u.host_with(&env).is_local());
        let shown = Host::Service("billing".into()).to_string();
        assert!(shown.contains("service billing"), "{shown}");
        let u = DatabaseUrl::parse("postgres://u:pw@localhost/app?service=billing").unwrap();
        if std::env::var_os("PGSERVICE").is_none() {
            let target = u.target();
            assert!(
                target.contains("service billing") && target.contains("database app"),
                "{target}"
            );
            assert!(!target.contains("pw"));
        }
    }
}
