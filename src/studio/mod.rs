//! The web dashboard (feature `studio`): `db-ops studio` serves it, and a
//! tokio service can mount the same [`axum::Router`] in its own server.
//!
//! Guide: `docs/admin.md`, "db-ops studio".

/// The SVG drawing of an execution's graph ([`graph::render_svg`]).
pub mod graph;
