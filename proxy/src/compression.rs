//! Response compression on the way out (gzip, brotli), with Pingora's
//! compression machinery, for routes with `compress`.
//!
//! The module sits in the downstream chain only when the starting config
//! has a compressing route (it costs every request, even switched off); it
//! is built off (level 0) and switched on per request here, in
//! `request_filter`, for a route that compresses and a client that accepts
//! a coding we serve. `response_filter` (which runs before the module sees
//! the response) switches it off again for what must not be compressed: a
//! type the route does not list, a body already encoded, a range, or
//! `Cache-Control: no-transform`.
//!
//! The module runs after the cache in Pingora's response path (a stored
//! copy is always the origin's bytes, and a hit goes through the module
//! again), so a compressed body is never stored, and never served to a
//! client that did not ask for it.
//!
//! The module is [`EdgeCompression`]: Pingora's own compression context
//! (`ResponseCompressionCtx`: the decision, `Vary`, the ETag and the
//! encoders) in a module of ours, which writes the end of a brotli body
//! that Pingora 0.9 leaves out (cloudflare/pingora#1013). A body the
//! upstream cut short never gets an end: the client sees it truncated.

use std::any::Any;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header::{ACCEPT_ENCODING, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_TYPE, VARY};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::{HttpModule, HttpModuleBuilder, HttpModules, Module};
use pingora::protocols::http::compression::{Algorithm, ResponseCompressionCtx};
use pingora::proxy::Session;
use pingora::Result;

use crate::config::route_compress::Compression;

/// A content coding this proxy produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    /// `br`
    Brotli,
    /// `gzip`
    Gzip,
}

impl Coding {
    /// The token in `Accept-Encoding` and `Content-Encoding`.
    pub fn as_str(self) -> &'static str {
        match self {
            Coding::Brotli => "br",
            Coding::Gzip => "gzip",
        }
    }
}

