//! Cron schedules that start executions of a workflow: exactly one
//! execution per tick, however many processes fire them.
//!
//! A schedule ([`Schedule`], table `schedules`) is a cron expression read in
//! an IANA time zone, the workflow to start, and the data and user id of the
//! executions it starts. [`fire_due_schedules`] fires every due schedule;
//! the maintenance leader calls it every round (see
//! `runtime::maintenance`), but any number of callers may, at once.
//!
//! **Exactly once per tick.** A firing locks the due rows with `FOR UPDATE
//! SKIP LOCKED` (a schedule being fired by another caller is skipped, not
//! waited for), starts one execution per tick it fires with
//! [`start_execution`] and the idempotency key
//! `schedule:<schedule id>:<tick in UTC, RFC 3339>`, and moves
//! `next_fire_at` past `now`, all in one transaction. A second caller
//! either skips the locked row or, once the first committed, no longer
//! finds it due (PostgreSQL re-checks `next_fire_at <= now` on the row
//! version it locks). And should a writer bypass the lock (a stale copy of
//! the row, a hand-written `UPDATE` moving `next_fire_at` back), the unique
//! index on `executions (workflow_id, idempotency_key)` refuses a second
//! execution of the same tick: `start_execution` returns the existing one
//! (`created: false`).
//!
//! **Cron and time zones** are parsed by [croner](https://docs.rs/croner)
//! (5 fields, or 6 with seconds first; `L`, `W`, `#`, names, `@daily` ...)
//! and [chrono-tz](https://docs.rs/chrono-tz) before anything is written;
//! a bad one is [`Error::InvalidSchedule`]. Ticks are wall-clock times in the
//! schedule's zone, stored and keyed as UTC instants. Across a DST change: a
//! fixed time skipped by the spring-forward (02:30 in `Europe/Berlin` on the
//! last Sunday of March) fires at the first instant after the gap (03:00
//! CEST); a fixed time that occurs twice in the autumn fires once, at the
//! first; interval patterns (`*/15 * * * *`, `0 * * * *`) fire at the
//! instants that exist, both of a repeated hour included.
//!
//! **Missed ticks** (the service was down, or every caller was): when a
//! firing finds several ticks due at once, [`MissedTicks`] decides. `Skip`
//! (the default): only the latest due tick fires, once, and the older ones
//! never do. `CatchUp { max }`: the latest `max` due ticks fire, oldest
//! first; older ones never do. Either way `next_fire_at` then moves to the
//! first tick after `now`.
//!
//! **Pause.** A paused schedule does not fire ([`pause_schedule`]).
//! [`resume_schedule`] sets `next_fire_at` to the first tick after the
//! resume: ticks that fell while it was paused never fire.

use chrono::{DateTime, SubsecRound, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use diesel::prelude::*;
use diesel::sql_types::Timestamptz;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::start::start_execution;
use crate::error::{Error, Result};
use crate::models::{Execution, NewExecution, Schedule};
use crate::schema::schedules;

/// Schedules a [`fire_due_schedules`] call locks and fires at most.
pub const DEFAULT_SCHEDULE_BATCH: i64 = 100;

/// The largest [`MissedTicks::CatchUp`] `max` (so one firing of one
/// schedule starts at most 100 executions).
pub const MAX_CATCH_UP: u32 = 100;

/// Longest schedule name, in characters.
const MAX_NAME: usize = 200;

/// What a firing does when several ticks of a schedule are due at once
/// (after a downtime; column `missed_ticks`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissedTicks {
    /// Only the latest due tick fires, once; older due ticks never fire.
    /// (A daily 02:00 schedule whose services were all down from 01:00 to
    /// 09:00 fires once at 09:00, for the 02:00 tick.)
    #[default]
    Skip,
    /// The latest `max` due ticks fire (1 to [`MAX_CATCH_UP`]), oldest
    /// first; older due ticks never fire.
    CatchUp {
        /// How many due ticks one firing starts at most.
        max: u32,
    },
}

impl MissedTicks {
    /// How many due ticks a firing starts at most.
    fn limit(self) -> usize {
        match self {
            MissedTicks::Skip => 1,
            MissedTicks::CatchUp { max } => max as usize,
        }
    }

    fn columns(self) -> (&'static str, Option<i32>) {
        match self {
            MissedTicks::Skip => ("skip", None),
            MissedTicks::CatchUp { max } => ("catch_up", Some(max.min(MAX_CATCH_UP) as i32)),
        }
    }
}

