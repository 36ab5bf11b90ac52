//! `churnlog torture` (hidden): the child process the crash tests kill -9.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use churnlog::bench;
use churnlog::cache::{Cache, Options};

/// Crash-test child: appends forever and prints each durable acknowledgement.
#[derive(clap::Args)]
pub struct TortureArgs {
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value_t = 4)]
    streams: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Appends records of deterministic content until killed; prints `ACK stream seq len`
/// once each is durable and `UPLOADED stream upto` after each upload acknowledgement.
pub fn run(args: TortureArgs) -> anyhow::Result<ExitCode> {
    let TortureArgs { dir, streams, seed } = args;
    let opts = Options {
        segment_size: 1 << 20,
        capacity_bytes: 256 << 20,
        record_size_max: 64 << 10,
        commit_bytes_max: 256 << 10,
        ..Options::default()
    };
    let cache = Cache::open(&dir, opts)?;
    let ids: Vec<_> = (0..streams).map(|i| cache.stream(&format!("m{i}"), "d0")).collect::<Result<_, _>>()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY")?;
    out.flush()?;
    let mut buf = Vec::new();
    let mut round = seed;
    loop {
        round += 1;
        let mut tickets = Vec::new();
        for &s in &ids {
            // One record per stream per round, all settled before the next: the next
            // sequence is the one after the last durable record.
            let seq = cache.stream_info(s).map_or(1, |i| i.durable_upto + 1);
            let len = bench::record_len(s.0, seq, 1, 48 << 10);
            bench::record_bytes(s.0, seq, len, 0.5, &mut buf);
            let t = cache.append(s, &buf)?;
            anyhow::ensure!(t.seq == seq, "sequence {} assigned where {} was expected", t.seq, seq);
            tickets.push((t, len));
        }
        for (t, len) in tickets {
            let (stream, seq) = (t.stream, t.seq);
            t.wait()?;
            writeln!(out, "ACK {} {} {}", stream.0, seq, len)?;
        }
        out.flush()?;
        if round.is_multiple_of(16) {
            for &s in &ids {
                let info = cache.stream_info(s).expect("stream");
                let upto = info.durable_upto.saturating_sub(20);
                if upto > info.uploaded_upto {
                    cache.ack(s, upto)?;
                    writeln!(out, "UPLOADED {} {}", s.0, upto)?;
                }
            }
            cache.reclaim()?;
            out.flush()?;
        }
    }
}
