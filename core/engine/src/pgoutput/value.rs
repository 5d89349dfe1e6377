//! Column values: what a type OID says about the text Postgres sent, the matcher value it
//! becomes and how it is written in JSON (docs/pgoutput.md, "Values").

use std::borrow::Cow;

use crate::matcher::{parse_int, parse_number, Value};

/// How the text of a scalar value is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scalar {
    /// bool: `t` / `f`.
    Bool,
    /// int2, int4, int8, oid.
    Int,
    /// float4, float8 (`NaN`, `Infinity`, `-Infinity` included).
    Float,
    /// numeric: exact decimal text.
    Numeric,
    /// json, jsonb: the JSON text itself.
    Json,
    /// timestamp, timestamptz: rewritten to ISO 8601 (`T` separator, `+HH:MM` offset).
    Timestamp,
    /// timetz: the offset rewritten to `+HH:MM`.
    TimeTz,
    /// Everything else: the text as Postgres sent it.
    Text,
}

/// How the text of a column value is read: a scalar, or a one-dimensional array of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ValueKind {
    Scalar(Scalar),
    Array(Scalar),
}

/// The built-in types the decoder knows by OID: (oid, pg_type.typname, kind). Other OIDs are
/// named by the decoder's Type messages (or by their number) and read as text.
pub const BUILTIN_TYPES: &[(u32, &str, ValueKind)] = {
    use Scalar::*;
    use ValueKind::{Array as A, Scalar as S};
    &[
        (16, "bool", S(Bool)),
        (17, "bytea", S(Text)),
        (18, "char", S(Text)),
        (19, "name", S(Text)),
        (20, "int8", S(Int)),
        (21, "int2", S(Int)),
        (23, "int4", S(Int)),
        (25, "text", S(Text)),
        (26, "oid", S(Int)),
        (114, "json", S(Json)),
        (142, "xml", S(Text)),
        (650, "cidr", S(Text)),
        (700, "float4", S(Float)),
        (701, "float8", S(Float)),
        (790, "money", S(Text)),
        (829, "macaddr", S(Text)),
        (869, "inet", S(Text)),
        (1042, "bpchar", S(Text)),
        (1043, "varchar", S(Text)),
        (1082, "date", S(Text)),
        (1083, "time", S(Text)),
        (1114, "timestamp", S(Timestamp)),
        (1184, "timestamptz", S(Timestamp)),
        (1186, "interval", S(Text)),
        (1266, "timetz", S(TimeTz)),
        (1560, "bit", S(Text)),
        (1562, "varbit", S(Text)),
        (1700, "numeric", S(Numeric)),
        (2950, "uuid", S(Text)),
        (3614, "tsvector", S(Text)),
        (3802, "jsonb", S(Json)),
        (3904, "int4range", S(Text)),
        (3906, "numrange", S(Text)),
        (3908, "tsrange", S(Text)),
        (3910, "tstzrange", S(Text)),
        (3912, "daterange", S(Text)),
        (3926, "int8range", S(Text)),
        (199, "_json", A(Json)),
        (1000, "_bool", A(Bool)),
        (1001, "_bytea", A(Text)),
        (1002, "_char", A(Text)),
        (1003, "_name", A(Text)),
        (1005, "_int2", A(Int)),
        (1007, "_int4", A(Int)),
        (1009, "_text", A(Text)),
        (1014, "_bpchar", A(Text)),
        (1015, "_varchar", A(Text)),
        (1016, "_int8", A(Int)),
        (1021, "_float4", A(Float)),
        (1022, "_float8", A(Float)),
        (1028, "_oid", A(Int)),
        (1115, "_timestamp", A(Timestamp)),
        (1182, "_date", A(Text)),
        (1183, "_time", A(Text)),
        (1185, "_timestamptz", A(Timestamp)),
        (1231, "_numeric", A(Numeric)),
        (1270, "_timetz", A(TimeTz)),
        (2951, "_uuid", A(Text)),
        (3807, "_jsonb", A(Json)),
    ]
};

