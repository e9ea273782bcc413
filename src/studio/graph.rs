//! Placeholder until the SVG drawing lands.

use crate::models::ExecutionStep;
use crate::ops;

/// The execution's graph as an inline SVG element, every text escaped.
pub fn render_svg(steps: &[ExecutionStep], _edges: &[ops::StepEdge], _base: &str) -> String {
    let mut out = String::from("<svg class=\"graph\">");
    for s in steps {
        out.push_str(&format!(
            "<g class=\"node\" data-step-id=\"{}\" data-status=\"{}\"></g>",
            s.id,
            s.status.as_str()
        ));
    }
    out.push_str("</svg>");
    out
}
