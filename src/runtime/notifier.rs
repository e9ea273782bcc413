//! [`Notifier`]: the engine's notifications as an async [`Stream`], on a
//! dedicated connection that reconnects by itself and says so.
//!
//! The triggers send a `NOTIFY` on [`CHANNEL`] when a transaction that
//! changed executions or steps commits (see [`Notification`]), and one on
//! [`CLAIMABLE_CHANNEL`] when steps became claimable (see [`Claimable`]). A
//! notifier holds one tokio-postgres connection that has run `LISTEN` on
//! both and yields a [`NotifierEvent`] for each notification, the moment
//! the socket has it: a background task waits on the socket (no sleep or
//! poll loop), so an idle notifier costs one small query every
//! [`NotifierOptions::catch_up_interval`].
//!
//! **A NOTIFY is a wake-up, not a record.** PostgreSQL delivers it only to
//! sessions listening when the transaction commits: while the notifier is
//! disconnected, notifications are lost. The stream says when that can have
//! happened: [`NotifierEvent::Disconnected`] as soon as the connection is
//! found broken, then [`NotifierEvent::Reconnected`] once a new connection
//! listens again (after a capped, jittered exponential backoff; forever,
//! until the notifier is dropped).
//!
//! **Catching up from the feed.** The record is the event feed
//! ([`crate::engine::feed`]): every transition's event, ordered by the
//! writing transaction. The notifier notes, every
//! [`NotifierOptions::catch_up_interval`], how far the feed has been
//! notified (every event of a transaction older than the snapshot's xmin
//! committed while it listened). After a reconnection it replays the feed
//! from there as [`NotifierEvent::Notification`]s: the first batch before
//! `Reconnected`, the rest (events of transactions that were still running
//! elsewhere on the server, which hold the feed's horizon back) shortly
//! after, until every transaction that committed before the new `LISTEN`
//! is covered. So a [`Notification`] stream has duplicates (the replay
//! starts a little before the disconnection). It is a best effort: the
//! noted position trails the horizon by one check, because PostgreSQL makes
//! a commit visible a moment before it signals listeners, but a
//! notification held in the server's queue for longer (a commit stuck on a
//! synchronous standby) can still be missed; a consumer that must see every
//! transition reads the feed with a cursor. Claimable
//! notifications are not in the feed: on `Reconnected` a worker claims,
//! which finds whatever became claimable meanwhile.
//!
//! **Never silently deaf.** A connection closed by the server (a
//! terminated backend, a restart), a broken socket, or a connection that
//! stops answering (a health check that gets no answer within
//! [`NotifierOptions::health_check_timeout`]) is reported and replaced.
//! The stream ends (`None`) only if its task stopped, which it does only
//! when the [`Notifier`] is dropped.
//!
//! **Connection settings.** The notifier reads the same [`DatabaseUrl`] as
//! the pool: host (or unix-socket directory, `hostaddr`, `PGHOST`), port
//! (`PGPORT`), database, user (`PGUSER`), password (`PGPASSWORD`),
//! `application_name` (the URL's, else [`NOTIFIER_APPLICATION_NAME`]),
//! `connect_timeout` and `options`. TLS is not supported yet: `sslmode`
//! `disable`, `allow` and `prefer` connect without it, `require`,
//! `verify-ca` and `verify-full` are refused with
//! [`Error::InvalidDatabaseUrl`], as are connection services (`service`,
//! `PGSERVICE`). Other libpq parameters and `~/.pgpass` are not read. The
//! password is never logged nor put in an error.

use std::fmt;
use std::future::{Future, poll_fn};
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{AsyncMessage, Client, Connection, NoTls, Socket};

use crate::config::{Config, DEFAULT_CONNECT_TIMEOUT, DatabaseUrl, Host};
use crate::engine::feed::FeedPosition;
use crate::engine::{CHANNEL, CLAIMABLE_CHANNEL, Claimable, Notification};
use crate::error::{Error, Result};

/// The `application_name` of the notifier's connection, unless the URL sets one.
pub const NOTIFIER_APPLICATION_NAME: &str = "workflow-db notifier";

