//! A real `kill -9`: a child process appends (and acknowledges uploads) as fast as it can;
//! it is killed at random moments, and after each kill the cache is reopened and every
//! acknowledged record is checked byte for byte.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use churnlog::cache::{Cache, Options};

#[derive(Default)]
struct Seen {
    /// (stream, seq) → length of every record the child saw acknowledged durable.
    acked: HashMap<(u32, u64), usize>,
    uploaded: HashMap<u32, u64>,
}

#[test]
fn kill_minus_nine_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let iterations = 6;
    for i in 0..iterations {
        let mut child = Command::new(env!("CARGO_BIN_EXE_churnlog"))
            .args(["torture", "--dir"])
            .arg(dir.path())
            .args(["--streams", "4", "--seed", &i.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn churnlog torture");
        let stdout = child.stdout.take().unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let reader = {
            let seen = seen.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let parts: Vec<&str> = line.split_whitespace().collect();
                    let mut s = seen.lock().unwrap();
                    match parts.as_slice() {
                        ["READY"] => {
                            let _ = ready_tx.send(());
                        }
                        ["ACK", st, seq, len] => {
                            s.acked.insert((st.parse().unwrap(), seq.parse().unwrap()), len.parse().unwrap());
                        }
                        ["UPLOADED", st, upto] => {
                            s.uploaded.insert(st.parse().unwrap(), upto.parse().unwrap());
                        }
                        _ => panic!("unexpected line from child: {line}"),
                    }
                }
            })
        };
        ready_rx.recv_timeout(Duration::from_secs(30)).expect("child became ready");
        // Kill at a pseudo-random moment after the child started working.
        std::thread::sleep(Duration::from_millis(150 + (i as u64 * 7919) % 400));
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        reader.join().unwrap();

        let opts = Options {
            segment_size: 1 << 20,
            capacity_bytes: 256 << 20,
            record_size_max: 64 << 10,
            commit_bytes_max: 256 << 10,
            background_reclaim: false,
            ..Options::default()
        };
        let cache =
            Cache::open(dir.path(), opts).unwrap_or_else(|e| panic!("iteration {i}: reopen after kill -9: {e}"));
        let report = cache.recovery_report().clone();
        assert!(report.damage.is_empty() && report.damaged_streams.is_empty(), "iteration {i}: {report:?}");
        let s = seen.lock().unwrap();
        assert!(!s.acked.is_empty(), "the child acknowledged nothing before it was killed");
        let mut buf = Vec::new();
        let mut checked = 0;
        for info in cache.streams() {
            let stream = info.id.0;
            let max_acked = s.acked.keys().filter(|(st, _)| *st == stream).map(|(_, q)| *q).max().unwrap_or(0);
            assert!(
                info.durable_upto >= max_acked,
                "iteration {i}: stream {stream} durable to {} but {max_acked} was acknowledged",
                info.durable_upto
            );
            assert!(info.uploaded_upto >= s.uploaded.get(&stream).copied().unwrap_or(0));
            for seq in info.uploaded_upto + 1..=info.durable_upto {
                let got = cache
                    .read(info.id, seq)
                    .unwrap_or_else(|e| panic!("iteration {i}: stream {stream} seq {seq}: {e}"));
                let len = churnlog::bench::record_len(stream, seq, 1, 48 << 10);
                churnlog::bench::record_bytes(stream, seq, len, 0.5, &mut buf);
                assert_eq!(got, buf, "iteration {i}: stream {stream} seq {seq} differs");
                if let Some(&acked_len) = s.acked.get(&(stream, seq)) {
                    assert_eq!(acked_len, len);
                }
                checked += 1;
            }
        }
        assert!(cache.verify().is_clean());
        eprintln!(
            "iteration {i}: {} acknowledged so far, {checked} cached records checked, torn tail: {:?}",
            s.acked.len(),
            report.torn_tail.is_some()
        );
    }
}