impl Schedule {
    /// The missed-tick policy stored in `missed_ticks` and
    /// `catch_up_limit` (the table's CHECK constraints keep them valid).
    pub fn policy(&self) -> MissedTicks {
        match (self.missed_ticks.as_str(), self.catch_up_limit) {
            ("catch_up", Some(max)) => MissedTicks::CatchUp {
                max: u32::try_from(max).unwrap_or(1).clamp(1, MAX_CATCH_UP),
            },
            _ => MissedTicks::Skip,
        }
    }
}

/// A cron expression parsed in its time zone.
#[derive(Debug, Clone)]
struct CronTz {
    cron: Cron,
    tz: Tz,
}

impl CronTz {
    /// Parses both, or says which is wrong.
    fn parse(cron: &str, time_zone: &str) -> Result<CronTz> {
        let tz: Tz = time_zone.parse().map_err(|e| Error::InvalidSchedule {
            field: "time_zone",
            value: time_zone.to_owned(),
            reason: format!("not an IANA time zone name ({e}); e.g. Europe/Berlin or UTC"),
        })?;
        let parsed = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(cron)
            .map_err(|e| Error::InvalidSchedule {
                field: "cron",
                value: cron.to_owned(),
                reason: format!(
                    "{e} (5 fields: minute hour day-of-month month day-of-week, or 6 with seconds first)"
                ),
            })?;
        Ok(CronTz { cron: parsed, tz })
    }

    /// The first tick strictly after `t`.
    fn next_after(&self, t: DateTime<Utc>) -> Result<DateTime<Utc>> {
        let local = t.trunc_subsecs(0).with_timezone(&self.tz);
        self.cron
            .find_next_occurrence(&local, false)
            .map(|next| next.with_timezone(&Utc))
            .map_err(|e| self.never(e))
    }

    /// Up to `limit` ticks in `from ..= until`, the latest ones, oldest
    /// first.
    fn latest_due(
        &self,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Vec<DateTime<Utc>> {
        let mut ticks = Vec::new();
        let mut cursor = until.trunc_subsecs(0).with_timezone(&self.tz);
        let mut inclusive = true;
        while ticks.len() < limit {
            // No earlier tick within croner's search limit: none is due.
            let Ok(tick) = self.cron.find_previous_occurrence(&cursor, inclusive) else {
                break;
            };
            let utc = tick.with_timezone(&Utc);
            if utc < from {
                break;
            }
            ticks.push(utc);
            cursor = tick;
            inclusive = false;
        }
        ticks.reverse();
        ticks
    }

    fn never(&self, e: croner::errors::CronError) -> Error {
        Error::InvalidSchedule {
            field: "cron",
            value: self.cron.pattern.to_string(),
            reason: format!("no next fire time ({e})"),
        }
    }
}

/// Checks a cron expression in a time zone without writing anything, and
/// returns its first `n` fire times after `after` (UTC instants; convert
/// with `.with_timezone(&tz)` for wall-clock times). [`Error::InvalidSchedule`]
/// when either does not parse, or the expression never fires.
///
/// ```
/// use chrono::{TimeZone, Utc};
/// let after = Utc.with_ymd_and_hms(2027, 3, 27, 12, 0, 0).unwrap();
/// let ticks = workflow_db::engine::fire_times("30 2 * * *", "Europe/Berlin", after, 2)?;
/// // 02:30 does not exist on 28 March 2027 in Berlin: it fires at 03:00 CEST.
/// assert_eq!(ticks[0], Utc.with_ymd_and_hms(2027, 3, 28, 1, 0, 0).unwrap());
/// assert_eq!(ticks[1], Utc.with_ymd_and_hms(2027, 3, 29, 0, 30, 0).unwrap());
/// # Ok::<(), workflow_db::Error>(())
/// ```
pub fn fire_times(
    cron: &str,
    time_zone: &str,
    after: DateTime<Utc>,
    n: usize,
) -> Result<Vec<DateTime<Utc>>> {
    let parsed = CronTz::parse(cron, time_zone)?;
    let mut ticks = Vec::with_capacity(n.min(1000));
    let mut t = after;
    for _ in 0..n {
        t = parsed.next_after(t)?;
        ticks.push(t);
    }
    Ok(ticks)
}

/// The next `n` times the schedule fires, from its `next_fire_at`
/// (included) on, as UTC instants; empty for a paused schedule (it fires
/// nothing until resumed, and resuming starts from the first tick after
/// the resume). When `next_fire_at` is already past (no firing ran since),
/// the first entries are overdue ticks, of which the next firing fires what
/// the schedule's [`MissedTicks`] says.
pub fn next_fire_times(schedule: &Schedule, n: usize) -> Result<Vec<DateTime<Utc>>> {
    if schedule.paused || n == 0 {
        return Ok(Vec::new());
    }
    let parsed = CronTz::parse(&schedule.cron, &schedule.time_zone)?;
    let mut ticks = parsed.latest_due(
        schedule.next_fire_at,
        schedule.next_fire_at,
        1, // next_fire_at itself, when it is a tick
    );
    while ticks.len() < n {
        let after = ticks
            .last()
            .copied()
            .unwrap_or(schedule.next_fire_at - chrono::TimeDelta::seconds(1));
        ticks.push(parsed.next_after(after)?);
    }
    Ok(ticks)
}

/// A schedule to create ([`NewSchedule::create`]) or to create or update
/// by name ([`NewSchedule::upsert`]). [`NewSchedule::new`] sets time zone
/// UTC, [`MissedTicks::Skip`], not paused, no data or user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewSchedule {
    /// Primary key of a new schedule (a fresh UUIDv7); an upsert that finds
    /// the name keeps the existing id.
    pub id: Uuid,
    /// Unique name, 1 to 200 characters.
    pub name: String,
    /// The workflow each tick starts.
    pub workflow_id: Uuid,
    /// Cron expression: 5 fields, or 6 with seconds first.
    pub cron: String,
    /// IANA time zone name (default `UTC`).
    pub time_zone: String,
    /// JSON data of every execution it starts.
    pub data: Option<Value>,
    /// User id of every execution it starts.
    pub user_id: Option<String>,
    /// Create it paused (an upsert keeps the stored flag).
    pub paused: bool,
    /// What to do when several ticks are due at once.
    pub missed_ticks: MissedTicks,
}