/// The name and kind of a built-in type.
pub fn builtin_type(oid: u32) -> Option<(&'static str, ValueKind)> {
    BUILTIN_TYPES
        .iter()
        .find(|(o, _, _)| *o == oid)
        .map(|(_, name, kind)| (*name, *kind))
}

/// The matcher's value for the text of a column of this kind.
pub fn match_value(kind: ValueKind, text: &str) -> Value {
    match kind {
        ValueKind::Array(_) => Value::Text(text.into()),
        ValueKind::Scalar(scalar) => match scalar {
            Scalar::Bool => match text {
                "t" => Value::Bool(true),
                "f" => Value::Bool(false),
                _ => Value::Text(text.into()),
            },
            Scalar::Int => parse_int(text).map_or_else(|| Value::Text(text.into()), Value::Int),
            Scalar::Float => float_value(text),
            Scalar::Numeric => numeric_value(text),
            Scalar::Timestamp => Value::Text(iso_timestamp(text).into()),
            Scalar::TimeTz => Value::Text(iso_timetz(text).into()),
            Scalar::Json | Scalar::Text => Value::Text(text.into()),
        },
    }
}

/// A numeric for the matcher: an integer when the text has no fraction (or only zeros after
/// the point) and fits in i64, else the nearest float.
pub fn numeric_value(text: &str) -> Value {
    let unsigned = text.strip_prefix(['+', '-']).unwrap_or(text);
    let (int_part, frac) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let integral = !int_part.is_empty()
        && int_part.bytes().all(|b| b.is_ascii_digit())
        && frac.bytes().all(|b| b == b'0');
    if integral {
        let digits = &text[..text.len() - unsigned.len() + int_part.len()];
        if let Some(i) = parse_int(digits) {
            return Value::Int(i);
        }
    }
    float_value(text)
}

/// A float for the matcher, read as the matcher reads number literals.
fn float_value(text: &str) -> Value {
    // Postgres' usual output is a JSON number, which Rust parses exactly as `parse_number`
    // would (without its allocation for the nan/infinity check).
    let number = if is_json_number(text) {
        text.parse().ok()
    } else {
        parse_number(text)
    };
    number.map_or_else(|| Value::Text(text.into()), Value::Float)
}

fn digits(b: &[u8], from: usize, n: usize) -> bool {
    b.len() >= from + n && b[from..from + n].iter().all(u8::is_ascii_digit)
}

/// `HH:MM:SS[.fraction]` at `from`: where it ends.
fn time_end(b: &[u8], from: usize) -> Option<usize> {
    if !(digits(b, from, 2)
        && b.get(from + 2) == Some(&b':')
        && digits(b, from + 3, 2)
        && b.get(from + 5) == Some(&b':')
        && digits(b, from + 6, 2))
    {
        return None;
    }
    let mut end = from + 8;
    if b.get(end) == Some(&b'.') && digits(b, end + 1, 1) {
        end += 1;
        while b.get(end).is_some_and(u8::is_ascii_digit) {
            end += 1;
        }
    }
    Some(end)
}

/// A UTC offset `+HH`, `+HH:MM` or `+HH:MM:SS` (or `-`) as `+HH:MM[:SS]`; `None` otherwise.
fn iso_offset(zone: &str) -> Option<Cow<'_, str>> {
    let b = zone.as_bytes();
    let signed = matches!(b.first(), Some(b'+' | b'-')) && digits(b, 1, 2);
    let pair = |at: usize| b[at] == b':' && digits(b, at + 1, 2);
    match b.len() {
        0 => Some(Cow::Borrowed(zone)),
        3 if signed => Some(Cow::Owned(format!("{zone}:00"))),
        6 if signed && pair(3) => Some(Cow::Borrowed(zone)),
        9 if signed && pair(3) && pair(6) => Some(Cow::Borrowed(zone)),
        _ => None,
    }
}

