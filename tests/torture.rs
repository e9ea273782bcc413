//! The randomized concurrency torture (`workflow_db::torture`), bounded for
//! CI: 4 threads for 40 s by default, then a drain and the invariant check.
//! `TORTURE_SEED` replays a run's choices, `TORTURE_SECONDS` and
//! `TORTURE_THREADS` change its size; for long runs use the example:
//! `cargo run --release --example torture --features test-utils -- --seconds 600 --seed 42`.

use workflow_db::testing::TestDatabase;
use workflow_db::torture::{self, TortureConfig};

#[test]
fn torture() {
    let config = TortureConfig::from_env();
    eprintln!(
        "torture: seed {} ({} threads, {} s); replay with TORTURE_SEED={}",
        config.seed,
        config.threads,
        config.duration.as_secs(),
        config.seed
    );
    let db = TestDatabase::new();
    let report = torture::run(db.url(), &config).unwrap();
    eprintln!("{report}");
    assert!(
        report.passed(),
        "the torture failed; replay with TORTURE_SEED={}\n{report}",
        config.seed
    );
    // It did something: executions ran to the end, some were refused along the way.
    let finished: i64 = report.statuses.values().sum();
    assert!(finished > 0, "{report}");
    assert!(
        report.ops.get("claim").copied().unwrap_or(0) > 0,
        "{report}"
    );
}
