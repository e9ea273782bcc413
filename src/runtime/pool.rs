//! [`AsyncPool`]: the crate's r2d2 pool behind an async interface.
//!
//! Every query function of the crate takes `&mut PgConnection` and blocks
//! its thread while PostgreSQL answers. [`AsyncPool::run`] hands a closure
//! over such functions to tokio's blocking thread pool
//! ([`tokio::task::spawn_blocking`]) with a connection checked out of the
//! pool, so the runtime's worker threads never block and no query exists
//! twice. Why this design rather than `diesel-async` is in the
//! [module documentation](super).

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use diesel::PgConnection;
use tokio::sync::Semaphore;
use tokio::task::JoinError;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::pool::{PgPool, build_pool};

/// The crate's connection pool ([`PgPool`]) for tokio services: every
/// engine operation and model query, run on tokio's blocking thread pool.
///
/// Cheap to clone (the clones share the pool). Needs a tokio runtime with
/// timers enabled (`#[tokio::main]` and `#[tokio::test]` enable them).
///
/// ```no_run
/// use std::time::Duration;
/// use workflow_db::runtime::AsyncPool;
/// use workflow_db::{Config, engine};
///
/// # async fn demo() -> workflow_db::Result<()> {
/// let pool = AsyncPool::from_config(&Config::from_env()?).await?;
/// let worker = String::from("worker-1");
/// let lease = Duration::from_secs(30);
/// let steps = pool
///     .run(move |c| engine::claim_steps(c, &worker, 10, lease).map_err(Into::into))
///     .await?;
/// for step in steps {
///     let lease = step.lease().expect("a claimed step is leased");
///     // ... the step's work, async ...
///     pool.run(move |c| engine::complete_step(c, &lease, None).map(drop)).await?;
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct AsyncPool {
    pool: PgPool,
    /// One permit per connection of the pool: callers beyond the pool's
    /// size wait here, as futures (cancellable, FIFO), instead of each
    /// parking a blocking thread on r2d2's condition variable.
    permits: Arc<Semaphore>,
}

impl std::fmt::Debug for AsyncPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncPool")
            .field("max_size", &self.pool.max_size())
            .field("available_permits", &self.permits.available_permits())
            .finish()
    }
}

impl AsyncPool {
    /// Wraps an existing pool (built by [`build_pool`], or by hand).
    pub fn new(pool: PgPool) -> Self {
        let permits = Arc::new(Semaphore::new(pool.max_size() as usize));
        AsyncPool { pool, permits }
    }

    /// Builds the pool with [`build_pool`] (which blocks until its first
    /// connection is open, so it runs on the blocking thread pool too).
    /// Fails as `build_pool` does, without the password.
    pub async fn from_config(config: &Config) -> Result<Self> {
        let config = config.clone();
        let pool = tokio::task::spawn_blocking(move || build_pool(&config))
            .await
            .map_err(task_error)??;
        Ok(AsyncPool::new(pool))
    }

