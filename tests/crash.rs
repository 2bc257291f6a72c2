//! Crash safety: a worker dies at 23 different points of a backfill — kill -9 while indexing, and aborts
//! at failpoints just before and after a block's write, between a window's ingested rows and its
//! checkpoint, between a resolution lookup and its write, between its ingested rows and the rest, after
//! it, and on the owner side right after recording a spend for a peer — then restarts on its data
//! directory. Every time, the answers are exactly the reference's: no manual step, no resync.

mod common;

use chainidx::sandbox::SandboxBuilder;
use chainidx_core::generator::{GenConfig, generate};
use chainidx_node::failpoint;
use common::check::{Api, check_script, check_tx};
use common::reference::Reference;
use std::time::{Duration, Instant};

/// How worker `victim` dies in one run.
enum Crash {
    /// kill -9 once this share of all blocks is indexed.
    KillAt(f64),
    /// Abort the n-th time the failpoint is reached.
    Failpoint(&'static str, usize),
}

fn crash_points() -> Vec<Crash> {
    let mut points: Vec<Crash> = (1..=8).map(|i| Crash::KillAt(i as f64 / 9.0)).collect();
    points.extend([
        Crash::Failpoint(failpoint::INDEX_BEFORE_WRITE, 3),
        Crash::Failpoint(failpoint::INDEX_BEFORE_WRITE, 21),
        Crash::Failpoint(failpoint::INDEX_AFTER_WRITE, 7),
        Crash::Failpoint(failpoint::INDEX_AFTER_WRITE, 30),
        Crash::Failpoint(failpoint::RESOLVE_AFTER_LOOKUP, 1),
        Crash::Failpoint(failpoint::RESOLVE_AFTER_LOOKUP, 2),
        Crash::Failpoint(failpoint::RESOLVE_AFTER_APPLY, 1),
        Crash::Failpoint(failpoint::RESOLVE_AFTER_APPLY, 3),
        Crash::Failpoint(failpoint::SPEND_AFTER_WRITE, 1),
        Crash::Failpoint(failpoint::SPEND_AFTER_WRITE, 2),
        Crash::Failpoint(failpoint::SPEND_AFTER_WRITE, 4),
        Crash::Failpoint(failpoint::SPEND_AFTER_WRITE, 6),
        // Between a window's (or resolution batch's) ingested rows and the batch that makes them count.
        Crash::Failpoint(failpoint::INDEX_AFTER_INGEST, 2),
        Crash::Failpoint(failpoint::RESOLVE_AFTER_INGEST, 1),
        Crash::Failpoint(failpoint::RESOLVE_AFTER_INGEST, 2),
    ]);
    points
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dying_at_23_points_then_restarting_gives_exact_answers() {
    let dir = tempfile::tempdir().unwrap();
    let chain = dir.path().join("chain");
    let config = GenConfig {
        blocks: 100,
        seed: 11,
        txs_per_block: 40,
        hot_address_share: 0.2,
    };
    let gen_dir = chain.clone();
    tokio::task::spawn_blocking(move || generate(&config, &gen_dir, &mut |_| {}))
        .await
        .unwrap()
        .unwrap();
    let reference = Reference::from_blk_dir(&chain);
    let scripts = reference.scripts();
    let txids = reference.txids();
    let total_blocks = reference.tip_height() as u64 + 1;
    let points = crash_points();
    assert_eq!(points.len(), 23);

    let mut fired = 0;
    for (point, crash) in points.iter().enumerate() {
        let victim = point % 3;
        let mut builder = SandboxBuilder::new(
            env!("CARGO_BIN_EXE_chainidx"),
            format!("blk:{}", chain.display()),
            dir.path().join(format!("run-{point}")),
        )
        .workers(3)
        .shard_blocks(10)
        // ~400 txs per shard in windows of 150: a crash can fall between two windows of a shard.
        .window_txs(150)
        // ...or between two of its resolution batches.
        .resolve_batch(100);
        // The victim writes each window beside the next one's blocks, as a worker with a core to spare
        // does (one index thread each here would not), so that crashes fall in the middle of such writes.
        let mut failpoints = format!("{}=on", failpoint::INDEX_WRITE_BESIDE);
        if let Crash::Failpoint(name, n) = crash {
            failpoints.push_str(&format!(",{name}={n}"));
        }
        builder = builder.worker_failpoints(victim, failpoints);
        let mut sandbox = builder.start().await.unwrap();
        let how = match crash {
            Crash::KillAt(share) => {
                let started = Instant::now();
                loop {
                    let status = sandbox.status().await.unwrap();
                    let indexed: u64 = status
                        .shards
                        .iter()
                        .map(|s| (s.next_height - s.start_height) as u64)
                        .sum();
                    if indexed as f64 >= share * total_blocks as f64 || status.backfill_complete {
                        break;
                    }
                    assert!(
                        started.elapsed() < Duration::from_secs(60),
                        "backfill did not progress"
                    );
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                sandbox.kill_worker(victim).await.unwrap();
                fired += 1;
                format!("kill -9 at {:.0}% indexed", share * 100.0)
            }
            Crash::Failpoint(name, n) => {
                if sandbox
                    .wait_worker_exit(victim, Duration::from_secs(20))
                    .await
                {
                    fired += 1;
                    format!("aborted at {name} #{n}")
                } else {
                    sandbox.kill_worker(victim).await.unwrap();
                    format!("{name} #{n} never reached; killed after the backfill")
                }
            }
        };
        sandbox.restart_worker(victim).await.unwrap();
        let status = sandbox
            .wait_for_backfill(Duration::from_secs(120), |_| {})
            .await
            .unwrap();
        assert!(status.shards.iter().all(|s| s.pending_inputs == 0));
        common::assert_shards_crossed_boundaries(
            &sandbox.worker_statuses().await.unwrap(),
            200,
            &format!("point {point}"),
        );

        // A different slice of every script and tx each run; over the 23 runs, the whole chain. After a
        // crash between ingested rows and their stats, every script: a miscount would touch only a few.
        let api = Api::new(sandbox.http_url());
        let (skip, step) = match crash {
            Crash::Failpoint(name, _) if name.ends_with("after-ingest") => (0, 1),
            _ => (point, points.len()),
        };
        for script in scripts.iter().skip(skip).step_by(step) {
            check_script(&api, &reference, script.clone(), bitcoin::Network::Regtest).await;
        }
        for txid in txids.iter().skip(point).step_by(points.len()) {
            check_tx(&api, &reference, *txid).await;
        }
        // Every shard ends compacted, also those that were ready before the crash and not yet compacted.
        sandbox
            .wait_for_compactions(Duration::from_secs(60))
            .await
            .unwrap();
        let run = dir.path().join(format!("run-{point}"));
        for worker in std::fs::read_dir(&run).unwrap().flatten() {
            for shard in std::fs::read_dir(worker.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if shard.file_name().to_string_lossy().starts_with("shard-") {
                    assert!(
                        shard.path().join("compacted").exists(),
                        "point {point}: {} not compacted",
                        shard.path().display()
                    );
                }
            }
        }
        eprintln!("point {point}: worker {victim} {how}; answers exact; shards compacted");
        sandbox.shutdown().await;
    }
    assert!(
        fired >= 21,
        "only {fired} of 23 crashes happened where planned"
    );
}