#[derive(Insertable)]
#[diesel(table_name = schedules)]
struct ScheduleInsert<'a> {
    id: Uuid,
    name: &'a str,
    workflow_id: Uuid,
    cron: &'a str,
    time_zone: &'a str,
    data: Option<&'a Value>,
    user_id: Option<&'a str>,
    paused: bool,
    missed_ticks: &'static str,
    catch_up_limit: Option<i32>,
    next_fire_at: DateTime<Utc>,
}

impl NewSchedule {
    /// A schedule named `name` that starts `workflow_id` at every tick of
    /// `cron`, read in UTC.
    pub fn new(name: impl Into<String>, workflow_id: Uuid, cron: impl Into<String>) -> Self {
        NewSchedule {
            id: Uuid::now_v7(),
            name: name.into(),
            workflow_id,
            cron: cron.into(),
            time_zone: "UTC".to_owned(),
            data: None,
            user_id: None,
            paused: false,
            missed_ticks: MissedTicks::Skip,
        }
    }

    /// Reads the cron expression in this IANA time zone (`Europe/Berlin`).
    pub fn time_zone(mut self, time_zone: impl Into<String>) -> Self {
        self.time_zone = time_zone.into();
        self
    }

    /// Sets the JSON data of the executions it starts.
    pub fn data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }

    /// Sets the user id of the executions it starts.
    pub fn user_id(mut self, user_id: impl Into<String>) -> Self {
        self.user_id = Some(user_id.into());
        self
    }

    /// Creates it paused.
    pub fn paused(mut self, paused: bool) -> Self {
        self.paused = paused;
        self
    }

    /// Sets the missed-tick policy.
    pub fn missed_ticks(mut self, policy: MissedTicks) -> Self {
        self.missed_ticks = policy;
        self
    }

    /// Checks everything that can be checked without the database: the
    /// name, the catch-up limit, the time zone, and that the cron
    /// expression parses and fires at least once after `now`.
    fn validate(&self, now: DateTime<Utc>) -> Result<CronTz> {
        let chars = self.name.chars().count();
        if chars == 0 || chars > MAX_NAME {
            return Err(Error::InvalidSchedule {
                field: "name",
                value: self.name.clone(),
                reason: format!("must be 1 to {MAX_NAME} characters, not {chars}"),
            });
        }
        if let MissedTicks::CatchUp { max } = self.missed_ticks {
            if !(1..=MAX_CATCH_UP).contains(&max) {
                return Err(Error::InvalidSchedule {
                    field: "missed_ticks",
                    value: format!("CatchUp {{ max: {max} }}"),
                    reason: format!("max must be 1 to {MAX_CATCH_UP}"),
                });
            }
        }
        let parsed = CronTz::parse(&self.cron, &self.time_zone)?;
        parsed.next_after(now)?;
        Ok(parsed)
    }

    fn insert(&self, next_fire_at: DateTime<Utc>) -> ScheduleInsert<'_> {
        let (missed_ticks, catch_up_limit) = self.missed_ticks.columns();
        ScheduleInsert {
            id: self.id,
            name: &self.name,
            workflow_id: self.workflow_id,
            cron: &self.cron,
            time_zone: &self.time_zone,
            data: self.data.as_ref(),
            user_id: self.user_id.as_deref(),
            paused: self.paused,
            missed_ticks,
            catch_up_limit,
            next_fire_at,
        }
    }

    /// Inserts the schedule, due first at the first tick after the
    /// database's current time. Refused before anything is written with
    /// [`Error::InvalidSchedule`] (cron, time zone, name, catch-up limit);
    /// a name already taken is a unique violation
    /// ([`Error::sqlstate`] `23505`, constraint `schedules_name_key`); an
    /// unknown workflow a foreign-key violation.
    #[tracing::instrument(skip_all, fields(schedule.id = %self.id, schedule.name = %self.name, workflow.id = %self.workflow_id))]
    pub fn create(&self, conn: &mut PgConnection) -> Result<Schedule> {
        let parsed = self.validate(Utc::now())?;
        let next = parsed.next_after(db_now(conn)?)?;
        Ok(diesel::insert_into(schedules::table)
            .values(self.insert(next))
            .returning(Schedule::as_returning())
            .get_result(conn)?)
    }

    /// Creates the schedule, or updates the one with this name (services
    /// may declare their schedules at every boot). An update replaces the
    /// workflow, cron expression, time zone, data, user id and policy, and
    /// keeps the id, the paused flag (an operator's pause survives a
    /// deploy) and `last_error`. When the cron expression and time zone are
    /// unchanged, `next_fire_at` is kept too (a redeploy neither skips nor
    /// repeats a tick); when either changed, the schedule is next due at
    /// the first new tick after now (and after its last fired tick). Same
    /// refusals as [`create`](Self::create), before anything is written.
    #[tracing::instrument(skip_all, fields(schedule.name = %self.name, workflow.id = %self.workflow_id))]
    pub fn upsert(&self, conn: &mut PgConnection) -> Result<Schedule> {
        let parsed = self.validate(Utc::now())?;
        conn.transaction(|conn| {
            let now = db_now(conn)?;
            // Two turns suffice in READ COMMITTED: a conflicting INSERT
            // waits for the other writer, whose row the next SELECT sees.
            for _ in 0..3 {
                let existing = schedules::table
                    .filter(schedules::name.eq(&self.name))
                    .select(Schedule::as_select())
                    .for_update()
                    .first(conn)
                    .optional()?;
                if let Some(existing) = existing {
                    let next_fire_at =
                        if existing.cron == self.cron && existing.time_zone == self.time_zone {
                            existing.next_fire_at
                        } else {
                            parsed.next_after(existing.last_fired_at.map_or(now, |l| l.max(now)))?
                        };
                    let (missed_ticks, catch_up_limit) = self.missed_ticks.columns();
                    return Ok(diesel::update(schedules::table.find(existing.id))
                        .set((
                            schedules::workflow_id.eq(self.workflow_id),
                            schedules::cron.eq(&self.cron),
                            schedules::time_zone.eq(&self.time_zone),
                            schedules::data.eq(self.data.as_ref()),
                            schedules::user_id.eq(self.user_id.as_deref()),
                            schedules::missed_ticks.eq(missed_ticks),
                            schedules::catch_up_limit.eq(catch_up_limit),
                            schedules::next_fire_at.eq(next_fire_at),
                        ))
                        .returning(Schedule::as_returning())
                        .get_result(conn)?);
                }
                // A racing upsert of the same name makes this INSERT wait
                // for it, then do nothing: the next turn finds its row.
                let inserted = diesel::insert_into(schedules::table)
                    .values(self.insert(parsed.next_after(now)?))
                    .on_conflict(schedules::name)
                    .do_nothing()
                    .returning(Schedule::as_returning())
                    .get_result(conn)
                    .optional()?;
                if let Some(schedule) = inserted {
                    return Ok(schedule);
                }
            }
            // Only under REPEATABLE READ or SERIALIZABLE, whose snapshot
            // hides the row that made the INSERT do nothing.
            Err(Error::Query(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::SerializationFailure,
                Box::new(format!(
                    "schedule {:?} was created concurrently; retry the transaction",
                    self.name
                )),
            )))
        })
    }
}

