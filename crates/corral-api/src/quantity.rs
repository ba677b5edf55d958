//! Kubernetes resource quantities (`100m`, `0.5`, `64Mi`, `1G`, `1e3`) as exact numbers, for
//! the scheduler's sums and the agent's cgroup limits.

use serde_json::Value;

/// A quantity in billionths of its unit, exact for every suffix Kubernetes allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Quantity(i128);

const NANO: i128 = 1_000_000_000;

impl Quantity {
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let (negative, text) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text.strip_prefix('+').unwrap_or(text)),
        };
        let number_end = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
        let (number, suffix) = text.split_at(number_end);
        if number.is_empty() || number == "." {
            return None;
        }
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if fraction.len() > 9 || fraction.contains('.') {
            return None;
        }
        let digits: i128 = format!("{whole}{fraction:0<9}").parse().ok()?;
        let scaled = |m: i128| digits.checked_mul(m);
        let value = match suffix {
            "" => Some(digits),
            "n" => Some(digits / NANO),
            "u" => Some(digits / 1_000_000),
            "m" => Some(digits / 1_000),
            "k" => scaled(1_000),
            "M" => scaled(1_000_000),
            "G" => scaled(1_000_000_000),
            "T" => scaled(1_000_000_000_000),
            "P" => scaled(1_000_000_000_000_000),
            "E" => scaled(1_000_000_000_000_000_000),
            "Ki" => scaled(1 << 10),
            "Mi" => scaled(1 << 20),
            "Gi" => scaled(1 << 30),
            "Ti" => scaled(1 << 40),
            "Pi" => scaled(1 << 50),
            "Ei" => scaled(1 << 60),
            exp if exp.starts_with(['e', 'E']) => {
                let e: i32 = exp[1..].parse().ok()?;
                match e {
                    0..=18 => scaled(10i128.pow(e as u32)),
                    -9..=-1 => Some(digits / 10i128.pow((-e) as u32)),
                    _ => None,
                }
            }
            _ => None,
        }?;
        Some(Quantity(if negative { -value } else { value }))
    }

    /// From a JSON quantity: a string, or a plain number.
    pub fn from_json(v: &Value) -> Option<Self> {
        match v {
            Value::String(s) => Self::parse(s),
            Value::Number(n) => n.as_i64().map(|i| Quantity(i as i128 * NANO)).or_else(|| Self::parse(&n.to_string())),
            _ => None,
        }
    }

    /// In thousandths, rounded up (CPU in millicores).
    pub fn millis(self) -> i64 {
        let m = NANO / 1000;
        (self.0 / m + i128::from(self.0 % m > 0)) as i64
    }

    /// In whole units, rounded up (memory in bytes).
    pub fn value(self) -> i64 {
        (self.0 / NANO + i128::from(self.0 % NANO > 0)) as i64
    }
}

impl std::ops::Add for Quantity {
    type Output = Quantity;

    fn add(self, other: Quantity) -> Quantity {
        Quantity(self.0 + other.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Quantity {
        Quantity::parse(s).unwrap_or_else(|| panic!("{s} parses"))
    }

    #[test]
    fn cpu_and_memory_quantities_in_their_units() {
        assert_eq!(q("100m").millis(), 100);
        assert_eq!(q("0.5").millis(), 500);
        assert_eq!(q("2").millis(), 2000);
        assert_eq!(q("1u").millis(), 1, "rounded up");
        assert_eq!(q("64Mi").value(), 64 << 20);
        assert_eq!(q("1G").value(), 1_000_000_000);
        assert_eq!(q("1.5Gi").value(), 3 << 29);
        assert_eq!(q("1e3").value(), 1000);
        assert_eq!(q("129e6").value(), 129_000_000);
        assert_eq!(Quantity::from_json(&serde_json::json!(3)).map(Quantity::millis), Some(3000));
    }

    #[test]
    fn malformed_quantities_are_refused() {
        for bad in ["", "Mi", "1.2.3", "1X", "50 Mi", "1e99", "0.0000000001"] {
            assert_eq!(Quantity::parse(bad), None, "{bad:?}");
        }
    }
}
