//! The key domain, free of I/O: the key format and its checksum, hashing, the
//! display hint, and the parse-don't-validate newtypes the rest of the crate
//! passes around instead of raw strings.
//!
//! Nothing in this module that holds a secret can print it: [`ApiKey`]'s
//! `Debug` shows only the display hint, and it has no `Display`.

mod fields;
mod limits;
mod owner;
mod record;
mod secret;

pub use fields::{Invalid, KeyId, Metadata, Network, OwnerId, OwnerState, Resource, Scope};
pub use limits::{Credits, Limits, MAX_WINDOWS, RateLimit, RefillInterval, check_windows};
pub use owner::{Ceiling, OwnerRecord};
pub use record::{Grant, KeyRecord, KeyState, MintSpec, NewKey};
pub use secret::{ApiKey, KeyFormatError, KeyHash, KeyPrefix};
