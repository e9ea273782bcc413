//! STUDIO (issue 13): how fast the web dashboard (`workflow_db::studio`)
//! answers on a large database. For each `--studio-executions` scale
//! (default 100k and 1M executions) a throwaway database of its own is
//! built set-based (`studio_seed.sql`: 5 workflows at version 3,
//! executions over the last 30 days, 90% completed, 5% failed, 2%
//! cancelled, the rest running, paused or pending, 3–6 steps each with
//! their edges, and the history the transitions write), vacuumed and
//! analyzed; then every page is requested in-process
//! (`tower::ServiceExt::oneshot` on `Studio::router`, a real `AsyncPool`
//! of 4 connections, the bench's tokio runtime), sequentially: 20 warm-up
//! requests, then `--studio-requests` timed ones, each from the request to
//! the fully collected body. Figures: p50, p99 and max per page and scale
//! (ms), `--runs` times on the same database; the growth 1M / 100k of the
//! p50s. Every response must be 200. The seeding time is printed (and
//! noted), not a figure.

use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use tower::ServiceExt;
use workflow_db::Config;
use workflow_db::runtime::AsyncPool;
use workflow_db::studio::{Studio, StudioOptions};
use workflow_db::testing::TestDatabase;

use crate::Res;
use crate::db::{Bench, connect, count_on};
use crate::report::{Better, scale_label};

/// The seeding statements, in sections `-- @name`.
const SEED: &str = include_str!("studio_seed.sql");
/// Executions inserted per chunk (one statement per table and chunk).
const CHUNK: u64 = 100_000;
/// Untimed requests before each page's timed ones.
const WARMUP: usize = 20;
/// `next-page` links followed for the deep list page.
const DEEP: usize = 50;
/// Connections of the studio's pool.
const POOL_SIZE: u32 = 4;

/// The section `name` of [`SEED`].
fn section(name: &str) -> Res<&'static str> {
    let start = SEED
        .find(&format!("-- @{name}\n"))
        .ok_or_else(|| format!("studio_seed.sql has no section {name}"))?;
    let rest = &SEED[start..];
    let end = rest[4..].find("\n-- @").map_or(rest.len(), |i| i + 5);
    Ok(&rest[..end])
}

/// What the pages are asked about, read from the seeded database.
struct Targets {
    completed: String,
    running: String,
    running_step: String,
}

#[derive(QueryableByName)]
struct Ids {
    #[diesel(sql_type = diesel::sql_types::Text)]
    completed: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    running: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    running_step: String,
}

