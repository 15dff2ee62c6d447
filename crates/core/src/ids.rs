//! Identifiers and time: run and task ids (UUID v7, time-ordered), journal
//! sequence numbers and epoch-millisecond timestamps.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Milliseconds since the Unix epoch. Every timestamp in Keel is one of these,
/// so lease comparisons are integer comparisons in every backend.
pub type Millis = i64;

/// Position of an event in a run's journal. The first event has sequence 1.
pub type Seq = i64;

/// The tenant every row belongs to when none is given.
pub const DEFAULT_TENANT: &str = "default";

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// Creates a new, time-ordered id (UUID v7).
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_id!(
    /// Identifies one run: one request handled by one agent version.
    RunId
);
uuid_id!(
    /// Identifies one task in the store's queue.
    TaskId
);

impl RunId {
    /// The W3C trace id of this run: the run id's 128 bits in lowercase hex,
    /// so every call a run makes shares one trace.
    pub fn trace_id(&self) -> String {
        self.0.simple().to_string()
    }
}
