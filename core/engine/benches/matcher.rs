//! Criterion benchmark of the engine alone (no Python): one row event against N eq-filtered
//! subscriptions. The end-to-end numbers users care about come from benches/matcher.py.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use pyrt_engine::matcher::{ChangeKind, Matcher, Row, RowEvent, Value};

fn build(n: u64) -> Matcher {
    let mut m = Matcher::new();
    for i in 0..n {
        let table = ["orders", "messages", "profiles"][(i % 3) as usize];
        m.add_rows(
            i,
            "*",
            "public",
            table,
            Some(&format!("user_id=eq.{}", i / 3)),
        )
        .unwrap();
    }
    m
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("match_row_eq");
    for n in [10_000u64, 100_000, 1_000_000] {
        let m = build(n);
        let events: Vec<RowEvent> = (0..1024u64)
            .map(|i| {
                let mut row = Row::new();
                row.set("user_id", Value::Int(((i * 7919) % (n / 3)) as i64));
                row.set("body", Value::Text("hello".into()));
                RowEvent {
                    kind: ChangeKind::Insert,
                    schema: "public".into(),
                    table: "messages".into(),
                    record: Some(row),
                    old_record: None,
                }
            })
            .collect();
        group.bench_with_input(BenchmarkId::from_parameter(n), &events, |b, events| {
            let mut out = Vec::new();
            b.iter(|| {
                for e in events {
                    out.clear();
                    m.match_row(black_box(e), &mut out);
                }
                black_box(out.len())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
