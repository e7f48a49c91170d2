//! Placement constraints as users write them, parsed once and checked against nodes.
//!
//! A constraint is one line of text:
//!
//! | text | meaning |
//! |---|---|
//! | `unique_host` | no two tasks of the job on one node |
//! | `exclusive_host` | the job's tasks share a node with no other job |
//! | `zone_balance` | tasks spread evenly over the nodes' `zone` attribute |
//! | `KEY == VALUE`, `KEY != VALUE` | attribute equality |
//! | `KEY in [A, B]`, `KEY not in [A, B]` | attribute membership |
//! | `KEY =~ REGEX` | attribute matches a regular expression (unanchored) |
//! | `KEY exists` | the node has the attribute |
//!
//! A job lists them under `constraints.hard` (nodes that fail are never used) and
//! `constraints.soft` (nodes that fail score lower).

use std::collections::HashMap;
use std::fmt;

use regex::Regex;

/// The attribute that `zone_balance` spreads over.
pub const ZONE: &str = "zone";
/// Most constraints in each of `hard` and `soft`.
pub const MAX_CONSTRAINTS: usize = 32;
/// Longest constraint text.
pub const MAX_CONSTRAINT_LEN: usize = 256;
/// Compiled-size cap for a constraint's regular expression.
const REGEX_SIZE_LIMIT: usize = 64 << 10;

/// One parsed constraint.
#[derive(Debug, Clone)]
pub enum Constraint {
    /// No two tasks of the job on one node.
    UniqueHost,
    /// The job's tasks share a node with no other job's.
    ExclusiveHost,
    /// Tasks spread evenly over zones.
    ZoneBalance,
    /// A rule on one node attribute.
    Attr {
        /// The attribute.
        key: String,
        /// The test.
        op: AttrOp,
    },
}

/// A test on one attribute's value.
#[derive(Debug, Clone)]
pub enum AttrOp {
    /// Equal to.
    Eq(String),
    /// Absent or different.
    Ne(String),
    /// One of.
    In(Vec<String>),
    /// Absent or none of.
    NotIn(Vec<String>),
    /// Present and matching.
    Matches(Regex),
    /// Present.
    Exists,
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 63
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
}

fn valid_value(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && !v
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, ',' | '[' | ']'))
}

impl Constraint {
    /// Parses one constraint; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Constraint, String> {
        if text.len() > MAX_CONSTRAINT_LEN {
            return Err(format!("at most {MAX_CONSTRAINT_LEN} characters"));
        }
        let t = text.trim();
        match t {
            "unique_host" => return Ok(Constraint::UniqueHost),
            "exclusive_host" => return Ok(Constraint::ExclusiveHost),
            "zone_balance" => return Ok(Constraint::ZoneBalance),
            _ => {}
        }
        let (key, rest) = t.split_once(char::is_whitespace).ok_or_else(|| {
            format!(
                "`{t}` is not a constraint: expected unique_host, exclusive_host, \
                 zone_balance or `KEY OP VALUE`"
            )
        })?;
        if !valid_key(key) {
            return Err(format!(
                "attribute `{key}`: 1-63 letters, digits, `_`, `-`, `.`, `/`"
            ));
        }
        let rest = rest.trim();
        let value = |v: &str| -> Result<String, String> {
            let v = v.trim();
            if valid_value(v) {
                Ok(v.to_string())
            } else {
                Err(format!(
                    "value `{v}`: 1-128 characters without spaces, commas or brackets"
                ))
            }
        };
        let list = |v: &str| -> Result<Vec<String>, String> {
            let inner = v
                .trim()
                .strip_prefix('[')
                .and_then(|v| v.strip_suffix(']'))
                .ok_or_else(|| format!("`{}` is not a list like [a, b]", v.trim()))?;
            let items = inner.split(',').map(value).collect::<Result<Vec<_>, _>>()?;
            Ok(items)
        };
        let op = if rest == "exists" {
            AttrOp::Exists
        } else if let Some(v) = rest.strip_prefix("==") {
            AttrOp::Eq(value(v)?)
        } else if let Some(v) = rest.strip_prefix("!=") {
            AttrOp::Ne(value(v)?)
        } else if let Some(v) = rest.strip_prefix("=~") {
            let pattern = v.trim();
            if pattern.is_empty() {
                return Err("`=~` needs a regular expression".into());
            }
            let re = regex::RegexBuilder::new(pattern)
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map_err(|e| format!("regular expression: {e}"))?;
            AttrOp::Matches(re)
        } else if let Some(v) = rest.strip_prefix("not in") {
            AttrOp::NotIn(list(v)?)
        } else if let Some(v) = rest.strip_prefix("in") {
            AttrOp::In(list(v)?)
        } else {
            return Err(format!(
                "unknown operator in `{t}`: use ==, !=, in, not in, =~ or exists"
            ));
        };
        Ok(Constraint::Attr {
            key: key.to_string(),
            op,
        })
    }

    /// For attribute rules: whether a node with `attrs` passes. Other kinds depend on
    /// placement state and pass here.
    pub fn matches(&self, attrs: &HashMap<String, String>) -> bool {
        let Constraint::Attr { key, op } = self else {
            return true;
        };
        let v = attrs.get(key);
        match op {
            AttrOp::Eq(x) => v == Some(x),
            AttrOp::Ne(x) => v != Some(x),
            AttrOp::In(xs) => v.is_some_and(|v| xs.contains(v)),
            AttrOp::NotIn(xs) => v.is_none_or(|v| !xs.contains(v)),
            AttrOp::Matches(re) => v.is_some_and(|v| re.is_match(v)),
            AttrOp::Exists => v.is_some(),
        }
    }

    /// The short name used in "why pending" explanations.
    pub fn label(&self) -> String {
        match self {
            Constraint::UniqueHost => "unique host".into(),
            Constraint::ExclusiveHost => "exclusive host".into(),
            Constraint::ZoneBalance => "zone balance".into(),
            Constraint::Attr { .. } => self.to_string(),
        }
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Constraint::UniqueHost => f.write_str("unique_host"),
            Constraint::ExclusiveHost => f.write_str("exclusive_host"),
            Constraint::ZoneBalance => f.write_str("zone_balance"),
            Constraint::Attr { key, op } => match op {
                AttrOp::Eq(v) => write!(f, "{key} == {v}"),
                AttrOp::Ne(v) => write!(f, "{key} != {v}"),
                AttrOp::In(vs) => write!(f, "{key} in [{}]", vs.join(", ")),
                AttrOp::NotIn(vs) => write!(f, "{key} not in [{}]", vs.join(", ")),
                AttrOp::Matches(re) => write!(f, "{key} =~ {}", re.as_str()),
                AttrOp::Exists => write!(f, "{key} exists"),
            },
        }
    }
}