/// What the notifier's stream yields.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotifierEvent {
    /// A committed transition (see [`Notification`] and `docs/engine.md`).
    Notification(Notification),
    /// Steps became claimable (see [`Claimable`]): what wakes a worker.
    Claimable(Claimable),
    /// The connection was lost: notifications committed from now until the
    /// next [`NotifierEvent::Reconnected`] are not delivered. The notifier
    /// is already reconnecting.
    Disconnected {
        /// Why (the driver's error chain, or "no answer to the health
        /// check"); never the password.
        reason: String,
    },
    /// A new connection listens again; whatever commits after this event is
    /// notified. The [`Notification`]s missed since the last
    /// [`NotifierEvent::Disconnected`] are replayed from the event feed
    /// (unless [`NotifierOptions::catch_up`] is off); [`Claimable`]s are
    /// not: claim now.
    Reconnected,
}

/// Settings of a [`Notifier`]; [`NotifierOptions::default`] then change fields.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NotifierOptions {
    /// `application_name` unless the URL sets one (default
    /// [`NOTIFIER_APPLICATION_NAME`]).
    pub application_name: String,
    /// Limit for opening a connection and running `LISTEN`, unless the URL
    /// sets `connect_timeout` (default 10 s).
    pub connect_timeout: Duration,
    /// Wait before the first reconnection attempt (default 100 ms); each
    /// failed attempt doubles it up to [`NotifierOptions::reconnect_max`].
    /// Waits are jittered (50–100 % of the value) so that many notifiers do
    /// not reconnect in step after a failover.
    pub reconnect_initial: Duration,
    /// The longest wait between reconnection attempts (default 10 s). The
    /// backoff starts again from `reconnect_initial` after a connection that
    /// lasted at least this long.
    pub reconnect_max: Duration,
    /// After this long without any message from the server, the notifier
    /// sends `SELECT 1` to prove the connection still works (default 30 s).
    pub health_check_interval: Duration,
    /// A health check not answered within this is a lost connection
    /// (default 10 s).
    pub health_check_timeout: Duration,
    /// Listen to the transitions ([`CHANNEL`]) as well as to claimable work
    /// ([`CLAIMABLE_CHANNEL`]) (default true). A worker needs only the
    /// latter: without transitions there is nothing to catch up either.
    pub transitions: bool,
    /// After a reconnection, replay the event feed from where the last
    /// connection had delivered it, as notifications (default true). See
    /// [the module documentation](self).
    pub catch_up: bool,
    /// How often the notifier notes how far the feed was delivered (default
    /// 5 s): a catch-up also replays up to this much from before the
    /// disconnection (duplicates, not gaps).
    pub catch_up_interval: Duration,
    /// Events buffered for a slow consumer (default 1024). When the buffer
    /// is full the notifier stops reading the socket until the consumer
    /// catches up (PostgreSQL queues the notifications meanwhile); nothing
    /// is dropped.
    pub capacity: usize,
}

impl Default for NotifierOptions {
    fn default() -> Self {
        NotifierOptions {
            application_name: NOTIFIER_APPLICATION_NAME.to_owned(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(10),
            health_check_interval: Duration::from_secs(30),
            health_check_timeout: Duration::from_secs(10),
            transitions: true,
            catch_up: true,
            catch_up_interval: Duration::from_secs(5),
            capacity: 1024,
        }
    }
}

/// The engine's notifications as a [`Stream`] of [`NotifierEvent`]s, from a
/// dedicated connection listening on [`CHANNEL`] and [`CLAIMABLE_CHANNEL`] (see the
/// [module documentation](self)).
///
/// Needs a tokio runtime with timers (`#[tokio::main]` has them). Dropping
/// the notifier stops its task and closes its connection.
///
/// ```no_run
/// use futures_util::StreamExt;
/// use workflow_db::runtime::{Notifier, NotifierEvent};
///
/// # async fn demo(url: &workflow_db::DatabaseUrl) -> workflow_db::Result<()> {
/// let mut notifier = Notifier::connect(url).await?;
/// while let Some(event) = notifier.next().await {
///     match event {
///         NotifierEvent::Notification(n) => { /* wake the workers for n.execution_id */ }
///         NotifierEvent::Disconnected { reason } => eprintln!("notifier lost: {reason}"),
///         NotifierEvent::Reconnected => { /* catch up: claim, or read engine::feed */ }
///         _ => {}
///     }
/// }
/// # Ok(())
/// # }
/// ```
pub struct Notifier {
    events: mpsc::Receiver<NotifierEvent>,
    task: JoinHandle<()>,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notifier")
            .field("buffered", &self.events.len())
            .field("running", &!self.task.is_finished())
            .finish()
    }
}