/// The database's clock (`statement_timestamp()`).
fn db_now(conn: &mut PgConnection) -> QueryResult<DateTime<Utc>> {
    diesel::select(diesel::dsl::sql::<Timestamptz>("statement_timestamp()")).get_result(conn)
}

fn not_found(id: Uuid) -> Error {
    Error::NotFound {
        entity: "schedule",
        id: id.to_string(),
    }
}

/// The schedule with this id ([`Error::NotFound`] when there is none).
pub fn get_schedule(conn: &mut PgConnection, id: Uuid) -> Result<Schedule> {
    Schedule::find(conn, id)
        .optional()?
        .ok_or_else(|| not_found(id))
}

/// The schedule named `name`, if any.
pub fn find_schedule(conn: &mut PgConnection, name: &str) -> Result<Option<Schedule>> {
    Ok(Schedule::find_by_name(conn, name)?)
}

/// Every schedule (or those of one workflow), by name.
pub fn list_schedules(conn: &mut PgConnection, workflow_id: Option<Uuid>) -> Result<Vec<Schedule>> {
    Ok(Schedule::list_all(conn, workflow_id)?)
}

/// Deletes a schedule; whether it existed. Executions it started stay.
/// (Deleting its workflow deletes it too.) A firing in progress holds the
/// row: the delete waits for it.
pub fn delete_schedule(conn: &mut PgConnection, id: Uuid) -> Result<bool> {
    Ok(Schedule::delete(conn, id)?)
}

