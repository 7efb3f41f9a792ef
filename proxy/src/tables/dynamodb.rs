//! The DynamoDB backend: this region's replica of a DynamoDB global table,
//! through `aws-sdk-dynamodb`. It owns the mapping between [`Item`] and
//! DynamoDB rows and between SDK errors and [`TableError`]; which rows mean
//! what is the callers' business.
//!
//! Schema: `pk` (string, partition key), `sk` (string, sort key), other
//! attributes as S, N (integers) or BOOL, TTL on [`EXPIRES_AT`]. DynamoDB
//! deletes expired rows lazily (up to days later), so expired rows are also
//! left out here, on read.
//!
//! Every call is bounded: connect timeout 1 s, operation timeout 2 s
//! (retries included), two attempts at most. The proxy treats a slow table as
//! an unreachable one, and a heartbeat or polling loop must never hang on it.
//!
//! Credentials come from the default AWS chain (environment, profile, web
//! identity, ECS, instance metadata); nothing here invents any. A local
//! DynamoDB-compatible server (MiniStack, DynamoDB Local) checks no
//! signatures but the SDK still signs, so it needs `AWS_ACCESS_KEY_ID` and
//! `AWS_SECRET_ACCESS_KEY` set to anything (`.ci/run` exports `test`), or
//! [`DynamoTable::connect_with_static_credentials`].

use std::collections::HashMap;
use std::error::Error as StdError;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_dynamodb::config::Credentials;
use aws_sdk_dynamodb::error::{BuildError, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, CreateReplicationGroupMemberAction,
    KeySchemaElement, KeyType, ReplicationGroupUpdate, ScalarAttributeType, TableStatus,
    TimeToLiveSpecification,
};
use aws_sdk_dynamodb::Client;

use super::{Attr, Item, Table, TableError, EXPIRES_AT};
use crate::clock::unix_ms;

/// Partition key attribute.
const PK: &str = "pk";
/// Sort key attribute.
const SK: &str = "sk";

/// How long `ensure` and `make_global` wait for the table to become ACTIVE.
const ACTIVE_WAIT: Duration = Duration::from_secs(10);
/// Between two DescribeTable calls while waiting.
const ACTIVE_POLL: Duration = Duration::from_millis(200);

/// Where the table is and what to do when it is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamoSettings {
    /// Table name (the same in every region of a global table).
    pub table: String,
    /// Endpoint URL of a DynamoDB-compatible server (`http://127.0.0.1:4566`);
    /// `None` for AWS's own endpoint for `aws_region`.
    pub endpoint: Option<String>,
    /// This proxy's AWS region: which replica it reads and writes.
    pub aws_region: String,
    /// Create the table (on-demand billing, TTL on `expires_at`) when it does
    /// not exist. A production global table is made by the operator instead.
    pub create_if_missing: bool,
}

/// One region's replica of the DynamoDB table.
#[derive(Debug, Clone)]
pub struct DynamoTable {
    client: Client,
    settings: DynamoSettings,
}

// === impl DynamoTable ===

impl DynamoTable {
    /// A client for `settings`, with the default credential chain. Loads
    /// configuration only: nothing is sent until the first operation.
    pub async fn connect(settings: DynamoSettings) -> DynamoTable {
        DynamoTable::build(settings, None).await
    }

    /// As [`connect`](Self::connect), but signing with fixed credentials
    /// instead of the default chain: for tests and local servers that check
    /// no signatures (MiniStack, DynamoDB Local). Never for AWS itself.
    pub async fn connect_with_static_credentials(
        settings: DynamoSettings,
        access_key_id: &str,
        secret_access_key: &str,
    ) -> DynamoTable {
        let credentials = Credentials::new(
            access_key_id,
            secret_access_key,
            None,
            None,
            "edge-router-static",
        );
        DynamoTable::build(settings, Some(credentials)).await
    }

