//! Row values, filter literals and the comparisons between them (docs/matcher.md,
//! "Comparison semantics").

use std::cmp::Ordering;

/// One column value of a row, as the matcher sees it.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(Box<str>),
}

/// A row: column names and values, in the order the source produced them.
///
/// Rows are short (tens of columns), so a linear scan beats hashing each name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    columns: Vec<(Box<str>, Value)>,
}

impl Row {
    /// A row with no columns: every filter condition on it is unknown.
    pub const EMPTY: Row = Row {
        columns: Vec::new(),
    };

    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_capacity(n: usize) -> Self {
        Self {
            columns: Vec::with_capacity(n),
        }
    }

    /// Sets `name` to `value`, replacing an earlier value of the same column.
    pub fn set(&mut self, name: &str, value: Value) {
        match self.columns.iter_mut().find(|(n, _)| &**n == name) {
            Some((_, v)) => *v = value,
            None => self.columns.push((name.into(), value)),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.columns
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, v)| v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.columns.iter().map(|(n, v)| (&**n, v))
    }

    pub fn len(&self) -> usize {
        self.columns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }
}

impl<'a> FromIterator<(&'a str, Value)> for Row {
    fn from_iter<I: IntoIterator<Item = (&'a str, Value)>>(iter: I) -> Self {
        let mut row = Row::new();
        for (n, v) in iter {
            row.set(n, v);
        }
        row
    }
}

/// A filter literal, read once at subscribe time in every way a row value may need it.
#[derive(Clone, Debug, PartialEq)]
pub struct Literal {
    pub text: Box<str>,
    pub int: Option<i64>,
    pub num: Option<f64>,
    pub boolean: Option<bool>,
}

impl Literal {
    pub fn new(text: &str) -> Self {
        Self {
            int: parse_int(text),
            num: parse_number(text),
            boolean: parse_bool(text),
            text: text.into(),
        }
    }

    /// Orders `value` against this literal, or `None` when that is unknown (null value, or a
    /// literal that does not read as the value's type).
    pub fn compare(&self, value: &Value) -> Option<Ordering> {
        match value {
            Value::Null => None,
            Value::Text(s) => Some((**s).cmp(&*self.text)),
            Value::Int(i) => match (self.int, self.num) {
                (Some(n), _) => Some(i.cmp(&n)),
                (None, Some(x)) => Some(pg_float_cmp(*i as f64, x)),
                (None, None) => None,
            },
            Value::Float(f) => self.num.map(|x| pg_float_cmp(*f, x)),
            Value::Bool(b) => self.boolean.map(|x| b.cmp(&x)),
        }
    }
}

/// Postgres' float8 ordering: NaN equals NaN and sorts above everything, -0 equals 0.
pub fn pg_float_cmp(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        // Neither is NaN, so partial_cmp is total here (and -0 == 0).
        (false, false) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
    }
}

/// The hash key of a number: equal under `pg_float_cmp` iff equal keys.
pub fn number_key(x: f64) -> u64 {
    if x.is_nan() {
        f64::NAN.to_bits()
    } else if x == 0.0 {
        0f64.to_bits()
    } else {
        x.to_bits()
    }
}

fn ascii_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn strip_sign(s: &str) -> &str {
    s.strip_prefix(['+', '-']).unwrap_or(s)
}

/// `[+-]digits` within i64.
pub fn parse_int(s: &str) -> Option<i64> {
    if !ascii_digits(strip_sign(s)) {
        return None;
    }
    s.parse().ok()
}

/// `[+-]digits[.digits][e[+-]digits]`, or nan / [+-]inf / [+-]infinity.
pub fn parse_number(s: &str) -> Option<f64> {
    let body = strip_sign(s);
    let lower = body.to_ascii_lowercase();
    if lower == "inf" || lower == "infinity" {
        return Some(if s.starts_with('-') {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        });
    }
    if s.eq_ignore_ascii_case("nan") {
        return Some(f64::NAN);
    }
    let (mantissa, exponent) = match body.find(['e', 'E']) {
        Some(i) => (&body[..i], Some(&body[i + 1..])),
        None => (body, None),
    };
    let (int_part, frac_part) = match mantissa.find('.') {
        Some(i) => (&mantissa[..i], &mantissa[i + 1..]),
        None => (mantissa, ""),
    };
    let digits_ok = |d: &str| d.is_empty() || ascii_digits(d);
    if (int_part.is_empty() && frac_part.is_empty())
        || !digits_ok(int_part)
        || !digits_ok(frac_part)
    {
        return None;
    }
    if let Some(e) = exponent {
        if !ascii_digits(strip_sign(e)) {
            return None;
        }
    }
    // The grammar above is a subset of what Rust's correctly-rounded parser accepts.
    s.parse().ok()
}

/// `true`/`t`/`false`/`f`, any case.
pub fn parse_bool(s: &str) -> Option<bool> {
    if s.eq_ignore_ascii_case("true") || s.eq_ignore_ascii_case("t") {
        Some(true)
    } else if s.eq_ignore_ascii_case("false") || s.eq_ignore_ascii_case("f") {
        Some(false)
    } else {
        None
    }
}

