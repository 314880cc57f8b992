//! The suite's scenarios, one per file, each adding its rows to the table.

pub mod admin_plane;
pub mod end_to_end;
pub mod flood;
pub mod hits;
pub mod invalid;
pub mod limits;
pub mod memory;
pub mod misses;
pub mod revocation_under_load;
pub mod telemetry;