/// A job's parsed constraints.
#[derive(Debug, Clone, Default)]
pub struct Constraints {
    /// Nodes failing any of these are not used.
    pub hard: Vec<Constraint>,
    /// Nodes failing these score lower.
    pub soft: Vec<Constraint>,
}

impl Constraints {
    /// Parses the wire form; errors name the field (`constraints.hard[1]`).
    pub fn parse(c: &berth_proto::Constraints) -> Result<Constraints, Vec<(String, String)>> {
        let mut errs = Vec::new();
        let mut parse_list = |name: &str, list: &[String]| {
            if list.len() > MAX_CONSTRAINTS {
                errs.push((
                    format!("constraints.{name}"),
                    format!("at most {MAX_CONSTRAINTS}"),
                ));
                return Vec::new();
            }
            list.iter()
                .enumerate()
                .filter_map(|(i, t)| match Constraint::parse(t) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        errs.push((format!("constraints.{name}[{i}]"), e));
                        None
                    }
                })
                .collect()
        };
        let hard = parse_list("hard", &c.hard);
        let soft = parse_list("soft", &c.soft);
        if errs.is_empty() {
            Ok(Constraints { hard, soft })
        } else {
            Err(errs)
        }
    }

    /// Whether any hard constraint is of this kind.
    pub fn hard_has(&self, f: impl Fn(&Constraint) -> bool) -> bool {
        self.hard.iter().any(f)
    }

    /// Whether any soft constraint is of this kind.
    pub fn soft_has(&self, f: impl Fn(&Constraint) -> bool) -> bool {
        self.soft.iter().any(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_every_form_and_prints_it_back() {
        for t in [
            "unique_host",
            "exclusive_host",
            "zone_balance",
            "instance_type == m5.xlarge",
            "zone != c",
            "zone in [a, b]",
            "zone not in [a, b]",
            "gpu_model =~ ^a100",
            "ssd exists",
        ] {
            let c = Constraint::parse(t).unwrap_or_else(|e| panic!("{t}: {e}"));
            assert_eq!(c.to_string(), t);
            assert_eq!(Constraint::parse(&c.to_string()).unwrap().to_string(), t);
        }
        assert_eq!(
            Constraint::parse("  zone in [a,b ,c]  ")
                .unwrap()
                .to_string(),
            "zone in [a, b, c]"
        );
    }

    #[test]
    fn attribute_rules_match_as_documented() {
        let n = attrs(&[
            ("zone", "a"),
            ("instance_type", "m5.xlarge"),
            ("gpu", "a100-80g"),
        ]);
        let m = |t: &str| Constraint::parse(t).unwrap().matches(&n);
        assert!(m("instance_type == m5.xlarge"));
        assert!(!m("instance_type == m5.large"));
        assert!(m("zone != b") && !m("zone != a") && m("rack != r1"));
        assert!(m("zone in [a, b]") && !m("zone in [b, c]") && !m("rack in [r1]"));
        assert!(m("zone not in [b]") && !m("zone not in [a]") && m("rack not in [r1]"));
        assert!(m("gpu =~ ^a100") && !m("gpu =~ ^h100$") && !m("rack =~ .*"));
        assert!(m("gpu exists") && !m("rack exists"));
        assert!(m("unique_host"));
    }

    #[test]
    fn bad_constraints_say_what_is_wrong() {
        for (t, want) in [
            ("unique-host", "is not a constraint"),
            ("zone >= a", "unknown operator"),
            ("zone == ", "value ``"),
            ("zone in a, b", "is not a list"),
            ("zone in [a, ]", "value ``"),
            ("zone =~ (", "regular expression"),
            ("zo ne == a", "unknown operator"),
            ("z$ == a", "attribute `z$`"),
            ("zone =~ a{1000}{1000}", "regular expression"),
        ] {
            let err = Constraint::parse(t).unwrap_err();
            assert!(err.contains(want), "{t}: {err}");
        }
        let long = format!("k == {}", "v".repeat(300));
        assert!(
            Constraint::parse(&long)
                .unwrap_err()
                .contains("at most 256")
        );
    }

    #[test]
    fn lists_name_the_failing_entry() {
        let c = berth_proto::Constraints {
            hard: vec!["unique_host".into(), "zone >< a".into()],
            soft: vec!["x ==".into()],
        };
        let errs = Constraints::parse(&c).unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["constraints.hard[1]", "constraints.soft[0]"]);
        let many = berth_proto::Constraints {
            hard: vec!["unique_host".into(); 33],
            soft: vec![],
        };
        assert_eq!(
            Constraints::parse(&many).unwrap_err()[0].0,
            "constraints.hard"
        );
    }
}