/// Where an ISO 8601 rewrite of `text` splits it: (end of the date, end of the time, whether
/// the offset needs `:00`); `None` if `text` is not `YYYY-MM-DD HH:MM:SS[.f][+HH[:MM[:SS]]]`.
fn timestamp_parts(text: &str) -> Option<(usize, usize, bool)> {
    let b = text.as_bytes();
    let year = b.iter().take_while(|c| c.is_ascii_digit()).count();
    let date_ok = year >= 4
        && b.get(year) == Some(&b'-')
        && digits(b, year + 1, 2)
        && b.get(year + 3) == Some(&b'-')
        && digits(b, year + 4, 2)
        && b.get(year + 6) == Some(&b' ');
    if !date_ok {
        return None;
    }
    let end = time_end(b, year + 7)?;
    let suffix = matches!(iso_offset(&text[end..])?, Cow::Owned(_));
    Some((year + 6, end, suffix))
}

/// `YYYY-MM-DD HH:MM:SS[.f][+HH[:MM[:SS]]]` as ISO 8601: `T` between date and time, and
/// the offset as `+HH:MM`. Any other text (`infinity`, BC dates, other DateStyles) is kept.
pub fn iso_timestamp(text: &str) -> Cow<'_, str> {
    match timestamp_parts(text) {
        Some((date, _, suffix)) => {
            let mut iso = String::with_capacity(text.len() + 3);
            iso.push_str(&text[..date]);
            iso.push('T');
            iso.push_str(&text[date + 1..]);
            if suffix {
                iso.push_str(":00");
            }
            Cow::Owned(iso)
        }
        None => Cow::Borrowed(text),
    }
}

/// Where `HH:MM:SS[.f]+HH` ends its time, if `text` is that (it needs `:00`).
fn timetz_needs_minutes(text: &str) -> bool {
    time_end(text.as_bytes(), 0)
        .and_then(|end| iso_offset(&text[end..]))
        .is_some_and(|zone| matches!(zone, Cow::Owned(_)))
}

/// `HH:MM:SS[.f]+HH` as `HH:MM:SS[.f]+HH:00`; other text is kept.
pub fn iso_timetz(text: &str) -> Cow<'_, str> {
    if timetz_needs_minutes(text) {
        Cow::Owned(format!("{text}:00"))
    } else {
        Cow::Borrowed(text)
    }
}

/// Whether `text` is exactly one JSON number (RFC 8259).
pub fn is_json_number(text: &str) -> bool {
    number_end(text.as_bytes(), 0) == Some(text.len())
}

/// Where the JSON number starting at `i` ends, if one starts there.
fn number_end(b: &[u8], mut i: usize) -> Option<usize> {
    let run = |i: usize| {
        b[i.min(b.len())..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count()
    };
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => i += run(i),
        _ => return None,
    }
    if b.get(i) == Some(&b'.') {
        let n = run(i + 1);
        if n == 0 {
            return None;
        }
        i += 1 + n;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let n = run(i);
        if n == 0 {
            return None;
        }
        i += n;
    }
    Some(i)
}

/// Where the JSON string starting at `i` (a `"`) ends, if it is one.
fn string_end(b: &[u8], mut i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    i += 1;
    loop {
        match *b.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => match *b.get(i + 1)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                b'u' if b.len() >= i + 6 && b[i + 2..i + 6].iter().all(u8::is_ascii_hexdigit) => {
                    i += 6
                }
                _ => return None,
            },
            c if c < 0x20 => return None,
            _ => i += 1,
        }
    }
}

