//! The PostgREST-style row filter: grammar, parse errors and evaluation (docs/matcher.md).
//!
//! Written by hand because no crate parses PostgREST filters, and because errors must name
//! the exact character offset where a filter went wrong.

use ahash::AHashSet;

use super::error::FilterError;
use super::value::{LikePattern, Literal, Row, Value};
use std::cmp::Ordering;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operator {
    Eq,
    Neq,
    Lt,
    Lte,
    Gt,
    Gte,
    Like,
    Ilike,
    Is,
    In,
}

impl Operator {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "eq" => Self::Eq,
            "neq" => Self::Neq,
            "lt" => Self::Lt,
            "lte" => Self::Lte,
            "gt" => Self::Gt,
            "gte" => Self::Gte,
            "like" => Self::Like,
            "ilike" => Self::Ilike,
            "is" => Self::Is,
            "in" => Self::In,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Eq => "eq",
            Self::Neq => "neq",
            Self::Lt => "lt",
            Self::Lte => "lte",
            Self::Gt => "gt",
            Self::Gte => "gte",
            Self::Like => "like",
            Self::Ilike => "ilike",
            Self::Is => "is",
            Self::In => "in",
        }
    }
}

/// What `is.` tests for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IsValue {
    Null,
    True,
    False,
}

impl IsValue {
    pub fn name(self) -> &'static str {
        match self {
            Self::Null => "null",
            Self::True => "true",
            Self::False => "false",
        }
    }
}

/// The operand of a condition, compiled for evaluation.
#[derive(Clone, Debug, PartialEq)]
pub enum Test {
    Compare(Operator, Literal),
    In(Box<[Literal]>),
    Like(LikePattern, Box<str>),
    Is(IsValue),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    pub column: Box<str>,
    pub negated: bool,
    pub operator: Operator,
    pub test: Test,
}

impl Condition {
    /// True, false, or `None` for SQL's unknown.
    pub fn evaluate(&self, row: &Row) -> Option<bool> {
        let value = row.get(&self.column)?;
        let result = match &self.test {
            Test::Compare(op, literal) => {
                let ord = literal.compare(value)?;
                match op {
                    Operator::Eq => ord == Ordering::Equal,
                    Operator::Neq => ord != Ordering::Equal,
                    Operator::Lt => ord == Ordering::Less,
                    Operator::Lte => ord != Ordering::Greater,
                    Operator::Gt => ord == Ordering::Greater,
                    Operator::Gte => ord != Ordering::Less,
                    _ => unreachable!("only comparison operators are compiled to Compare"),
                }
            }
            Test::In(items) => {
                if matches!(value, Value::Null) {
                    return None;
                }
                items
                    .iter()
                    .any(|l| l.compare(value) == Some(Ordering::Equal))
            }
            Test::Like(pattern, _) => match value {
                Value::Text(s) => pattern.matches(s),
                _ => return None,
            },
            Test::Is(what) => matches!(
                (what, value),
                (IsValue::Null, Value::Null)
                    | (IsValue::True, Value::Bool(true))
                    | (IsValue::False, Value::Bool(false))
            ),
        };
        Some(result != self.negated)
    }

    /// The literals an equality index may file this condition under, if it is indexable
    /// (a non-negated `eq` or `in`).
    /// Whether `other` is the same test (`key`'s equality, without building the keys).
    fn same(&self, other: &Condition) -> bool {
        let texts = |a: &[Literal], b: &[Literal]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.text == y.text)
        };
        self.column == other.column
            && self.negated == other.negated
            && self.operator == other.operator
            && match (&self.test, &other.test) {
                (Test::Compare(_, a), Test::Compare(_, b)) => a.text == b.text,
                (Test::In(a), Test::In(b)) => texts(a, b),
                (Test::Like(_, a), Test::Like(_, b)) => a == b,
                (Test::Is(a), Test::Is(b)) => a == b,
                _ => false,
            }
    }

    /// A text equal for two conditions exactly when they are the same test (a literal is
    /// a function of its unquoted text; every part is length-prefixed).
    fn key(&self) -> String {
        let mut key = String::new();
        let mut part = |text: &str| {
            key.push_str(&text.len().to_string());
            key.push(':');
            key.push_str(text);
        };
        part(&self.column);
        part(if self.negated { "not" } else { "" });
        part(self.operator.name());
        match &self.test {
            Test::Compare(_, literal) => part(&literal.text),
            Test::In(items) => items.iter().for_each(|l| part(&l.text)),
            Test::Like(_, pattern) => part(pattern),
            Test::Is(value) => part(value.name()),
        }
        key
    }

    pub fn index_literals(&self) -> Option<&[Literal]> {
        if self.negated {
            return None;
        }
        match &self.test {
            Test::Compare(Operator::Eq, l) => Some(std::slice::from_ref(l)),
            Test::In(items) => Some(items),
            _ => None,
        }
    }
}

