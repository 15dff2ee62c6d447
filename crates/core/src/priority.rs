//! A run's priority: which of the runs waiting for a worker goes first.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How urgent a run is, from [`Priority::LOWEST`] (0) to [`Priority::HIGHEST`]
/// (9); unset, a run has [`Priority::DEFAULT`] (5), so callers can ask for
/// both more and less than the rest.
///
/// Every task of a run carries its priority. Under contention the queue
/// hands out tasks by rank, `due time - priority x credit` (the store's
/// `PRIORITY_CREDIT`): a higher priority counts as having waited longer,
/// but a task of lower priority that has waited long enough still goes
/// first, so no priority starves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct Priority(u8);

impl Priority {
    /// The lowest priority.
    pub const LOWEST: Priority = Priority(0);
    /// The priority of a run submitted without one.
    pub const DEFAULT: Priority = Priority(5);
    /// The highest priority.
    pub const HIGHEST: Priority = Priority(9);

    /// The priority `value`, if it is in `0..=9`.
    pub fn new(value: i64) -> Option<Priority> {
        match u8::try_from(value) {
            Ok(v) if v <= Priority::HIGHEST.0 => Some(Priority(v)),
            _ => None,
        }
    }

    /// Its number, 0 to 9.
    pub fn get(self) -> u8 {
        self.0
    }
}

impl Default for Priority {
    fn default() -> Self {
        Priority::DEFAULT
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A number outside `0..=9`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("priority must be an integer from 0 (lowest) to 9 (highest), got {0}")]
pub struct OutOfRange(pub i64);

impl TryFrom<u8> for Priority {
    type Error = OutOfRange;
    fn try_from(value: u8) -> Result<Self, Self::Error> {
        Priority::new(i64::from(value)).ok_or(OutOfRange(i64::from(value)))
    }
}

impl TryFrom<i64> for Priority {
    type Error = OutOfRange;
    fn try_from(value: i64) -> Result<Self, Self::Error> {
        Priority::new(value).ok_or(OutOfRange(value))
    }
}

impl From<Priority> for u8 {
    fn from(p: Priority) -> u8 {
        p.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_zero_to_nine_are_priorities() {
        assert_eq!(Priority::new(0), Some(Priority::LOWEST));
        assert_eq!(Priority::new(9), Some(Priority::HIGHEST));
        assert_eq!(Priority::new(10), None);
        assert_eq!(Priority::new(-1), None);
        assert_eq!(Priority::default().get(), 5);
        assert_eq!(serde_json::to_string(&Priority::HIGHEST).unwrap(), "9");
        assert_eq!(
            serde_json::from_str::<Priority>("7").unwrap(),
            Priority::new(7).unwrap()
        );
        let err = serde_json::from_str::<Priority>("12").unwrap_err();
        assert!(
            err.to_string().contains("0 (lowest) to 9 (highest)"),
            "{err}"
        );
        assert!(serde_json::from_str::<Priority>("-1").is_err());
    }
}
