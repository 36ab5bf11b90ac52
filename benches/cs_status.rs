//! Criterion bench of the configuration server's status report at fleet scale: 100
//! process servers with 200 machines each (20,000), every server with a stored heartbeat
//! report, in a SQLite database. It times the parts of `GET /api/v1/status` apart: the
//! database snapshot, building the report from it, and serialising the JSON answer.
//! Run: `cargo bench --bench cs_status`.

use churnlog::control::api::{Heartbeat, MachineReport, PsRegistration};
use churnlog::control::cs::db::Db;
use churnlog::control::cs::status;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

const PROCESS_SERVERS: usize = 100;
const MACHINES_PER_PS: usize = 200;

fn fleet(rt: &tokio::runtime::Runtime, dir: &std::path::Path) -> Db {
    rt.block_on(async {
        let db = Db::open(dir.join("cs.db").to_str().unwrap(), std::time::Duration::from_secs(900)).await.unwrap();
        let now = churnlog::control::cs::now_ms();
        for p in 0..PROCESS_SERVERS {
            let id = format!("ps-{p:03}");
            let reg = PsRegistration {
                id: id.clone(),
                address: format!("127.0.0.1:{}", 10_000 + p),
                cert_pem: "-----BEGIN CERTIFICATE-----\n".repeat(10),
                version: churnlog::control::VERSION.to_string(),
                cache_size_bytes: 1 << 40,
            };
            db.register_ps(&reg, now).await.unwrap();
            // A first heartbeat makes it connected and healthy, so placement uses it.
            db.heartbeat(&Heartbeat { id: id.clone(), cache_free_percent: 90.0, ..Default::default() }, now)
                .await
                .unwrap();
            for m in 0..MACHINES_PER_PS {
                let name = format!("m-{p:03}-{m:03}");
                db.register_machine(&name, "00", now).await.unwrap();
                db.assignment(&name, now).await.unwrap();
            }
        }
        let snapshot = db.snapshot().await.unwrap();
        for ps in &snapshot.process_servers {
            let machines = snapshot
                .machines
                .iter()
                .filter(|m| m.ps_id.as_deref() == Some(ps.id.as_str()))
                .map(|m| MachineReport {
                    name: m.name.clone(),
                    rpo_seconds: Some(12.5),
                    resync_required: false,
                    pending_bytes: 1 << 20,
                })
                .collect();
            let hb = Heartbeat { id: ps.id.clone(), cache_free_percent: 80.0, machines, ..Default::default() };
            db.heartbeat(&hb, now).await.unwrap();
        }
        db
    })
}

fn status_report(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = fleet(&rt, dir.path());
    let snapshot = rt.block_on(db.snapshot()).unwrap();
    assert_eq!(snapshot.machines.len(), PROCESS_SERVERS * MACHINES_PER_PS);
    let now = churnlog::control::cs::now_ms();
    let report = status::build(&snapshot, now, 900_000);
    let mut g = c.benchmark_group("cs_status_20000_machines");
    g.sample_size(20);
    // The parts, the database snapshot with its cache warm.
    g.bench_function("snapshot", |b| b.iter(|| rt.block_on(db.snapshot()).unwrap()));
    g.bench_function("build", |b| b.iter(|| status::build(&snapshot, now, 900_000)));
    g.bench_function("serialize", |b| b.iter(|| serde_json::to_vec(&report).unwrap()));
    let whole = || {
        let s = rt.block_on(db.snapshot()).unwrap();
        serde_json::to_vec(&status::build(&s, churnlog::control::cs::now_ms(), 900_000)).unwrap()
    };
    // Nothing changed since the last status request.
    g.bench_function("whole_unchanged", |b| b.iter(whole));
    // One server's heartbeat since the last request (its report is parsed again).
    let hb = rt.block_on(async { db.snapshot().await.unwrap().reports.values().next().unwrap().as_ref().clone() });
    g.bench_function("whole_after_a_heartbeat", |b| {
        b.iter_batched(
            || rt.block_on(db.heartbeat(&hb, churnlog::control::cs::now_ms())).unwrap(),
            |_| whole(),
            BatchSize::PerIteration,
        )
    });
    // A machine registered since the last request (the machine list is read again).
    let mut n = 0;
    g.bench_function("whole_after_a_machine_change", |b| {
        b.iter_batched(
            || {
                n += 1;
                rt.block_on(db.register_machine(&format!("new-{n}"), "00", churnlog::control::cs::now_ms())).unwrap()
            },
            |_| whole(),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, status_report);
criterion_main!(benches);
