//! The replicated table: one single-table design behind [`Table`], with two
//! backends. [`embedded`] (the default) is in-process: one region's plain
//! store, or the simulated global table of `edge-router demo` and tests.
//! `dynamodb` (cargo feature `dynamodb`) talks to this region's replica of a
//! DynamoDB global table. Each proxy reads and writes only its own region's
//! replica; replication between regions is the table's business.
//!
//! Rows (docs/dynamodb.md): heartbeats `pk = "hb#<shard>"`, `sk = <region>`, attribute
//! `t` (Unix ms); invalidations `pk = "inv#<shard>"`, `sk =
//! "<time>#<region>#<id>"`. Every row may carry [`EXPIRES_AT`] (Unix seconds),
//! the DynamoDB TTL attribute; expired rows are never returned.

pub mod embedded;
pub mod heartbeat;

#[cfg(feature = "dynamodb")]
pub mod dynamodb;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

/// Name of the TTL attribute (Unix seconds), as configured on the DynamoDB table.
pub const EXPIRES_AT: &str = "expires_at";

/// An attribute value: the three DynamoDB scalar types the rows use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attr {
    /// String.
    S(String),
    /// Number (integers only: times, counters).
    N(i64),
    /// Boolean.
    Bool(bool),
}

/// One row: partition key, sort key and attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Partition key (`pk`).
    pub pk: String,
    /// Sort key (`sk`).
    pub sk: String,
    /// Other attributes by name (never `pk` or `sk`).
    pub attrs: BTreeMap<String, Attr>,
}

impl Item {
    /// A row with no attributes yet.
    pub fn new(pk: impl Into<String>, sk: impl Into<String>) -> Item {
        Item {
            pk: pk.into(),
            sk: sk.into(),
            attrs: BTreeMap::new(),
        }
    }

    /// Builder-style attribute.
    pub fn with(mut self, name: &str, value: Attr) -> Item {
        self.attrs.insert(name.to_string(), value);
        self
    }

    /// A numeric attribute.
    pub fn n(&self, name: &str) -> Option<i64> {
        match self.attrs.get(name) {
            Some(Attr::N(n)) => Some(*n),
            _ => None,
        }
    }

    /// A string attribute.
    pub fn s(&self, name: &str) -> Option<&str> {
        match self.attrs.get(name) {
            Some(Attr::S(s)) => Some(s),
            _ => None,
        }
    }

    /// A boolean attribute.
    pub fn bool(&self, name: &str) -> Option<bool> {
        match self.attrs.get(name) {
            Some(Attr::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    /// True when the row carries an expiry at or before `now_s` (Unix seconds).
    pub fn expired(&self, now_s: i64) -> bool {
        self.n(EXPIRES_AT).is_some_and(|t| t <= now_s)
    }
}

/// Why a table operation failed. Every variant is a reason the request path
/// treats the table as unreachable; the text goes to logs and `/status`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// No answer: connection refused, timeout, DNS, TLS.
    #[error("table unreachable: {0}")]
    Unreachable(String),
    /// The table does not exist (or is not yet active).
    #[error("table not found: {0}")]
    NotFound(String),
    /// The service refused: throttling, credentials, permissions, validation.
    #[error("table refused the request: {0}")]
    Refused(String),
}

/// Most rows one `query` returns; a caller that needs more pages with `after`.
pub const QUERY_PAGE: usize = 1000;

/// One region's view of the replicated table.
#[async_trait]
pub trait Table: Send + Sync + 'static {
    /// What this is, for logs and `/status` (`embedded (us-east-1)`,
    /// `dynamodb edge-router in eu-west-1`).
    fn describe(&self) -> String;

    /// Write a row (replacing one with the same keys) in the local replica.
    /// `Ok` means durably accepted by the local replica.
    async fn put(&self, item: Item) -> Result<(), TableError>;

    /// Rows of partition `pk` whose sort key is greater than `after` (all
    /// when `None`), in sort-key order, at most `limit`. Expired rows are
    /// left out.
    async fn query(
        &self,
        pk: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Item>, TableError>;

    /// One row, if present and not expired.
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, TableError>;

    /// Make sure the table exists, creating it where the backend allows
    /// (the embedded table always exists; DynamoDB only with
    /// `create_if_missing`). Called at start and after `NotFound`.
    async fn ensure(&self) -> Result<(), TableError>;
}

/// A shared handle to one region's table.
pub type SharedTable = Arc<dyn Table>;

/// Open the table `[tables]` configures, as region `region` uses it.
///
/// DynamoDB clients are built on a short-lived runtime of their own: Pingora
/// starts its runtimes only when the server runs, and building a client
/// makes no connection (the first request does, on the runtime that makes it).
pub fn open(config: &crate::config::TablesConfig, region: &str) -> Result<SharedTable, OpenError> {
    match &config.backend {
        crate::config::TableBackend::Embedded => {
            Ok(Arc::new(embedded::EmbeddedTable::single(region)))
        }
        #[cfg(feature = "dynamodb")]
        crate::config::TableBackend::DynamoDb {
            table,
            endpoint,
            aws_region,
            create_if_missing,
        } => {
            let settings = dynamodb::DynamoSettings {
                table: table.clone(),
                endpoint: endpoint.clone(),
                aws_region: aws_region.clone(),
                create_if_missing: *create_if_missing,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| OpenError(format!("runtime for the DynamoDB client: {e}")))?;
            let table = rt.block_on(dynamodb::DynamoTable::connect(settings));
            Ok(Arc::new(table))
        }
        #[cfg(not(feature = "dynamodb"))]
        crate::config::TableBackend::DynamoDb { .. } => Err(OpenError(
            "this build has no DynamoDB support (build with --features dynamodb)".to_string(),
        )),
    }
}

/// The configured table could not be opened.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct OpenError(pub String);
