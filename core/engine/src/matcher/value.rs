//! Row values, filter literals and the comparisons between them (docs/matcher.md,
//! "Comparison semantics").

use std::cmp::Ordering;

use ahash::AHashMap;

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

/// A compiled LIKE / ILIKE pattern: the fixed-length segments between its `%` runs.
///
/// A text matches when the first segment starts it, the last one ends it and the others
/// occur in order in between. Taking each middle segment at its leftmost occurrence is never
/// worse than a later one, so matching is one forward pass over the text per segment, each
/// step costing at most [`SHORT_SEGMENT`] comparisons or, for a longer segment, a 64-bit word
/// per 64 of its tokens (Shift-And). A backtracking matcher costs the product of pattern and
/// text lengths instead: `%aaa…ab` (1,000 characters) against 100,000 `a`s took 0.9 s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LikePattern {
    /// One more than the pattern's runs (the first and last may be empty).
    segments: Box<[Segment]>,
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
                    // Consecutive runs are one run.
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
        let segments = tokens
            .split(|t| *t == PatternToken::AnyRun)
            .map(Segment::new)
            .collect();
        Some(Self {
            segments,
            case_insensitive,
        })
    }

    pub fn matches(&self, text: &str) -> bool {
        if self.case_insensitive {
            let folded: Vec<char> = text.chars().flat_map(char::to_lowercase).collect();
            self.matches_chars(&folded)
        } else {
            let chars: Vec<char> = text.chars().collect();
            self.matches_chars(&chars)
        }
    }

    fn matches_chars(&self, s: &[char]) -> bool {
        let (first, rest) = self.segments.split_first().expect("at least one segment");
        let Some((last, middle)) = rest.split_last() else {
            return s.len() == first.len && first.matches_at(s);
        };
        // The first and last segments are anchored, and must not overlap.
        let Some(end) = s.len().checked_sub(last.len) else {
            return false;
        };
        if end < first.len || !first.matches_at(&s[..first.len]) || !last.matches_at(&s[end..]) {
            return false;
        }
        let mut at = first.len;
        for segment in middle {
            match segment.find(&s[at..end]) {
                Some(i) => at += i + segment.len,
                None => return false,
            }
        }
        true
    }
}

/// Past this many tokens a segment is searched for with Shift-And; up to it, by comparing it
/// at each position, which costs at most this many steps per character of the text.
const SHORT_SEGMENT: usize = 32;

/// Literal characters and `_`s: what a pattern has between two runs.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Segment {
    /// `Char` and `AnyOne` only.
    tokens: Box<[PatternToken]>,
    len: usize,
    /// For segments longer than [`SHORT_SEGMENT`].
    shift_and: Option<ShiftAnd>,
}

impl Segment {
    fn new(tokens: &[PatternToken]) -> Self {
        Self {
            tokens: tokens.into(),
            len: tokens.len(),
            shift_and: (tokens.len() > SHORT_SEGMENT).then(|| ShiftAnd::new(tokens)),
        }
    }

    /// Whether the segment matches `s`, which has its length.
    fn matches_at(&self, s: &[char]) -> bool {
        debug_assert_eq!(s.len(), self.len);
        self.tokens.iter().zip(s).all(|(t, c)| match t {
            PatternToken::Char(expected) => expected == c,
            _ => true,
        })
    }

    /// Where the segment first occurs in `s`.
    fn find(&self, s: &[char]) -> Option<usize> {
        match &self.shift_and {
            Some(shift_and) => shift_and.find(s),
            None => (0..(s.len() + 1).checked_sub(self.len)?)
                .find(|&i| self.matches_at(&s[i..i + self.len])),
        }
    }
}

/// A segment compiled for a bit-parallel search: bit `i` (of word `i / 64`) of a character's
/// mask is set where token `i` accepts that character.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ShiftAnd {
    len: usize,
    /// The bits of the `_` tokens: what any character matches.
    any: Box<[u64]>,
    /// For each character the segment names: its bits (`any`'s included).
    masks: AHashMap<char, Box<[u64]>>,
}

impl ShiftAnd {
    fn new(tokens: &[PatternToken]) -> Self {
        let mut any = vec![0u64; tokens.len().div_ceil(64)];
        for (i, t) in tokens.iter().enumerate() {
            if *t == PatternToken::AnyOne {
                any[i / 64] |= 1 << (i % 64);
            }
        }
        let mut masks: AHashMap<char, Box<[u64]>> = AHashMap::default();
        for (i, t) in tokens.iter().enumerate() {
            if let PatternToken::Char(c) = t {
                masks.entry(*c).or_insert_with(|| any.clone().into())[i / 64] |= 1 << (i % 64);
            }
        }
        Self {
            len: tokens.len(),
            any: any.into(),
            masks,
        }
    }

