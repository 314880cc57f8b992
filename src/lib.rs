//! keyward: an API-key authorization service.
//!
//! It mints, lists and revokes API keys, stores only their SHA-256, and
//! answers "may this key do this?" from memory for Envoy's `ext_authz` filter
//! and for services that call it directly.
//!
//! # Layout
//!
//! - [`config`] — every setting, as flags with environment fallbacks.
//! - [`startup`] — [`startup::Application`] wires the gRPC services; `main`
//!   and the tests both run it.
//! - [`key`] — the key format, checksum, hash and field newtypes; no I/O.
//! - [`store`] — PostgreSQL through sqlx, the only place sqlx errors are
//!   translated.
//! - [`cache`] — moka caches of key records by hash, and their invalidation.
//! - [`policy`] — the decision, a pure function of a key record and a request.
//! - [`checker`] — the hot path tying throttle, parse, hash, cache, filter,
//!   store and policy.
//! - [`filter`] — the membership filter that refuses never-minted keys
//!   without a lookup.
//! - [`throttle`] — brute-force protection per client address.
//! - [`limits`] — rate limits (local or Redis GCRA) and usage credits
//!   (reserved from PostgreSQL in blocks), enforced after an allow.
//! - [`invalidation`] — the `LISTEN` task that keeps every replica's cache
//!   fresh.
//! - [`usage`] — in-memory usage counts, flushed in batches.
//! - [`api`] — gRPC handlers; [`api::status`] is the only place errors become
//!   `tonic::Status`.
//! - [`net`] — accepted connections, tuned for how h2 writes.
//! - [`pb`] — code generated from `proto/`.
//! - [`telemetry`] — logging.
#![forbid(unsafe_code)]

pub mod api;
pub mod cache;
pub mod checker;
pub mod config;
pub mod filter;
pub mod invalidation;
pub mod key;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod pb;
pub mod policy;
pub mod startup;
pub mod store;
pub mod sync;
pub mod telemetry;
pub mod throttle;
pub mod tls;
pub mod usage;