/// Pauses a schedule: it fires nothing until [`resume_schedule`]. Pausing a
/// paused schedule changes nothing. A firing in progress holds the row: the
/// pause waits for it, and applies from the next tick.
#[tracing::instrument(skip(conn))]
pub fn pause_schedule(conn: &mut PgConnection, id: Uuid) -> Result<Schedule> {
    diesel::update(schedules::table.find(id))
        .set(schedules::paused.eq(true))
        .returning(Schedule::as_returning())
        .get_result(conn)
        .optional()?
        .ok_or_else(|| not_found(id))
}

/// Resumes a paused schedule: it is next due at the first tick after now
/// (the database's clock; and after its last fired tick), so the ticks that
/// fell while it was paused never fire; `last_error` is cleared. Resuming
/// a schedule that is not paused changes nothing (its `next_fire_at`
/// stays, so no due tick is lost). A cron expression or time zone that no
/// longer parses (written by hand) is [`Error::InvalidSchedule`] and the
/// schedule stays paused.
#[tracing::instrument(skip(conn))]
pub fn resume_schedule(conn: &mut PgConnection, id: Uuid) -> Result<Schedule> {
    conn.transaction(|conn| {
        let schedule = schedules::table
            .find(id)
            .select(Schedule::as_select())
            .for_update()
            .first(conn)
            .optional()?
            .ok_or_else(|| not_found(id))?;
        if !schedule.paused {
            return Ok(schedule);
        }
        let parsed = CronTz::parse(&schedule.cron, &schedule.time_zone)?;
        let now = db_now(conn)?;
        let from = schedule.last_fired_at.map_or(now, |l| l.max(now));
        let next = parsed.next_after(from)?;
        Ok(diesel::update(schedules::table.find(id))
            .set((
                schedules::paused.eq(false),
                schedules::last_error.eq(None::<String>),
                schedules::next_fire_at.eq(next),
            ))
            .returning(Schedule::as_returning())
            .get_result(conn)?)
    })
}

/// One tick fired by [`fire_due_schedules`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Fired {
    /// The schedule.
    pub schedule_id: Uuid,
    /// The tick (a UTC instant; the execution's idempotency key names it).
    pub tick: DateTime<Utc>,
    /// The execution of the tick.
    pub execution: Execution,
    /// False when the tick's execution already existed (a writer that
    /// bypassed the row lock started it): nothing was started twice.
    pub created: bool,
}

