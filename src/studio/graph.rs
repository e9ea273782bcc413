//! The SVG drawing of an execution's graph: one box per step, laid out in
//! layers from the roots down by the `rust-sugiyama` crate (a Sugiyama
//! layout), arrows along the edges. Colours come from the page's
//! stylesheet through the classes `status-*`; nothing inline, no script.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use rust_sugiyama::configure::{Config, RankingType};

use super::view;
use crate::enums::StepStatus;
use crate::graph::{SIGNAL_NODE_TYPE, TIMER_NODE_TYPE};
use crate::models::ExecutionStep;
use crate::ops::{self, StepEdge};

/// Width of a node's box.
const NODE_W: f64 = 220.0;
/// Height of a node's box.
const NODE_H: f64 = 52.0;
/// Horizontal gap between boxes of a layer.
const H_GAP: f64 = 32.0;
/// Vertical gap between layers (room for the arrows).
const V_GAP: f64 = 48.0;
/// Gap between the drawings of disconnected components.
const COMPONENT_GAP: f64 = 64.0;
/// Space around the drawing.
const MARGIN: f64 = 16.0;
/// Characters of a node id shown in its box (the title has it whole).
const ID_CHARS: usize = 24;

/// The execution's graph as an inline SVG element, every text escaped.
///
/// One box per step (by `node_id`), laid out top to bottom from the roots,
/// each a link to `{base}/steps/{step id}` with the node id, the status, the
/// attempt and retries, the duration, and a mark on timer (⏱) and signal (✉)
/// waits. Edges whose ends are not among `steps` are left out. Colours are
/// left to the page's stylesheet: the group of a step has the class
/// `status-{status}`, edges the class `edge`. A cyclic graph (which a
/// validated workflow has not) is drawn by [`ops::layers`], its cycle in a
/// last layer.
pub fn render_svg(steps: &[ExecutionStep], edges: &[StepEdge], base: &str) -> String {
    render_at(steps, edges, base, Utc::now())
}

/// [`render_svg`] at a given time (the duration of running steps).
fn render_at(
    steps: &[ExecutionStep],
    edges: &[StepEdge],
    base: &str,
    now: DateTime<Utc>,
) -> String {
    let links = index_edges(steps, edges);
    let (pos, width, height) = layout(steps, edges, &links);
    let (w, h) = (fmt_num(width), fmt_num(height));

    let mut out = String::with_capacity(512 + steps.len() * 600 + links.len() * 160);
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"graph\" viewBox=\"0 0 {w} {h}\" \
         width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"execution graph\">"
    );
    out.push_str(
        "<defs><marker id=\"arrow\" class=\"arrowhead\" viewBox=\"0 0 10 10\" refX=\"10\" \
         refY=\"5\" markerWidth=\"8\" markerHeight=\"8\" orient=\"auto-start-reverse\">\
         <path d=\"M 0 0 L 10 5 L 0 10 z\"/></marker></defs>",
    );

    for &(s, t) in &links {
        let (sx, sy) = (pos[s].0 + NODE_W / 2.0, pos[s].1 + NODE_H);
        let (tx, ty) = (pos[t].0 + NODE_W / 2.0, pos[t].1);
        let bend = ((ty - sy).abs() / 2.0).max(V_GAP / 2.0);
        let _ = write!(
            out,
            "<path class=\"edge\" data-from=\"{}\" data-to=\"{}\" d=\"M {} {} C {} {} {} {} {} {}\" \
             marker-end=\"url(#arrow)\"/>",
            escape(&steps[s].node_id),
            escape(&steps[t].node_id),
            fmt_num(sx),
            fmt_num(sy),
            fmt_num(sx),
            fmt_num(sy + bend),
            fmt_num(tx),
            fmt_num(ty - bend),
            fmt_num(tx),
            fmt_num(ty),
        );
    }

    let base = escape(base.trim_end_matches('/'));
    for (step, &(x, y)) in steps.iter().zip(&pos) {
        let node = escape(&step.node_id);
        let status = escape(step.status.as_str());
        let id = step.id;
        let _ = write!(
            out,
            "<g class=\"node status-{status}\" data-step-id=\"{id}\" data-node-id=\"{node}\" \
             data-status=\"{status}\"><a href=\"{base}/steps/{id}\"><title>{node} — {status}</title>\
             <rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" rx=\"6\"/>\
             <text class=\"node-id\" x=\"{}\" y=\"{}\">{}</text>\
             <text class=\"node-meta\" x=\"{}\" y=\"{}\">{}</text></a></g>",
            fmt_num(x),
            fmt_num(y),
            fmt_num(NODE_W),
            fmt_num(NODE_H),
            fmt_num(x + 12.0),
            fmt_num(y + 21.0),
            escape(&view::cut(&step.node_id, ID_CHARS)),
            fmt_num(x + 12.0),
            fmt_num(y + 40.0),
            escape(&meta(step, now)),
        );
    }
    out.push_str("</svg>");
    out
}