/// A parsed filter: conditions that must all be true.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filter {
    pub conditions: Box<[Condition]>,
}

impl Filter {
    pub fn parse(text: &str) -> Result<Self, FilterError> {
        Parser::new(text).parse()
    }

    /// The same filter with each repeated condition kept once (the first): AND is
    /// idempotent. A rule's forced `user_id=eq.{sub}` in front of the client's own
    /// `user_id=eq.42`, quoted or not, is then one condition, and a subscription left with
    /// only its indexed condition needs no re-check on a hit.
    pub fn without_repeats(self) -> Self {
        let n = self.conditions.len();
        let conditions: Vec<Condition> = if n <= 16 {
            // A few conditions (nearly every filter): compared pairwise, nothing allocated
            // unless one repeats.
            let c = &self.conditions;
            if !(1..n).any(|j| (0..j).any(|i| c[i].same(&c[j]))) {
                return self;
            }
            let mut kept: Vec<Condition> = Vec::with_capacity(n);
            for condition in self.conditions.into_vec() {
                if !kept.iter().any(|k| k.same(&condition)) {
                    kept.push(condition);
                }
            }
            kept
        } else {
            let mut seen = AHashSet::with_capacity(n);
            let all = self.conditions.into_vec();
            all.into_iter().filter(|c| seen.insert(c.key())).collect()
        };
        Self {
            conditions: conditions.into(),
        }
    }

    /// Every condition true (unknown excludes).
    pub fn matches(&self, row: &Row) -> bool {
        self.conditions
            .iter()
            .all(|c| c.evaluate(row) == Some(true))
    }

    /// Which condition an equality index should use: of the `eq` and `in` conditions, the
    /// one `crowd` says fewest subscriptions are filed under so far (`crowd(condition)`:
    /// how many its buckets hold now); on a tie an `eq` before an `in`, then the first.
    ///
    /// A tenant's forced `tenant_id=eq.{claims.tenant}` in front of a user's own
    /// `user_id=eq.42` (or `org_id=in.(...)`) is thus filed under the user's own condition
    /// once the tenant's bucket is the fuller, and an event looks at that user's
    /// subscriptions, not the whole tenant's.
    pub fn index_condition(&self, crowd: impl Fn(&Condition) -> usize) -> Option<usize> {
        let mut candidates = self
            .conditions
            .iter()
            .enumerate()
            .filter(|(_, c)| c.index_literals().is_some());
        let first = candidates.next()?;
        let Some(second) = candidates.next() else {
            return Some(first.0); // the common case: nothing to weigh
        };
        [first, second]
            .into_iter()
            .chain(candidates)
            .min_by_key(|(i, c)| (crowd(c), c.operator != Operator::Eq, *i))
            .map(|(i, _)| i)
    }
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
}

fn is_column_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '$'
}