/// A schedule [`fire_due_schedules`] paused because its tick could not be
/// started (a cron expression or time zone that no longer parses, a
/// workflow whose graph is invalid, ...). The reason is in its
/// `last_error`; fix it and [`resume_schedule`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct PausedOnError {
    /// The schedule.
    pub schedule_id: Uuid,
    /// Why (also stored in `schedules.last_error`).
    pub error: String,
}

/// What one [`fire_due_schedules`] call did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct FireReport {
    /// Due schedules locked and handled (at most the batch): when it equals
    /// the batch, more may be due; call again.
    pub schedules: usize,
    /// The ticks fired, by schedule, oldest first.
    pub fired: Vec<Fired>,
    /// Due ticks the [`MissedTicks`] policy dropped (older than the ones
    /// fired), counted up to 1,000 per schedule.
    pub skipped: u64,
    /// Schedules paused because they could not fire.
    pub paused: Vec<PausedOnError>,
}

/// The idempotency key of a schedule's tick:
/// `schedule:<schedule id>:<tick in UTC, RFC 3339, seconds>`.
///
/// ```
/// use chrono::{TimeZone, Utc};
/// let id = uuid::Uuid::nil();
/// let tick = Utc.with_ymd_and_hms(2027, 3, 28, 1, 0, 0).unwrap();
/// assert_eq!(
///     workflow_db::engine::schedule_tick_key(id, tick),
///     "schedule:00000000-0000-0000-0000-000000000000:2027-03-28T01:00:00Z"
/// );
/// ```
pub fn schedule_tick_key(schedule_id: Uuid, tick: DateTime<Utc>) -> String {
    format!(
        "schedule:{schedule_id}:{}",
        tick.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
    )
}

/// [`fire_due_schedules_batch`] with [`DEFAULT_SCHEDULE_BATCH`].
pub fn fire_due_schedules(conn: &mut PgConnection, now: DateTime<Utc>) -> Result<FireReport> {
    fire_due_schedules_batch(conn, now, DEFAULT_SCHEDULE_BATCH)
}

/// Fires the schedules due at `now` (pass the database's clock,
/// `statement_timestamp()`, as the maintenance loop does; tests pass any
/// instant): up to `batch` unpaused schedules whose `next_fire_at <= now`,
/// oldest tick first, in ONE transaction (a savepoint inside the
/// caller's).
///
/// Each due schedule is locked `FOR UPDATE SKIP LOCKED` (another caller
/// firing it is skipped, not waited for); its due ticks (`next_fire_at
/// ..= now`) are chosen by its [`MissedTicks`] policy, each started with
/// [`start_execution`] under the key
/// [`schedule_tick_key`] (the workflow's current version, the schedule's
/// data and user id), and `next_fire_at` moves to the first tick after
/// `now`, `last_fired_at` to the latest tick fired. Every tick is thus
/// started at most once, whatever the number of callers: see the
/// [module documentation](self).
///
/// A schedule that cannot fire through a fault of its own (its cron
/// expression or time zone no longer parses or never fires again, its
/// workflow's graph is invalid, a constraint refuses its execution) is
/// paused, with the reason in `last_error` ([`FireReport::paused`]), so it
/// neither blocks the others nor fails every call. Every other error (a
/// deadlock or lock timeout, [`Error::is_retryable`]; a statement timeout;
/// a lost connection; a caller's transaction that is not READ COMMITTED,
/// which the engine's triggers refuse) rolls the whole call back and is
/// returned: nothing was started, call again.
///
/// Bounded work: at most `batch` schedules (1 to 10,000) and
/// [`MAX_CATCH_UP`] executions per schedule.
#[tracing::instrument(skip(conn), fields(fired, skipped))]
pub fn fire_due_schedules_batch(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    batch: i64,
) -> Result<FireReport> {
    let batch = batch.clamp(1, 10_000);
    let report = conn.transaction(|conn| {
        let due: Vec<Schedule> = schedules::table
            .filter(schedules::paused.eq(false))
            .filter(schedules::next_fire_at.le(now))
            .order((schedules::next_fire_at, schedules::id))
            .limit(batch)
            .select(Schedule::as_select())
            .for_update()
            .skip_locked()
            .load(conn)?;
        let mut report = FireReport {
            schedules: due.len(),
            ..FireReport::default()
        };
        for schedule in &due {
            let fired = conn.transaction(|conn| fire_one(conn, schedule, now));
            match fired {
                Ok((fired, skipped)) => {
                    report.skipped += skipped;
                    report.fired.extend(fired);
                }
                Err(e) if !is_schedule_fault(&e) => return Err(e),
                Err(e) => {
                    let error = e.to_string();
                    tracing::warn!(
                        schedule.id = %schedule.id,
                        schedule.name = %schedule.name,
                        %error,
                        "schedule cannot fire; paused"
                    );
                    diesel::update(schedules::table.find(schedule.id))
                        .set((schedules::paused.eq(true), schedules::last_error.eq(&error)))
                        .execute(conn)?;
                    report.paused.push(PausedOnError {
                        schedule_id: schedule.id,
                        error,
                    });
                }
            }
        }
        Ok::<_, Error>(report)
    })?;
    let span = tracing::Span::current();
    span.record("fired", report.fired.len());
    span.record("skipped", report.skipped);
    Ok(report)
}