/// The edges as pairs of step indexes: both ends among the steps (the first
/// step of a node id, should two share one), no self-loops, no duplicates.
fn index_edges(steps: &[ExecutionStep], edges: &[StepEdge]) -> Vec<(usize, usize)> {
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(steps.len());
    for (i, s) in steps.iter().enumerate() {
        index.entry(s.node_id.as_str()).or_insert(i);
    }
    let links: BTreeSet<(usize, usize)> = edges
        .iter()
        .filter_map(|e| {
            Some((
                *index.get(e.source.as_str())?,
                *index.get(e.target.as_str())?,
            ))
        })
        .filter(|(s, t)| s != t)
        .collect();
    links.into_iter().collect()
}

/// Whether the graph of `n` nodes has a cycle (Kahn's algorithm).
fn is_cyclic(n: usize, links: &[(usize, usize)]) -> bool {
    let mut indegree = vec![0usize; n];
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); n];
    for &(s, t) in links {
        indegree[t] += 1;
        out[s].push(t);
    }
    let mut ready: Vec<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
    let mut seen = 0;
    while let Some(v) = ready.pop() {
        seen += 1;
        for &t in &out[v] {
            indegree[t] -= 1;
            if indegree[t] == 0 {
                ready.push(t);
            }
        }
    }
    seen < n
}

/// The top-left corner of each step's box (in the order of `steps`), and
/// the width and height of the drawing, margins included.
fn layout(
    steps: &[ExecutionStep],
    edges: &[StepEdge],
    links: &[(usize, usize)],
) -> (Vec<(f64, f64)>, f64, f64) {
    let n = steps.len();
    if n == 0 {
        return (Vec::new(), 2.0 * MARGIN, 2.0 * MARGIN);
    }
    // rust-sugiyama 0.4 breaks cycles by reversing a feedback arc set and
    // then asserts that none is left: a self-loop (removed above) survives
    // the reversal and panics. Longer cycles it lays out, but they do not
    // come from validated workflows, so rather than lean on the crate's
    // cycle removal they get the plain layers, the cycle in a last one.
    let mut pos = if is_cyclic(n, links) {
        layered(steps, edges)
    } else {
        sugiyama(n, links)
    };
    // Anything the layout left out (it should not) goes in a last row.
    let bottom = pos.iter().flatten().map(|p| p.1).fold(0.0, f64::max);
    let mut x = MARGIN;
    for p in pos.iter_mut().filter(|p| p.is_none()) {
        *p = Some((x, bottom + NODE_H + V_GAP));
        x += NODE_W + H_GAP;
    }
    let pos: Vec<(f64, f64)> = pos.into_iter().map(|p| p.unwrap_or((0.0, 0.0))).collect();
    let width = pos.iter().map(|p| p.0).fold(0.0, f64::max) + NODE_W + MARGIN;
    let height = pos.iter().map(|p| p.1).fold(0.0, f64::max) + NODE_H + MARGIN;
    (pos, width, height)
}

