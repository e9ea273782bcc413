//! Live execution pages: one notifier per server, one render per change of
//! a watched execution, pushed to every viewer of it as a server-sent event.
//!
//! A viewer's stream subscribes to its execution in the [`Hub`]; the
//! notifier marks an execution dirty when a notification names it (every
//! watched one after a reconnection, whose missed notifications the feed
//! replays); every [`LIVE_INTERVAL`](super::LIVE_INTERVAL) the live task
//! reads and renders each dirty execution that still has viewers, once,
//! and publishes the fragment on the execution's `watch` channel. Viewers
//! see the newest fragment (a slow viewer skips intermediate ones, never
//! the last). A new viewer marks its execution dirty, so what changed
//! between its page load and its subscription reaches it too.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use askama::Template;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_core::Stream;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use super::Studio;
use super::pages::{self, PageError};
use crate::config::DatabaseUrl;
use crate::error::{Error, Result};
use crate::runtime::{Notifier, NotifierEvent, NotifierOptions};

type Fragment = Option<Arc<str>>;

/// The executions being watched, each with the channel of its fragment.
#[derive(Default)]
pub(super) struct Hub {
    watched: Mutex<HashMap<Uuid, Watched>>,
}

struct Watched {
    tx: watch::Sender<Fragment>,
    dirty: bool,
    /// When it was last taken for a render.
    taken: Instant,
}

/// A watched execution is re-read at least this often, notified or not
/// (a NOTIFY is a wake-up, not a promise).
const REFRESH: Duration = Duration::from_secs(15);

impl Hub {
    fn lock(&self) -> MutexGuard<'_, HashMap<Uuid, Watched>> {
        // A panic while holding the lock leaves only flags behind.
        self.watched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn subscribe(&self, id: Uuid) -> watch::Receiver<Fragment> {
        let mut watched = self.lock();
        let w = watched.entry(id).or_insert_with(|| Watched {
            tx: watch::channel(None).0,
            dirty: true,
            taken: Instant::now(),
        });
        w.dirty = true;
        w.tx.subscribe()
    }

    fn touch(&self, id: Uuid) {
        if let Some(w) = self.lock().get_mut(&id) {
            w.dirty = true;
        }
    }

    fn touch_all(&self) {
        for w in self.lock().values_mut() {
            w.dirty = true;
        }
    }

    /// The executions with viewers that are dirty or were not read for
    /// [`REFRESH`] (forgetting those without viewers).
    fn take_dirty(&self) -> Vec<Uuid> {
        let mut watched = self.lock();
        watched.retain(|_, w| w.tx.receiver_count() > 0);
        let now = Instant::now();
        watched
            .iter_mut()
            .filter_map(|(id, w)| {
                let due = std::mem::take(&mut w.dirty) || now - w.taken >= REFRESH;
                if due {
                    w.taken = now;
                }
                due.then_some(*id)
            })
            .collect()
    }

    fn publish(&self, id: Uuid, fragment: Arc<str>) {
        if let Some(w) = self.lock().get(&id) {
            w.tx.send_replace(Some(fragment));
        }
    }
}

/// Connects the notifier and starts the live task (see the module docs).
pub(super) async fn start(studio: Studio, url: &DatabaseUrl) -> Result<()> {
    let options = NotifierOptions {
        application_name: "workflow-db studio".to_owned(),
        ..NotifierOptions::default()
    };
    let mut notifier = Notifier::connect_with(url, options).await?;
    tokio::spawn(async move {
        let shutdown = studio.inner.shutdown.clone();
        let mut tick = tokio::time::interval(super::LIVE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                event = notifier.recv() => match event {
                    Some(NotifierEvent::Notification(n)) => studio.inner.live.touch(n.execution_id),
                    Some(NotifierEvent::Reconnected) => studio.inner.live.touch_all(),
                    Some(NotifierEvent::Disconnected { reason }) => {
                        tracing::warn!(%reason, "studio: live updates paused, reconnecting");
                    }
                    Some(_) => {}
                    None => break,
                },
                _ = tick.tick() => {
                    for id in studio.inner.live.take_dirty() {
                        render(&studio, id).await;
                    }
                }
            }
        }
    });
    Ok(())
}

/// Reads and renders one execution on a blocking thread (the layout and
/// the template are CPU work) and publishes it. A failure (a pool timeout,
/// a lost connection, a panic) marks it dirty again, so the next tick
/// tries again: a viewer must not keep a stale last state.
async fn render(studio: &Studio, id: Uuid) {
    let renderer = studio.clone();
    let rendered = studio
        .read(move |conn| {
            let data = pages::load_execution(conn, &id.to_string())?;
            Ok(pages::execution_live(&renderer, &data).render())
        })
        .await;
    match rendered {
        // An event's data cannot hold a carriage return; the page reads
        // the character reference as the same text.
        Ok(Ok(html)) => studio
            .inner
            .live
            .publish(id, Arc::from(html.replace('\r', "&#13;"))),
        Ok(Err(e)) => tracing::error!(error = %e, "studio: live template failed"),
        // Gone (pruned): nothing more to show.
        Err(Error::NotFound { .. }) => {}
        Err(e) => {
            tracing::warn!(execution_id = %id, error = %e, "studio: live update failed, retrying");
            studio.inner.live.touch(id);
        }
    }
}

/// `GET /executions/{id}/live`: the execution's fragments as server-sent
/// events named `update`, until the viewer leaves or the server stops.
pub(super) async fn stream(
    State(studio): State<Studio>,
    Path(id): Path<String>,
) -> std::result::Result<Response, PageError> {
    let id = Uuid::try_parse(&id).map_err(|_| {
        PageError::from(Error::InvalidId {
            what: "execution id",
            input: id.clone(),
            reason: "a live stream needs the whole id",
        })
    })?;
    // An execution that does not exist has nothing to stream.
    studio
        .read(move |conn| {
            use diesel::prelude::*;
            crate::schema::executions::table
                .find(id)
                .select(crate::schema::executions::id)
                .first::<Uuid>(conn)
                .map_err(|e| match e {
                    diesel::result::Error::NotFound => Error::NotFound {
                        entity: "execution",
                        id: id.to_string(),
                    },
                    e => e.into(),
                })
        })
        .await?;
    let mut fragments = studio.inner.live.subscribe(id);
    let (tx, rx) = mpsc::channel::<Arc<str>>(1);
    let shutdown = studio.inner.shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = fragments.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let fragment = fragments.borrow_and_update().clone();
                    if let Some(html) = fragment {
                        // A stalled viewer must not hold the shutdown up.
                        tokio::select! {
                            sent = tx.send(html) => if sent.is_err() { break },
                            () = shutdown.cancelled() => break,
                        }
                    }
                }
                () = tx.closed() => break,
                () = shutdown.cancelled() => break,
            }
        }
    });
    let mut response = Sse::new(Updates(rx))
        .keep_alive(KeepAlive::default())
        .into_response();
    *response.status_mut() = StatusCode::OK;
    Ok(response)
}

/// A viewer's fragments as a stream of events.
struct Updates(mpsc::Receiver<Arc<str>>);

impl Stream for Updates {
    type Item = std::result::Result<Event, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0
            .poll_recv(cx)
            .map(|html| html.map(|html| Ok(Event::default().event("update").data(&*html))))
    }
}
