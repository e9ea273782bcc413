//! The web dashboard (feature `studio`): `db-ops studio` serves it, and a
//! tokio service can mount the same [`axum::Router`] in its own server.
//!
//! Pages: an overview (executions by status, what finished in the last
//! hour, queues, stuck work), the executions list with filters (keyset
//! pages, never a `count(*)` over the table), one execution (its graph as
//! SVG, its steps, its history, why it waits), one step (input, output,
//! error, every attempt), workflows with their versions, queues and
//! schedules. Everything is rendered on the server from templates compiled
//! into the crate ([`askama`], which escapes every value unless told
//! otherwise); the pages carry one small script, for live updates.
//!
//! **Live.** An execution page subscribes to `…/live`, a server-sent-events
//! stream. One [`Notifier`](crate::runtime::Notifier) per server listens to
//! the engine's notifications; an execution with viewers is re-read and
//! re-rendered once per change (at most [`LIVE_INTERVAL`] apart) and the
//! fragment is pushed to all its viewers: the database is read once per
//! change of a watched execution, not once per viewer.
//!
//! **Safety.** Bound to 127.0.0.1 by default; [`check_bind`] refuses an
//! address other hosts can reach unless an access token is set (sent as
//! `Authorization: Bearer`, or once as `?token=` which sets a cookie).
//! Actions (cancel, pause, resume, retry) exist only when
//! [`StudioOptions::actions`] is set; each is a POST carrying the server's
//! CSRF token and is applied only after a confirmation page. Every response
//! carries a strict Content-Security-Policy (no inline script or style).
//! Nothing of the connection string is shown.
//!
//! ```no_run
//! # async fn demo() -> workflow_db::Result<()> {
//! use workflow_db::studio::{Studio, StudioOptions};
//! let config = workflow_db::Config::from_env()?;
//! let pool = workflow_db::runtime::AsyncPool::from_config(&config).await?;
//! let mut options = StudioOptions::default();
//! options.base_path = "/studio".to_owned(); // where it is nested
//! options.allowed_hosts = vec!["ops.internal".to_owned()]; // names besides localhost
//! let studio = Studio::new(pool, options);
//! studio.start_live(&config.database_url).await?;
//! let app = axum::Router::new().nest("/studio", studio.router());
//! # let _ = app;
//! # Ok(())
//! # }
//! ```
//!
//! Without a token, only requests addressed to `localhost`, a loopback
//! address or one of [`StudioOptions::allowed_hosts`] are answered (a page
//! elsewhere must not reach it by DNS rebinding).
//!
//! Guide: `docs/admin.md`, "db-ops studio".

pub mod graph;
mod live;
mod pages;
mod view;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseUrl;
use crate::error::{Error, Result};
use crate::runtime::AsyncPool;

/// The longest a watched execution's viewers wait for a change to show
/// (changes closer together are pushed as one update).
pub const LIVE_INTERVAL: Duration = Duration::from_millis(250);

/// The environment variable `db-ops studio` reads its access token from.
pub const TOKEN_ENV: &str = "WORKFLOW_DB_STUDIO_TOKEN";

/// The cookie that carries the access token after a `?token=` visit.
const TOKEN_COOKIE: &str = "workflow_db_studio";

/// Settings of a [`Studio`]; [`StudioOptions::default`] then change fields.
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct StudioOptions {
    /// Offer cancel, pause, resume and retry (default off: read only).
    pub actions: bool,
    /// Require this access token on every request (default none).
    pub token: Option<String>,
    /// The path the router is mounted under, without a trailing slash
    /// (default empty: the root).
    pub base_path: String,
    /// Host names (the `Host` header without its port) answered without a
    /// token besides `localhost` and loopback addresses (default none).
    pub allowed_hosts: Vec<String>,
}

impl std::fmt::Debug for StudioOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StudioOptions")
            .field("actions", &self.actions)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("base_path", &self.base_path)
            .field("allowed_hosts", &self.allowed_hosts)
            .finish()
    }
}

