//! One file per endpoint group.

pub mod health;
pub mod infer;
pub mod models;
pub mod predict;
