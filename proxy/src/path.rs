//! Path normalisation before route matching (Envoy's `normalize_path`,
//! `merge_slashes` and `path_with_escaped_slashes_action`): percent-escapes
//! of unreserved characters are decoded, other escapes get upper-case hex,
//! dot-segments are removed (RFC 3986 5.2.4), `//` is merged when
//! configured, and encoded `/` and `\` are kept, refused or decoded. The
//! result is both what routes match and what is forwarded, so the proxy and
//! the backend never disagree about which route a request took.
//!
//! A path that is already normal is returned borrowed: the common request
//! allocates nothing here.

use std::borrow::Cow;

/// What to do with `%2F` and `%5C` in a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EscapedSlashes {
    /// Leave them encoded: they never split segments (the default).
    #[default]
    Keep,
    /// Answer 400.
    Reject,
    /// Decode `%2F` to `/` before dot-segments and merging; `%5C` is refused.
    Unescape,
}

/// Path rules from `[server]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathRules {
    /// Merge runs of `/` into one.
    pub merge_slashes: bool,
    /// Encoded slashes.
    pub escaped_slashes: EscapedSlashes,
}

impl Default for PathRules {
    fn default() -> Self {
        PathRules {
            merge_slashes: true,
            escaped_slashes: EscapedSlashes::Keep,
        }
    }
}

/// Why a path was refused (400); the text is safe to show a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not origin-form.
    #[error("path must start with '/'")]
    NotAbsolute,
    /// `%` not followed by two hex digits.
    #[error("malformed percent-escape in path")]
    BadEscape,
    /// An encoded `/` or `\` with `escaped_slashes = "reject"`.
    #[error("encoded slash in path")]
    EscapedSlash,
    /// A control character, space or non-ASCII byte.
    #[error("path contains a byte that must be percent-encoded")]
    BadByte,
}

/// Normalise a request path (without the query).
pub fn normalize_path(path: &str, rules: PathRules) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_normal(path, rules)? {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode(path, rules)?;
    let mut out = remove_dot_segments(&decoded);
    if rules.merge_slashes {
        merge_slashes(&mut out);
    }
    Ok(Cow::Owned(out))
}

/// One scan: true when nothing would change. Also refuses bytes that no
/// valid request-target contains, so the slow path never sees them.
fn is_normal(path: &str, rules: PathRules) -> Result<bool, PathError> {
    let b = path.as_bytes();
    let mut normal = true;
    for (i, &c) in b.iter().enumerate() {
        match c {
            // A raw `\` is a separator to some backends (IIS, Windows) and
            // not to others: refused rather than guessed.
            0..=0x20 | 0x7f..=0xff | b'\\' => return Err(PathError::BadByte),
            b'%' => normal = false,
            b'/' => {
                let next = &b[i + 1..];
                if (rules.merge_slashes && next.first() == Some(&b'/')) || dot_segment_at(next) {
                    normal = false;
                }
            }
            _ => {}
        }
    }
    Ok(normal)
}

/// `.` or `..` as a whole segment at the start of `rest`.
fn dot_segment_at(rest: &[u8]) -> bool {
    let seg_end = rest.iter().position(|&c| c == b'/').unwrap_or(rest.len());
    // `..;x` is `..` to servlet containers (path parameters): it counts.
    let seg = &rest[..seg_end];
    let before_params = seg.split(|&c| c == b';').next().unwrap_or(seg);
    matches!(before_params, b"." | b"..")
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

fn decode(path: &str, rules: PathRules) -> Result<String, PathError> {
    const UPPER: &[u8; 16] = b"0123456789ABCDEF";
    let b = path.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            out.push(b[i] as char);
            i += 1;
            continue;
        }
        let (Some(h), Some(l)) = (
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadEscape);
        };
        let v = h << 4 | l;
        match v {
            b'/' | b'\\' => match rules.escaped_slashes {
                EscapedSlashes::Reject => return Err(PathError::EscapedSlash),
                EscapedSlashes::Unescape if v == b'/' => out.push('/'),
                // A decoded `\` would be ambiguous (see `is_normal`).
                EscapedSlashes::Unescape => return Err(PathError::EscapedSlash),
                EscapedSlashes::Keep => {
                    out.push('%');
                    out.push(UPPER[usize::from(h)] as char);
                    out.push(UPPER[usize::from(l)] as char);
                }
            },
            v if unreserved(v) => out.push(v as char),
            _ => {
                out.push('%');
                out.push(UPPER[usize::from(h)] as char);
                out.push(UPPER[usize::from(l)] as char);
            }
        }
        i += 3;
    }
    Ok(out)
}

