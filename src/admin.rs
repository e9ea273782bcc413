//! Destructive administration (reset, nuke) and the guard that protects it.

use serde::Serialize;

/// The guard rule that refused a destructive command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum GuardRule {
    /// `APP_ENV`, `RUST_ENV` or `NODE_ENV` says production.
    EnvironmentIsProduction,
    /// The database is stamped production.
    DatabaseIsProduction,
    /// The URL looks like a production server.
    UrlLooksLikeProduction,
    /// The server is not on loopback or a unix socket and `--allow-remote` was not given.
    RemoteServer,
    /// What the server reports after connecting disagrees with the URL.
    ConnectedTargetMismatch,
    /// The confirmation was missing, wrong, or declined.
    NotConfirmed,
}

impl GuardRule {
    /// The rule's stable name, as printed and documented.
    pub const fn name(self) -> &'static str {
        match self {
            GuardRule::EnvironmentIsProduction => "environment-is-production",
            GuardRule::DatabaseIsProduction => "database-is-production",
            GuardRule::UrlLooksLikeProduction => "url-looks-like-production",
            GuardRule::RemoteServer => "remote-server",
            GuardRule::ConnectedTargetMismatch => "connected-target-mismatch",
            GuardRule::NotConfirmed => "not-confirmed",
        }
    }
}