/// A qvalue in thousandths (RFC 9110 12.4.2); `None` if malformed.
fn qvalue(text: &str) -> Option<u16> {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let thousandths = format!("{frac:0<3}").parse::<u16>().ok()?;
    match int {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// The coding to answer with, from the client's `Accept-Encoding`: the
/// acceptable one (q > 0, directly or through `*`) with the highest q; on
/// a tie brotli, which is smaller for the same CPU. No header, or nothing
/// acceptable: none (identity).
///
/// Pingora's module would take the first coding listed and ignore q, so
/// `gzip;q=0, br` would be answered with gzip, which the client refused;
/// it is told only the coding chosen here.
pub fn choose(accept_encoding: Option<&http::HeaderValue>) -> Option<Coding> {
    let text = accept_encoding?.to_str().ok()?;
    let (mut br, mut gzip, mut any) = (None, None, None);
    for item in text.split(',') {
        let mut fields = item.split(';');
        let name = fields.next().unwrap_or("").trim();
        let mut q = Some(1000);
        for param in fields {
            if let Some((k, v)) = param.split_once('=') {
                if k.trim().eq_ignore_ascii_case("q") {
                    q = qvalue(v.trim());
                }
            }
        }
        // A malformed qvalue makes the item unusable, not acceptable.
        let Some(q) = q else { continue };
        let slot = if name.eq_ignore_ascii_case("br") {
            &mut br
        } else if name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip") {
            &mut gzip
        } else if name == "*" {
            &mut any
        } else {
            continue;
        };
        // Listed twice: the better word counts.
        *slot = Some(slot.map_or(q, |old: u16| old.max(q)));
    }
    let br = br.or(any).unwrap_or(0);
    let gzip = gzip.or(any).unwrap_or(0);
    match (br, gzip) {
        (0, 0) => None,
        (b, g) if b >= g => Some(Coding::Brotli),
        _ => Some(Coding::Gzip),
    }
}

/// The last meta-block of a brotli stream, empty (RFC 7932 9.2: ISLAST
/// and ISLASTEMPTY set, then zero bits). It ends the stream when written
/// after a flush, which leaves the stream on a byte boundary.
const BROTLI_END: u8 = 0x03;

/// The response compression of one request: Pingora's
/// `ResponseCompressionCtx` driven as Pingora's `ResponseCompression`
/// module drives it, except that the end of the body is written here.
pub struct EdgeCompression {
    ctx: ResponseCompressionCtx,
    /// The body's end was written (nothing follows it).
    ended: bool,
}

impl EdgeCompression {
    /// The context, to switch on or off before the response header.
    pub fn ctx(&mut self) -> &mut ResponseCompressionCtx {
        &mut self.ctx
    }

    /// After the encoder's last output (`out`): Pingora's brotli encoder
    /// ends a body with a flush, never the stream's last meta-block, so
    /// strict decoders (Node's fetch, Google's `brotli`) refuse every body;
    /// it is added here. gzip ends its own stream.
    fn end(&mut self, out: &mut Option<Bytes>) {
        self.ended = true;
        if self
            .ctx
            .get_info()
            .is_some_and(|(name, ..)| name == "brotli")
        {
            let mut last = BytesMut::from(out.take().unwrap_or_default());
            last.extend_from_slice(&[BROTLI_END]);
            *out = Some(last.freeze());
        }
    }
}

#[async_trait]
impl HttpModule for EdgeCompression {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    async fn request_header_filter(&mut self, req: &mut RequestHeader) -> Result<()> {
        self.ctx.request_filter(req);
        Ok(())
    }

    async fn response_header_filter(
        &mut self,
        resp: &mut ResponseHeader,
        end_of_stream: bool,
    ) -> Result<()> {
        self.ctx.response_header_filter(resp, end_of_stream);
        Ok(())
    }

    fn response_body_filter(
        &mut self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
    ) -> Result<()> {
        if !self.ctx.is_enabled() || self.ended {
            return Ok(());
        }
        if let Some(encoded) = self.ctx.response_body_filter(body.as_ref(), end_of_stream) {
            *body = Some(encoded);
        }
        if end_of_stream {
            self.end(body);
        }
        Ok(())
    }

    fn response_done_filter(&mut self) -> Result<Option<Bytes>> {
        // The response is complete (a cache hit's body, say, ends this way)
        // and its end was not in a body chunk: write it now.
        if !self.ctx.is_enabled() || self.ended {
            return Ok(None);
        }
        let mut out = self.ctx.response_body_filter(None, true);
        self.end(&mut out);
        Ok(out)
    }
}

/// Builds each request's [`EdgeCompression`], switched off (level 0).
struct EdgeCompressionBuilder;

impl HttpModuleBuilder for EdgeCompressionBuilder {
    fn init(&self) -> Module {
        Box::new(EdgeCompression {
            ctx: ResponseCompressionCtx::new(0, false, false),
            ended: false,
        })
    }

    fn order(&self) -> i16 {
        // Where Pingora puts its own: after most other response filters.
        i16::MIN / 2
    }
}

/// Add the compression module to the downstream chain, switched off until
/// a request of a compressing route switches it on.
pub fn add_module(modules: &mut HttpModules) {
    modules.add_module(Box::new(EdgeCompressionBuilder));
}

/// The compression context of this request, while it can still be set
/// (before it saw a response header).
fn module(session: &mut Session) -> Option<&mut ResponseCompressionCtx> {
    session
        .downstream_modules_ctx
        .get_mut::<EdgeCompression>()
        .map(EdgeCompression::ctx)
        .filter(|m| m.is_header_phase())
}

/// Switch compression on for this request, at the route's levels, if the
/// client accepts a coding we produce. A process started without the
/// module (no compressing route then; a reload cannot add one) leaves the
/// response as it is.
pub fn enable(session: &mut Session, settings: &Compression) -> Result<()> {
    // A compressed body of unknown length is sent chunked, which HTTP/1.0
    // clients cannot read (nginx's `gzip_http_version 1.1`).
    if session.req_header().version < http::Version::HTTP_11 {
        return Ok(());
    }
    let Some(coding) = choose(session.req_header().headers.get(ACCEPT_ENCODING)) else {
        return Ok(());
    };
    let Some(m) = module(session) else {
        return Ok(());
    };
    m.adjust_algorithm_level(Algorithm::Gzip, settings.gzip_level);
    m.adjust_algorithm_level(Algorithm::Brotli, settings.brotli_level);
    // The module read the request's Accept-Encoding before this hook, while
    // it was off (so it kept nothing): tell it the one coding chosen.
    let mut told = RequestHeader::build("GET", b"/", Some(1))?;
    told.insert_header(ACCEPT_ENCODING, coding.as_str())?;
    m.request_filter(&told);
    Ok(())
}

/// Switch compression off for this request (the proxy's own answers, and
/// responses that must not be compressed).
pub fn disable(session: &mut Session) {
    if let Some(m) = module(session) {
        m.adjust_level(0);
    }
}

/// Why a response of a compressing route is sent as it is, if it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Its type is not in the route's `types`.
    Type,
    /// It already has a `Content-Encoding` (never encoded twice).
    Encoded,
    /// A 206: `Content-Range` counts the bytes as they are.
    Partial,
    /// `Cache-Control: no-transform` (RFC 9111 5.2.2.6).
    NoTransform,
    /// Server-sent events: the encoders hold small writes back, so events
    /// would wait for kilobytes of others.
    Stream,
    /// Marked private (Set-Cookie, `Cache-Control: private` or `no-store`):
    /// compressing secrets beside what a client reflects leaks them through
    /// the compressed length (BREACH), unless the route says `private = true`.
    Private,
}