impl Parser {
    fn new(text: &str) -> Self {
        Self {
            chars: text.chars().collect(),
            pos: 0,
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn at_condition_end(&self) -> bool {
        matches!(self.peek(), None | Some(','))
    }

    fn parse(mut self) -> Result<Filter, FilterError> {
        let mut conditions = Vec::new();
        if self.chars.is_empty() {
            return Ok(Filter::default());
        }
        loop {
            conditions.push(self.condition()?);
            match self.peek() {
                None => break,
                Some(',') => self.pos += 1,
                Some(_) => unreachable!("every condition ends at ',' or the end"),
            }
        }
        Ok(Filter {
            conditions: conditions.into(),
        })
    }

    fn condition(&mut self) -> Result<Condition, FilterError> {
        if self.at_condition_end() {
            return Err(FilterError::new("empty condition", self.pos));
        }
        let column = self.column()?;
        if self.peek() != Some('=') {
            return Err(FilterError::new("expected '=' after column", self.pos));
        }
        self.pos += 1;
        let (mut name, mut name_start) = self.operator_name();
        let mut negated = false;
        if name == "not" && self.peek() == Some('.') {
            negated = true;
            self.pos += 1;
            (name, name_start) = self.operator_name();
        }
        let operator = Operator::from_name(&name)
            .ok_or_else(|| FilterError::new(format!("unknown operator '{name}'"), name_start))?;
        if self.peek() != Some('.') {
            return Err(FilterError::new("expected '.' after operator", self.pos));
        }
        self.pos += 1;
        let value_start = self.pos;
        let test = match operator {
            Operator::In => Test::In(self.list()?),
            Operator::Is => Test::Is(self.is_value()?),
            Operator::Like | Operator::Ilike => {
                let text = self.value()?;
                let pattern = LikePattern::compile(&text, operator == Operator::Ilike)
                    .ok_or_else(|| FilterError::new("pattern ends with an escape", value_start))?;
                Test::Like(pattern, text.into())
            }
            op => Test::Compare(op, Literal::new(&self.value()?)),
        };
        Ok(Condition {
            column: column.into(),
            negated,
            operator,
            test,
        })
    }

    fn column(&mut self) -> Result<String, FilterError> {
        if self.peek() == Some('"') {
            let start = self.pos;
            let name = self
                .quoted()
                .ok_or_else(|| FilterError::new("unterminated quoted column", start))?;
            if name.is_empty() {
                return Err(FilterError::new("empty quoted column", start));
            }
            return Ok(name);
        }
        let start = self.pos;
        while self.peek().is_some_and(is_column_char) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(FilterError::new("expected column name", start));
        }
        Ok(self.chars[start..self.pos].iter().collect())
    }

    /// The operator word: everything up to '.', ',' or the end.
    fn operator_name(&mut self) -> (String, usize) {
        let start = self.pos;
        while !matches!(self.peek(), None | Some('.') | Some(',')) {
            self.pos += 1;
        }
        (self.chars[start..self.pos].iter().collect(), start)
    }

    /// A double-quoted string at `pos`, unescaped; `None` if it never closes.
    fn quoted(&mut self) -> Option<String> {
        debug_assert_eq!(self.peek(), Some('"'));
        let mut i = self.pos + 1;
        let mut out = String::new();
        while i < self.chars.len() {
            match self.chars[i] {
                '"' => {
                    self.pos = i + 1;
                    return Some(out);
                }
                '\\' => {
                    let escaped = *self.chars.get(i + 1)?;
                    out.push(escaped);
                    i += 2;
                }
                c => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        None
    }

    fn value(&mut self) -> Result<String, FilterError> {
        let start = self.pos;
        if self.peek() == Some('"') {
            let value = self
                .quoted()
                .ok_or_else(|| FilterError::new("unterminated quoted value", start))?;
            if !self.at_condition_end() {
                return Err(FilterError::new(
                    "expected ',' after quoted value",
                    self.pos,
                ));
            }
            return Ok(value);
        }
        while !self.at_condition_end() {
            if self.peek() == Some('"') {
                return Err(FilterError::new(
                    "unexpected '\"' in unquoted value",
                    self.pos,
                ));
            }
            self.pos += 1;
        }
        Ok(self.chars[start..self.pos].iter().collect())
    }

    fn is_value(&mut self) -> Result<IsValue, FilterError> {
        let start = self.pos;
        while !self.at_condition_end() {
            self.pos += 1;
        }
        let raw: String = self.chars[start..self.pos].iter().collect();
        match raw.to_ascii_lowercase().as_str() {
            "null" | "unknown" => Ok(IsValue::Null),
            "true" => Ok(IsValue::True),
            "false" => Ok(IsValue::False),
            _ => Err(FilterError::new(
                format!("invalid is value '{raw}', expected null, true, false or unknown"),
                start,
            )),
        }
    }

    fn skip_spaces(&mut self) {
        while self.peek() == Some(' ') {
            self.pos += 1;
        }
    }

    fn list(&mut self) -> Result<Box<[Literal]>, FilterError> {
        if self.peek() != Some('(') {
            return Err(FilterError::new("expected '(' after in.", self.pos));
        }
        let open = self.pos;
        self.pos += 1;
        let mut items = Vec::new();
        if self.peek() == Some(')') {
            self.pos += 1;
        } else {
            loop {
                self.skip_spaces();
                let item = if self.peek() == Some('"') {
                    let start = self.pos;
                    let item = self
                        .quoted()
                        .ok_or_else(|| FilterError::new("unterminated quoted value", start))?;
                    self.skip_spaces();
                    match self.peek() {
                        None => return Err(FilterError::new("unterminated list", open)),
                        Some(',' | ')') => item,
                        Some(_) => {
                            return Err(FilterError::new("expected ',' or ')' in list", self.pos))
                        }
                    }
                } else {
                    let start = self.pos;
                    loop {
                        match self.peek() {
                            None => return Err(FilterError::new("unterminated list", open)),
                            Some(',' | ')') => break,
                            Some(c @ ('(' | '"')) => {
                                return Err(FilterError::new(
                                    format!("unexpected '{c}' in list"),
                                    self.pos,
                                ))
                            }
                            Some(_) => self.pos += 1,
                        }
                    }
                    let raw: String = self.chars[start..self.pos].iter().collect();
                    raw.trim_end_matches(' ').to_owned()
                };
                items.push(Literal::new(&item));
                let sep = self.peek();
                self.pos += 1;
                if sep == Some(')') {
                    break;
                }
            }
        }
        if !self.at_condition_end() {
            return Err(FilterError::new("expected ',' after list", self.pos));
        }
        Ok(items.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> (String, usize) {
        let e = Filter::parse(text).unwrap_err();
        (e.reason, e.position)
    }

    fn e(reason: &str, position: usize) -> (String, usize) {
        (reason.to_owned(), position)
    }

    #[test]
    fn parses_every_operator() {
        let f = Filter::parse(r#"a=eq.1,b=not.in.(x, "y,z" ,),c=is.NULL,d=ilike.*x\_,"e f"=gt.2"#)
            .unwrap();
        let ops: Vec<_> = f
            .conditions
            .iter()
            .map(|c| (&*c.column, c.negated, c.operator))
            .collect();
        assert_eq!(
            ops,
            [
                ("a", false, Operator::Eq),
                ("b", true, Operator::In),
                ("c", false, Operator::Is),
                ("d", false, Operator::Ilike),
                ("e f", false, Operator::Gt),
            ]
        );
        match &f.conditions[1].test {
            Test::In(items) => {
                let texts: Vec<_> = items.iter().map(|l| &*l.text).collect();
                assert_eq!(texts, ["x", "y,z", ""]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(Filter::parse("").unwrap(), Filter::default());
    }

    #[test]
    fn errors_name_problem_and_position() {
        assert_eq!(err("a=eq.1,"), e("empty condition", 7));
        assert_eq!(err(",a=eq.1"), e("empty condition", 0));
        assert_eq!(err(" a=eq.1"), e("expected column name", 0));
        assert_eq!(err("a"), e("expected '=' after column", 1));
        assert_eq!(err("a-b=eq.1"), e("expected '=' after column", 1));
        assert_eq!(err(r#""a=eq.1"#), e("unterminated quoted column", 0));
        assert_eq!(err(r#"""=eq.1"#), e("empty quoted column", 0));
        assert_eq!(err("a=match.x"), e("unknown operator 'match'", 2));
        assert_eq!(err("a=not.not.eq.1"), e("unknown operator 'not'", 6));
        assert_eq!(err("a=not"), e("unknown operator 'not'", 2));
        assert_eq!(err("a=eq"), e("expected '.' after operator", 4));
        assert_eq!(err("a=eq,b=eq.1"), e("expected '.' after operator", 4));
        assert_eq!(
            err(r#"a=eq.x"y"#),
            e("unexpected '\"' in unquoted value", 6)
        );
        assert_eq!(err(r#"a=eq."x"y"#), e("expected ',' after quoted value", 8));
        assert_eq!(err(r#"a=eq."x"#), e("unterminated quoted value", 5));
        assert_eq!(err("a=in.1"), e("expected '(' after in.", 5));
        assert_eq!(err("a=in.(1,2"), e("unterminated list", 5));
        assert_eq!(err("a=in.(1,(2)"), e("unexpected '(' in list", 8));
        assert_eq!(err(r#"a=in.("1" x)"#), e("expected ',' or ')' in list", 10));
        assert_eq!(err("a=in.(1)x"), e("expected ',' after list", 8));
        assert_eq!(
            err("a=is.nil"),
            e(
                "invalid is value 'nil', expected null, true, false or unknown",
                5
            )
        );
        assert_eq!(err(r"a=like.x\"), e("pattern ends with an escape", 7));
    }

    #[test]
    fn three_valued_logic() {
        let row: Row = [("n", Value::Null), ("x", Value::Int(3))]
            .into_iter()
            .collect();
        let eval = |f: &str| Filter::parse(f).unwrap().conditions[0].evaluate(&row);
        assert_eq!(eval("n=eq.1"), None);
        assert_eq!(eval("n=not.eq.1"), None);
        assert_eq!(eval("n=is.null"), Some(true));
        assert_eq!(eval("n=not.is.null"), Some(false));
        assert_eq!(eval("missing=is.null"), None);
        assert_eq!(eval("x=is.null"), Some(false));
        assert_eq!(eval("x=in.(a,3)"), Some(true));
        assert_eq!(eval("x=eq.a"), None);
        assert_eq!(eval("x=like.3"), None);
        assert_eq!(eval("x=gte.3"), Some(true));
        assert_eq!(eval("x=not.lt.2.5"), Some(true));
    }
}