/// Errors that are the schedule's own (its definition, its workflow, the
/// rows it would write), for which it is paused. Everything else (a
/// deadlock, a lock or statement timeout, a lost connection, a caller's
/// transaction that is not READ COMMITTED) rolls the whole call back and is
/// returned, to be tried again: it would fail any schedule alike.
fn is_schedule_fault(e: &Error) -> bool {
    match e {
        Error::InvalidSchedule { .. }
        | Error::InvalidGraph { .. }
        | Error::NotFound { .. }
        | Error::IllegalTransition { .. } => true,
        // Integrity constraint violations (class 23: check, unique,
        // foreign key, not null), which retrying cannot change.
        Error::Query(_) => {
            !e.is_connection_error() && e.sqlstate().is_some_and(|c| c.starts_with("23"))
        }
        _ => false,
    }
}

/// Due ticks a firing counts as skipped at most, per schedule (the count
/// only feeds the report, a log line and a metric).
const MAX_SKIPPED_COUNTED: u64 = 1000;

/// Fires one locked, due schedule (inside a savepoint): the ticks its
/// policy chooses, then `next_fire_at` past `now`. The fired ticks and how
/// many due ticks were dropped.
fn fire_one(
    conn: &mut PgConnection,
    schedule: &Schedule,
    now: DateTime<Utc>,
) -> Result<(Vec<Fired>, u64)> {
    let parsed = CronTz::parse(&schedule.cron, &schedule.time_zone)?;
    let policy = schedule.policy();
    let ticks = parsed.latest_due(schedule.next_fire_at, now, policy.limit());
    let skipped = match ticks.first() {
        // Count the dropped ticks, boundedly: a one-second cron after a
        // week's downtime has 600,000.
        Some(&oldest) => {
            let mut n = 0u64;
            let mut t = schedule.next_fire_at - chrono::TimeDelta::seconds(1);
            while n < MAX_SKIPPED_COUNTED {
                t = parsed.next_after(t)?;
                if t >= oldest {
                    break;
                }
                n += 1;
            }
            n
        }
        None => 0,
    };
    let mut fired = Vec::with_capacity(ticks.len());
    for &tick in &ticks {
        let mut new = NewExecution::new(schedule.workflow_id)
            .idempotency_key(schedule_tick_key(schedule.id, tick));
        new.data.clone_from(&schedule.data);
        new.user_id.clone_from(&schedule.user_id);
        let started = start_execution(conn, &new)?;
        tracing::debug!(
            schedule.id = %schedule.id,
            %tick,
            execution.id = %started.execution.id,
            created = started.created,
            "schedule fired"
        );
        fired.push(Fired {
            schedule_id: schedule.id,
            tick,
            execution: started.execution,
            created: started.created,
        });
    }
    let next = parsed.next_after(now)?;
    let last_fired = ticks.last().copied().or(schedule.last_fired_at);
    diesel::update(schedules::table.find(schedule.id))
        .set((
            schedules::next_fire_at.eq(next),
            schedules::last_fired_at.eq(last_fired),
        ))
        .execute(conn)?;
    if skipped > 0 {
        tracing::info!(
            schedule.id = %schedule.id,
            schedule.name = %schedule.name,
            skipped,
            since = %schedule.next_fire_at,
            "schedule skipped missed ticks"
        );
    }
    Ok((fired, skipped))
}