/// The Sugiyama layout of an acyclic graph, one component beside the other.
fn sugiyama(n: usize, links: &[(usize, usize)]) -> Vec<Option<(f64, f64)>> {
    // The crate adds `vertex_spacing` to both sides of every vertex; the
    // height carries the extra room between layers.
    let vertices: Vec<(u32, (f64, f64))> = (0..n)
        .map(|i| (i as u32, (NODE_W, NODE_H + V_GAP - H_GAP)))
        .collect();
    let edges: Vec<(u32, u32)> = links.iter().map(|&(s, t)| (s as u32, t as u32)).collect();
    let config = Config {
        vertex_spacing: H_GAP,
        // Roots on top, not pulled down next to their first child.
        ranking_type: RankingType::Up,
        // Swapping neighbours to save crossings costs much on big graphs.
        transpose: n <= 200,
        ..Config::default()
    };
    let mut pos = vec![None; n];
    let mut left = MARGIN;
    // One layout per weakly connected component, each in coordinates of
    // its own; vertex numbers are the insertion order (the crate's node
    // indexes), positions the centres of the boxes.
    for (component, _, _) in rust_sugiyama::from_vertices_and_edges(&vertices, &edges, &config) {
        let min_x = component
            .iter()
            .map(|c| c.1.0)
            .fold(f64::INFINITY, f64::min);
        let max_x = component
            .iter()
            .map(|c| c.1.0)
            .fold(f64::NEG_INFINITY, f64::max);
        let min_y = component
            .iter()
            .map(|c| c.1.1)
            .fold(f64::INFINITY, f64::min);
        if !min_x.is_finite() || !max_x.is_finite() || !min_y.is_finite() {
            continue;
        }
        for (v, (x, y)) in component {
            if let Some(p) = pos.get_mut(v) {
                *p = Some((left + x - min_x, MARGIN + y - min_y));
            }
        }
        left += max_x - min_x + NODE_W + COMPONENT_GAP;
    }
    pos
}

/// The placement of [`ops::layers`]: one row per layer, in its order.
fn layered(steps: &[ExecutionStep], edges: &[StepEdge]) -> Vec<Option<(f64, f64)>> {
    let mut by_node: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, s) in steps.iter().enumerate() {
        by_node.entry(s.node_id.as_str()).or_default().push(i);
    }
    let nodes: Vec<&str> = steps.iter().map(|s| s.node_id.as_str()).collect();
    let mut pos = vec![None; steps.len()];
    for (row, layer) in ops::layers(&nodes, edges).iter().enumerate() {
        let y = MARGIN + row as f64 * (NODE_H + V_GAP);
        let mut x = MARGIN;
        for node in layer {
            for &i in by_node.get(node.as_str()).into_iter().flatten() {
                if pos[i].is_none() {
                    pos[i] = Some((x, y));
                    x += NODE_W + H_GAP;
                }
            }
        }
    }
    pos
}

/// The second line of a box: status, attempt and retries, duration, and
/// the mark of a wait.
fn meta(step: &ExecutionStep, now: DateTime<Utc>) -> String {
    let mut meta = step.status.as_str().to_owned();
    if step.attempt > 1 {
        let _ = write!(meta, " · attempt {}", step.attempt);
    }
    if step.retry_count > 0 {
        let _ = write!(meta, " · retries {}", step.retry_count);
    }
    if let Some(started) = step.started_at {
        let end = match (step.completed_at, step.status) {
            (Some(end), _) => Some(end),
            (None, StepStatus::Running) => Some(now),
            _ => None,
        };
        if let Some(end) = end {
            let _ = write!(meta, " · {}", view::duration(end - started));
        }
    }
    match step.node_type.as_deref() {
        Some(TIMER_NODE_TYPE) => meta.push_str(" · ⏱"),
        Some(SIGNAL_NODE_TYPE) => meta.push_str(" · ✉"),
        _ => {}
    }
    meta
}

/// Text for XML content and double- or single-quoted attribute values:
/// markup characters as references, characters XML does not allow (the
/// controls but tab and newline, U+FFFE, U+FFFF) as U+FFFD.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\t' | '\n' => out.push(c),
            '\u{0}'..='\u{1f}' | '\u{fffe}' | '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// A coordinate, at most one decimal.
