//! Sessions: one connection per thread, driven statement by statement, so a
//! test can hold one transaction open while another runs and see which one
//! waits ("B now waits for A" is read from `pg_stat_activity` and
//! `pg_blocking_pids`, never slept for).

use std::fmt::{Debug, Display};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use diesel::connection::{AnsiTransactionManager, TransactionManager};
use diesel::prelude::*;
use diesel::sql_types::{Array, Bool, Integer};
use workflow_db::testing::TestDatabase;

/// How long a session may take to finish its statements or to start waiting
/// on a lock before the test gives up (a hang guard, not a measurement).
pub const SETTLE_LIMIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(2);

/// A statement's outcome: `Ok(debug of the value)` or `Err(the error's message)`.
pub type Outcome = std::result::Result<String, String>;
type Command = Box<dyn FnOnce(&mut PgConnection) -> Outcome + Send>;

/// Where a session stands after [`Session::settle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// It ran everything it was given.
    Done,
    /// It waits on a lock another session holds.
    Blocked,
}

#[derive(QueryableByName)]
struct Pid {
    #[diesel(sql_type = Integer)]
    pid: i32,
}

#[derive(QueryableByName)]
struct Waiting {
    #[diesel(sql_type = Bool)]
    waiting: bool,
}

#[derive(QueryableByName)]
struct Blockers {
    #[diesel(sql_type = Array<Integer>)]
    pids: Vec<i32>,
}

/// A connection on its own thread, driven statement by statement.
pub struct Session {
    pub name: &'static str,
    pub pid: i32,
    commands: Option<mpsc::Sender<(String, Command)>>,
    outcomes: mpsc::Receiver<(String, Outcome)>,
    sent: usize,
    done: Vec<(String, Outcome)>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Session {
    pub fn new(db: &TestDatabase, name: &'static str) -> Session {
        let mut conn = db.connect();
        let pid = diesel::sql_query("SELECT pg_backend_pid() AS pid")
            .get_result::<Pid>(&mut conn)
            .unwrap()
            .pid;
        let (commands, inbox) = mpsc::channel::<(String, Command)>();
        let (report, outcomes) = mpsc::channel();
        let thread = thread::spawn(move || {
            for (label, command) in inbox {
                let outcome = command(&mut conn);
                if report.send((label, outcome)).is_err() {
                    return;
                }
            }
        });
        Session {
            name,
            pid,
            commands: Some(commands),
            outcomes,
            sent: 0,
            done: Vec::new(),
            thread: Some(thread),
        }
    }

    /// Queues a statement (or several, in `f`); returns at once.
    pub fn run<T: Debug, E: Display>(
        &mut self,
        label: &str,
        f: impl FnOnce(&mut PgConnection) -> std::result::Result<T, E> + Send + 'static,
    ) {
        let command: Command =
            Box::new(move |conn| f(conn).map(|v| format!("{v:?}")).map_err(|e| e.to_string()));
        self.commands
            .as_ref()
            .expect("session still open")
            .send((label.to_owned(), command))
            .expect("session thread alive");
        self.sent += 1;
    }

    /// `BEGIN` through Diesel's transaction manager, so that the engine's
    /// own `conn.transaction(..)` calls nest as savepoints inside it.
    pub fn begin(&mut self) {
        self.run("BEGIN", AnsiTransactionManager::begin_transaction);
    }

    pub fn commit(&mut self) {
        self.run("COMMIT", AnsiTransactionManager::commit_transaction);
    }

    pub fn rollback(&mut self) {
        self.run("ROLLBACK", AnsiTransactionManager::rollback_transaction);
    }

    pub fn drain(&mut self) {
        while let Ok(outcome) = self.outcomes.try_recv() {
            self.done.push(outcome);
        }
    }

    /// Waits until the session ran every statement queued so far, or waits
    /// on a lock (`pg_stat_activity.wait_event_type = 'Lock'`).
    pub fn settle(&mut self, observer: &mut PgConnection) -> State {
        let deadline = Instant::now() + SETTLE_LIMIT;
        loop {
            self.drain();
            if self.done.len() == self.sent {
                return State::Done;
            }
            let waiting = diesel::sql_query(
                // `object`: the cluster-wide lock a committing NOTIFY takes
                // (other tests' traffic), not the block a test looks for.
                // A waiter whose blocker just committed may not have woken
                // yet: it still shows the wait, but no longer a blocker.
                "SELECT coalesce(bool_or(wait_event_type = 'Lock' AND wait_event NOT IN ('extend', 'object') \
                                         AND cardinality(pg_blocking_pids(pid)) > 0), false) \
                 AS waiting FROM pg_stat_activity WHERE pid = $1",
            )
            .bind::<Integer, _>(self.pid)
            .get_result::<Waiting>(observer)
            .unwrap()
            .waiting;
            if waiting {
                return State::Blocked;
            }
            assert!(
                Instant::now() < deadline,
                "session {} neither finished nor waited on a lock within {SETTLE_LIMIT:?}; done: {:?}",
                self.name,
                self.done
            );
            thread::sleep(POLL);
        }
    }

    /// The sessions this one waits for.
    pub fn blockers(&self, observer: &mut PgConnection) -> Vec<i32> {
        diesel::sql_query("SELECT pg_blocking_pids($1) AS pids")
            .bind::<Integer, _>(self.pid)
            .get_result::<Blockers>(observer)
            .unwrap()
            .pids
    }

    /// The outcome of the last statement (after a `settle` that returned `Done`).
    pub fn last(&self) -> Outcome {
        assert_eq!(
            self.done.len(),
            self.sent,
            "session {} still busy",
            self.name
        );
        self.done.last().expect("a statement ran").1.clone()
    }

    /// Closes the session (waiting for its statements); every outcome, in order.
    pub fn finish(mut self) -> Vec<(String, Outcome)> {
        drop(self.commands.take());
        if let Some(thread) = self.thread.take() {
            thread.join().expect("session thread panicked");
        }
        self.drain();
        assert_eq!(
            self.done.len(),
            self.sent,
            "session {} lost outcomes",
            self.name
        );
        self.done
    }
}

/// The outcome of a statement that succeeded with this debug output.
pub fn ok(outcome: &str) -> Outcome {
    Ok(outcome.to_owned())
}
