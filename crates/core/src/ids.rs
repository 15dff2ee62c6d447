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
impl RunId {
    /// The id of child `index` of the `spawn_agents` call `call_index` of
    /// step `step` of this run. Derived, not drawn: a spawn decided again
    /// (after a crash, or by a second worker) names the same children, so
    /// it can never create a second set. Keeps the parent's 48-bit
    /// timestamp (ids stay time-ordered); the other bits mix the parent id
    /// with the position (a UUID version 8).
    pub fn child(self, step: u32, call_index: u32, index: u32) -> RunId {
        let parent = self.0.as_u128();
        let position = (u64::from(step) << 40) ^ (u64::from(call_index) << 20) ^ u64::from(index);
        let high = mix(mix((parent >> 64) as u64) ^ position);
        let low = mix(mix(parent as u64 ^ high) ^ position.rotate_left(17));
        let mut bytes = ((u128::from(high) << 64) | u128::from(low)).to_be_bytes();
        bytes[..6].copy_from_slice(&self.0.as_bytes()[..6]);
        RunId(uuid::Builder::from_custom_bytes(bytes).into_uuid())
    }
}

/// SplitMix64's finaliser: every input bit moves about half the output bits.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

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
