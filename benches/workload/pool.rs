//! The r2d2 checkout figure: checkouts per second of a one-connection pool,
//! with and without the ping on checkout (`test_on_check_out`), which is
//! why the crate's pool does not ping (see `workflow_db::pool::build_pool`).

use std::time::{Duration, Instant};

use diesel::PgConnection;
use diesel::r2d2::{ConnectionManager, Pool};

use crate::Res;
use crate::db::Bench;
use crate::report::Better;

impl Bench {
    pub fn r2d2(&mut self, rep: usize) -> Res<()> {
        eprintln!("r2d2 checkout (rep {rep})");
        for test in [true, false] {
            let manager = ConnectionManager::<PgConnection>::new(self.url.expose());
            let pool = Pool::builder()
                .max_size(1)
                .min_idle(Some(1))
                .test_on_check_out(test)
                .build(manager)?;
            drop(pool.get()?);
            let deadline = Instant::now() + Duration::from_secs_f64(self.args.duration.min(3.0));
            let t0 = Instant::now();
            let mut n = 0u64;
            while Instant::now() < deadline {
                for _ in 0..100 {
                    let c = pool.get()?;
                    std::hint::black_box(&c);
                }
                n += 100;
            }
            let v = n as f64 / t0.elapsed().as_secs_f64();
            self.report.ours(
                &format!("r2d2 checkout+return, test_on_check_out = {test}"),
                "checkouts/s",
                Better::Higher,
                v,
            );
        }
        Ok(())
    }
}
