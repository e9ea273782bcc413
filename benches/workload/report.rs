//! Figures and their report: [`Report`] collects every run's value per
//! figure, the crate-vs-limit [`Pair`]s, the [`Growth`] ratios (a figure at
//! a larger size vs the same at a smaller one) and the [`Target`]s, prints
//! the Markdown tables and writes `target/workload.json` and
//! `target/workload.md`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::Res;
use crate::args::Args;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Better {
    Higher,
    Lower,
}

#[derive(Debug)]
pub struct Figure {
    pub name: String,
    pub unit: &'static str,
    pub better: Better,
    pub limit: bool,
    pub values: Vec<f64>,
}

impl Figure {
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.values.clone();
        v.sort_by(f64::total_cmp);
        v
    }
    fn median(&self) -> f64 {
        let v = self.sorted();
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }
    fn min(&self) -> f64 {
        self.sorted()[0]
    }
    fn max(&self) -> f64 {
        *self.sorted().last().unwrap_or(&f64::NAN)
    }
}

/// A crate figure compared with a limit figure.
#[derive(Debug)]
pub struct Pair {
    pub ours: String,
    pub limit: String,
}

/// How a figure grows with size: `of` (the larger case) / `base` (the
/// smaller), medians, next to what linear growth would give.
#[derive(Debug)]
pub struct Growth {
    pub of: String,
    pub base: String,
    pub linear: f64,
}

/// A bound a figure's median should stay within (below it for
/// [`Better::Lower`], at or above it for [`Better::Higher`]).
#[derive(Debug)]
pub struct Target {
    pub figure: String,
    pub bound: f64,
}

#[derive(Default)]
pub struct Report {
    pub figures: Vec<Figure>,
    pub pairs: Vec<Pair>,
    pub growths: Vec<Growth>,
    pub targets: Vec<Target>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn record(&mut self, name: &str, unit: &'static str, better: Better, limit: bool, v: f64) {
        eprintln!(
            "  {}{name}: {} {unit}",
            if limit { "[limit] " } else { "" },
            fmt(v)
        );
        match self.figures.iter_mut().find(|f| f.name == name) {
            Some(f) => f.values.push(v),
            None => self.figures.push(Figure {
                name: name.to_owned(),
                unit,
                better,
                limit,
                values: vec![v],
            }),
        }
    }
    pub fn ours(&mut self, name: &str, unit: &'static str, better: Better, v: f64) {
        self.record(name, unit, better, false, v);
    }
    pub fn lim(&mut self, name: &str, unit: &'static str, better: Better, v: f64) {
        self.record(name, unit, better, true, v);
    }
    /// The three figures `<name> p50`, `<name> p99` and `<name> mean` (ms)
    /// of a latency measurement.
    pub fn latency(&mut self, name: &str, (p50, p99, mean): (f64, f64, f64), limit: bool) {
        for (p, v) in [("p50", p50), ("p99", p99), ("mean", mean)] {
            self.record(&format!("{name} {p}"), "ms", Better::Lower, limit, v);
        }
    }
    pub fn pair(&mut self, ours: &str, limit: &str) {
        if !self
            .pairs
            .iter()
            .any(|p| p.ours == ours && p.limit == limit)
        {
            self.pairs.push(Pair {
                ours: ours.to_owned(),
                limit: limit.to_owned(),
            });
        }
    }
    /// Pairs the p50 and the p99 of two latency figures.
    pub fn pair_latency(&mut self, ours: &str, limit: &str) {
        for p in ["p50", "p99"] {
            self.pair(&format!("{ours} {p}"), &format!("{limit} {p}"));
        }
    }
    /// Records that `of` is `base` at `linear` times the size.
    pub fn growth(&mut self, of: &str, base: &str, linear: f64) {
        if !self.growths.iter().any(|g| g.of == of && g.base == base) {
            self.growths.push(Growth {
                of: of.to_owned(),
                base: base.to_owned(),
                linear,
            });
        }
    }
    /// Records a bound for the median of `figure` (in its unit).
    pub fn target(&mut self, figure: &str, bound: f64) {
        if !self.targets.iter().any(|t| t.figure == figure) {
            self.targets.push(Target {
                figure: figure.to_owned(),
                bound,
            });
        }
    }
    fn get(&self, name: &str) -> Option<&Figure> {
        self.figures.iter().find(|f| f.name == name)
    }
    /// `of` / `base`, medians.
    fn growth_ratio(&self, g: &Growth) -> Option<f64> {
        Some(self.get(&g.of)?.median() / self.get(&g.base)?.median())
    }
    /// (median, met) of a target's figure.
    fn verdict(&self, t: &Target) -> Option<(f64, bool)> {
        let f = self.get(&t.figure)?;
        let m = f.median();
        Some((
            m,
            match f.better {
                Better::Lower => m < t.bound,
                Better::Higher => m >= t.bound,
            },
        ))
    }
    /// Speed ratio of the medians: > 1 means the crate is faster
    /// (throughput: crate/limit; latency and seconds: limit/crate).
    fn ratio(&self, p: &Pair) -> Option<f64> {
        let (a, b) = (self.get(&p.ours)?, self.get(&p.limit)?);
        Some(match a.better {
            Better::Higher => a.median() / b.median(),
            Better::Lower => b.median() / a.median(),
        })
    }

