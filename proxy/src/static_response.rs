//! Writing a route's fixed answer (`return`: a redirect or a page such as
//! a maintenance notice). The answer is decided in `request_filter` like
//! every other: what it says comes from the config
//! ([`crate::config::route_return`]), the request only fills in a
//! redirect's `$host` and `$request_uri`.

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION, TRANSFER_ENCODING};
use http::Method;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

use crate::config::route_return::StaticResponse;

/// Set what the answer itself says on `resp` (built with its status):
/// `Location` (for `host` and `request_uri`, the path as matched and the
/// query), `Content-Type` and `Content-Length`. These come after the
/// route's header rules, and win.
pub fn fill(
    resp: &mut ResponseHeader,
    spec: &StaticResponse,
    host: &str,
    request_uri: &str,
) -> Result<()> {
    if let Some(location) = &spec.location {
        resp.insert_header(LOCATION, location.expand(host, request_uri))?;
    }
    if let Some(ct) = &spec.content_type {
        resp.insert_header(CONTENT_TYPE, ct.clone())?;
    }
    if !spec.bodiless() {
        resp.insert_header(CONTENT_LENGTH, spec.body.len().to_string())?;
    } else if spec.status == 205 {
        // 205 is not bodiless in HTTP/1.1's framing (RFC 9112 6.3): without
        // a length a client would read until the connection closes.
        resp.insert_header(CONTENT_LENGTH, "0")?;
    }
    Ok(())
}

/// Whether the request announces a body: the answer does not read it, so
/// the connection is closed after it rather than kept alive behind an
/// upload of any size.
pub fn request_has_body(session: &Session) -> bool {
    let headers = &session.req_header().headers;
    headers.contains_key(TRANSFER_ENCODING)
        || headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

/// Write `resp` and the body (none for HEAD, whose `Content-Length` still
/// says how long the body would be).
pub async fn write(session: &mut Session, resp: ResponseHeader, body: &Bytes) -> Result<()> {
    let head_only = session.req_header().method == Method::HEAD || body.is_empty();
    session
        .write_response_header(Box::new(resp), head_only)
        .await?;
    if !head_only {
        session
            .write_response_body(Some(body.clone()), true)
            .await?;
    }
    Ok(())
}
