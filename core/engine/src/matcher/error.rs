//! The one shape of a rejected input: what is wrong and at which character offset.

use std::fmt;

/// A filter or channel name rejected at subscribe time. `position` counts characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PositionedError {
    pub reason: String,
    pub position: usize,
}

impl PositionedError {
    pub(crate) fn new(reason: impl Into<String>, position: usize) -> Self {
        Self {
            reason: reason.into(),
            position,
        }
    }
}

impl fmt::Display for PositionedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (at position {})", self.reason, self.position)
    }
}

impl std::error::Error for PositionedError {}

/// A row filter (or row subscription) that could not be parsed.
pub type FilterError = PositionedError;

/// A channel name or pattern that is not valid.
pub type ChannelNameError = PositionedError;
