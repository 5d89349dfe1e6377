//! Criterion benchmark of the pgoutput decoder alone (no Python): decoding 10-column INSERTs,
//! building the matcher's row event and encoding the JSON payload. The end-to-end numbers
//! come from benches/pgoutput.py.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use pyrt_engine::pgoutput::{encode, Datum, Decoder, Message};

fn row(i: u32) -> Vec<Datum> {
    let text = |s: String| Datum::Text(s.into());
    vec![
        text(format!("{}", 1_000_000 + i)),
        text(format!("{}", i % 1000)),
        text(format!("User {i} Chloé")),
        text(format!("user{i}@example.com")),
        text(format!("{}.{:02}", i * 7, i % 100)),
        text("t".into()),
        text(format!("2026-01-{:02} 12:34:05.123456+00", 1 + i % 28)),
        text(format!(
            r#"{{"tags": ["a", "b"], "n": {}, "ok": true}}"#,
            i % 100
        )),
        text("paid".into()),
        text(format!("{}.{}", i % 100, i)),
    ]
}

fn decoder() -> Decoder {
    let mut d = Decoder::new();
    let columns = [
        (1, "id", 20, -1),
        (0, "user_id", 23, -1),
        (0, "name", 25, -1),
        (0, "email", 25, -1),
        (0, "amount", 1700, -1),
        (0, "active", 16, -1),
        (0, "created_at", 1184, -1),
        (0, "meta", 3802, -1),
        (0, "status", 25, -1),
        (0, "score", 701, -1),
    ];
    d.decode(&encode::relation(1, "public", "orders", b'd', &columns))
        .unwrap();
    d.decode(&encode::begin(1, 800_000_000_000_000, 7)).unwrap();
    d
}

fn bench(c: &mut Criterion) {
    let payloads: Vec<Vec<u8>> = (0..1024).map(|i| encode::insert(1, &row(i))).collect();
    let mut group = c.benchmark_group("pgoutput_10col_insert_x1024");
    let mut d = decoder();
    group.bench_function("decode", |b| {
        b.iter(|| {
            for p in &payloads {
                black_box(d.decode(p).unwrap());
            }
        })
    });
    let changes: Vec<_> = payloads
        .iter()
        .map(|p| match d.decode(p).unwrap() {
            Message::Change(c) => c,
            _ => unreachable!(),
        })
        .collect();
    group.bench_function("row_event", |b| {
        b.iter(|| {
            for c in &changes {
                black_box(c.row_event());
            }
        })
    });
    group.bench_function("to_json", |b| {
        b.iter(|| {
            for c in &changes {
                black_box(c.to_json(Some(1 << 20)));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