fn fmt_num(v: f64) -> String {
    let r = (v * 10.0).round() / 10.0;
    if r == r.trunc() {
        format!("{}", r as i64)
    } else {
        format!("{r:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;
    use uuid::Uuid;

    fn step(node: &str, status: StepStatus) -> ExecutionStep {
        let t = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        ExecutionStep {
            id: Uuid::now_v7(),
            execution_id: Uuid::nil(),
            node_id: node.into(),
            status,
            input: None,
            output: None,
            validation: None,
            retry_count: 0,
            error: None,
            started_at: None,
            completed_at: None,
            created_at: t,
            updated_at: t,
            upstream_pending: 0,
            max_retries: 0,
            run_after: t,
            locked_by: None,
            locked_until: None,
            parked: false,
            attempt: 0,
            node_type: Some("work".into()),
            reclaims: 0,
            priority: 0,
            queue: None,
            concurrency_key: None,
            throttled: false,
            wait_seconds: None,
            wait_until: None,
            wait_signal: None,
            wake_at: None,
        }
    }

    fn steps(nodes: &[&str]) -> Vec<ExecutionStep> {
        nodes.iter().map(|n| step(n, StepStatus::Pending)).collect()
    }

    fn edge(s: &str, t: &str) -> StepEdge {
        StepEdge {
            source: s.into(),
            target: t.into(),
        }
    }

    /// The top-left corner of each node's box by node id, read back from
    /// the SVG.
    fn boxes(svg: &str) -> HashMap<String, (f64, f64)> {
        let mut out = HashMap::new();
        for group in svg.split("<g class=\"node ").skip(1) {
            let attr = |name: &str| {
                let from = group.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
                let len = group[from..].find('"').unwrap();
                group[from..from + len].to_owned()
            };
            let rect = &group[group.find("<rect").unwrap()..];
            let num = |name: &str| {
                let from = rect.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
                let len = rect[from..].find('"').unwrap();
                rect[from..from + len].parse::<f64>().unwrap()
            };
            out.insert(attr("data-node-id"), (num("x"), num("y")));
        }
        out
    }

    fn overlap(a: (f64, f64), b: (f64, f64)) -> bool {
        (a.0 - b.0).abs() < NODE_W && (a.1 - b.1).abs() < NODE_H
    }

    #[test]
    fn a_diamond_flows_down() {
        let s = steps(&["root", "left", "right", "sink"]);
        let e = [
            edge("root", "left"),
            edge("root", "right"),
            edge("left", "sink"),
            edge("right", "sink"),
        ];
        let svg = render_svg(&s, &e, "/studio");
        let b = boxes(&svg);
        assert_eq!(b.len(), 4);
        for middle in ["left", "right"] {
            assert!(b["root"].1 + NODE_H <= b[middle].1, "{b:?}");
            assert!(b[middle].1 + NODE_H <= b["sink"].1, "{b:?}");
        }
        assert!(!overlap(b["left"], b["right"]), "{b:?}");
        assert_eq!(svg.matches("<path class=\"edge\"").count(), 4);
        assert!(svg.contains("data-from=\"root\" data-to=\"left\""));
        assert!(svg.starts_with(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"graph\" viewBox=\"0 0 "
        ));
        assert!(svg.ends_with("</svg>"));
        assert!(!svg.contains("style"));
    }

    #[test]
    fn a_hostile_node_id_is_escaped() {
        let hostile = "<script>alert(1)</script>\"' & ]]>\u{0}x";
        let s = vec![
            step(hostile, StepStatus::Failed),
            step("b", StepStatus::Completed),
        ];
        let e = [edge(hostile, "b")];
        let svg = render_svg(&s, &e, "/st\"udio<");
        assert!(!svg.contains("<script"));
        assert!(!svg.contains("]]>"));
        assert!(!svg.contains('\u{0}'));
        let escaped = "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39; &amp; ]]&gt;\u{fffd}x";
        assert!(svg.contains(&format!("data-node-id=\"{escaped}\"")));
        assert!(svg.contains(&format!("data-from=\"{escaped}\"")));
        assert!(svg.contains(&format!("<title>{escaped} — failed</title>")));
        assert!(svg.contains("href=\"/st&quot;udio&lt;/steps/"));
        // Every '<' opens one of the elements drawn, every '&' a reference.
        for tag in svg.split('<').skip(1) {
            let name: String = tag
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '/')
                .collect();
            let name = name.trim_start_matches('/');
            assert!(
                [
                    "svg", "defs", "marker", "path", "g", "a", "title", "rect", "text"
                ]
                .contains(&name),
                "{tag}"
            );
        }
        for amp in svg.split('&').skip(1) {
            assert!(
                ["amp;", "lt;", "gt;", "quot;", "#39;"]
                    .iter()
                    .any(|r| amp.starts_with(r))
            );
        }
    }

    #[test]
    fn escape_keeps_tabs_and_newlines_only() {
        assert_eq!(
            escape("a\tb\nc\rd\u{1b}e\u{fffe}"),
            "a\tb\nc\u{fffd}d\u{fffd}e\u{fffd}"
        );
        assert_eq!(escape("<&>\"'"), "&lt;&amp;&gt;&quot;&#39;");
    }

    #[test]
    fn every_step_appears_once_with_its_status() {
        let mut s = Vec::new();
        for (i, status) in StepStatus::ALL.iter().enumerate() {
            s.push(step(&format!("n{i}"), *status));
        }
        let e = [
            edge("n0", "n1"),
            edge("n1", "n2"),
            edge("gone", "n3"),
            edge("n3", "n3"),
        ];
        let svg = render_svg(&s, &e, "");
        for st in &s {
            let status = st.status.as_str();
            let group = format!(
                "<g class=\"node status-{status}\" data-step-id=\"{}\" data-node-id=\"{}\" data-status=\"{status}\">",
                st.id, st.node_id
            );
            assert_eq!(svg.matches(&group).count(), 1, "{group}");
            assert_eq!(svg.matches(&st.id.to_string()).count(), 2);
            assert!(svg.contains(&format!("href=\"/steps/{}\"", st.id)));
        }
        assert_eq!(svg.matches("<g class=\"node ").count(), s.len());
        // The edge from an unknown node and the self-loop are left out.
        assert_eq!(svg.matches("<path class=\"edge\"").count(), 2);
    }

    #[test]
    fn components_sit_side_by_side() {
        let s = steps(&["a", "b", "c", "x", "y", "lone", "p", "q", "r"]);
        let e = [
            edge("a", "b"),
            edge("a", "c"),
            edge("x", "y"),
            edge("p", "q"),
            edge("q", "r"),
            edge("p", "r"),
        ];
        let b = boxes(&render_svg(&s, &e, ""));
        assert_eq!(b.len(), s.len());
        let all: Vec<_> = b.values().copied().collect();
        for (i, p) in all.iter().enumerate() {
            assert!(p.0 >= MARGIN && p.1 >= MARGIN, "{b:?}");
            for q in &all[i + 1..] {
                assert!(!overlap(*p, *q), "{b:?}");
            }
        }
        assert!(b["a"].1 < b["b"].1 && b["p"].1 < b["q"].1 && b["q"].1 < b["r"].1);
    }

    #[test]
    fn a_single_node_and_no_nodes() {
        let svg = render_svg(&steps(&["only"]), &[], "/s/");
        let b = boxes(&svg);
        assert_eq!(b["only"], (MARGIN, MARGIN));
        assert!(svg.contains("href=\"/s/steps/"));
        assert!(svg.contains("viewBox=\"0 0 252 84\""));
        let empty = render_svg(&[], &[], "");
        assert!(empty.contains("viewBox=\"0 0 32 32\"") && empty.ends_with("</svg>"));
    }

    #[test]
    fn no_edges_put_every_node_apart() {
        let s = steps(&["a", "b", "c", "d"]);
        let b = boxes(&render_svg(&s, &[], ""));
        let all: Vec<_> = b.values().copied().collect();
        for (i, p) in all.iter().enumerate() {
            for q in &all[i + 1..] {
                assert!(!overlap(*p, *q), "{b:?}");
            }
        }
    }

    #[test]
    fn a_cycle_does_not_panic() {
        let s = steps(&["a", "b", "c", "d"]);
        let e = [
            edge("a", "b"),
            edge("b", "c"),
            edge("c", "b"),
            edge("c", "d"),
            edge("d", "d"),
        ];
        let svg = render_svg(&s, &e, "");
        let b = boxes(&svg);
        assert_eq!(b.len(), 4);
        assert!(b["a"].1 < b["b"].1);
        let all: Vec<_> = b.values().copied().collect();
        for (i, p) in all.iter().enumerate() {
            for q in &all[i + 1..] {
                assert!(!overlap(*p, *q), "{b:?}");
            }
        }
        let two = render_svg(&steps(&["a", "b"]), &[edge("a", "b"), edge("b", "a")], "");
        assert_eq!(boxes(&two).len(), 2);
    }

    /// A layered DAG: `width` nodes per layer, each wired to two of the
    /// next layer.
    fn layered_dag(n: usize, width: usize) -> (Vec<ExecutionStep>, Vec<StepEdge>) {
        let names: Vec<String> = (0..n).map(|i| format!("node-{i}")).collect();
        let s = names
            .iter()
            .map(|n| step(n, StepStatus::Completed))
            .collect();
        let mut e = Vec::new();
        for i in 0..n.saturating_sub(width) {
            let layer = i / width;
            let next = (layer + 1) * width;
            e.push(edge(&names[i], &names[(next + (i * 7) % width).min(n - 1)]));
            e.push(edge(
                &names[i],
                &names[(next + (i * 3 + 1) % width).min(n - 1)],
            ));
        }
        (s, e)
    }

    #[test]
    fn a_big_graph_draws_every_node_once() {
        let (s, e) = layered_dag(250, 10);
        let svg = render_svg(&s, &e, "");
        let b = boxes(&svg);
        assert_eq!(b.len(), 250);
        assert!(b["node-0"].1 < b["node-10"].1);
        let mut rows: HashMap<i64, Vec<f64>> = HashMap::new();
        for p in b.values() {
            rows.entry(p.1 as i64).or_default().push(p.0);
        }
        for xs in rows.values_mut() {
            xs.sort_by(f64::total_cmp);
            assert!(xs.windows(2).all(|w| w[1] - w[0] >= NODE_W));
        }
    }

    #[test]
    fn meta_line() {
        let now = DateTime::from_timestamp(1_700_000_100, 0).unwrap();
        let mut s = step("n", StepStatus::Running);
        s.started_at = Some(now - TimeDelta::milliseconds(12_340));
        s.attempt = 2;
        s.retry_count = 1;
        assert_eq!(meta(&s, now), "running · attempt 2 · retries 1 · 12.3 s");
        s.status = StepStatus::Completed;
        s.attempt = 1;
        s.retry_count = 0;
        s.completed_at = Some(now - TimeDelta::milliseconds(12_000));
        assert_eq!(meta(&s, now), "completed · 340 ms");
        let mut t = step("t", StepStatus::Pending);
        t.node_type = Some(TIMER_NODE_TYPE.into());
        t.started_at = Some(now);
        assert_eq!(meta(&t, now), "pending · ⏱");
        t.node_type = Some(SIGNAL_NODE_TYPE.into());
        assert_eq!(meta(&t, now), "pending · ✉");
    }

    #[test]
    fn long_ids_are_cut() {
        let long = "a".repeat(30);
        let svg = render_svg(&steps(&[&long]), &[], "");
        assert!(svg.contains(&format!(">{}…</text>", "a".repeat(23))));
        assert!(svg.contains(&format!("<title>{long} — pending</title>")));
        assert_eq!(view::cut("short", 24), "short");
    }
}