/// RFC 3986 5.2.4 on an absolute path. Never climbs above the root.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut ends_in_dot = false;
    for seg in path[1..].split('/') {
        // Path parameters on a dot-segment (`..;x`) do not hide it.
        let seg = match seg.split(';').next() {
            Some(d @ ("." | "..")) => d,
            _ => seg,
        };
        ends_in_dot = matches!(seg, "." | "..");
        match seg {
            "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    // `/a/b/..` is the directory `/a/`, and the root stays `/`.
    if ends_in_dot || out.is_empty() {
        out.push('/');
    }
    out
}

fn merge_slashes(path: &mut String) {
    if path.contains("//") {
        let mut out = String::with_capacity(path.len());
        let mut prev_slash = false;
        for c in path.chars() {
            if c == '/' && prev_slash {
                continue;
            }
            prev_slash = c == '/';
            out.push(c);
        }
        *path = out;
    }
}

/// Whether `prefix` covers `path` segment by segment (Envoy's
/// `path_separated_prefix`): `/admin` covers `/admin` and `/admin/x`, never
/// `/adminx`. A configured trailing `/` is the same prefix: `/admin/` also
/// covers `/admin`, so no spelling of the path reaches another route.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
    if prefix.is_empty() {
        return true;
    }
    match path.strip_prefix(prefix) {
        // `;` starts path parameters: `/admin;x` is the segment `admin`.
        Some(rest) => rest.is_empty() || rest.starts_with('/') || rest.starts_with(';'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize_path(p, PathRules::default()).map(Cow::into_owned)
    }

    fn with(
        p: &str,
        escaped_slashes: EscapedSlashes,
        merge_slashes: bool,
    ) -> Result<String, PathError> {
        normalize_path(
            p,
            PathRules {
                merge_slashes,
                escaped_slashes,
            },
        )
        .map(Cow::into_owned)
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/a/b", "/a/b/", "/a.b/..c/.d", "/api/v1/users?x"] {
            assert!(
                matches!(
                    normalize_path(p, PathRules::default()),
                    Ok(Cow::Borrowed(_))
                ),
                "{p}"
            );
        }
    }

    #[test]
    fn unreserved_escapes_are_decoded_others_upper_cased() {
        assert_eq!(n("/%61dmin/x").as_deref(), Ok("/admin/x"));
        assert_eq!(n("/a%7eb").as_deref(), Ok("/a~b"));
        assert_eq!(n("/a%3fb").as_deref(), Ok("/a%3Fb"));
        assert_eq!(n("/a%20b").as_deref(), Ok("/a%20b"));
        assert_eq!(n("/%zz"), Err(PathError::BadEscape));
        assert_eq!(n("/%4"), Err(PathError::BadEscape));
    }

    #[test]
    fn dot_segments_are_removed() {
        assert_eq!(n("/public/../admin/x").as_deref(), Ok("/admin/x"));
        assert_eq!(n("/a/./b").as_deref(), Ok("/a/b"));
        assert_eq!(n("/a/b/..").as_deref(), Ok("/a/"));
        assert_eq!(n("/a/b/.").as_deref(), Ok("/a/b/"));
        assert_eq!(n("/../../etc/passwd").as_deref(), Ok("/etc/passwd"));
        assert_eq!(n("/%2e%2e/admin").as_deref(), Ok("/admin"));
        assert_eq!(n("/a/%2E/b").as_deref(), Ok("/a/b"));
        assert_eq!(n("/..").as_deref(), Ok("/"));
        assert_eq!(n("/.").as_deref(), Ok("/"));
    }

    #[test]
    fn slashes_merge_unless_disabled() {
        assert_eq!(n("//admin//x").as_deref(), Ok("/admin/x"));
        assert_eq!(
            with("//a//b", EscapedSlashes::Keep, false).as_deref(),
            Ok("//a//b")
        );
    }

    #[test]
    fn escaped_slashes_keep_reject_unescape() {
        assert_eq!(n("/a%2fb/../c").as_deref(), Ok("/c"));
        assert_eq!(
            n("/public%2F..%2Fadmin").as_deref(),
            Ok("/public%2F..%2Fadmin")
        );
        assert_eq!(
            with("/a%2Fb", EscapedSlashes::Reject, true),
            Err(PathError::EscapedSlash)
        );
        assert_eq!(
            with("/public%2F..%2Fadmin", EscapedSlashes::Unescape, true).as_deref(),
            Ok("/admin")
        );
        assert_eq!(
            with("/a%5Cb", EscapedSlashes::Unescape, true),
            Err(PathError::EscapedSlash)
        );
    }

    #[test]
    fn backslashes_and_path_parameters_cannot_hide_segments() {
        assert_eq!(n("/public\\..\\admin"), Err(PathError::BadByte));
        assert_eq!(n("/public/..;/admin/x").as_deref(), Ok("/admin/x"));
        assert_eq!(n("/public/.;x/a").as_deref(), Ok("/public/a"));
        assert!(prefix_matches("/admin", "/admin;jsessionid=1/x"));
        assert!(!prefix_matches("/admin", "/admin.;x"));
    }

    #[test]
    fn bad_bytes_and_non_absolute() {
        assert_eq!(n("*"), Err(PathError::NotAbsolute));
        assert_eq!(n("a/b"), Err(PathError::NotAbsolute));
        assert_eq!(n("/a b"), Err(PathError::BadByte));
    }

    #[test]
    fn prefixes_match_by_segment() {
        assert!(prefix_matches("/admin", "/admin"));
        assert!(prefix_matches("/admin", "/admin/x"));
        assert!(!prefix_matches("/admin", "/adminx"));
        assert!(prefix_matches("/admin/", "/admin"));
        assert!(prefix_matches("/admin/", "/admin/x"));
        assert!(!prefix_matches("/admin/", "/adminx"));
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("", "/anything"));
    }

    proptest::proptest! {
        /// Normalising twice changes nothing, and no dot-segment or `//` survives.
        #[test]
        fn idempotent_and_clean(p in "/[a-z./%2eEfF]{0,30}") {
            if let Ok(once) = normalize_path(&p, PathRules::default()) {
                let twice = normalize_path(&once, PathRules::default()).unwrap();
                proptest::prop_assert_eq!(once.as_ref(), twice.as_ref());
                proptest::prop_assert!(!once.contains("//"));
                proptest::prop_assert!(!once.split('/').any(|s| s == "." || s == ".."));
            }
        }
    }
}
