//! Kubernetes-style resource quantities and human durations.
//!
//! CPU is kept in millicores (`500m`, `0.5` and `"1"` are all valid), memory and disk in MiB
//! (`64Mi`, `1Gi`, `100M`; a bare number is bytes, as in Kubernetes, rounded up to whole MiB).

use std::time::Duration;

/// Why a quantity or duration could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// Empty input.
    #[error("must not be empty")]
    Empty,
    /// A leading minus sign.
    #[error("must not be negative")]
    Negative,
    /// Not a number followed by a known suffix.
    #[error("`{input}` is not a quantity (expected e.g. {example})")]
    Malformed {
        /// What the user wrote.
        input: String,
        /// A valid example for this kind of quantity.
        example: &'static str,
    },
    /// The value does not fit the unit's range.
    #[error("`{0}` is too large")]
    TooLarge(String),
    /// A duration humantime could not read.
    #[error("`{input}` is not a duration (expected e.g. 10s, 1m, 500ms): {reason}")]
    Duration {
        /// What the user wrote.
        input: String,
        /// humantime's explanation.
        reason: String,
    },
}

const NANO: u128 = 1_000_000_000;
const MIB: u128 = 1 << 20;

/// Parses a quantity into nano-units (value x 1e9), so that `500m` and `0.5` are exact.
fn parse_nano_units(input: &str, example: &'static str) -> Result<u128, QuantityError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(QuantityError::Empty);
    }
    if s.starts_with('-') {
        return Err(QuantityError::Negative);
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    let malformed = || QuantityError::Malformed {
        input: input.to_string(),
        example,
    };
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(malformed());
    }
    if frac_part.len() > 9 || frac_part.contains('.') {
        return Err(malformed());
    }
    let too_large = || QuantityError::TooLarge(input.to_string());
    let int: u128 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().map_err(|_| too_large())?
    };
    let frac: u128 = if frac_part.is_empty() {
        0
    } else {
        let scale = 10u128.pow(9 - frac_part.len() as u32);
        frac_part.parse::<u128>().map_err(|_| malformed())? * scale
    };
    let nano = int
        .checked_mul(NANO)
        .and_then(|v| v.checked_add(frac))
        .ok_or_else(too_large)?;
    let (mul, div): (u128, u128) = match suffix {
        "" => (1, 1),
        "m" => (1, 1000),
        "k" => (1_000, 1),
        "M" => (1_000_000, 1),
        "G" => (1_000_000_000, 1),
        "T" => (1_000_000_000_000, 1),
        "P" => (1_000_000_000_000_000, 1),
        "E" => (1_000_000_000_000_000_000, 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        "Ei" => (1 << 60, 1),
        _ => return Err(malformed()),
    };
    Ok(nano.checked_mul(mul).ok_or_else(too_large)? / div)
}

/// Parses CPU into millicores, rounding up: `500m` -> 500, `0.5` -> 500, `2` -> 2000.
pub fn parse_cpu_millis(input: &str) -> Result<u32, QuantityError> {
    let nano = parse_nano_units(input, "500m, 0.5 or 2")?;
    let millis = nano.div_ceil(1_000_000);
    u32::try_from(millis).map_err(|_| QuantityError::TooLarge(input.to_string()))
}

/// Parses a byte quantity into MiB, rounding up: `64Mi` -> 64, `1Gi` -> 1024, `100M` -> 96.
pub fn parse_mib(input: &str) -> Result<u64, QuantityError> {
    let nano = parse_nano_units(input, "64Mi, 1Gi or 100M")?;
    let bytes = nano.div_ceil(NANO);
    u64::try_from(bytes.div_ceil(MIB)).map_err(|_| QuantityError::TooLarge(input.to_string()))
}

/// Formats millicores the way users write them: `500m`, `2`.
pub fn format_cpu_millis(millis: u32) -> String {
    if millis.is_multiple_of(1000) {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

/// Formats MiB the way users write them: `64Mi`, `2Gi`.
pub fn format_mib(mib: u64) -> String {
    if mib != 0 && mib.is_multiple_of(1024) {
        format!("{}Gi", mib / 1024)
    } else {
        format!("{mib}Mi")
    }
}

/// Parses a duration such as `10s`, `1m`, `1h 30m` or `500ms`.
pub fn parse_duration(input: &str) -> Result<Duration, QuantityError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(QuantityError::Empty);
    }
    if s.starts_with('-') {
        return Err(QuantityError::Negative);
    }
    humantime::parse_duration(s).map_err(|e| QuantityError::Duration {
        input: input.to_string(),
        reason: e.to_string(),
    })
}

/// Formats a duration in milliseconds compactly: `10s`, `1m 30s`, `250ms`.
pub fn format_duration_ms(ms: u64) -> String {
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cpu_forms() {
        assert_eq!(parse_cpu_millis("500m"), Ok(500));
        assert_eq!(parse_cpu_millis("0.5"), Ok(500));
        assert_eq!(parse_cpu_millis("2"), Ok(2000));
        assert_eq!(parse_cpu_millis(".25"), Ok(250));
        assert_eq!(parse_cpu_millis("0.0001"), Ok(1), "rounds up to 1m");
        assert_eq!(parse_cpu_millis("-1"), Err(QuantityError::Negative));
        assert!(matches!(
            parse_cpu_millis("half"),
            Err(QuantityError::Malformed { .. })
        ));
        assert!(matches!(
            parse_cpu_millis("1.2.3"),
            Err(QuantityError::Malformed { .. })
        ));
        assert!(matches!(
            parse_cpu_millis("5000000"),
            Err(QuantityError::TooLarge(_))
        ));
    }

    #[test]
    fn memory_forms() {
        assert_eq!(parse_mib("64Mi"), Ok(64));
        assert_eq!(parse_mib("1Gi"), Ok(1024));
        assert_eq!(parse_mib("100M"), Ok(96));
        assert_eq!(parse_mib("1024"), Ok(1));
        assert_eq!(parse_mib("0.5Gi"), Ok(512));
        assert_eq!(parse_mib("0"), Ok(0));
        assert_eq!(parse_mib(""), Err(QuantityError::Empty));
        assert!(matches!(
            parse_mib("64MB"),
            Err(QuantityError::Malformed { .. })
        ));
        assert!(matches!(
            parse_mib("99999999999999999999999999999999999999999Ei"),
            Err(QuantityError::TooLarge(_))
        ));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("-1s"), Err(QuantityError::Negative));
        assert!(matches!(
            parse_duration("soon"),
            Err(QuantityError::Duration { .. })
        ));
    }

    proptest! {
        #[test]
        fn cpu_round_trips(millis in 1u32..4_000_000) {
            prop_assert_eq!(parse_cpu_millis(&format_cpu_millis(millis)), Ok(millis));
        }

        #[test]
        fn mib_round_trips(mib in 0u64..(1 << 40)) {
            prop_assert_eq!(parse_mib(&format_mib(mib)), Ok(mib));
        }

        #[test]
        fn never_panics(s in "\\PC{0,24}") {
            let _ = parse_cpu_millis(&s);
            let _ = parse_mib(&s);
            let _ = parse_duration(&s);
        }
    }
}
