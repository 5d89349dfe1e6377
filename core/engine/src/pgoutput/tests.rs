use proptest::prelude::*;

use super::encode;
use super::*;

fn text(s: &str) -> Datum {
    Datum::Text(s.into())
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn decoded(d: &mut Decoder, bytes: &[u8]) -> Message {
    d.decode(bytes).unwrap_or_else(|e| panic!("{e}"))
}

fn change(d: &mut Decoder, bytes: &[u8]) -> RowChange {
    match decoded(d, bytes) {
        Message::Change(c) => c,
        other => panic!("expected a change, got {other:?}"),
    }
}

fn error(d: &mut Decoder, bytes: &[u8]) -> (String, usize) {
    let e = d.decode(bytes).expect_err("should fail");
    (e.reason, e.offset)
}

/// A decoder that knows relation 1: public.items (id int4 key, name text, doc jsonb,
/// price numeric, at timestamptz, tags int4[]).
fn items() -> Decoder {
    let mut d = Decoder::new();
    decoded(
        &mut d,
        &encode::relation(
            1,
            "public",
            "items",
            b'd',
            &[
                (1, "id", 23, -1),
                (0, "name", 25, -1),
                (0, "doc", 3802, -1),
                (0, "price", 1700, -1),
                (0, "at", 1184, -1),
                (0, "tags", 1007, -1),
            ],
        ),
    );
    d
}

fn item_row(id: &str) -> Vec<Datum> {
    vec![
        text(id),
        text("a \"b\"\n"),
        text(r#"{"k": [1, 2]}"#),
        text("12.50"),
        text("2024-01-02 03:04:05.678+00"),
        text("{1,NULL,3}"),
    ]
}

// Captured from PostgreSQL 15 (pg_logical_slot_peek_binary_changes, proto_version 1).
const CAPTURED_BEGIN: &str = "420000000001929eb0000303d0d7711308000002d7";
const CAPTURED_RELATION: &str =
    "52000040037075626c69630074006400080169640000000017ffffffff006200000000\
10ffffffff006e00000006a4ffffffff006a0000000edaffffffff00747300000004a0ffffffff00747a000000045affff\
ffff006100000003efffffffff006269670000000019ffffffff";

#[test]
fn captured_begin_and_relation() {
    let mut d = Decoder::new();
    let Message::Begin(b) = decoded(&mut d, &hex(CAPTURED_BEGIN)) else {
        panic!()
    };
    assert_eq!(b.final_lsn, 0x1929eb0);
    assert_eq!(b.xid, 727);
    assert_eq!(d.transaction(), Some(b));
    let Message::Relation(r) = decoded(&mut d, &hex(CAPTURED_RELATION)) else {
        panic!()
    };
    assert_eq!((r.relid, &*r.namespace, &*r.name), (16387, "public", "t"));
    assert_eq!(r.replica_identity, b'd');
    let names: Vec<_> = r
        .columns
        .iter()
        .map(|c| (&*c.name, &*c.type_name, c.is_key()))
        .collect();
    assert_eq!(
        names,
        [
            ("id", "int4", true),
            ("b", "bool", false),
            ("n", "numeric", false),
            ("j", "jsonb", false),
            ("ts", "timestamptz", false),
            ("tz", "timestamp", false),
            ("a", "_int4", false),
            ("big", "text", false),
        ]
    );
    assert_eq!(r.columns[0].type_modifier, -1);
    assert!(d.relation(16387).is_some());
}

#[test]
fn transaction_messages() {
    let mut d = Decoder::new();
    assert_eq!(
        decoded(&mut d, &encode::begin(10, -5, 7)),
        Message::Begin(Begin {
            final_lsn: 10,
            commit_time: -5,
            xid: 7
        })
    );
    assert_eq!(
        decoded(&mut d, &encode::origin(3, "node-a")),
        Message::Origin(Origin {
            commit_lsn: 3,
            name: "node-a".into()
        })
    );
    assert_eq!(
        decoded(&mut d, &encode::commit(0, 10, 20, 99)),
        Message::Commit(Commit {
            flags: 0,
            commit_lsn: 10,
            end_lsn: 20,
            commit_time: 99
        })
    );
    assert_eq!(d.transaction(), None);
    let Message::Message(m) = decoded(&mut d, &encode::message(1, 5, "pfx", b"\x00\xff")) else {
        panic!()
    };
    assert!(m.transactional());
    assert_eq!(
        (&*m.prefix, &*m.content, m.lsn),
        ("pfx", &b"\x00\xff"[..], 5)
    );
    assert_eq!(decoded(&mut d, b"S\x00\x01"), Message::Unknown(b'S'));
}

#[test]
fn types_name_columns_and_pg_catalog_is_the_empty_namespace() {
    let mut d = Decoder::new();
    let Message::Type(t) = decoded(&mut d, &encode::type_info(16400, "", "mood")) else {
        panic!()
    };
    assert_eq!((&*t.namespace, &*t.name), ("pg_catalog", "mood"));
    let Message::Relation(r) = decoded(
        &mut d,
        &encode::relation(
            5,
            "s",
            "t",
            b'f',
            &[(0, "m", 16400, -1), (0, "x", 99999, 4)],
        ),
    ) else {
        panic!()
    };
    assert_eq!(&*r.columns[0].type_name, "mood");
    assert_eq!(&*r.columns[1].type_name, "99999");
    assert_eq!(r.columns[1].kind, ValueKind::Scalar(Scalar::Text));
}

#[test]
fn insert_becomes_a_row_event_and_a_payload() {
    let mut d = items();
    decoded(&mut d, &encode::begin(1, 0, 9));
    let c = change(&mut d, &encode::insert(1, &item_row("7")));
    let ev = c.row_event();
    assert_eq!(ev.kind, ChangeKind::Insert);
    assert_eq!((&*ev.schema, &*ev.table), ("public", "items"));
    let rec = ev.record.unwrap();
    assert_eq!(rec.get("id"), Some(&Value::Int(7)));
    assert_eq!(
        rec.get("doc"),
        Some(&Value::Text(r#"{"k": [1, 2]}"#.into()))
    );
    assert_eq!(rec.get("price"), Some(&Value::Float(12.5)));
    assert_eq!(
        rec.get("at"),
        Some(&Value::Text("2024-01-02T03:04:05.678+00:00".into()))
    );
    assert_eq!(rec.get("tags"), Some(&Value::Text("{1,NULL,3}".into())));
    assert!(ev.old_record.is_none());
    let json = String::from_utf8(c.to_json(None)).unwrap();
    assert_eq!(
        json,
        concat!(
            r#"{"schema":"public","table":"items","commit_timestamp":"2000-01-01T00:00:00.000Z","#,
            r#""type":"INSERT","columns":[{"name":"id","type":"int4"},{"name":"name","type":"text"},"#,
            r#"{"name":"doc","type":"jsonb"},{"name":"price","type":"numeric"},"#,
            r#"{"name":"at","type":"timestamptz"},{"name":"tags","type":"_int4"}],"#,
            r#""record":{"id":7,"name":"a \"b\"\n","doc":{"k": [1, 2]},"price":12.50,"#,
            r#""at":"2024-01-02T03:04:05.678+00:00","tags":[1,null,3]},"errors":null}"#
        )
    );
}

#[test]
fn update_and_delete_with_key_tuples() {
    let mut d = items();
    let c = change(&mut d, &encode::update(1, None, &item_row("1")));
    assert_eq!(c.transaction, None);
    assert!(c.old_record().is_none());
    let json = String::from_utf8(c.to_json(None)).unwrap();
    assert!(json.contains(r#""old_record":{},"errors":null}"#), "{json}");
    assert!(json.contains(r#""commit_timestamp":null"#));
    let key = [
        text("1"),
        Datum::Null,
        Datum::Null,
        Datum::Null,
        Datum::Null,
        Datum::Null,
    ];
    let c = change(
        &mut d,
        &encode::update(1, Some((OldTuple::Key, &key)), &item_row("2")),
    );
    assert_eq!(c.old_kind, Some(OldTuple::Key));
    // A key tuple's non-key columns are not values: they are left out, not null.
    let old = c.old_record().unwrap();
    assert_eq!(old.len(), 1);
    assert_eq!(old.get("id"), Some(&Value::Int(1)));
    let c = change(&mut d, &encode::delete(1, OldTuple::Key, &key));
    let ev = c.row_event();
    assert!(ev.record.is_none());
    assert_eq!(ev.filtered_row().unwrap().len(), 1);
    let json = String::from_utf8(c.to_json(None)).unwrap();
    assert!(json.ends_with(r#""type":"DELETE","columns":[{"name":"id","type":"int4"},{"name":"name","type":"text"},{"name":"doc","type":"jsonb"},{"name":"price","type":"numeric"},{"name":"at","type":"timestamptz"},{"name":"tags","type":"_int4"}],"old_record":{"id":1},"errors":null}"#), "{json}");
}

#[test]
fn unchanged_toast_is_absent_or_taken_from_the_full_old_row() {
    let mut d = items();
    let mut new = item_row("1");
    new[1] = Datum::Unchanged;
    let c = change(&mut d, &encode::update(1, None, &new));
    let rec = c.record().unwrap();
    assert_eq!(rec.get("name"), None);
    assert_eq!(rec.len(), 5);
    let json = String::from_utf8(c.to_json(None)).unwrap();
    assert!(json.contains(r#""record":{"id":1,"doc":"#), "{json}");
    let mut old = item_row("1");
    old[1] = text("big");
    let c = change(
        &mut d,
        &encode::update(1, Some((OldTuple::Full, &old)), &new),
    );
    assert_eq!(
        c.record().unwrap().get("name"),
        Some(&Value::Text("big".into()))
    );
    assert_eq!(c.old_record().unwrap().len(), 6);
    // Null is a value, distinct from unchanged.
    new[1] = Datum::Null;
    let c = change(&mut d, &encode::update(1, None, &new));
    assert_eq!(c.record().unwrap().get("name"), Some(&Value::Null));
}

#[test]
fn oversized_payloads_keep_small_fields_and_say_why() {
    let mut d = items();
    let mut row = item_row("3");
    row[1] = text(&"x".repeat(1000));
    let c = change(&mut d, &encode::insert(1, &row));
    let full = c.to_json(None);
    assert_eq!(c.to_json(Some(full.len())), full);
    let cut = String::from_utf8(c.to_json(Some(500))).unwrap();
    assert!(cut.len() < 500, "{cut}");
    assert!(!cut.contains("xxx"));
    assert!(cut.contains(r#""id":3"#));
    assert!(cut.ends_with(r#""errors":"Error 413: Payload Too Large"}"#));
}

#[test]
fn truncate_resolves_relations() {
    let mut d = items();
    let Message::Truncate(t) = decoded(&mut d, &encode::truncate(3, &[1])) else {
        panic!()
    };
    assert_eq!(t.options, 3);
    assert_eq!(&*t.relations[0].name, "items");
    assert_eq!(
        error(&mut d, &encode::truncate(0, &[1, 2])),
        ("unknown relation id 2".into(), 10)
    );
}

#[test]
fn errors_say_what_and_where() {
    let mut d = items();
    assert_eq!(error(&mut d, b""), ("empty message".into(), 0));
    assert_eq!(
        error(&mut d, b"B\0\0"),
        ("unexpected end of message reading final LSN".into(), 1)
    );
    assert_eq!(
        error(&mut d, &encode::insert(2, &[])),
        ("unknown relation id 2".into(), 1)
    );
    assert_eq!(
        error(&mut d, &encode::insert(1, &[text("1")])),
        ("tuple has 1 columns, relation public.items has 6".into(), 6)
    );
    let mut bytes = encode::insert(1, &item_row("1"));
    bytes[8] = b'b';
    assert_eq!(
        error(&mut d, &bytes),
        ("binary tuple data is not supported".into(), 8)
    );
    bytes[8] = b'x';
    assert_eq!(
        error(&mut d, &bytes),
        ("unknown column kind 0x78".into(), 8)
    );
    let mut bytes = encode::insert(1, &item_row("1"));
    bytes[13] = 0xff;
    assert_eq!(
        error(&mut d, &bytes),
        ("invalid UTF-8 in column value".into(), 13)
    );
    let mut bytes = encode::begin(1, 2, 3);
    bytes.push(0);
    assert_eq!(
        error(&mut d, &bytes),
        ("1 unexpected trailing bytes".into(), 21)
    );
    assert_eq!(
        error(
            &mut d,
            &encode::delete(1, OldTuple::Key, &[])[..5]
                .iter()
                .chain(b"N")
                .copied()
                .collect::<Vec<_>>()
        ),
        ("expected tuple kind 'K' or 'O', got 0x4e".into(), 5)
    );
    assert_eq!(
        error(&mut d, b"O\0\0\0\0\0\0\0\0abc"),
        ("unterminated string reading origin name".into(), 9)
    );
    let mut neg = encode::message(0, 0, "p", b"");
    let n = neg.len();
    neg[n - 4..].copy_from_slice(&(-1i32).to_be_bytes());
    assert_eq!(
        error(&mut d, &neg),
        ("negative content length -1".into(), 12)
    );
    // A failed message changes nothing.
    assert!(d.transaction().is_none());
    assert!(d.relation(2).is_none());
}

#[test]
fn values() {
    use Scalar::*;
    let s = |k| ValueKind::Scalar(k);
    assert_eq!(match_value(s(Bool), "t"), Value::Bool(true));
    assert_eq!(match_value(s(Bool), "x"), Value::Text("x".into()));
    assert_eq!(
        match_value(s(Int), "-9223372036854775808"),
        Value::Int(i64::MIN)
    );
    assert_eq!(match_value(s(Int), "4294967295"), Value::Int(4294967295));
    assert!(matches!(match_value(s(Float), "NaN"), Value::Float(f) if f.is_nan()));
    assert_eq!(
        match_value(s(Float), "-Infinity"),
        Value::Float(f64::NEG_INFINITY)
    );
    assert_eq!(match_value(s(Float), "1e+20"), Value::Float(1e20));
    assert_eq!(numeric_value("12.000"), Value::Int(12));
    assert_eq!(numeric_value("-0.0"), Value::Int(0));
    assert_eq!(numeric_value("12.5"), Value::Float(12.5));
    assert_eq!(numeric_value("99999999999999999999"), Value::Float(1e20));
    assert_eq!(numeric_value("Infinity"), Value::Float(f64::INFINITY));
    assert_eq!(numeric_value("."), Value::Text(".".into()));
    assert_eq!(iso_timestamp("2024-01-02 03:04:05"), "2024-01-02T03:04:05");
    assert_eq!(
        iso_timestamp("2024-01-02 03:04:05.5-05:30"),
        "2024-01-02T03:04:05.5-05:30"
    );
    assert_eq!(
        iso_timestamp("12024-01-02 03:04:05+01"),
        "12024-01-02T03:04:05+01:00"
    );
    assert_eq!(
        iso_timestamp("2024-01-02 03:04:05 BC"),
        "2024-01-02 03:04:05 BC"
    );
    assert_eq!(iso_timestamp("infinity"), "infinity");
    assert_eq!(iso_timetz("03:04:05+02"), "03:04:05+02:00");
    assert_eq!(iso_timetz("03:04:05.1-02:30"), "03:04:05.1-02:30");
    for ok in ["0", "-1.5e+3", "1E9", "0.0"] {
        assert!(is_json_number(ok), "{ok}");
    }
    for bad in ["01", "+1", "1.", ".5", "NaN", "Infinity", "1e", "", "-"] {
        assert!(!is_json_number(bad), "{bad}");
    }
    for ok in [
        "{}",
        " [ ] ",
        r#"{"a": [1, {"b": null}], "c": "\u00e9\n"}"#,
        "true",
        "\"x\"",
        "-0",
        "[[[[]]]]",
        r#"{"a":1,"b":2}"#,
    ] {
        assert!(is_json(ok), "{ok}");
    }
    for bad in [
        "",
        "{",
        "[1,]",
        "{\"a\"}",
        "{\"a\":1,}",
        "[1 2]",
        "tru",
        "nul",
        "\"\t\"",
        "\"\\x\"",
        "{1:2}",
        "[1]]",
        "'a'",
        "NaN",
        "\"\\u12\"",
    ] {
        assert!(!is_json(bad), "{bad}");
    }
    assert!(is_json(
        &"[".repeat(100_000)
            .chars()
            .chain("]".repeat(100_000).chars())
            .collect::<String>()
    ));
    let items = |t| {
        parse_array(t).map(|v| {
            v.into_iter()
                .map(|x| x.map(|c| c.into_owned()))
                .collect::<Vec<_>>()
        })
    };
    assert_eq!(items("{}"), Some(vec![]));
    assert_eq!(
        items(r#"{1,NULL,"NULL","a \"b\\",x}"#),
        Some(vec![
            Some("1".into()),
            None,
            Some("NULL".into()),
            Some("a \"b\\".into()),
            Some("x".into())
        ])
    );
    for bad in [
        "{{1},{2}}",
        "[0:1]={1,2}",
        "{1,}",
        "{",
        "{1}x",
        "{\"a}",
        "1",
    ] {
        assert_eq!(items(bad), None, "{bad}");
    }
    let json = |kind, t| {
        let mut out = Vec::new();
        write_value_json(&mut out, kind, t);
        String::from_utf8(out).unwrap()
    };
    assert_eq!(json(s(Float), "NaN"), "\"NaN\"");
    assert_eq!(json(s(Numeric), "1.10"), "1.10");
    assert_eq!(json(s(Json), "{bad"), "\"{bad\"");
    assert_eq!(json(s(Text), "\u{1}\u{7f}é"), "\"\\u0001\u{7f}é\"");
    assert_eq!(
        json(ValueKind::Array(Text), r#"{"a,b",NULL}"#),
        r#"["a,b",null]"#
    );
    assert_eq!(json(ValueKind::Array(Bool), "{t,f}"), "[true,false]");
    assert_eq!(json(ValueKind::Array(Int), "{{1},{2}}"), "\"{{1},{2}}\"");
    assert_eq!(
        json(ValueKind::Array(Timestamp), r#"{"2024-01-02 03:04:05"}"#),
        r#"["2024-01-02T03:04:05"]"#
    );
    assert_eq!(format_commit_time(0), "2000-01-01T00:00:00.000Z");
    assert_eq!(format_commit_time(-1), "1999-12-31T23:59:59.999Z");
    assert_eq!(
        format_commit_time(789_000_123_456_789),
        "2024-12-31T22:42:03.456Z"
    );
    assert!(format_commit_time(i64::MIN).starts_with("-290278-12-22T"));
    assert!(format_commit_time(i64::MAX).starts_with("294277-01-09T"));
}

#[test]
fn builtin_table_has_each_oid_once() {
    let mut oids: Vec<u32> = BUILTIN_TYPES.iter().map(|t| t.0).collect();
    oids.sort_unstable();
    oids.dedup();
    assert_eq!(oids.len(), BUILTIN_TYPES.len());
}

fn arb_datum() -> impl Strategy<Value = Datum> {
    prop_oneof![
        Just(Datum::Null),
        Just(Datum::Unchanged),
        ".{0,12}".prop_map(|s| Datum::Text(s.into())),
    ]
}

const OIDS: [u32; 12] = [16, 20, 23, 25, 114, 700, 1009, 1114, 1184, 1266, 1700, 3802];

prop_compose! {
    fn arb_relation()(
        relid in 0u32..4,
        columns in prop::collection::vec(("[a-z]{1,6}", 0u8..3, prop::sample::select(&OIDS[..])), 0..6),
        identity in prop::sample::select(&b"dnfi"[..]),
    ) -> (u32, u8, Vec<(u8, String, u32)>) {
        (relid, identity, columns.into_iter().map(|(n, f, o)| (f, n, o)).collect())
    }
}

fn relation_bytes(relid: u32, identity: u8, columns: &[(u8, String, u32)]) -> Vec<u8> {
    let specs: Vec<encode::ColumnSpec<'_>> = columns
        .iter()
        .map(|(f, n, o)| (*f, n.as_str(), *o, -1))
        .collect();
    encode::relation(relid, "s", "t", identity, &specs)
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(
        rel in arb_relation(),
        tag in prop::sample::select(&b"BCORYIUDTMSx"[..]),
        body in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut d = Decoder::new();
        d.decode(&relation_bytes(rel.0, rel.1, &rel.2)).unwrap();
        let mut bytes = vec![tag];
        bytes.extend(body);
        if let Ok(Message::Change(c)) = d.decode(&bytes) {
            let _ = c.row_event();
            let _ = c.to_json(Some(10));
        }
    }

    #[test]
    fn fully_arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let mut d = items();
        let _ = d.decode(&bytes);
    }

    #[test]
    fn round_trip_and_every_prefix_fails(
        rel in arb_relation(),
        rows in prop::collection::vec(prop::collection::vec(arb_datum(), 6), 1..4),
        kind in 0u8..5,
        commit_time in any::<i64>(),
    ) {
        let mut d = Decoder::new();
        let relation = relation_bytes(rel.0, rel.1, &rel.2);
        let Message::Relation(r) = d.decode(&relation).unwrap() else { panic!() };
        prop_assert_eq!(r.columns.len(), rel.2.len());
        d.decode(&encode::begin(1, commit_time, 2)).unwrap();
        let n = rel.2.len();
        let new: Vec<Datum> = rows[0][..n].to_vec();
        let old: Vec<Datum> = rows[rows.len() - 1][..n].to_vec();
        let (bytes, old_kind) = match kind {
            0 => (encode::insert(rel.0, &new), None),
            1 => (encode::update(rel.0, None, &new), None),
            2 => (encode::update(rel.0, Some((OldTuple::Full, &old)), &new), Some(OldTuple::Full)),
            3 => (encode::delete(rel.0, OldTuple::Key, &old), Some(OldTuple::Key)),
            _ => (encode::delete(rel.0, OldTuple::Full, &old), Some(OldTuple::Full)),
        };
        let Message::Change(c) = d.decode(&bytes).unwrap() else { panic!() };
        prop_assert_eq!(c.old_kind, old_kind);
        prop_assert_eq!(c.old.as_ref(), old_kind.map(|_| &old));
        prop_assert_eq!(c.new.as_ref(), (kind < 3).then_some(&new));
        prop_assert_eq!(c.transaction.map(|t| t.commit_time), Some(commit_time));
        let json = c.to_json(None);
        prop_assert!(std::str::from_utf8(&json).is_ok());
        for cut in 0..bytes.len() {
            prop_assert!(d.decode(&bytes[..cut]).is_err(), "prefix {} decoded", cut);
        }
        for cut in 0..relation.len() {
            prop_assert!(d.decode(&relation[..cut]).is_err());
        }
    }

    #[test]
    fn json_strings_and_values_are_valid_json(s in ".{0,20}", kind in prop::sample::select(&OIDS[..])) {
        let mut out = Vec::new();
        write_json_string(&mut out, &s);
        prop_assert!(is_json(std::str::from_utf8(&out).unwrap()));
        out.clear();
        write_value_json(&mut out, builtin_type(kind).unwrap().1, &s);
        prop_assert!(is_json(std::str::from_utf8(&out).unwrap()), "{}", String::from_utf8_lossy(&out));
    }
}