/// Builds the data set of `n` executions on `conn`; returns what the
/// pages will show.
fn seed(conn: &mut PgConnection, n: u64) -> Res<Targets> {
    conn.batch_execute(section("setup")?)?;
    conn.batch_execute(&section("plan")?.replace("{n}", &n.to_string()))?;
    let mut lo = 1;
    while lo <= n {
        let hi = (lo + CHUNK - 1).min(n);
        let t = Instant::now();
        for part in [
            "chunk_steps",
            "chunk_executions",
            "chunk_insert_steps",
            "chunk_events",
        ] {
            conn.batch_execute(
                &section(part)?
                    .replace("{lo}", &lo.to_string())
                    .replace("{hi}", &hi.to_string()),
            )?;
        }
        eprintln!(
            "  executions {lo}..{hi} inserted in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        lo = hi + 1;
    }
    conn.batch_execute(section("finish")?)?;
    // The events' foreign keys, checked set-based (their per-row checks
    // were off for the insert).
    let orphans = count_on(
        conn,
        "execution_events e WHERE NOT EXISTS (SELECT 1 FROM executions x WHERE x.id = e.execution_id) \
           OR (e.step_id IS NOT NULL \
               AND NOT EXISTS (SELECT 1 FROM execution_steps s WHERE s.id = e.step_id))",
    )?;
    if orphans != 0 {
        return Err(
            format!("STUDIO seed: {orphans} events without their execution or step").into(),
        );
    }
    // A completed execution of the 6-step workflow from the middle of the
    // range, the newest running one of it with its layer running (lease
    // not expired), and that running step.
    let ids: Ids = diesel::sql_query(format!(
        "WITH r AS (SELECT p.id FROM studio_plan p \
                     WHERE p.status = 'running' AND p.wf = 0 AND p.run_now AND NOT p.expired \
                     ORDER BY p.n DESC LIMIT 1) \
         SELECT (SELECT p.id::text FROM studio_plan p WHERE p.status = 'completed' AND p.wf = 0 \
                   AND p.n >= {} ORDER BY p.n LIMIT 1) AS completed, \
                (SELECT r.id::text FROM r) AS running, \
                (SELECT s.id::text FROM execution_steps s, r \
                  WHERE s.execution_id = r.id AND s.status = 'running' \
                  ORDER BY s.node_id LIMIT 1) AS running_step",
        n / 2
    ))
    .get_result(conn)?;
    Ok(Targets {
        completed: ids.completed,
        running: ids.running,
        running_step: ids.running_step,
    })
}

/// One GET through the router: (ms from the request to the whole body,
/// the body). Anything but 200 is an error.
async fn get(router: &Router, uri: &str) -> Res<(f64, String)> {
    let t = Instant::now();
    let response = router
        .clone()
        .oneshot(Request::get(uri).body(Body::empty())?)
        .await?;
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX).await?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if status != StatusCode::OK {
        return Err(format!(
            "STUDIO GET {uri}: {status}: {}",
            String::from_utf8_lossy(&body)
                .chars()
                .take(500)
                .collect::<String>()
        )
        .into());
    }
    Ok((ms, String::from_utf8(body.to_vec())?))
}

/// The `next-page` link of a list page, unescaped.
fn next_page(html: &str) -> Option<String> {
    let at = html.find("id=\"next-page\" href=\"")? + "id=\"next-page\" href=\"".len();
    let href = &html[at..at + html[at..].find('"')?];
    Some(
        href.replace("&#x2f;", "/")
            .replace("&#47;", "/")
            .replace("&#x3d;", "=")
            .replace("&#61;", "=")
            .replace("&quot;", "\"")
            .replace("&#x27;", "'")
            .replace("&#39;", "'")
            .replace("&amp;", "&"),
    )
}

/// (p50, p99, max) of a page's request times, ms.
type Quantiles = (f64, f64, f64);

/// (p50, p99, max) of `v`, nearest rank.
fn p50_p99_max(mut v: Vec<f64>) -> Quantiles {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let rank = |p: f64| v[((n as f64 * p / 100.0).ceil() as usize).clamp(1, n) - 1];
    (rank(50.0), rank(99.0), v[n - 1])
}

/// The figure name of page `label` at scale `scale`.
fn figure(label: &str, scale: &str) -> String {
    format!("STUDIO {label} {scale}")
}

impl Bench {
    pub fn studio_group(&mut self) -> Res<()> {
        let scales = self.args.studio_executions.clone();
        let mut labels: Vec<String> = Vec::new();
        for &n in &scales {
            let scale = scale_label(n);
            eprintln!("STUDIO page times at {n} executions: building the database");
            let db = TestDatabase::throwaway("studio")?;
            eprintln!("  database {}", db.name());
            let result = self.studio_scale(&db, n, &mut labels);
            if self.args.keep {
                let name = db.keep();
                eprintln!("kept database {name} (drop it with: DROP DATABASE {name})");
            }
            result?;
            if scales.len() > 1 && n == *scales.iter().max().unwrap_or(&n) {
                let base = *scales.iter().min().unwrap_or(&n);
                for label in &labels {
                    for p in ["p50", "p99"] {
                        self.report.growth(
                            &format!("{} {p}", figure(label, &scale)),
                            &format!("{} {p}", figure(label, &scale_label(base))),
                            n as f64 / base as f64,
                        );
                    }
                }
            }
        }
        Ok(())
    }

