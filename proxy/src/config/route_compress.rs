//! A route's response compression, validated: nginx's `gzip on;
//! gzip_comp_level; gzip_types` (and ngx_brotli's `brotli_comp_level`),
//! Envoy's compressor filter. Which types Pingora's compression module would
//! never touch is known here, so a config cannot list one and look like it
//! compresses it. No I/O here; `crate::compression` applies it per request.

use super::diag::{ConfigError, Locator, Seg};
use super::raw::{RawCompress, RawCompressSettings, RawRoute};

/// gzip level when none is given: zlib's own default, a fair trade of CPU for size.
const DEFAULT_GZIP_LEVEL: u32 = 6;
/// brotli quality when none is given: above 5 brotli switches to far
/// slower algorithms, which on-the-fly compression cannot afford.
const DEFAULT_BROTLI_LEVEL: u32 = 4;
/// Types compressed when none are listed: text, and the text-like
/// `application/` types (nginx's default, `text/html` alone, surprises).
const DEFAULT_TYPES: &[&str] = &[
    "text/*",
    "application/json",
    "application/javascript",
    "application/xml",
    "image/svg+xml",
];

/// The media-type prefixes Pingora 0.9's compression module accepts at all
/// (its `MIME_CHECK`), besides skipping any type with `zip` in it.
const PINGORA_COMPRESSES: &[&str] = &[
    "text/",
    "application/",
    "font/",
    "image/x-icon",
    "image/svg+xml",
    "binary/octet-stream",
];

/// A media range a route compresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaRange {
    /// `application/json`: that type (lower case).
    Exact(String),
    /// `text/*`: every subtype (stored as `text/`).
    Type(String),
}

/// A route's compression settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compression {
    /// gzip level, 1 to 9.
    pub gzip_level: u32,
    /// brotli quality, 1 to 11.
    pub brotli_level: u32,
    /// The media ranges compressed.
    pub types: Vec<MediaRange>,
    /// Responses marked private are compressed too (`private = true`).
    pub private: bool,
}

impl Compression {
    /// Whether a response of `content_type` (a `Content-Type` value,
    /// parameters and case ignored) is one this route compresses.
    pub fn compresses(&self, content_type: &str) -> bool {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        self.types.iter().any(|range| match range {
            MediaRange::Exact(t) => *t == essence,
            MediaRange::Type(prefix) => essence.starts_with(prefix.as_str()),
        })
    }
}

/// Whether `c` may appear in a media type's name (RFC 9110 token characters).
fn token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$&^_.+-".contains(c)
}

/// A `types` entry as a media range, or why it is not one Pingora compresses.
fn media_range(text: &str) -> Result<MediaRange, String> {
    let lower = text.trim().to_ascii_lowercase();
    let Some((ty, sub)) = lower.split_once('/') else {
        return Err(format!(
            "`{text}` is not a media type like \"text/html\" or \"text/*\""
        ));
    };
    let valid = !ty.is_empty()
        && ty.chars().all(token_char)
        && (sub == "*" || (!sub.is_empty() && sub.chars().all(token_char)));
    if !valid {
        return Err(format!(
            "`{text}` is not a media type like \"text/html\" or \"text/*\""
        ));
    }
    let never = if sub == "*" {
        !PINGORA_COMPRESSES.contains(&format!("{ty}/").as_str())
    } else {
        lower.contains("zip") || !PINGORA_COMPRESSES.iter().any(|p| lower.starts_with(p))
    };
    if never {
        return Err(format!(
            "`{text}` is not (wholly) compressible: Pingora compresses text/*, application/*, font/*, image/svg+xml and icons, and nothing with `zip` in its name"
        ));
    }
    Ok(if sub == "*" {
        MediaRange::Type(format!("{ty}/"))
    } else {
        MediaRange::Exact(lower)
    })
}

/// Validate route `i`'s `compress` (`None`: off).
pub(super) fn route_compress(
    loc: &Locator<'_>,
    i: usize,
    raw: &RawRoute,
    errors: &mut Vec<ConfigError>,
) -> Option<Compression> {
    let defaults = RawCompressSettings::default();
    let settings = match raw.compress.as_ref()? {
        RawCompress::Switch(false) => return None,
        RawCompress::Switch(true) => &defaults,
        RawCompress::Settings(s) => s,
    };
    let at = |k: &str| {
        vec![
            Seg::from("routes"),
            Seg::from(i),
            Seg::from("compress"),
            Seg::from(k),
        ]
    };
    let before = errors.len();
    let mut level = |key: &str, value: Option<i64>, max: u32, default: u32| match value {
        None => default,
        Some(v) => match u32::try_from(v) {
            Ok(v) if (1..=max).contains(&v) => v,
            _ => {
                errors.push(loc.at_path(&at(key), format!("`{v}` is not a level from 1 to {max}")));
                default
            }
        },
    };
    let gzip_level = level("level", settings.level, 9, DEFAULT_GZIP_LEVEL);
    let brotli_level = level(
        "brotli_level",
        settings.brotli_level,
        11,
        DEFAULT_BROTLI_LEVEL,
    );
    let mut types = Vec::new();
    match &settings.types {
        None => types.extend(DEFAULT_TYPES.iter().filter_map(|t| media_range(t).ok())),
        Some(list) if list.is_empty() => errors.push(loc.at_path(
            &at("types"),
            "`types` is empty: nothing would be compressed (leave it out for the defaults)",
        )),
        Some(list) => {
            for (j, t) in list.iter().enumerate() {
                match media_range(t) {
                    Ok(r) => types.push(r),
                    Err(msg) => {
                        let mut p = at("types");
                        p.push(Seg::from(j));
                        errors.push(loc.at_path(&p, msg));
                    }
                }
            }
        }
    }
    (errors.len() == before).then_some(Compression {
        gzip_level,
        brotli_level,
        types,
        private: settings.private,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_match_by_essence_ignoring_parameters_and_case() {
        let c = Compression {
            gzip_level: 6,
            brotli_level: 4,
            types: DEFAULT_TYPES
                .iter()
                .map(|t| media_range(t).unwrap())
                .collect(),
            private: false,
        };
        assert!(c.compresses("text/html; charset=utf-8"));
        assert!(c.compresses("Application/JSON"));
        assert!(!c.compresses("application/octet-stream"));
        assert!(!c.compresses("image/png"));
        assert!(!c.compresses(""));
    }

    #[test]
    fn types_pingora_never_compresses_are_refused() {
        assert!(media_range("image/png").is_err());
        assert!(media_range("video/*").is_err());
        assert!(media_range("image/*").is_err());
        assert!(media_range("application/zip").is_err());
        assert!(media_range("*/*").is_err());
        assert!(media_range("text").is_err());
        assert_eq!(media_range("font/*"), Ok(MediaRange::Type("font/".into())));
        assert_eq!(
            media_range("image/svg+xml"),
            Ok(MediaRange::Exact("image/svg+xml".into()))
        );
    }
}