    /// Where the segment first occurs in `s`: bit `i` of `state` is set while the last
    /// `i + 1` characters read match the segment's first `i + 1` tokens.
    fn find(&self, s: &[char]) -> Option<usize> {
        let (last_word, last_bit) = ((self.len - 1) / 64, 1u64 << ((self.len - 1) % 64));
        let mut state = vec![0u64; self.any.len()];
        for (j, c) in s.iter().enumerate() {
            let mask = self.masks.get(c).unwrap_or(&self.any);
            let mut carry = 1u64;
            for (word, m) in state.iter_mut().zip(mask.iter()) {
                let next = *word >> 63;
                *word = ((*word << 1) | carry) & m;
                carry = next;
            }
            if state[last_word] & last_bit != 0 {
                return Some(j + 1 - self.len);
            }
        }
        None
    }
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

    /// The pattern run as an NFA over the text (as `pyrt/reference/matcher.py` does): the oracle.
    fn like_oracle(pattern: &str, text: &str) -> bool {
        let s: Vec<char> = text.chars().collect();
        let mut reach = vec![false; s.len() + 1];
        reach[0] = true;
        let mut chars = pattern.chars();
        while let Some(c) = chars.next() {
            let literal = match c {
                '%' | '*' => {
                    if let Some(first) = reach.iter().position(|r| *r) {
                        reach[first..].fill(true);
                    }
                    continue;
                }
                '_' => None,
                '\\' => chars.next(),
                c => Some(c),
            };
            for p in (0..s.len()).rev() {
                reach[p + 1] = reach[p] && literal.is_none_or(|l| l == s[p]);
            }
            reach[0] = false;
        }
        reach[s.len()]
    }

    #[test]
    fn like_segments() {
        let p = |s| LikePattern::compile(s, false).unwrap();
        for (pattern, text, expected) in [
            ("", "", true),
            ("", "a", false),
            ("%", "", true),
            ("a%a", "a", false),
            ("a%a", "aa", true),
            ("ab%bc", "abc", false),
            ("ab%bc", "abbc", true),
            ("%ab_d%", "xxabcabxdy", true),
            ("%a_%_a%", "aba", false),
            ("%a_%_a%", "abxba", true),
            ("_%_", "a", false),
            ("%b%b%", "abab", true),
        ] {
            assert_eq!(p(pattern).matches(text), expected, "{pattern:?} {text:?}");
            assert_eq!(like_oracle(pattern, text), expected, "{pattern:?} {text:?}");
        }
        // Segments longer than one 64-bit word.
        let long = format!("%{}b%", "a_".repeat(50));
        let hit = format!("xx{}bxx", "ac".repeat(50));
        assert!(p(&long).matches(&hit));
        assert!(!p(&long).matches(&hit.replace('b', "c")));
    }

    #[test]
    fn like_is_linear_in_the_text() {
        // `%aaa…ab` against `aaa…a`: a backtracking matcher tries the 2,000 `a`s at each of
        // the 200,000 places (4 * 10**8 steps, seconds); here the last segment is compared
        // once, at the end, and middle segments are found in one pass over the text.
        let a = |n: usize| "a".repeat(n);
        let started = std::time::Instant::now();
        for (pattern, text) in [
            (format!("%{}b", a(2_000)), a(200_000)),
            (format!("%{}b%", a(SHORT_SEGMENT - 1)), a(50_000)),
            (format!("%{}b%", a(2_000)), a(20_000)),
        ] {
            let pattern = LikePattern::compile(&pattern, false).unwrap();
            assert!(!pattern.matches(&text));
            assert!(pattern.matches(&format!("{text}b")));
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    proptest::proptest! {
        #[test]
        fn like_agrees_with_the_oracle(
            pattern in "[ab_%*\\\\]{0,12}",
            text in "[abc]{0,12}",
            long in 0usize..3,
        ) {
            // Now and then, segments of more than 64 tokens.
            let pattern = pattern.replace('*', &"a".repeat(long * 40));
            let text = text.repeat(long * 10 + 1);
            if let Some(compiled) = LikePattern::compile(&pattern, false) {
                proptest::prop_assert_eq!(compiled.matches(&text), like_oracle(&pattern, &text));
            }
        }
    }
}