    /// The synchronous pool underneath, for code that runs on its own
    /// threads (or inside a closure given to [`AsyncPool::run`], where the
    /// connection it was handed is the one to use).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Runs `f` with a connection of the pool on tokio's blocking thread
    /// pool and returns what it returns.
    ///
    /// `f` is any crate operation or Diesel query, or several inside a
    /// `conn.transaction(..)`; map a `QueryResult` with `.map_err(Into::into)`.
    /// The caller's `tracing` span is entered around `f`, so the query
    /// functions' spans nest under it.
    ///
    /// **Waiting for a connection.** At most as many closures run at once as
    /// the pool has connections; the others wait asynchronously, first come
    /// first served. A wait longer than the pool's `connection_timeout`
    /// fails with [`Error::Pool`], as a checkout of the sync pool does.
    ///
    /// **Cancellation.** Dropping the returned future while it waits for a
    /// connection cancels the call: nothing ran. Once `f` has started it
    /// runs to its end on its thread (a blocking call cannot be
    /// interrupted) and its result is dropped: what it committed stays
    /// committed. Keep each closure to one short unit of work.
    ///
    /// **Panics and shutdown.** A panic in `f` is returned as an error (see
    /// [`TaskFailed::Panicked`]), not propagated: the connection it had is
    /// discarded by the pool (Diesel's r2d2 manager drops a connection
    /// checked in during a panic), so a transaction it left open is rolled
    /// back and the pool stays usable. A task the runtime dropped before it
    /// ran (shutdown) is [`TaskFailed::Cancelled`]. Both come back as
    /// [`Error::Task`].
    pub async fn run<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&mut PgConnection) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let wait = self.pool.connection_timeout();
        // Never closed, so `acquire_owned` fails only on the timeout.
        let permit = tokio::time::timeout(wait, Arc::clone(&self.permits).acquire_owned())
            .await
            .ok()
            .and_then(std::result::Result::ok);
        let pool = self.pool.clone();
        let span = tracing::Span::current();
        let task = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            // Without a permit every connection is busy and the wait has
            // already lasted `connection_timeout`: one last try, then r2d2's
            // own timeout error.
            let checkout = if permit.is_some() {
                wait
            } else {
                Duration::ZERO
            };
            let mut conn = pool.get_timeout(checkout)?;
            let out = f(&mut conn);
            if out.as_ref().is_err_and(Error::is_connection_error) {
                // Flags the connection broken so the pool discards it
                // (Diesel misses a break during a statement's preparation).
                let _ = crate::pool::ping(&mut conn);
            }
            drop(conn);
            drop(permit);
            out
        });
        task.await.map_err(task_error)?
    }
}

/// Why a closure given to [`AsyncPool::run`] returned no result (as
/// [`Error::Task`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TaskFailed {
    /// The closure panicked. Its connection was discarded (a transaction it
    /// had open was rolled back); what it had committed stays committed.
    #[error(
        "the database closure panicked: {message} (its connection was discarded; an open transaction was rolled back)"
    )]
    Panicked {
        /// The panic's message, when it had one (`<non-string panic payload>` otherwise).
        message: String,
    },
    /// The runtime dropped the task before it ran (it is shutting down).
    #[error("the database task was cancelled before it ran (the runtime is shutting down)")]
    Cancelled,
}

impl TaskFailed {
    /// The [`TaskFailed`] inside `error`, if that is what it is.
    pub fn of(error: &Error) -> Option<&TaskFailed> {
        match error {
            Error::Task(failed) => Some(failed),
            _ => None,
        }
    }
}

impl From<TaskFailed> for Error {
    fn from(e: TaskFailed) -> Self {
        Error::Task(e)
    }
}

pub(super) fn task_error(e: JoinError) -> Error {
    let failed = match e.try_into_panic() {
        Ok(payload) => TaskFailed::Panicked {
            message: panic_message(payload.as_ref()),
        },
        Err(_) => TaskFailed::Cancelled,
    };
    tracing::error!(error = %failed, "blocking database task failed");
    failed.into()
}

pub(super) fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "<non-string panic payload>".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_payloads_become_messages() {
        let s: Box<dyn Any + Send> = Box::new("boom");
        assert_eq!(panic_message(s.as_ref()), "boom");
        let s: Box<dyn Any + Send> = Box::new(String::from("owned boom"));
        assert_eq!(panic_message(s.as_ref()), "owned boom");
        let s: Box<dyn Any + Send> = Box::new(42u8);
        assert_eq!(panic_message(s.as_ref()), "<non-string panic payload>");
    }

    #[test]
    fn task_failures_are_recognisable_through_the_crate_error() {
        let e: Error = TaskFailed::Cancelled.into();
        assert_eq!(TaskFailed::of(&e), Some(&TaskFailed::Cancelled));
        assert!(e.to_string().contains("cancelled"), "{e}");
        let other = Error::Query(diesel::result::Error::NotFound);
        assert_eq!(TaskFailed::of(&other), None);
    }
}