/// One element of a compiled LIKE pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatternToken {
    /// `%` or `*`: any run of characters.
    AnyRun,
    /// `_`: exactly one character.
    AnyOne,
    Char(char),
}

/// A compiled LIKE / ILIKE pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LikePattern {
    tokens: Box<[PatternToken]>,
    case_insensitive: bool,
}

impl LikePattern {
    /// Compiles `pattern`; `None` if it ends with an unfinished escape.
    pub fn compile(pattern: &str, case_insensitive: bool) -> Option<Self> {
        let mut tokens = Vec::with_capacity(pattern.len());
        let mut chars = pattern.chars();
        while let Some(c) = chars.next() {
            let literal = match c {
                '%' | '*' => {
                    // Consecutive runs are one run; this keeps matching linear-ish.
                    if tokens.last() != Some(&PatternToken::AnyRun) {
                        tokens.push(PatternToken::AnyRun);
                    }
                    continue;
                }
                '_' => {
                    tokens.push(PatternToken::AnyOne);
                    continue;
                }
                '\\' => chars.next()?,
                c => c,
            };
            if case_insensitive {
                tokens.extend(literal.to_lowercase().map(PatternToken::Char));
            } else {
                tokens.push(PatternToken::Char(literal));
            }
        }
        Some(Self {
            tokens: tokens.into(),
            case_insensitive,
        })
    }

    pub fn matches(&self, text: &str) -> bool {
        if self.case_insensitive {
            let folded: Vec<char> = text.chars().flat_map(char::to_lowercase).collect();
            wildcard_match(&self.tokens, &folded)
        } else {
            let chars: Vec<char> = text.chars().collect();
            wildcard_match(&self.tokens, &chars)
        }
    }
}

/// Greedy wildcard matching with one backtrack point: O(len(p) * len(s)) at worst.
fn wildcard_match(p: &[PatternToken], s: &[char]) -> bool {
    let (mut pi, mut si) = (0usize, 0usize);
    let mut backtrack: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some(PatternToken::AnyOne) => {
                pi += 1;
                si += 1;
            }
            Some(PatternToken::Char(c)) if *c == s[si] => {
                pi += 1;
                si += 1;
            }
            Some(PatternToken::AnyRun) => {
                backtrack = Some((pi, si));
                pi += 1;
            }
            _ => match backtrack {
                Some((run, start)) => {
                    pi = run + 1;
                    si = start + 1;
                    backtrack = Some((run, start + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|t| *t == PatternToken::AnyRun)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        for ok in [
            "1",
            "-1",
            "+1.5",
            ".5",
            "5.",
            "1e5",
            "1E-5",
            "-.5e+3",
            "NaN",
            "-Infinity",
            "inf",
        ] {
            assert!(parse_number(ok).is_some(), "{ok}");
        }
        for bad in [
            "", ".", "e5", "1e", "1_0", " 1", "1 ", "0x10", "+", "-nan", "١", "1.2.3",
        ] {
            assert!(parse_number(bad).is_none(), "{bad}");
        }
        assert_eq!(parse_int("9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_int("9223372036854775808"), None);
        assert_eq!(parse_number("1e999"), Some(f64::INFINITY));
    }

    #[test]
    fn typed_comparison() {
        let five = Literal::new("5");
        assert_eq!(five.compare(&Value::Int(5)), Some(Ordering::Equal));
        assert_eq!(five.compare(&Value::Float(5.0)), Some(Ordering::Equal));
        // Text compares as text ("10" < "5"), integers as numbers (10 > 5).
        assert_eq!(
            five.compare(&Value::Text("10".into())),
            Some(Ordering::Less)
        );
        assert_eq!(five.compare(&Value::Int(10)), Some(Ordering::Greater));
        assert_eq!(five.compare(&Value::Bool(true)), None);
        assert_eq!(five.compare(&Value::Null), None);
        let nan = Literal::new("nan");
        assert_eq!(nan.compare(&Value::Float(f64::NAN)), Some(Ordering::Equal));
        assert_eq!(
            nan.compare(&Value::Float(f64::INFINITY)),
            Some(Ordering::Less)
        );
        assert_eq!(
            Literal::new("-0").compare(&Value::Float(0.0)),
            Some(Ordering::Equal)
        );
        assert_eq!(
            Literal::new("2.5").compare(&Value::Int(2)),
            Some(Ordering::Less)
        );
    }

    #[test]
    fn like() {
        let p = |s, ci| LikePattern::compile(s, ci).unwrap();
        assert!(p("a%c", false).matches("abbbc"));
        assert!(p("a*c", false).matches("ac"));
        assert!(p("a_c", false).matches("abc"));
        assert!(!p("a_c", false).matches("ac"));
        assert!(p(r"100\%", false).matches("100%"));
        assert!(!p(r"100\%", false).matches("1000"));
        assert!(p("%b%b%", false).matches("abab"));
        assert!(!p("A%", false).matches("abc"));
        assert!(p("A%", true).matches("abc"));
        assert!(p("σ%", true).matches("Σx"));
        assert!(LikePattern::compile("abc\\", false).is_none());
    }
}