impl Notifier {
    /// Connects to `url` with [`NotifierOptions::default`], runs `LISTEN`
    /// and starts the task that reads notifications. Fails (naming the
    /// target, never the password) when this first connection cannot be
    /// opened; after that it reconnects by itself.
    pub async fn connect(url: &DatabaseUrl) -> Result<Notifier> {
        Notifier::connect_with(url, NotifierOptions::default()).await
    }

    /// [`Notifier::connect`] to the configuration's `database_url`, with its
    /// `connect_timeout`.
    pub async fn from_config(config: &Config) -> Result<Notifier> {
        let options = NotifierOptions {
            connect_timeout: config.connect_timeout,
            ..NotifierOptions::default()
        };
        Notifier::connect_with(&config.database_url, options).await
    }

    /// [`Notifier::connect`] with these options.
    pub async fn connect_with(url: &DatabaseUrl, options: NotifierOptions) -> Result<Notifier> {
        let mut options = options;
        let config = pg_config(url, &options)?;
        // The URL's connect_timeout, when it has one, bounds every attempt.
        if let Some(t) = config.get_connect_timeout() {
            options.connect_timeout = *t;
        }
        let target = url.target();
        let live = open(&config, options.connect_timeout, listen_sql(&options))
            .await
            .map_err(|reason| Error::Connection {
                target: target.clone(),
                source: diesel::ConnectionError::BadConnection(reason),
            })?;
        tracing::debug!(%target, "notifier listening");
        let (tx, events) = mpsc::channel(options.capacity.max(1));
        let task = tokio::spawn(supervise(live, config, options, target, tx));
        Ok(Notifier { events, task })
    }

    /// The next event; `None` only if the notifier's task stopped. The
    /// same as `StreamExt::next`.
    pub async fn recv(&mut self) -> Option<NotifierEvent> {
        self.events.recv().await
    }

    /// The next event if one is buffered, without waiting (to handle a
    /// burst of notifications as one).
    pub fn try_recv(&mut self) -> Option<NotifierEvent> {
        self.events.try_recv().ok()
    }
}

