//! What a route's config says: the policy's name and its parameters.
//!
//! Parsing here is of single words only; assembling a [`Policy`] from a
//! route's keys (and rejecting parameters that do not belong to its policy)
//! is the config loader's job, so that its errors can carry file positions.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Policy names as written in config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PolicyName {
    /// `local`: local backends only.
    Local,
    /// `local-first`: local while healthy, else the nearest healthy region.
    /// The default policy of a route.
    #[default]
    LocalFirst,
    /// `primary`: everything goes to the upstream's primary region.
    Primary,
    /// `read-your-writes`: reads stay local unless the client's token is ahead of the local replica.
    ReadYourWrites,
    /// `bounded-staleness`: reads stay local while replication lag is within a bound.
    BoundedStaleness,
}

/// A word this build does not accept for a policy setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A name that is no policy at all.
    #[error(
        "unknown policy `{0}` (expected one of: local, local-first, primary, \
         read-your-writes, bounded-staleness)"
    )]
    Unknown(String),
    /// An `on_primary_down` value that is neither `fail` nor `nearest`.
    #[error("unknown on_primary_down `{0}` (expected one of: fail, nearest)")]
    UnknownOnPrimaryDown(String),
    /// A `writes` value that is neither `local` nor `primary`.
    #[error("unknown writes `{0}` (expected one of: local, primary)")]
    UnknownWrites(String),
}

impl FromStr for PolicyName {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(PolicyName::Local),
            "local-first" => Ok(PolicyName::LocalFirst),
            "primary" => Ok(PolicyName::Primary),
            "read-your-writes" => Ok(PolicyName::ReadYourWrites),
            "bounded-staleness" => Ok(PolicyName::BoundedStaleness),
            other => Err(PolicyError::Unknown(other.to_string())),
        }
    }
}

impl PolicyName {
    /// The name used in configuration, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyName::Local => "local",
            PolicyName::LocalFirst => "local-first",
            PolicyName::Primary => "primary",
            PolicyName::ReadYourWrites => "read-your-writes",
            PolicyName::BoundedStaleness => "bounded-staleness",
        }
    }
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to do when the primary region cannot serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OnPrimaryDown {
    /// Answer 503: consistency over availability. The default, because it never
    /// silently weakens what the route promised.
    #[default]
    Fail,
    /// Serve local-first from the other allowed regions: availability over consistency.
    Nearest,
}

impl FromStr for OnPrimaryDown {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fail" => Ok(OnPrimaryDown::Fail),
            "nearest" => Ok(OnPrimaryDown::Nearest),
            other => Err(PolicyError::UnknownOnPrimaryDown(other.to_string())),
        }
    }
}

impl OnPrimaryDown {
    /// The word used in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            OnPrimaryDown::Fail => "fail",
            OnPrimaryDown::Nearest => "nearest",
        }
    }
}

impl fmt::Display for OnPrimaryDown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where `read-your-writes` sends writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Writes {
    /// Local-first, like `local-first` (the default: active-active writes).
    #[default]
    Local,
    /// The primary region, like `primary`.
    Primary,
}

impl FromStr for Writes {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(Writes::Local),
            "primary" => Ok(Writes::Primary),
            other => Err(PolicyError::UnknownWrites(other.to_string())),
        }
    }
}

impl Writes {
    /// The word used in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Writes::Local => "local",
            Writes::Primary => "primary",
        }
    }
}

impl fmt::Display for Writes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A route's policy with its parameters (Copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Policy {
    /// Local backends only; none healthy means 503.
    Local,
    /// Local backends while any is healthy, else the nearest healthy region.
    #[default]
    LocalFirst,
    /// Reads and writes go to the upstream's primary region.
    Primary {
        /// What to do when the primary cannot serve.
        on_primary_down: OnPrimaryDown,
    },
    /// Reads stay local unless the client's consistency token is ahead of the local replica.
    ReadYourWrites {
        /// Where writes go.
        writes: Writes,
        /// What to do when the primary cannot serve; used only when `writes` is `Primary`.
        on_primary_down: OnPrimaryDown,
    },
    /// Reads stay local while the local replica lags the primary by at most `max_staleness`.
    BoundedStaleness {
        /// The largest replication lag (primary to local) a local read may have.
        max_staleness: Duration,
        /// What to do when the primary cannot serve (writes, and reads over the bound).
        on_primary_down: OnPrimaryDown,
    },
}

impl Policy {
    /// The policy's name, without its parameters.
    pub fn name(self) -> PolicyName {
        match self {
            Policy::Local => PolicyName::Local,
            Policy::LocalFirst => PolicyName::LocalFirst,
            Policy::Primary { .. } => PolicyName::Primary,
            Policy::ReadYourWrites { .. } => PolicyName::ReadYourWrites,
            Policy::BoundedStaleness { .. } => PolicyName::BoundedStaleness,
        }
    }

    /// The name used in configuration, logs and metrics.
    pub fn as_str(self) -> &'static str {
        self.name().as_str()
    }
}
