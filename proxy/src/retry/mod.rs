//! Retries: which failures are retried ([`policy`]), how many retries the cluster can afford
//! ([`budget`]), and request bodies that can be sent more than once ([`body`]).
//!
//! The loop itself lives in the request path (`pipeline.rs`), which owns the deadlines; this
//! module holds the decisions, so they are unit-tested without sockets.

pub mod body;
pub mod budget;
pub mod policy;

pub use body::{buffer_for_replay, RequestBody};
pub use budget::{BudgetParams, RetryBudget};
pub use policy::{Outcome, RetryPolicy};