    fn studio_scale(&mut self, db: &TestDatabase, n: u64, labels: &mut Vec<String>) -> Res<()> {
        let scale = scale_label(n);
        let url = db
            .url()
            .with_default_param("sslmode", "disable")
            .with_default_param("application_name", "workflow-db-bench");
        let mut conn = connect(&url)?;
        let t = Instant::now();
        let targets = seed(&mut conn, n)?;
        let insert = t.elapsed().as_secs_f64();
        let t = Instant::now();
        conn.batch_execute("VACUUM ANALYZE")?;
        conn.batch_execute("CHECKPOINT")?;
        let vacuum = t.elapsed().as_secs_f64();
        let steps = count_on(&mut conn, "execution_steps")?;
        let events = count_on(&mut conn, "execution_events")?;
        let size: i64 = {
            #[derive(QueryableByName)]
            struct S {
                #[diesel(sql_type = diesel::sql_types::BigInt)]
                s: i64,
            }
            diesel::sql_query("SELECT pg_database_size(current_database()) AS s")
                .get_result::<S>(&mut conn)?
                .s
        };
        drop(conn);
        let note = format!(
            "STUDIO {scale}: {n} executions, {steps} steps, {events} events ({:.1} GB) inserted in \
             {insert:.0} s, VACUUM ANALYZE + CHECKPOINT {vacuum:.0} s",
            size as f64 / 1e9
        );
        eprintln!("  {note}");
        self.report.notes.push(note);

        let rt = self.runtime()?;
        let mut config = Config::new(url.clone());
        config.pool_size = POOL_SIZE;
        let requests = self.args.studio_requests;
        let runs = self.args.runs;
        let results = rt.block_on(async move {
            let pool = AsyncPool::from_config(&config).await?;
            let studio = Studio::new(pool, StudioOptions::default());
            let router = studio.router();
            // The page 50 `next-page` links deep.
            let mut deep = "/executions".to_owned();
            for i in 0..DEEP {
                let (_, html) = get(&router, &deep).await?;
                deep = next_page(&html)
                    .ok_or_else(|| format!("STUDIO: list page {} has no next-page link", i + 1))?;
            }
            let pages: Vec<(String, String)> = vec![
                ("overview /".into(), "/".into()),
                ("executions list, first page".into(), "/executions".into()),
                (
                    "executions ?status=failed".into(),
                    "/executions?status=failed".into(),
                ),
                (
                    "executions ?workflow=invoice-sync".into(),
                    "/executions?workflow=invoice-sync".into(),
                ),
                (
                    "executions ?user=user-0 (busiest user, 3%)".into(),
                    "/executions?user=user-0".into(),
                ),
                (
                    "executions ?queue=storage (5% of executions)".into(),
                    "/executions?queue=storage".into(),
                ),
                (format!("executions, page {} (cursor)", DEEP + 1), deep),
                (
                    "execution page, completed (6 steps)".into(),
                    format!("/executions/{}", targets.completed),
                ),
                (
                    "execution page, running".into(),
                    format!("/executions/{}", targets.running),
                ),
                (
                    "step page, running step".into(),
                    format!("/steps/{}", targets.running_step),
                ),
                ("/workflows".into(), "/workflows".into()),
                ("/queues".into(), "/queues".into()),
                ("/schedules".into(), "/schedules".into()),
            ];
            let mut out: Vec<(String, Vec<Quantiles>)> = Vec::new();
            for (label, uri) in pages {
                let mut per_run = Vec::new();
                for _ in 0..runs {
                    for _ in 0..WARMUP {
                        get(&router, &uri).await?;
                    }
                    let mut lat = Vec::with_capacity(requests);
                    for _ in 0..requests {
                        lat.push(get(&router, &uri).await?.0);
                    }
                    per_run.push(p50_p99_max(lat));
                }
                out.push((label, per_run));
            }
            studio.shutdown();
            Res::Ok(out)
        })?;
        for (label, per_run) in results {
            let name = figure(&label, &scale);
            for (p50, p99, max) in per_run {
                for (p, v) in [("p50", p50), ("p99", p99), ("max", max)] {
                    self.report
                        .ours(&format!("{name} {p}"), "ms", Better::Lower, v);
                }
            }
            if !labels.contains(&label) {
                labels.push(label);
            }
        }
        Ok(())
    }
}