/// Whether a response of a route with `settings` may be compressed.
pub fn skip(settings: &Compression, resp: &ResponseHeader) -> Option<Skip> {
    let header = |name| resp.headers.get(name).and_then(|v| v.to_str().ok());
    if resp.headers.contains_key(CONTENT_ENCODING) {
        return Some(Skip::Encoded);
    }
    if resp.status.as_u16() == 206 {
        return Some(Skip::Partial);
    }
    let content_type = header(CONTENT_TYPE);
    if content_type.is_some_and(|t| {
        t.split(';')
            .next()
            .is_some_and(|e| e.trim().eq_ignore_ascii_case("text/event-stream"))
    }) {
        return Some(Skip::Stream);
    }
    if !content_type.is_some_and(|t| settings.compresses(t)) {
        return Some(Skip::Type);
    }
    let directive = |name: &[u8]| {
        resp.headers.get_all(CACHE_CONTROL).iter().any(|v| {
            v.as_bytes().split(|b| *b == b',').any(|d| {
                let d = d.trim_ascii();
                // `private="set-cookie"` names fields; it is still private.
                let d = d.split(|b| *b == b'=').next().unwrap_or(d);
                d.eq_ignore_ascii_case(name)
            })
        })
    };
    if directive(b"no-transform") {
        return Some(Skip::NoTransform);
    }
    let private = resp.headers.contains_key(http::header::SET_COOKIE)
        || directive(b"private")
        || directive(b"no-store");
    (private && !settings.private).then_some(Skip::Private)
}

/// Say that the response depends on `Accept-Encoding` (unless it already
/// says so, or `Vary: *`): it could be compressed for another client, so a
/// cache downstream must not hand this one to every client.
pub fn add_vary(resp: &mut ResponseHeader) -> Result<()> {
    let present = resp.headers.get_all(VARY).iter().any(|v| {
        v.as_bytes().split(|b| *b == b',').any(|t| {
            let t = t.trim_ascii();
            t == b"*" || t.eq_ignore_ascii_case(b"accept-encoding")
        })
    });
    if !present {
        resp.append_header(VARY, "accept-encoding")?;
    }
    Ok(())
}