impl Stream for Notifier {
    type Item = NotifierEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<NotifierEvent>> {
        self.get_mut().events.poll_recv(cx)
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A connection that has run `LISTEN`.
struct Live {
    client: Client,
    connection: Connection<Socket, NoTlsStream>,
}

/// Why a connection's loop ended.
enum Ended {
    /// The consumer dropped the notifier.
    Closed,
    /// The connection broke (the reason, for the event and the log).
    Lost(String),
}

/// Keeps a connection listening for as long as the consumer is there:
/// reads it, and replaces it when it breaks.
async fn supervise(
    mut live: Live,
    config: tokio_postgres::Config,
    options: NotifierOptions,
    target: String,
    tx: mpsc::Sender<NotifierEvent>,
) {
    // Failed attempts since the backoff was last reset.
    let mut failures: u32 = 0;
    // How far the feed was notified, and what is left to replay.
    let mut feed = FeedState::default();
    let mut reconnected = false;
    loop {
        let since = Instant::now();
        let mut held = Vec::new();
        let reason = match ready(&mut live, &mut feed, reconnected, &options, &tx, &mut held).await
        {
            Err(reason) => reason,
            Ok(false) => return,
            Ok(true) => {
                for message in &held {
                    if !dispatch(message, &tx).await {
                        return;
                    }
                }
                match read(&mut live, &tx, &options, &mut feed).await {
                    Ended::Closed => return,
                    Ended::Lost(reason) => reason,
                }
            }
        };
        drop(live);
        tracing::warn!(%target, %reason, "notifier connection lost; reconnecting");
        if tx
            .send(NotifierEvent::Disconnected { reason })
            .await
            .is_err()
        {
            return;
        }
        if since.elapsed() >= options.reconnect_max {
            failures = 0;
        }
        live = loop {
            let delay = jittered(backoff(
                options.reconnect_initial,
                options.reconnect_max,
                failures,
            ));
            failures = failures.saturating_add(1);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = tx.closed() => return,
            }
            let attempt = tokio::select! {
                r = open(&config, options.connect_timeout, listen_sql(&options)) => r,
                () = tx.closed() => return,
            };
            match attempt {
                Ok(live) => break live,
                Err(error) => {
                    tracing::warn!(%target, %error, attempt = failures, "notifier reconnection failed")
                }
            }
        };
        tracing::info!(%target, "notifier reconnected");
        reconnected = true;
    }
}

/// Makes a new connection ready (it has run `LISTEN`): notes where the
/// feed stands; after a reconnection, replays the first batch of what was
/// missed as notifications (the rest follows in [`read`]) and says
/// [`NotifierEvent::Reconnected`]. `Ok(false)`: the consumer is gone;
/// `Err`: the connection broke.
async fn ready(
    live: &mut Live,
    feed: &mut FeedState,
    reconnected: bool,
    options: &NotifierOptions,
    tx: &mpsc::Sender<NotifierEvent>,
    held: &mut Vec<AsyncMessage>,
) -> std::result::Result<bool, String> {
    let Live { client, connection } = live;
    let row = driven(connection, client.query_one(HORIZON, &[]), held).await?;
    let (xmin, xmax): (i64, i64) = (row.get(0), row.get(1));
    let horizon = FeedPosition {
        txid: xmin - 1,
        event_id: i64::MAX,
    };
    if !reconnected || !options.catch_up || !options.transitions || feed.head.is_none() {
        // Nothing owed from before this connection (or no catch-up asked).
        *feed = FeedState {
            head: Some(horizon),
            until: None,
        };
    } else {
        // Transactions that committed before LISTEN are below xmax: replay
        // the feed from the head until its horizon passes xmax.
        feed.until = Some(feed.until.map_or(xmax, |u| u.max(xmax)));
        let (notes, next) = driven(connection, replay(client, *feed, REPLAY_BATCH), held).await?;
        *feed = next;
        tracing::info!(
            replayed = notes.len(),
            done = feed.until.is_none(),
            "notifier: catching up from the event feed"
        );
        for n in notes {
            if tx.send(NotifierEvent::Notification(n)).await.is_err() {
                return Ok(false);
            }
        }
    }
    if reconnected && tx.send(NotifierEvent::Reconnected).await.is_err() {
        return Ok(false);
    }
    Ok(true)
}

/// Opens a connection and runs `LISTEN` on it, within `timeout`; the error
/// is the driver's error chain.
async fn open(
    config: &tokio_postgres::Config,
    timeout: Duration,
    listen: &str,
) -> std::result::Result<Live, String> {
    let attempt = async {
        let (client, mut connection) = config.connect(NoTls).await.map_err(|e| chain(&e))?;
        // The connection must be driven for the LISTEN to be sent and
        // answered; nothing is notified before it has run, notices are logged.
        let mut held = Vec::new();
        driven(&mut connection, client.batch_execute(listen), &mut held).await?;
        held.iter().for_each(log_message);
        Ok(Live { client, connection })
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no connection within {timeout:?}")))
}

/// The channels a notifier listens to.
fn listen_sql(options: &NotifierOptions) -> &'static str {
    if options.transitions {
        "LISTEN workflow_db_events; LISTEN workflow_db_claimable"
    } else {
        "LISTEN workflow_db_claimable"
    }
}

/// Reads `live` until it breaks or the consumer goes away, passing its
/// notifications on. Every [`NotifierOptions::catch_up_interval`] (and after
/// [`NotifierOptions::health_check_interval`] of silence) one query both
/// proves the connection alive and moves the feed's head; while a replay
/// is unfinished, a replay step every [`REPLAY_INTERVAL`] instead.
async fn read(
    live: &mut Live,
    tx: &mpsc::Sender<NotifierEvent>,
    options: &NotifierOptions,
    feed: &mut FeedState,
) -> Ended {
    let Live { client, connection } = live;
    let client: &Client = client;
    let mut quiet_until = Instant::now() + options.health_check_interval;
    let mut head_due = Instant::now() + next_check(options, feed);
    let mut check: Option<Check<'_>> = None;
    // The horizon of the previous check: the head moves there, one check
    // behind (see FeedState::head).
    let mut previous: Option<FeedPosition> = None;
    loop {
        tokio::select! {
            biased;
            m = poll_fn(|cx| connection.poll_message(cx)) => {
                let message = match m {
                    Some(Ok(message)) => message,
                    Some(Err(e)) => return Ended::Lost(chain(&e)),
                    None => return Ended::Lost("the server closed the connection".to_owned()),
                };
                // Any message proves the connection alive.
                quiet_until = Instant::now() + options.health_check_interval;
                if !dispatch(&message, tx).await {
                    return Ended::Closed;
                }
            }
            r = async { check.as_mut().expect("guarded by is_some").await }, if check.is_some() => {
                check = None;
                match r {
                    Ok(Checked::Horizon(xmin)) => {
                        let now = FeedPosition { txid: xmin - 1, event_id: i64::MAX };
                        if let Some(p) = previous.replace(now) {
                            feed.head = feed.head.max(Some(p));
                        }
                    }
                    Ok(Checked::Replayed(notes, next)) => {
                        *feed = next;
                        for n in notes {
                            if tx.send(NotifierEvent::Notification(n)).await.is_err() {
                                return Ended::Closed;
                            }
                        }
                    }
                    Err(reason) => return Ended::Lost(reason),
                }
                quiet_until = Instant::now() + options.health_check_interval;
                head_due = Instant::now() + next_check(options, feed);
            }
            () = tokio::time::sleep_until(quiet_until.min(head_due)), if check.is_none() => {
                let timeout = options.health_check_timeout;
                let state = *feed;
                check = Some(Box::pin(async move {
                    let step = async {
                        if state.until.is_some() {
                            let (notes, next) = replay(client, state, REPLAY_BATCH).await.map_err(|e| chain(&e))?;
                            Ok(Checked::Replayed(notes, next))
                        } else {
                            let row = client.query_one(HORIZON, &[]).await.map_err(|e| chain(&e))?;
                            Ok(Checked::Horizon(row.get(0)))
                        }
                    };
                    tokio::time::timeout(timeout, step)
                        .await
                        .unwrap_or_else(|_| Err(format!("no answer to the health check within {timeout:?}")))
                }));
            }
            () = tx.closed() => return Ended::Closed,
        }
    }
}

/// Replay steps while a replay is unfinished come this often.
const REPLAY_INTERVAL: Duration = Duration::from_millis(200);

/// Events per replay step.
const REPLAY_BATCH: u32 = 1000;

fn next_check(options: &NotifierOptions, feed: &FeedState) -> Duration {
    if feed.until.is_some() {
        REPLAY_INTERVAL
    } else {
        options.catch_up_interval
    }
}

/// Passes a notification on (false when the consumer is gone).
async fn dispatch(message: &AsyncMessage, tx: &mpsc::Sender<NotifierEvent>) -> bool {
    let event = match message {
        AsyncMessage::Notification(n) if n.channel() == CHANNEL => {
            Notification::parse(n.payload()).map(NotifierEvent::Notification)
        }
        AsyncMessage::Notification(n) if n.channel() == CLAIMABLE_CHANNEL => {
            Claimable::parse(n.payload()).map(NotifierEvent::Claimable)
        }
        _ => {
            log_message(message);
            return true;
        }
    };
    match event {
        Some(event) => tx.send(event).await.is_ok(),
        None => {
            tracing::warn!("ignoring a malformed notification");
            true
        }
    }
}

/// How far the feed was notified to the consumer, and what is left to
/// replay after a reconnection.
#[derive(Debug, Clone, Copy, Default)]
struct FeedState {
    /// Every event at or before this position was notified (live, or
    /// replayed); `None` before the first connection said where the feed
    /// stood. In normal operation it trails the feed's horizon by one check
    /// ([`NotifierOptions::catch_up_interval`]): a transaction can be
    /// finished in every snapshot a little before its NOTIFY reaches
    /// listeners (PostgreSQL signals them after the commit is visible, and
    /// a listener reads its queue only up to the oldest entry whose
    /// transaction is still committing).
    head: Option<FeedPosition>,
    /// While replaying: every transaction that committed before the current
    /// connection's `LISTEN` has a txid below this (the `xmax` of a snapshot
    /// taken after it). The replay is complete once the feed's horizon has
    /// passed it.
    until: Option<i64>,
}

/// The events after `($1, $2)` below the feed's horizon (the
/// `engine::feed` order: `txid` below the snapshot's xmin), at most `$3`,
/// and that horizon (on a row of its own when there is no event).
const REPLAY: &str = "WITH h AS (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin) \
     SELECT h.xmin, e.execution_id, e.step_id, e.to_status, e.txid, e.id FROM h \
     LEFT JOIN LATERAL (SELECT x.execution_id, x.step_id, x.to_status, x.txid, x.id \
                          FROM execution_events x \
                         WHERE (x.txid, x.id) > ($1, $2) AND x.txid < h.xmin \
                         ORDER BY x.txid, x.id LIMIT $3) e ON true \
     ORDER BY e.txid, e.id";

/// The feed's horizon now (`txid`s below it committed), and the `xmax` of
/// this snapshot (every transaction committed so far is below it).
const HORIZON: &str = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint, \
     pg_snapshot_xmax(pg_current_snapshot())::text::bigint";

type Check<'a> = Pin<Box<dyn Future<Output = std::result::Result<Checked, String>> + Send + 'a>>;

/// What a periodic check found.
enum Checked {
    /// The horizon (normal operation).
    Horizon(i64),
    /// A replay step: the notifications, and the new state.
    Replayed(Vec<Notification>, FeedState),
}

/// Runs `query` on `live` while reading its connection; messages that
/// arrive meanwhile are kept in `held`, in order.
async fn driven<T>(
    connection: &mut Connection<Socket, NoTlsStream>,
    query: impl Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    held: &mut Vec<AsyncMessage>,
) -> std::result::Result<T, String> {
    tokio::pin!(query);
    loop {
        tokio::select! {
            r = &mut query => return r.map_err(|e| chain(&e)),
            m = poll_fn(|cx| connection.poll_message(cx)) => match m {
                Some(Ok(message)) => held.push(message),
                Some(Err(e)) => return Err(chain(&e)),
                None => return Err("the server closed the connection".to_owned()),
            },
        }
    }
}

/// One replay step from `state.head`: the missed events as notifications
/// (at most `limit`), and the state after them.
async fn replay(
    client: &Client,
    state: FeedState,
    limit: u32,
) -> std::result::Result<(Vec<Notification>, FeedState), tokio_postgres::Error> {
    let from = state.head.unwrap_or(FeedPosition::START);
    let rows = client
        .query(
            REPLAY,
            &[&from.txid, &from.event_id, &i64::from(limit.max(1))],
        )
        .await?;
    let xmin: i64 = rows.first().map_or(0, |r| r.get(0));
    let mut notes = Vec::new();
    let mut head = from;
    for row in &rows {
        let Some(txid) = row.get::<_, Option<i64>>(4) else {
            continue; // the horizon's own row: no event
        };
        head = FeedPosition {
            txid,
            event_id: row.get(5),
        };
        let status: String = row.get(3);
        notes.extend(Notification::from_event(row.get(1), row.get(2), &status));
    }
    let mut next = FeedState {
        head: Some(head),
        until: state.until,
    };
    if notes.len() < limit.max(1) as usize {
        // Everything below the horizon was replayed.
        next.head = Some(head.max(FeedPosition {
            txid: xmin - 1,
            event_id: i64::MAX,
        }));
        if state.until.is_some_and(|until| xmin >= until) {
            next.until = None;
        }
    }
    Ok((notes, next))
}

fn log_message(message: &AsyncMessage) {
    match message {
        AsyncMessage::Notice(n) => {
            tracing::debug!(
                severity = n.severity(),
                message = n.message(),
                "notifier: server notice"
            )
        }
        AsyncMessage::Notification(n) => {
            tracing::debug!(
                channel = n.channel(),
                "notifier: ignoring a notification on another channel"
            )
        }
        _ => {}
    }
}

/// An error with its sources, `a: b: c` (tokio-postgres puts the useful
/// part, such as the server's message, in the source).
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.ends_with(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// `initial * 2^failures`, at most `max`.
fn backoff(initial: Duration, max: Duration, failures: u32) -> Duration {
    initial
        .checked_mul(1u32.checked_shl(failures.min(31)).unwrap_or(u32::MAX))
        .map_or(max, |d| d.min(max))
}

/// 50 to 100 % of `d`, at random.
fn jittered(d: Duration) -> Duration {
    // A fresh RandomState is randomly keyed: enough randomness for jitter
    // without a dependency.
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    d.mul_f64(0.5 + (r % 1_000_001) as f64 / 2_000_000.0)
}

/// The tokio-postgres settings for `url` (see the module documentation).
fn pg_config(url: &DatabaseUrl, options: &NotifierOptions) -> Result<tokio_postgres::Config> {
    dedicated_config(url, &options.application_name, options.connect_timeout)
}

/// The tokio-postgres settings of one of the runtime's dedicated
/// connections (the notifier's, the maintenance lock's) for `url`, read as
/// the module documentation says; `application_name` and `connect_timeout`
/// apply unless the URL sets its own.
pub(super) fn dedicated_config(
    url: &DatabaseUrl,
    application_name: &str,
    connect_timeout: Duration,
) -> Result<tokio_postgres::Config> {
    pg_config_with(url, application_name, connect_timeout, |var| {
        std::env::var(var).ok()
    })
}

fn pg_config_with(
    url: &DatabaseUrl,
    application_name: &str,
    connect_timeout: Duration,
    env: impl Fn(&str) -> Option<String>,
) -> Result<tokio_postgres::Config> {
    let env = |var: &str| env(var).filter(|v| !v.is_empty());
    let invalid = |reason: String| Error::InvalidDatabaseUrl { reason };
    let param = |key: &str| url.param(key);

    let mut config = tokio_postgres::Config::new();
    match url.host_with(env) {
        Host::Service(name) => {
            return Err(invalid(format!(
                "connection service {name:?}: the runtime's dedicated connections (notifier, maintenance) do not read pg_service.conf; give host and port in the URL"
            )));
        }
        Host::Socket(dir) if dir.starts_with('/') => {
            config.host_path(dir);
        }
        Host::Socket(_) => {
            // libpq's default socket directories.
            config.host_path("/var/run/postgresql").host_path("/tmp");
        }
        Host::Tcp(host) => {
            config.host(host);
        }
    }
    config.port(url.port_with(env));
    config.dbname(url.database());
    if let Some(user) = url.user().or_else(|| env("PGUSER")) {
        config.user(user);
    }
    let password = url.password().or_else(|| env("PGPASSWORD"));
    if let Some(password) = password {
        config.password(password);
    }
    match param("sslmode")
        .or_else(|| env("PGSSLMODE"))
        .as_deref()
        .unwrap_or("prefer")
    {
        "disable" | "allow" | "prefer" => {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        }
        mode => {
            return Err(invalid(format!(
                "sslmode={mode}: the runtime's dedicated connections (notifier, maintenance) do not support TLS yet (use sslmode=disable or prefer)"
            )));
        }
    }
    config
        .application_name(param("application_name").unwrap_or_else(|| application_name.to_owned()));
    let connect_timeout = match param("connect_timeout") {
        Some(secs) => secs
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|s| *s > 0)
            .map(Duration::from_secs)
            .ok_or_else(|| {
                invalid(format!(
                    "connect_timeout={secs:?} is not a number of seconds"
                ))
            })?,
        None => connect_timeout,
    };
    config.connect_timeout(connect_timeout);
    if let Some(o) = param("options") {
        config.options(o);
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str, env: &[(&str, &str)]) -> Result<tokio_postgres::Config> {
        let url = DatabaseUrl::parse(url).unwrap();
        let defaults = NotifierOptions::default();
        pg_config_with(
            &url,
            &defaults.application_name,
            defaults.connect_timeout,
            |k| {
                env.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            },
        )
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(10));
        assert_eq!(backoff(i, m, 0), Duration::from_millis(100));
        assert_eq!(backoff(i, m, 3), Duration::from_millis(800));
        assert_eq!(backoff(i, m, 7), m);
        assert_eq!(backoff(i, m, u32::MAX), m);
        for _ in 0..100 {
            let j = jittered(Duration::from_secs(1));
            assert!(
                j >= Duration::from_millis(500) && j <= Duration::from_secs(1),
                "{j:?}"
            );
        }
    }