/// Whether `text` is one JSON value (RFC 8259), surrounded by optional whitespace. Iterative,
/// so deep nesting costs memory, not stack.
pub fn is_json(text: &str) -> bool {
    let b = text.as_bytes();
    let ws = |mut i: usize| {
        while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            i += 1;
        }
        i
    };
    // After `{` or `,` in an object: a key and a colon, then a value.
    let member = |i: usize| -> Option<usize> {
        let i = ws(string_end(b, ws(i))?);
        (b.get(i) == Some(&b':')).then(|| ws(i + 1))
    };
    let mut open: Vec<u8> = Vec::new();
    let mut i = ws(0);
    loop {
        // A value starts at i.
        i = match b.get(i) {
            Some(b'{') => {
                let j = ws(i + 1);
                if b.get(j) == Some(&b'}') {
                    j + 1
                } else {
                    open.push(b'}');
                    let Some(j) = member(j) else { return false };
                    i = j;
                    continue;
                }
            }
            Some(b'[') => {
                let j = ws(i + 1);
                if b.get(j) == Some(&b']') {
                    j + 1
                } else {
                    open.push(b']');
                    i = j;
                    continue;
                }
            }
            Some(b'"') => match string_end(b, i) {
                Some(j) => j,
                None => return false,
            },
            Some(b't') if b[i..].starts_with(b"true") => i + 4,
            Some(b'f') if b[i..].starts_with(b"false") => i + 5,
            Some(b'n') if b[i..].starts_with(b"null") => i + 4,
            _ => match number_end(b, i) {
                Some(j) => j,
                None => return false,
            },
        };
        // A value ended at i: close containers until one continues.
        loop {
            i = ws(i);
            let Some(&close) = open.last() else {
                return i == b.len();
            };
            match b.get(i) {
                Some(&c) if c == close => {
                    open.pop();
                    i += 1;
                }
                Some(b',') if close == b']' => {
                    i = ws(i + 1);
                    break;
                }
                Some(b',') => match member(i + 1) {
                    Some(j) => {
                        i = j;
                        break;
                    }
                    None => return false,
                },
                _ => return false,
            }
        }
    }
}

/// The elements of a one-dimensional array in Postgres' text form (`{1,NULL,"a b"}`), `None`
/// for NULL elements; `None` overall for anything else (several dimensions, explicit bounds).
pub fn parse_array(text: &str) -> Option<Vec<Option<Cow<'_, str>>>> {
    let inner = text.strip_prefix('{')?;
    let mut out = Vec::new();
    if inner == "}" {
        return Some(out);
    }
    let mut rest = inner;
    loop {
        if let Some(quoted) = rest.strip_prefix('"') {
            let mut element = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                match chars.next()? {
                    (_, '\\') => element.push(chars.next()?.1),
                    (i, '"') => break i + 1,
                    (_, c) => element.push(c),
                }
            };
            out.push(Some(Cow::Owned(element)));
            rest = &quoted[end..];
        } else {
            let end = rest.find([',', '}'])?;
            let element = &rest[..end];
            if element.is_empty() || element.contains(['{', '"', '\\']) {
                return None;
            }
            out.push((!element.eq_ignore_ascii_case("NULL")).then_some(Cow::Borrowed(element)));
            rest = &rest[end..];
        }
        match rest.as_bytes().first() {
            Some(b',') => rest = &rest[1..],
            Some(b'}') if rest.len() == 1 => return Some(out),
            _ => return None,
        }
    }
}

/// For each byte: 0 if it goes into a JSON string as is, else the letter after its `\\`.
static ESCAPES: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        table[i] = b'u';
        i += 1;
    }
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table[b'\n' as usize] = b'n';
    table[b'\r' as usize] = b'r';
    table[b'\t' as usize] = b't';
    table[0x08] = b'b';
    table[0x0c] = b'f';
    table
};

/// Appends `text` as a JSON string (escapes as Python's `json.dumps(ensure_ascii=False)`).
pub fn write_json_string(out: &mut Vec<u8>, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let mut rest = text.as_bytes();
    while let Some(i) = rest.iter().position(|&c| ESCAPES[c as usize] != 0) {
        out.extend_from_slice(&rest[..i]);
        let c = rest[i];
        match ESCAPES[c as usize] {
            b'u' => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(c >> 4) as usize],
                HEX[(c & 15) as usize],
            ]),
            letter => out.extend_from_slice(&[b'\\', letter]),
        }
        rest = &rest[i + 1..];
    }
    out.extend_from_slice(rest);
    out.push(b'"');
}