/// The dashboard: its pool, settings and live updates. Cheap to clone.
#[derive(Clone)]
pub struct Studio {
    inner: Arc<Inner>,
}

struct Inner {
    pool: AsyncPool,
    actions: bool,
    base: String,
    allowed_hosts: Vec<String>,
    /// SHA-256 of the access token (compared digest to digest).
    token: Option<[u8; 32]>,
    /// The synchronizer token every action form carries.
    csrf: String,
    live: live::Hub,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Studio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Studio")
            .field("actions", &self.inner.actions)
            .field("base_path", &self.inner.base)
            .field("token", &self.inner.token.map(|_| "<set>"))
            .finish()
    }
}

fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Studio {
    /// A dashboard reading through `pool`. Live updates start with
    /// [`Studio::start_live`] (or [`serve`]).
    pub fn new(pool: AsyncPool, options: StudioOptions) -> Studio {
        let csrf = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        Studio {
            inner: Arc::new(Inner {
                pool,
                actions: options.actions,
                base: options.base_path.trim_end_matches('/').to_owned(),
                allowed_hosts: options
                    .allowed_hosts
                    .iter()
                    .map(|h| h.to_ascii_lowercase())
                    .collect(),
                token: options.token.as_deref().map(digest),
                csrf,
                live: live::Hub::default(),
                shutdown: CancellationToken::new(),
            }),
        }
    }

    /// The pages, the live streams and the static files, behind the token
    /// check and the security headers.
    pub fn router(&self) -> Router {
        pages::routes()
            .layer(middleware::from_fn_with_state(self.clone(), guard))
            .with_state(self.clone())
    }

    /// Listens to the engine's notifications on `url` (one connection) and
    /// keeps the viewers of each execution page up to date, until
    /// [`Studio::shutdown`]. Without it the pages work but do not update
    /// by themselves. Fails when that connection cannot be opened (the
    /// notifier speaks no TLS yet: `sslmode=require` URLs are refused);
    /// the pages can still be served.
    pub async fn start_live(&self, url: &DatabaseUrl) -> Result<()> {
        live::start(self.clone(), url).await
    }

    /// Ends the live streams (open event streams would otherwise keep a
    /// graceful shutdown waiting) and the live task.
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }

    fn link(&self, path: &str) -> String {
        format!("{}{path}", self.inner.base)
    }

    /// Whether the request's `Host` names this host: `localhost`, a
    /// loopback address, or one of [`StudioOptions::allowed_hosts`]. A
    /// request without one (not from a browser) is answered.
    fn host_allowed(&self, headers: &HeaderMap) -> bool {
        let Some(host) = headers.get(header::HOST) else {
            return true;
        };
        let Ok(host) = host.to_str() else {
            return false;
        };
        let name = host_name(host).to_ascii_lowercase();
        name == "localhost"
            || name
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
            || self.inner.allowed_hosts.contains(&name)
    }
}

/// Refuses to listen where other hosts can connect without an access
/// token: any address but a loopback one needs `token`.
pub fn check_bind(addr: &SocketAddr, token: Option<&str>) -> Result<()> {
    if addr.ip().is_loopback() || token.is_some_and(|t| !t.is_empty()) {
        return Ok(());
    }
    Err(Error::InvalidOption {
        option: "studio bind address",
        reason: format!(
            "{addr} can be reached from other hosts: set an access token ({TOKEN_ENV} or --token) \
             or bind to 127.0.0.1"
        ),
    })
}

/// How long a graceful stop waits for open requests once the live streams
/// are ended.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves `studio` on `listener` until `shutdown` completes; then ends the
/// live streams and returns once the open requests are answered (or after
/// [`SHUTDOWN_GRACE`]). Call [`Studio::start_live`] first for live pages.
pub async fn serve(
    studio: Studio,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let app = studio.router();
    let stop = studio.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        stop.shutdown();
    });
    let stopped = studio.inner.shutdown.clone();
    tokio::select! {
        served = server => served.map_err(|e| Error::Io {
            context: "serving the studio".to_owned(),
            source: e,
        }),
        () = async {
            stopped.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("studio: requests still open after the grace period, stopping anyway");
            Ok(())
        }
    }
}

