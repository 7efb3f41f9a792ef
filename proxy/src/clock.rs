//! Wall-clock time in the one unit the proxy signs, stores and compares:
//! Unix milliseconds (hop signatures, tokens, heartbeats, rate limits).

/// Unix time in milliseconds, from the system clock (0 before 1970).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