/// Appends the JSON for the text of a scalar: booleans and numbers as JSON literals when the
/// text is one, JSON text embedded as is when valid, everything else (and anything that
/// does not read as its type) as a string.
pub fn write_scalar_json(out: &mut Vec<u8>, scalar: Scalar, text: &str) {
    match scalar {
        Scalar::Bool => match text {
            "t" => out.extend_from_slice(b"true"),
            "f" => out.extend_from_slice(b"false"),
            _ => write_json_string(out, text),
        },
        Scalar::Int | Scalar::Float | Scalar::Numeric if is_json_number(text) => {
            out.extend_from_slice(text.as_bytes())
        }
        Scalar::Json if is_json(text) => out.extend_from_slice(text.as_bytes()),
        // A text that matched the patterns is digits and punctuation: no escapes needed.
        Scalar::Timestamp => match timestamp_parts(text) {
            Some((date, _, suffix)) => {
                out.push(b'"');
                out.extend_from_slice(&text.as_bytes()[..date]);
                out.push(b'T');
                out.extend_from_slice(&text.as_bytes()[date + 1..]);
                if suffix {
                    out.extend_from_slice(b":00");
                }
                out.push(b'"');
            }
            None => write_json_string(out, text),
        },
        Scalar::TimeTz if timetz_needs_minutes(text) => {
            out.push(b'"');
            out.extend_from_slice(text.as_bytes());
            out.extend_from_slice(b":00\"");
        }
        _ => write_json_string(out, text),
    }
}

/// Appends the JSON for the text of a column value of this kind. One-dimensional arrays
/// become JSON arrays of their elements; other arrays stay strings.
pub fn write_value_json(out: &mut Vec<u8>, kind: ValueKind, text: &str) {
    match kind {
        ValueKind::Scalar(scalar) => write_scalar_json(out, scalar, text),
        ValueKind::Array(element) => match parse_array(text) {
            Some(items) => {
                out.push(b'[');
                for (n, item) in items.iter().enumerate() {
                    if n > 0 {
                        out.push(b',');
                    }
                    match item {
                        Some(t) => write_scalar_json(out, element, t),
                        None => out.extend_from_slice(b"null"),
                    }
                }
                out.push(b']');
            }
            None => write_json_string(out, text),
        },
    }
}

/// Microseconds since 2000-01-01 00:00 UTC (Postgres' epoch) as
/// `YYYY-MM-DDTHH:MM:SS.mmmZ`, truncated to milliseconds.
pub fn format_commit_time(micros: i64) -> String {
    let mut out = Vec::with_capacity(24);
    write_commit_time(&mut out, micros);
    String::from_utf8(out).expect("ASCII")
}

/// Appends [`format_commit_time`]'s text (without quotes).
pub fn write_commit_time(out: &mut Vec<u8>, micros: i64) {
    let day_micros = 86_400_000_000i64;
    let days = micros.div_euclid(day_micros);
    let in_day = micros.rem_euclid(day_micros);
    // Howard Hinnant's civil_from_days, counting from 1970-01-01 (10957 days before 2000).
    let z = days + 10_957 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let ms = in_day / 1000;
    if (0..10_000).contains(&year) {
        fn digits(out: &mut Vec<u8>, n: i64, width: u32) {
            for p in (0..width).rev() {
                out.push(b'0' + (n / 10i64.pow(p) % 10) as u8);
            }
        }
        digits(out, year, 4);
        out.push(b'-');
        digits(out, month, 2);
        out.push(b'-');
        digits(out, day, 2);
        out.push(b'T');
        digits(out, ms / 3_600_000, 2);
        out.push(b':');
        digits(out, ms / 60_000 % 60, 2);
        out.push(b':');
        digits(out, ms / 1000 % 60, 2);
        out.push(b'.');
        digits(out, ms % 1000, 3);
        out.push(b'Z');
    } else {
        use std::io::Write;
        let _ = write!(
            out,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            ms / 3_600_000,
            ms / 60_000 % 60,
            ms / 1000 % 60,
            ms % 1000
        );
    }
}
