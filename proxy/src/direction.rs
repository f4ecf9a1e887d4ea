//! Which side of the application a request or connection is on (a leaf: everything names it).

/// Which listener a request came through.
///
/// ```
/// assert_eq!(remora_proxy::Direction::Inbound.as_str(), "inbound");
/// ```
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// From a caller to the local application (the inbound listener).
    Inbound,
    /// From the local application to a destination (the outbound listener).
    Outbound,
}

impl Direction {
    /// `inbound` or `outbound`, as in metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}