    #[test]
    fn the_url_becomes_a_tokio_postgres_config() {
        let c = config(
            "postgres://us%40er:p%40ss%2Fw@db.internal:6543/wf?sslmode=prefer&connect_timeout=3",
            &[],
        )
        .unwrap();
        assert_eq!(c.get_user(), Some("us@er"));
        assert_eq!(c.get_password(), Some(&b"p@ss/w"[..]));
        assert_eq!(c.get_dbname(), Some("wf"));
        assert_eq!(c.get_ports(), &[6543]);
        assert_eq!(
            c.get_hosts(),
            &[tokio_postgres::config::Host::Tcp("db.internal".into())]
        );
        assert_eq!(c.get_application_name(), Some(NOTIFIER_APPLICATION_NAME));
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(3)));
        // The password is not in the config's Debug.
        assert!(!format!("{c:?}").contains("p@ss"));

        let c = config(
            "postgres:///wf?application_name=mine",
            &[
                ("PGHOST", "/run/pg"),
                ("PGUSER", "bob"),
                ("PGPASSWORD", "pw"),
                ("PGPORT", "5433"),
            ],
        )
        .unwrap();
        assert_eq!(c.get_user(), Some("bob"));
        assert_eq!(c.get_password(), Some(&b"pw"[..]));
        assert_eq!(c.get_ports(), &[5433]);
        assert_eq!(c.get_application_name(), Some("mine"));
        assert_eq!(
            c.get_hosts(),
            &[tokio_postgres::config::Host::Unix("/run/pg".into())]
        );
    }

    #[test]
    fn tls_and_services_are_refused_without_the_password() {
        for url in [
            "postgres://u:SECRET@h/wf?sslmode=require",
            "postgres://u:SECRET@h/wf?sslmode=verify-full",
            "postgres://u:SECRET@h/wf?service=billing",
        ] {
            let err = config(url, &[]).unwrap_err();
            assert!(matches!(err, Error::InvalidDatabaseUrl { .. }), "{err}");
            assert!(!format!("{err} {err:?}").contains("SECRET"));
        }
        assert!(config("postgres://h/wf", &[("PGSSLMODE", "require")]).is_err());
        assert!(config("postgres://h/wf?connect_timeout=x", &[]).is_err());
    }

    #[test]
    fn error_chains_are_not_repeated() {
        #[derive(Debug)]
        struct E(&'static str, Option<Box<E>>);
        impl fmt::Display for E {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for E {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let e = E("db error", Some(Box::new(E("FATAL: terminated", None))));
        assert_eq!(chain(&e), "db error: FATAL: terminated");
    }
}