/// The compression step of `response_filter` for a route with `settings`:
/// `Vary` on what could be compressed, the module off for what must not be.
pub fn on_response(
    session: &mut Session,
    settings: &Compression,
    resp: &mut ResponseHeader,
) -> Result<()> {
    // 100 Continue, 103 Early Hints: the response proper comes next.
    if resp.status.is_informational() {
        return Ok(());
    }
    match skip(settings, resp) {
        None => add_vary(resp),
        Some(_) => {
            disable(session);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(header: &str) -> Option<Coding> {
        choose(Some(&http::HeaderValue::from_str(header).unwrap()))
    }

    #[test]
    fn brotli_wins_ties_and_q_decides_otherwise() {
        // Browsers list gzip first with equal weight.
        assert_eq!(pick("gzip, deflate, br, zstd"), Some(Coding::Brotli));
        assert_eq!(pick("gzip"), Some(Coding::Gzip));
        assert_eq!(pick("br;q=0.5, gzip;q=0.8"), Some(Coding::Gzip));
        assert_eq!(pick("x-gzip"), Some(Coding::Gzip));
        assert_eq!(pick("GZIP;Q=1.0"), Some(Coding::Gzip));
    }

    #[test]
    fn refused_and_unknown_codings_are_identity() {
        assert_eq!(choose(None), None);
        assert_eq!(pick(""), None);
        assert_eq!(pick("identity"), None);
        assert_eq!(pick("deflate, zstd"), None);
        assert_eq!(pick("gzip;q=0"), None);
        assert_eq!(pick("gzip;q=0, br;q=0.000"), None);
        assert_eq!(pick("gzip;q=2"), None, "a malformed q is not a yes");
    }

    #[test]
    fn the_wildcard_covers_codings_not_listed() {
        assert_eq!(pick("*"), Some(Coding::Brotli));
        assert_eq!(pick("br;q=0, *"), Some(Coding::Gzip));
        assert_eq!(pick("*;q=0"), None);
        assert_eq!(pick("gzip, *;q=0"), Some(Coding::Gzip));
    }

    fn settings() -> Compression {
        Compression {
            gzip_level: 6,
            brotli_level: 4,
            types: vec![crate::config::route_compress::MediaRange::Type(
                "text/".into(),
            )],
            private: false,
        }
    }

    fn response(headers: &[(&str, &str)], status: u16) -> ResponseHeader {
        let mut r = ResponseHeader::build(status, None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn only_listed_unencoded_whole_transformable_bodies_are_compressed() {
        let s = settings();
        assert_eq!(
            skip(&s, &response(&[("content-type", "text/html")], 200)),
            None
        );
        assert_eq!(
            skip(&s, &response(&[("content-type", "image/png")], 200)),
            Some(Skip::Type)
        );
        assert_eq!(skip(&s, &response(&[], 200)), Some(Skip::Type));
        assert_eq!(
            skip(
                &s,
                &response(
                    &[("content-type", "text/html"), ("content-encoding", "gzip")],
                    200
                )
            ),
            Some(Skip::Encoded)
        );
        assert_eq!(
            skip(&s, &response(&[("content-type", "text/html")], 206)),
            Some(Skip::Partial)
        );
        assert_eq!(
            skip(
                &s,
                &response(
                    &[
                        ("content-type", "text/html"),
                        ("cache-control", "public, No-Transform")
                    ],
                    200
                )
            ),
            Some(Skip::NoTransform)
        );
        assert_eq!(
            skip(&s, &response(&[("content-type", "text/event-stream")], 200)),
            Some(Skip::Stream)
        );
        for private in [
            ("set-cookie", "sid=1"),
            ("cache-control", "private, max-age=60"),
            ("cache-control", "private=\"set-cookie\""),
            ("cache-control", "no-store"),
        ] {
            let r = response(&[("content-type", "text/html"), private], 200);
            assert_eq!(skip(&s, &r), Some(Skip::Private), "{private:?}");
            let opted_in = Compression {
                private: true,
                ..settings()
            };
            assert_eq!(skip(&opted_in, &r), None, "{private:?}");
        }
    }

    /// Pingora's brotli encoder, fed as the module feeds it, with our end.
    fn pingora_brotli(input: &[u8], with_end: bool) -> Vec<u8> {
        let mut m = EdgeCompressionBuilder.init();
        let m = m
            .as_any_mut()
            .downcast_mut::<EdgeCompression>()
            .expect("our module");
        m.ctx().adjust_algorithm_level(Algorithm::Brotli, 4);
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("accept-encoding", "br").unwrap();
        m.ctx().request_filter(&req);
        let mut resp = response(&[("content-type", "text/plain")], 200);
        m.ctx().response_header_filter(&mut resp, false);
        assert_eq!(resp.headers.get("content-encoding").unwrap(), "br");
        let mut out = Vec::new();
        for piece in input.chunks(1000) {
            if let Some(b) = m
                .ctx()
                .response_body_filter(Some(&Bytes::copy_from_slice(piece)), false)
            {
                out.extend_from_slice(&b);
            }
        }
        if with_end {
            let done = m.response_done_filter().unwrap();
            out.extend_from_slice(&done.unwrap_or_default());
            // A second end writes nothing more.
            assert_eq!(m.response_done_filter().unwrap(), None);
        } else if let Some(b) = m.ctx().response_body_filter(None, true) {
            out.extend_from_slice(&b);
        }
        out
    }

    fn strict_brotli(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
        use std::io::Read;
        let mut out = Vec::new();
        brotli::Decompressor::new(bytes, 4096).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn a_brotli_body_ends_with_the_last_meta_block() {
        let input = "a line of text that repeats\n".repeat(500).into_bytes();
        // Pingora 0.9 alone (cloudflare/pingora#1013): a stream with no end.
        // When this starts to decode, Pingora ends the stream itself and
        // `EdgeCompression::end` must stop adding a second end.
        assert!(strict_brotli(&pingora_brotli(&input, false)).is_err());
        assert_eq!(strict_brotli(&pingora_brotli(&input, true)).unwrap(), input);
    }

    #[test]
    fn vary_is_added_once() {
        let mut r = response(&[("vary", "Origin")], 200);
        add_vary(&mut r).unwrap();
        add_vary(&mut r).unwrap();
        let all: Vec<_> = r.headers.get_all(VARY).iter().collect();
        assert_eq!(all, ["Origin", "accept-encoding"]);
        let mut star = response(&[("vary", "*")], 200);
        add_vary(&mut star).unwrap();
        assert_eq!(star.headers.get_all(VARY).iter().count(), 1);
    }
}