    /// Prints the table (and the ratios, and the notes) on stdout and writes
    /// it to `target/workload.md`, the figures to `target/workload.json`.
    pub fn print_and_save(
        &self,
        args: &Args,
        server_version: &str,
        started: DateTime<Utc>,
    ) -> Res<()> {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nworkflow-db workload, {} UTC, {cores} cores, PostgreSQL {server_version}, {} run(s), {} executions, {}s per throughput figure, batch {}{}",
            started.format("%Y-%m-%d %H:%M"),
            args.runs,
            args.executions,
            args.duration,
            args.batches
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            if args.limit {
                ", with the pgbench limit"
            } else {
                ""
            }
        );
        let _ = writeln!(out, "\n| figure | unit | median | min | max | runs |");
        let _ = writeln!(out, "|---|---|---:|---:|---:|---:|");
        for f in &self.figures {
            let _ = writeln!(
                out,
                "| {}{} | {} | {} | {} | {} | {} |",
                if f.limit { "limit: " } else { "" },
                f.name,
                f.unit,
                fmt(f.median()),
                fmt(f.min()),
                fmt(f.max()),
                f.values.len()
            );
        }
        if !self.pairs.is_empty() {
            let _ = writeln!(
                out,
                "\nSpeed ratio crate vs limit (medians; > 1 = the crate is faster): \
                 throughput crate/limit, latency and seconds limit/crate\n"
            );
            let _ = writeln!(out, "| crate figure | limit figure | ratio |");
            let _ = writeln!(out, "|---|---|---:|");
            for p in &self.pairs {
                if let Some(x) = self.ratio(p) {
                    let _ = writeln!(out, "| {} | {} | {:.2} |", p.ours, p.limit, x);
                }
            }
        }
        if self.growths.iter().any(|g| self.growth_ratio(g).is_some()) {
            let _ = writeln!(
                out,
                "\nGrowth (medians, figure / base figure; linear = the size ratio, less = better than linear)\n"
            );
            let _ = writeln!(out, "| figure | base figure | ratio | linear |");
            let _ = writeln!(out, "|---|---|---:|---:|");
            for g in &self.growths {
                if let Some(x) = self.growth_ratio(g) {
                    let _ = writeln!(
                        out,
                        "| {} | {} | {:.2} | {} |",
                        g.of,
                        g.base,
                        x,
                        fmt(g.linear)
                    );
                }
            }
        }
        if self.targets.iter().any(|t| self.verdict(t).is_some()) {
            let _ = writeln!(out, "\nTargets (medians)\n");
            let _ = writeln!(out, "| figure | median | target | verdict |");
            let _ = writeln!(out, "|---|---:|---:|---|");
            for t in &self.targets {
                if let (Some((m, met)), Some(f)) = (self.verdict(t), self.get(&t.figure)) {
                    let _ = writeln!(
                        out,
                        "| {} | {} {} | {} {} {} | {} |",
                        t.figure,
                        fmt(m),
                        f.unit,
                        if f.better == Better::Lower {
                            "<"
                        } else {
                            "≥"
                        },
                        fmt(t.bound),
                        f.unit,
                        if met { "met" } else { "missed" }
                    );
                }
            }
        }
        for n in &self.notes {
            let _ = writeln!(out, "\nnote: {n}");
        }
        println!("{out}");

        let figures: Vec<Value> = self
            .figures
            .iter()
            .map(|f| {
                let mut o = json!({
                    "name": if f.limit { format!("limit: {}", f.name) } else { f.name.clone() },
                    "unit": f.unit,
                    "median": f.median(),
                    "min": f.min(),
                    "max": f.max(),
                    "runs": f.values.len(),
                    "values": f.values,
                    "source": if f.limit { "limit" } else { "crate" },
                    "better": if f.better == Better::Higher { "higher" } else { "lower" },
                });
                let ratios: BTreeMap<String, f64> = self
                    .pairs
                    .iter()
                    .filter(|p| p.ours == f.name)
                    .filter_map(|p| Some((format!("limit: {}", p.limit), self.ratio(p)?)))
                    .collect();
                if !ratios.is_empty() {
                    o["speed_ratio_vs"] = json!(ratios);
                }
                let growth: BTreeMap<String, Value> = self
                    .growths
                    .iter()
                    .filter(|g| g.of == f.name)
                    .filter_map(|g| {
                        Some((
                            g.base.clone(),
                            json!({"ratio": self.growth_ratio(g)?, "linear": g.linear}),
                        ))
                    })
                    .collect();
                if !growth.is_empty() {
                    o["growth_vs"] = json!(growth);
                }
                if let Some((t, (_, met))) = self
                    .targets
                    .iter()
                    .find(|t| t.figure == f.name)
                    .and_then(|t| Some((t, self.verdict(t)?)))
                {
                    o["target"] = json!({"bound": t.bound, "met": met});
                }
                o
            })
            .collect();
        let path = target_dir().join("workload.json");
        std::fs::create_dir_all(target_dir())?;
        std::fs::write(&path, serde_json::to_string_pretty(&figures)?)?;
        std::fs::write(target_dir().join("workload.md"), &out)?;
        eprintln!("wrote {} and workload.md", path.display());
        Ok(())
    }
}

/// A value with 3 significant-ish digits, as the table shows it.
pub fn fmt(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else if x.abs() >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// `@100k`, `@1M`: the data scale in a figure's name.
pub fn scale_label(n: u64) -> String {
    if n % 1_000_000 == 0 {
        format!("@{}M", n / 1_000_000)
    } else if n % 1000 == 0 {
        format!("@{}k", n / 1000)
    } else {
        format!("@{n}")
    }
}

/// Nearest-rank percentiles (as run.sh computes them) and the mean:
/// (p50, p99, mean).
pub fn percentiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let rank = |p: f64| v[((n as f64 * p / 100.0).ceil() as usize).clamp(1, n) - 1];
    (rank(50.0), rank(99.0), v.iter().sum::<f64>() / n as f64)
}

/// Where the benchmark writes: the report, pgbench's latency logs, the W5 CSV files.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
}
