//! Integration tests: the real server on port 0, a fresh PostgreSQL database
//! per test, and the real grpcurl and Envoy binaries. Set TEST_LOG=1 to see the logs.

mod admin;
mod attack;
#[path = "../support/certs.rs"]
mod certs;
mod check;
mod database;
mod envoy;
mod faults;
mod helpers;
mod lifecycle;
mod limits;
mod list;
mod metrics;
mod privilege;
mod replicas;
mod shutdown;
mod traces;
mod transport;
mod usage;
mod walkthrough;