/// Security headers on every response; the access token on every request.
async fn guard(State(studio): State<Studio>, request: Request, next: Next) -> Response {
    let base = studio.inner.base.clone();
    let mut response = pages::BASE
        .scope(base, async {
            match studio.inner.token {
                // Without a token only names of this host are answered: a
                // page elsewhere that rebinds its own name to 127.0.0.1
                // must not read the studio (DNS rebinding).
                None if !studio.host_allowed(request.headers()) => pages::PageError::new(
                    StatusCode::MISDIRECTED_REQUEST,
                    "this studio answers requests addressed to localhost only \
                     (set an access token to serve it under other names)",
                )
                .into_response(),
                None => next.run(request).await,
                Some(expected) => authorize(&studio, expected, request, next).await,
            }
        })
        .await;
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        // same-origin, not no-referrer: with no-referrer a browser sends `Origin: null`
        // on the studio's own form posts, which the origin check refuses.
        (header::REFERRER_POLICY, "same-origin"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

async fn authorize(studio: &Studio, expected: [u8; 32], request: Request, next: Next) -> Response {
    let headers = request.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // The cookie holds the token's digest, never the token.
    let by_cookie =
        cookie(headers, TOKEN_COOKIE).is_some_and(|c| digest(&c) == digest(&hex(&expected)));
    if by_cookie || bearer.is_some_and(|t| digest(t) == expected) {
        return next.run(request).await;
    }
    // `?token=` once: set the cookie and go to the same page without it.
    let uri = request.uri();
    let query: Vec<(String, String)> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    if let Some((_, token)) = query.iter().find(|(k, _)| k == "token") {
        if digest(token) == expected {
            let rest: Vec<&(String, String)> = query.iter().filter(|(k, _)| k != "token").collect();
            // The path as the router sees it (a nested router's is
            // already without the prefix), one leading slash: never
            // `//host`, which a browser would read as another site.
            let mut target = studio.link(&format!("/{}", uri.path().trim_start_matches('/')));
            if !rest.is_empty() {
                target.push('?');
                target.push_str(
                    &url::form_urlencoded::Serializer::new(String::new())
                        .extend_pairs(rest)
                        .finish(),
                );
            }
            let mut response = Redirect::to(&target).into_response();
            let path = if studio.inner.base.is_empty() {
                "/"
            } else {
                studio.inner.base.as_str()
            };
            if let Ok(value) = HeaderValue::from_str(&format!(
                "{TOKEN_COOKIE}={}; Path={path}; HttpOnly; SameSite=Lax",
                hex(&expected)
            )) {
                response.headers_mut().insert(header::SET_COOKIE, value);
            }
            return response;
        }
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "this studio needs its access token: open it with ?token=<token> once, \
         or send Authorization: Bearer <token>\n",
    )
        .into_response()
}

/// `host[:port]` without the port (`[::1]:4000` is `[::1]`).
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

/// Whether a POST came from a page of this studio: `Sec-Fetch-Site`, when
/// the browser sends it, is `same-origin` (or `none`: typed or
/// bookmarked), and `Origin`, when sent, names the request's own host.
fn same_origin(headers: &HeaderMap) -> bool {
    let site = headers
        .get("sec-fetch-site")
        .map(|v| v.to_str().unwrap_or(""));
    if site.is_some_and(|s| s != "same-origin" && s != "none") {
        return false;
    }
    match (headers.get(header::ORIGIN), headers.get(header::HOST)) {
        (Some(origin), Some(host)) => {
            let origin = origin.to_str().unwrap_or("");
            let origin_host = origin.split_once("://").map_or("", |(_, h)| h);
            host.to_str()
                .is_ok_and(|h| h.eq_ignore_ascii_case(origin_host))
        }
        _ => true,
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}