    async fn build(settings: DynamoSettings, credentials: Option<Credentials>) -> DynamoTable {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(1))
            .operation_timeout(Duration::from_secs(2))
            .build();
        let retries = RetryConfig::standard()
            .with_max_attempts(2)
            .with_initial_backoff(Duration::from_millis(50))
            .with_max_backoff(Duration::from_millis(500));
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(settings.aws_region.clone()))
            .timeout_config(timeouts)
            .retry_config(retries);
        if let Some(endpoint) = &settings.endpoint {
            loader = loader.endpoint_url(endpoint.clone());
        }
        if let Some(credentials) = credentials {
            loader = loader.credentials_provider(credentials);
        }
        let config = loader.load().await;
        DynamoTable {
            client: Client::new(&config),
            settings,
        }
    }

    /// The settings this table was made with.
    pub fn settings(&self) -> &DynamoSettings {
        &self.settings
    }

    /// Turn the table into a global table with a replica in each of
    /// `replica_regions` (this client's own region is skipped; replicas that
    /// already exist are kept). For tests and dev against MiniStack, where
    /// one endpoint serves every region and replicas are ready at once; on
    /// AWS a replica takes minutes, longer than this waits, so production
    /// global tables are made by the operator (docs/dynamodb.md).
    pub async fn make_global(&self, replica_regions: &[String]) -> Result<(), TableError> {
        let existing: Vec<String> = self
            .client
            .describe_table()
            .table_name(&self.settings.table)
            .send()
            .await
            .map_err(|e| self.sdk_error("DescribeTable", e))?
            .table()
            .map(|t| {
                t.replicas()
                    .iter()
                    .filter_map(|r| r.region_name())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        for region in replica_regions {
            if *region == self.settings.aws_region || existing.contains(region) {
                continue;
            }
            let create = CreateReplicationGroupMemberAction::builder()
                .region_name(region)
                .build()
                .map_err(build_error)?;
            let sent = self
                .client
                .update_table()
                .table_name(&self.settings.table)
                .replica_updates(ReplicationGroupUpdate::builder().create(create).build())
                .send()
                .await;
            if let Err(e) = sent {
                // A replica made since the DescribeTable above (another
                // process) is as good as ours.
                let exists = e.code() == Some("ValidationException")
                    && e.message().is_some_and(|m| m.contains("already exist"));
                if !exists {
                    return Err(self.sdk_error("UpdateTable", e));
                }
            }
            // AWS accepts no further UpdateTable until this one is done.
            self.wait_active().await?;
        }
        Ok(())
    }

    /// The table's status, or `NotFound`.
    async fn status(&self) -> Result<Option<TableStatus>, TableError> {
        let out = self
            .client
            .describe_table()
            .table_name(&self.settings.table)
            .send()
            .await
            .map_err(|e| self.sdk_error("DescribeTable", e))?;
        Ok(out.table().and_then(|t| t.table_status()).cloned())
    }

    /// Poll DescribeTable until the table is ACTIVE, for [`ACTIVE_WAIT`].
    /// Not found counts as not yet: a new table may take a moment to show.
    async fn wait_active(&self) -> Result<(), TableError> {
        let deadline = Instant::now() + ACTIVE_WAIT;
        loop {
            let last = match self.status().await {
                Ok(None | Some(TableStatus::Active)) => return Ok(()),
                Ok(Some(status)) => status.as_str().to_string(),
                Err(TableError::NotFound(_)) => "not found".to_string(),
                Err(e) => return Err(e),
            };
            if Instant::now() >= deadline {
                return Err(TableError::NotFound(format!(
                    "{} is still {last} after {} s",
                    self.describe(),
                    ACTIVE_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(ACTIVE_POLL).await;
        }
    }

    /// CreateTable with our key schema, on-demand billing. A table created
    /// meanwhile by someone else (ResourceInUseException) is fine.
    async fn create(&self) -> Result<(), TableError> {
        let key = |name: &str, kind: KeyType| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(kind)
                .build()
                .map_err(build_error)
        };
        let string_attr = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(build_error)
        };
        let sent = self
            .client
            .create_table()
            .table_name(&self.settings.table)
            .attribute_definitions(string_attr(PK)?)
            .attribute_definitions(string_attr(SK)?)
            .key_schema(key(PK, KeyType::Hash)?)
            .key_schema(key(SK, KeyType::Range)?)
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await;
        match sent {
            Ok(_) => {
                tracing::info!(table = %self.describe(), "created the DynamoDB table");
                Ok(())
            }
            Err(e) if e.code() == Some("ResourceInUseException") => Ok(()),
            Err(e) => Err(self.sdk_error("CreateTable", e)),
        }
    }

    /// Turn on TTL deletion on `expires_at`. A failure is logged, not
    /// returned: the table works without it (expired rows are hidden on
    /// read), it only grows.
    async fn enable_ttl(&self) {
        let spec = match TimeToLiveSpecification::builder()
            .enabled(true)
            .attribute_name(EXPIRES_AT)
            .build()
        {
            Ok(spec) => spec,
            Err(e) => {
                tracing::warn!(error = %e, "cannot build the TTL specification");
                return;
            }
        };
        let sent = self
            .client
            .update_time_to_live()
            .table_name(&self.settings.table)
            .time_to_live_specification(spec)
            .send()
            .await;
        if let Err(e) = sent {
            let already = e
                .message()
                .is_some_and(|m| m.to_ascii_lowercase().contains("already enabled"));
            if !already {
                tracing::warn!(
                    table = %self.describe(),
                    error = %self.sdk_error("UpdateTimeToLive", e),
                    "TTL is not enabled: expired rows stay in the table (hidden on read); enable TTL on `{}`",
                    EXPIRES_AT
                );
            }
        }
    }

    /// The not-found error `ensure` returns when it may not create.
    fn missing(&self) -> TableError {
        let via = match &self.settings.endpoint {
            Some(endpoint) => format!(" at {endpoint}"),
            None => String::new(),
        };
        TableError::NotFound(format!(
            "no DynamoDB table `{}` in {}{via}; create the global table as docs/dynamodb.md \
             describes (keys pk and sk of type string, TTL on `{EXPIRES_AT}`, a replica in every \
             region), or for development set `create_if_missing = true` in [tables]",
            self.settings.table, self.settings.aws_region
        ))
    }

    /// One SDK error as a [`TableError`]: no answer is `Unreachable`, a
    /// missing table `NotFound`, anything the service refused `Refused`.
    fn sdk_error<E>(&self, op: &str, err: SdkError<E>) -> TableError
    where
        E: ProvideErrorMetadata + StdError + 'static,
    {
        let at = format!("{op} on {}", self.describe());
        match &err {
            SdkError::ServiceError(service) => {
                let code = service.err().code().unwrap_or("unknown error");
                let text = match service.err().message() {
                    Some(message) if !message.is_empty() => format!("{at}: {code}: {message}"),
                    _ => format!("{at}: {code}"),
                };
                if code == "ResourceNotFoundException" {
                    TableError::NotFound(text)
                } else if service.raw().status().is_server_error() {
                    // InternalServerError, ServiceUnavailable: the service is
                    // there but cannot serve, which is no answer for us.
                    TableError::Unreachable(text)
                } else {
                    TableError::Refused(text)
                }
            }
            // A timeout, or something that answered but not like DynamoDB
            // (a cut-off response, an HTML error page from a proxy).
            SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
                TableError::Unreachable(format!("{at}: {}", chain(&err)))
            }
            // Connection refused, DNS, TLS, connect timeout, a dropped
            // connection: I/O, timeout or transient.
            SdkError::DispatchFailure(dispatch)
                if dispatch.is_io() || dispatch.is_timeout() || dispatch.as_other().is_some() =>
            {
                TableError::Unreachable(format!("{at}: {}", chain(&err)))
            }
            // What stopped the request before it was sent: no credentials
            // in the chain, a malformed endpoint, a request we built wrong.
            _ => TableError::Refused(format!("{at}: {}", chain(&err))),
        }
    }
}

#[async_trait]
impl Table for DynamoTable {
    fn describe(&self) -> String {
        let s = &self.settings;
        match &s.endpoint {
            Some(endpoint) => format!("dynamodb {} in {} via {endpoint}", s.table, s.aws_region),
            None => format!("dynamodb {} in {}", s.table, s.aws_region),
        }
    }

    async fn put(&self, item: Item) -> Result<(), TableError> {
        self.client
            .put_item()
            .table_name(&self.settings.table)
            .set_item(Some(row_from_item(item)))
            .send()
            .await
            .map_err(|e| self.sdk_error("PutItem", e))?;
        Ok(())
    }

    async fn query(
        &self,
        pk: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Item>, TableError> {
        let mut items = Vec::new();
        if limit == 0 {
            return Ok(items);
        }
        // A sort key is never empty in DynamoDB, and an empty key value is
        // refused, so `after = ""` is the same as no bound.
        let after = after.filter(|a| !a.is_empty());
        let condition = match after {
            Some(_) => "pk = :pk AND sk > :after",
            None => "pk = :pk",
        };
        let now = (unix_ms() / 1000) as i64;
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        // DynamoDB applies `Limit` before we drop expired rows: page on until
        // `limit` live rows or the end of the partition.
        loop {
            let want = i32::try_from(limit - items.len()).unwrap_or(i32::MAX);
            let mut request = self
                .client
                .query()
                .table_name(&self.settings.table)
                .key_condition_expression(condition)
                .expression_attribute_values(":pk", AttributeValue::S(pk.to_string()))
                .consistent_read(false)
                .limit(want)
                .set_exclusive_start_key(start.clone());
            if let Some(after) = after {
                request = request
                    .expression_attribute_values(":after", AttributeValue::S(after.to_string()));
            }
            let out = request
                .send()
                .await
                .map_err(|e| self.sdk_error("Query", e))?;
            for row in out.items() {
                if let Some(item) = item_from_row(row) {
                    if !item.expired(now) && items.len() < limit {
                        items.push(item);
                    }
                }
            }
            let next = out.last_evaluated_key().cloned();
            // Stop at the end, when full, or if the server does not move on.
            if items.len() >= limit || next.is_none() || next == start {
                return Ok(items);
            }
            start = next;
        }
    }

    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, TableError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.settings.table)
            .key(PK, AttributeValue::S(pk.to_string()))
            .key(SK, AttributeValue::S(sk.to_string()))
            .consistent_read(false)
            .send()
            .await
            .map_err(|e| self.sdk_error("GetItem", e))?;
        let now = (unix_ms() / 1000) as i64;
        Ok(out
            .item()
            .and_then(item_from_row)
            .filter(|item| !item.expired(now)))
    }

    async fn ensure(&self) -> Result<(), TableError> {
        match self.status().await {
            Ok(None | Some(TableStatus::Active | TableStatus::Updating)) => Ok(()),
            Ok(Some(TableStatus::Creating)) => self.wait_active().await,
            Ok(Some(other)) => Err(TableError::NotFound(format!(
                "{} is {}",
                self.describe(),
                other.as_str()
            ))),
            Err(TableError::NotFound(_)) if self.settings.create_if_missing => {
                self.create().await?;
                self.wait_active().await?;
                self.enable_ttl().await;
                Ok(())
            }
            Err(TableError::NotFound(_)) => Err(self.missing()),
            Err(e) => Err(e),
        }
    }
}

// === rows ===

/// A row to write: keys, then the other attributes (a stray `pk`/`sk` among
/// them is left out: the item's own keys win).
fn row_from_item(item: Item) -> HashMap<String, AttributeValue> {
    let mut row = HashMap::with_capacity(item.attrs.len() + 2);
    for (name, value) in item.attrs {
        if name == PK || name == SK {
            continue;
        }
        let value = match value {
            Attr::S(s) => AttributeValue::S(s),
            Attr::N(n) => AttributeValue::N(n.to_string()),
            Attr::Bool(b) => AttributeValue::Bool(b),
        };
        row.insert(name, value);
    }
    row.insert(PK.to_string(), AttributeValue::S(item.pk));
    row.insert(SK.to_string(), AttributeValue::S(item.sk));
    row
}

/// A row read back. Without string keys it is not one of ours: skipped.
/// Attributes of types we do not use (lists, maps, sets, binary, NULL,
/// non-integer numbers) are left out of the item, not fatal.
fn item_from_row(row: &HashMap<String, AttributeValue>) -> Option<Item> {
    let (Some(AttributeValue::S(pk)), Some(AttributeValue::S(sk))) = (row.get(PK), row.get(SK))
    else {
        tracing::warn!(keys = ?row.get(PK).zip(row.get(SK)), "skipping a table row without string pk and sk");
        return None;
    };
    let mut item = Item::new(pk.clone(), sk.clone());
    for (name, value) in row {
        if name == PK || name == SK {
            continue;
        }
        let attr = match value {
            AttributeValue::S(s) => Attr::S(s.clone()),
            AttributeValue::Bool(b) => Attr::Bool(*b),
            AttributeValue::N(n) => match parse_integer(n) {
                Some(n) => Attr::N(n),
                None => {
                    tracing::warn!(pk = %pk, sk = %sk, attribute = %name, value = %n, "skipping a non-integer number attribute");
                    continue;
                }
            },
            _ => {
                tracing::warn!(pk = %pk, sk = %sk, attribute = %name, "skipping an attribute of a type edge-router does not use");
                continue;
            }
        };
        item.attrs.insert(name.clone(), attr);
    }
    Some(item)
}

/// A DynamoDB number as an `i64`: `-42`, also `42.000` (an integer written
/// by a client that formats decimals); `None` for fractions, exponents or
/// values out of range.
fn parse_integer(n: &str) -> Option<i64> {
    if let Ok(n) = n.parse::<i64>() {
        return Some(n);
    }
    let (whole, fraction) = n.split_once('.')?;
    if !fraction.bytes().all(|b| b == b'0') {
        return None;
    }
    whole.parse::<i64>().ok()
}

// === errors ===

fn build_error(e: BuildError) -> TableError {
    TableError::Refused(format!("building the request: {e}"))
}

/// An error and its sources on one line, `a: b: c`, a source whose text is
/// already there left out (layers often repeat their cause).
fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        let part = e.to_string();
        if !part.is_empty() && !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    // A row keeps its keys and every attribute type the table uses.
    #[test]
    fn row_round_trip() {
        let item = Item::new("inv#3", "0001#eu-west-1#x")
            .with("kind", Attr::S("prefix".into()))
            .with("t", Attr::N(-42))
            .with("big", Attr::N(i64::MAX))
            .with("soft", Attr::Bool(false));
        assert_eq!(item_from_row(&row_from_item(item.clone())), Some(item));
    }

    // The item's own keys win over attributes named pk or sk.
    #[test]
    fn stray_key_attributes_are_dropped() {
        let mut item = Item::new("a", "b");
        item.attrs.insert("pk".into(), Attr::S("other".into()));
        let row = row_from_item(item);
        assert_eq!(row.get("pk"), Some(&AttributeValue::S("a".into())));
        assert_eq!(item_from_row(&row), Some(Item::new("a", "b")));
    }

    // Rows that are not ours are skipped; odd attributes are left out, never a panic.
    #[test]
    fn malformed_rows_are_skipped_or_trimmed() {
        let mut row = HashMap::new();
        row.insert("pk".to_string(), AttributeValue::N("1".into()));
        row.insert("sk".to_string(), AttributeValue::S("x".into()));
        assert_eq!(item_from_row(&row), None);
        row.insert("pk".to_string(), AttributeValue::S("p".into()));
        row.insert("frac".to_string(), AttributeValue::N("1.5".into()));
        row.insert("huge".to_string(), AttributeValue::N("1e400".into()));
        row.insert("list".to_string(), AttributeValue::L(vec![]));
        row.insert("null".to_string(), AttributeValue::Null(true));
        row.insert("whole".to_string(), AttributeValue::N("7.000".into()));
        let item = item_from_row(&row).expect("string keys");
        assert_eq!(item, Item::new("p", "x").with("whole", Attr::N(7)));
    }

    #[test]
    fn integers_parse_strictly() {
        assert_eq!(parse_integer("-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_integer("12.0"), Some(12));
        assert_eq!(parse_integer("12.5"), None);
        assert_eq!(parse_integer("9223372036854775808"), None);
        assert_eq!(parse_integer(""), None);
        assert_eq!(parse_integer("."), None);
    }
}
