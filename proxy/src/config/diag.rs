//! Config errors that point at the file: line, column and key path.

use std::fmt;
use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// One mistake in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, as named on the command line.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Where in the document, e.g. `routes[2].upstream`.
    pub key_path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file, self.line, self.column, self.key_path, self.message
        )
    }
}

/// Every mistake found in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    /// `table.key`
    Key(String),
    /// `array[i]`
    Index(usize),
}

impl From<&str> for Seg {
    fn from(s: &str) -> Self {
        Seg::Key(s.to_string())
    }
}

impl From<&String> for Seg {
    fn from(s: &String) -> Self {
        Seg::Key(s.clone())
    }
}

impl From<usize> for Seg {
    fn from(i: usize) -> Self {
        Seg::Index(i)
    }
}

/// Render `routes[2].upstream`; keys that are not bare TOML keys are quoted.
pub fn render_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                let bare = !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                if bare {
                    out.push_str(k);
                } else {
                    out.push_str(&format!("{k:?}"));
                }
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    if out.is_empty() {
        out.push_str("(document)");
    }
    out
}

/// Turns byte offsets and key paths into positions in one file's text.
pub struct Locator<'a> {
    file: &'a str,
    text: &'a str,
    root: Option<Spanned<DeTable<'a>>>,
}

impl<'a> Locator<'a> {
    /// A locator over a file's text (which may fail to parse: then only offsets work).
    pub fn new(file: &'a str, text: &'a str) -> Self {
        Locator {
            file,
            text,
            root: DeTable::parse(text).ok(),
        }
    }

    /// An error at a byte offset.
    pub fn at_offset(
        &self,
        offset: usize,
        path: &[Seg],
        message: impl Into<String>,
    ) -> ConfigError {
        let (line, column) = line_col(self.text, offset);
        ConfigError {
            file: self.file.to_string(),
            line,
            column,
            key_path: render_path(path),
            message: message.into(),
        }
    }

    /// An error about the key at `path` (or its nearest existing parent, for a missing key).
    pub fn at_path(&self, path: &[Seg], message: impl Into<String>) -> ConfigError {
        let offset = self.span_of(path).map(|s| s.start).unwrap_or(0);
        self.at_offset(offset, path, message)
    }

    /// An error that serde reported while reading the value at `base`: the key
    /// path is refined to the innermost key that holds the error's position.
    pub fn from_toml(&self, base: &[Seg], err: &toml::de::Error) -> ConfigError {
        let offset = err.span().map(|s| s.start).unwrap_or(0);
        let path = self
            .path_at(offset)
            .filter(|p| p.starts_with(base))
            .unwrap_or_else(|| base.to_vec());
        self.at_offset(offset, &path, err.message().trim().to_string())
    }

    fn span_of(&self, path: &[Seg]) -> Option<Range<usize>> {
        let root = self.root.as_ref()?;
        let mut best = None;
        let mut table: Option<&DeTable<'_>> = Some(root.get_ref());
        let mut array: Option<&[Spanned<DeValue<'_>>]> = None;
        for seg in path {
            let value = match (seg, table, array) {
                (Seg::Key(k), Some(t), _) => {
                    let (key, value) = t.iter().find(|(key, _)| key.get_ref().as_ref() == k)?;
                    best = Some(key.span());
                    value
                }
                (Seg::Index(i), _, Some(a)) => {
                    let value = a.get(*i)?;
                    best = Some(value.span());
                    value
                }
                _ => break,
            };
            table = None;
            array = None;
            match value.get_ref() {
                DeValue::Table(t) => table = Some(t),
                DeValue::Array(a) => array = Some(a),
                _ => {}
            }
        }
        best
    }

    /// The deepest key path whose key or value covers `offset`. Every entry is
    /// searched, because a `[table]` header's span does not cover its body.
    fn path_at(&self, offset: usize) -> Option<Vec<Seg>> {
        fn walk(value: &DeValue<'_>, offset: usize, path: &mut Vec<Seg>, best: &mut Vec<Seg>) {
            let mut visit = |seg: Seg, covers: bool, v: &DeValue<'_>, path: &mut Vec<Seg>| {
                path.push(seg);
                if covers && path.len() > best.len() {
                    *best = path.clone();
                }
                walk(v, offset, path, best);
                path.pop();
            };
            match value {
                DeValue::Table(t) => {
                    for (k, v) in t.iter() {
                        let covers = k.span().contains(&offset) || v.span().contains(&offset);
                        visit(Seg::Key(k.get_ref().to_string()), covers, v.get_ref(), path);
                    }
                }
                DeValue::Array(a) => {
                    for (i, v) in a.iter().enumerate() {
                        visit(Seg::Index(i), v.span().contains(&offset), v.get_ref(), path);
                    }
                }
                _ => {}
            }
        }
        let root = self.root.as_ref()?;
        let mut best = Vec::new();
        walk(
            &DeValue::Table(root.get_ref().clone()),
            offset,
            &mut Vec::new(),
            &mut best,
        );
        Some(best)
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    (line, text[line_start..offset].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let t = "a = 1\nbb = 2\n";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 6), (2, 1));
        assert_eq!(line_col(t, 9), (2, 4));
        assert_eq!(line_col(t, 999), (3, 1));
    }

    #[test]
    fn paths_render_like_toml() {
        let p = [Seg::from("routes"), Seg::from(2), Seg::from("upstream")];
        assert_eq!(render_path(&p), "routes[2].upstream");
        assert_eq!(
            render_path(&[Seg::from("regions"), Seg::from("a b")]),
            "regions.\"a b\""
        );
    }

    #[test]
    fn locator_finds_nested_keys_and_array_items() {
        let t = "[server]\nregion = \"x\"\n\n[[routes]]\nhost = \"a\"\n\n[[routes]]\nupstream = \"u\"\n";
        let loc = Locator::new("f.toml", t);
        let e = loc.at_path(&["routes".into(), 1.into(), "upstream".into()], "m");
        assert_eq!((e.line, e.column), (8, 1));
        let e = loc.at_path(&["server".into(), "region".into()], "m");
        assert_eq!((e.line, e.column), (2, 1));
        // A missing key points at its nearest parent.
        let e = loc.at_path(&["server".into(), "nope".into()], "m");
        assert_eq!(e.line, 1);
    }
}
