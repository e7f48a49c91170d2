//! OCI image references: `[registry[:port]/]path[:tag][@algo:hex]`.
//!
//! References are normalised as containerd and Docker do: a bare `busybox` is
//! `docker.io/library/busybox:latest`.

use std::fmt;

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Registry host, with an optional port (`docker.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// Repository path inside the registry (`library/busybox`).
    pub repository: String,
    /// Tag; `latest` when neither tag nor digest was given.
    pub tag: Option<String>,
    /// Content digest (`sha256:...`), when pinned.
    pub digest: Option<String>,
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

const MAX_LEN: usize = 512;

fn is_path_component(s: &str) -> bool {
    // [a-z0-9]+ joined by one of `.`, `_`, `__` or any run of `-`.
    if s.is_empty() || !s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        return false;
    }
    if !s.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        return false;
    }
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && matches!(bytes[i], b'.' | b'_' | b'-') {
            i += 1;
        }
        let sep = &s[start..i];
        if sep.is_empty() {
            return false;
        }
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_registry(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    if let Some(p) = port
        && (p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    !host.is_empty()
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

fn is_tag(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn is_digest(s: &str) -> bool {
    match s.split_once(':') {
        Some(("sha256", hex)) => {
            hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        }
        Some(("sha512", hex)) => {
            hex.len() == 128
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        }
        _ => false,
    }
}

impl ImageRef {
    /// Parses and normalises a reference; the error says what is wrong with it.
    pub fn parse(input: &str) -> Result<Self, String> {
        if input.is_empty() {
            return Err("must not be empty".into());
        }
        if input.len() > MAX_LEN {
            return Err(format!("longer than {MAX_LEN} characters"));
        }
        if input.trim() != input || input.contains(char::is_whitespace) {
            return Err("must not contain whitespace".into());
        }
        let (name, digest) = match input.split_once('@') {
            Some((n, d)) => {
                if !is_digest(d) {
                    return Err(format!("`{d}` is not a digest (expected sha256:<64 hex>)"));
                }
                (n, Some(d.to_string()))
            }
            None => (input, None),
        };
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (path, tag) = match name[last_slash..].rfind(':') {
            Some(i) => {
                let tag = &name[last_slash + i + 1..];
                if !is_tag(tag) {
                    return Err(format!("`{tag}` is not a valid tag"));
                }
                (&name[..last_slash + i], Some(tag.to_string()))
            }
            None => (name, None),
        };
        let mut parts: Vec<&str> = path.split('/').collect();
        let first = parts[0];
        let registry = if parts.len() > 1
            && (first.contains('.') || first.contains(':') || first == "localhost")
        {
            if !is_registry(first) {
                return Err(format!("`{first}` is not a valid registry host"));
            }
            parts.remove(0);
            first.to_string()
        } else {
            "docker.io".to_string()
        };
        if parts.is_empty() {
            return Err("has no repository name".into());
        }
        for p in &parts {
            if !is_path_component(p) {
                return Err(format!(
                    "`{p}` is not a valid repository component (lowercase letters, digits, `.`, `_`, `-`)"
                ));
            }
        }
        if registry == "docker.io" && parts.len() == 1 {
            parts.insert(0, "library");
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(ImageRef {
            registry,
            repository: parts.join("/"),
            tag,
            digest,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn normalises() {
        let n = |s: &str| ImageRef::parse(s).map(|r| r.to_string());
        assert_eq!(
            n("busybox").as_deref(),
            Ok("docker.io/library/busybox:latest")
        );
        assert_eq!(
            n("docker.io/library/busybox:local").as_deref(),
            Ok("docker.io/library/busybox:local")
        );
        assert_eq!(
            n("127.0.0.1:5000/test/busybox:v1").as_deref(),
            Ok("127.0.0.1:5000/test/busybox:v1")
        );
        assert_eq!(n("localhost/a/b").as_deref(), Ok("localhost/a/b:latest"));
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            n(&format!("busybox@{d}")),
            Ok(format!("docker.io/library/busybox@{d}"))
        );
    }

    #[test]
    fn rejects() {
        for bad in [
            "",
            " busybox",
            "Busybox",
            "busybox:",
            "busybox:-x",
            "a//b",
            "busybox@sha256:zz",
            "reg.io:99999999/x",
            "-x",
            "x-",
            "a...b",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,64}") {
            let _ = ImageRef::parse(&s);
        }

        #[test]
        fn normal_form_is_stable(s in "[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,2}(:[a-z0-9]{1,8})?") {
            let once = ImageRef::parse(&s).expect("generated refs are valid").to_string();
            let twice = ImageRef::parse(&once).expect("normal form parses").to_string();
            prop_assert_eq!(once, twice);
        }
    }
}
