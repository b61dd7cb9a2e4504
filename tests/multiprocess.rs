//! Real processes on loopback with `dist.backend = "tcp"`: the same metrics as the in-process
//! backend, and clear, bounded failures. Every process a test starts is waited for or killed.

mod common;

use common::{finish, free_port, write_config, Rank};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn spawn(cfg: &Path, run: &Path, rank: usize, world: usize, port: u16, sets: &[&str]) -> Rank {
    spawn_as("--run-dir", cfg, run, rank, world, port, sets)
}

/// Three ranks of one job on a fresh port.
fn spawn_three(how: &str, cfg: &Path, run: &Path, sets: &[&str]) -> Vec<Rank> {
    let port = free_port();
    (0..3).map(|r| spawn_as(how, cfg, run, r, 3, port, sets)).collect()
}

/// A job that runs until stopped, with a checkpoint every 2 steps; tests add logging and timeout.
const ENDLESS: [&str; 4] = [
    "dist.workers=3",
    "train.batch_size=18",
    "train.epochs=1000",
    "train.checkpoint_every=2",
];

/// `how` is `--run-dir` for a new run or `--resume` to continue one.
fn spawn_as(how: &str, cfg: &Path, run: &Path, rank: usize, world: usize, port: u16, sets: &[&str]) -> Rank {
    let mut cmd = common::train_command(cfg, how, run, sets);
    cmd.args(["--set", "dist.backend=tcp"])
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string());
    Rank(cmd.spawn().unwrap())
}

#[test]
fn tcp_processes_match_in_process_workers_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path());
    for method in ["dense", "topk", "gtopk"] {
        let sets = [
            &format!("sparse.method={method}")[..],
            "sparse.density=0.01",
            "dist.workers=3",
            "train.batch_size=18",
            "sparse.delta_every=2",
        ];
        let local = dir.path().join(format!("local-{method}"));
        common::run(&common::config(&sets), &local, false).unwrap();
        let tcp = dir.path().join(format!("tcp-{method}"));
        let port = free_port();
        let ranks = (0..3).map(|r| spawn(&cfg, &tcp, r, 3, port, &sets)).collect();
        for (r, (code, err)) in finish(ranks, Duration::from_secs(120)).into_iter().enumerate() {
            assert_eq!(code, 0, "{method}: rank {r} failed: {err}");
        }
        assert_eq!(common::records(&local), common::records(&tcp), "{method}");
    }
}

#[test]
fn a_killed_rank_ends_the_job_with_its_name_and_the_checkpoint_survives() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path());
    let run = dir.path().join("run");
    let sets = [&ENDLESS[..], &["train.log_every=1", "dist.timeout=4"]].concat();
    let mut ranks = spawn_three("--run-dir", &cfg, &run, &sets);
    wait_until_running(&run, 5);
    let victim = ranks.pop().unwrap();
    drop(victim); // SIGKILL
    let killed_at = Instant::now();
    for (r, (code, err)) in finish(ranks, Duration::from_secs(30)).into_iter().enumerate() {
        assert_ne!(code, 0, "rank {r} should fail");
        assert!(err.contains("rank 2"), "rank {r} does not name the lost rank: {err}");
    }
    assert!(
        killed_at.elapsed() < Duration::from_secs(15),
        "took {:?}",
        killed_at.elapsed()
    );
    let latest = gtopk::train::checkpoint::latest(&run).unwrap().unwrap();
    gtopk::train::checkpoint::verify(&latest).unwrap();

    // Every rank resumes from it and finishes two more steps.
    let step: u64 = latest.file_name().unwrap().to_str().unwrap()["step-".len()..]
        .parse()
        .unwrap();
    let stop = format!("train.max_steps={}", step + 2);
    let mut again = sets.to_vec();
    again.push(&stop);
    let ranks = spawn_three("--resume", &cfg, &run, &again);
    for (r, (code, err)) in finish(ranks, Duration::from_secs(60)).into_iter().enumerate() {
        assert_eq!(code, 0, "rank {r} could not resume: {err}");
    }
    let newest = gtopk::train::checkpoint::latest(&run).unwrap().unwrap();
    assert!(
        newest.ends_with(format!("step-{:08}", step + 2)),
        "{}",
        newest.display()
    );
}

#[test]
fn mismatched_ranks_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path());
    let base = ["dist.workers=3", "train.batch_size=18", "dist.timeout=10"];

    // Another config on rank 1.
    let port = free_port();
    let mut odd = base.to_vec();
    odd.push("train.lr=0.2");
    let ranks = (0..3)
        .map(|r| {
            spawn(
                &cfg,
                &dir.path().join("a"),
                r,
                3,
                port,
                if r == 1 { &odd } else { &base },
            )
        })
        .collect();
    let out = finish(ranks, Duration::from_secs(60));
    for (r, (code, err)) in out.iter().enumerate() {
        assert_ne!(*code, 0, "rank {r}");
        assert!(err.contains("rank 1") && err.contains("config"), "rank {r}: {err}");
    }

    // A rank told the world has 4 processes while dist.workers = 3.
    let port = free_port();
    let ranks = vec![spawn(&cfg, &dir.path().join("b"), 0, 4, port, &base)];
    let (code, err) = &finish(ranks, Duration::from_secs(30))[0];
    assert_ne!(*code, 0);
    assert!(
        err.contains("dist.workers = 3 but the launcher started 4 processes"),
        "{err}"
    );

    // The rendezvous port is taken.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let ranks = vec![spawn(
        &cfg,
        &dir.path().join("c"),
        0,
        3,
        port,
        &["dist.workers=3", "train.batch_size=18", "dist.bind=127.0.0.1"],
    )];
    let (code, err) = &finish(ranks, Duration::from_secs(30))[0];
    assert_ne!(*code, 0);
    assert!(err.contains("in use"), "{err}");
}

/// The processes are gone from the process table: waited for, not zombies, not orphans.
fn assert_reaped(pids: &[u32]) {
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} is still in the process table"
        );
    }
}

/// Waits until the job has written a checkpoint and `lines` metrics lines.
fn wait_until_running(run: &Path, lines: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while gtopk::train::checkpoint::list(run).map(|l| l.len()).unwrap_or(0) < 1
        || std::fs::read_to_string(run.join("metrics.jsonl"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
            < lines
    {
        assert!(Instant::now() < deadline, "the job did not get going");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([sig, &pid.to_string()]).status().unwrap();
    assert!(ok.success(), "kill {sig} {pid}");
}

#[test]
fn a_stalled_rank_ends_the_job_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path());
    let run = dir.path().join("run");
    let sets = [&ENDLESS[..], &["train.log_every=50", "dist.timeout=3"]].concat();
    let mut ranks = spawn_three("--run-dir", &cfg, &run, &sets);
    let pids: Vec<u32> = ranks.iter().map(|r| r.0.id()).collect();
    wait_until_running(&run, 3);
    let stalled = ranks.pop().unwrap();
    signal(pids[2], "-STOP");
    let stopped_at = Instant::now();
    let out = finish(ranks, Duration::from_secs(30));
    let took = stopped_at.elapsed();
    // Wake the stalled rank: its peers are gone, so it must end too, on its own.
    signal(pids[2], "-CONT");
    let (code2, err2) = finish(vec![stalled], Duration::from_secs(30)).remove(0);
    for (r, (_, err)) in out.iter().enumerate() {
        eprintln!("rank {r}: {}", err.lines().last().unwrap_or(""));
    }
    eprintln!("rank 2 (stalled, woken): {}", err2.lines().last().unwrap_or(""));
    for (r, (code, err)) in out.iter().enumerate() {
        assert_ne!(*code, 0, "rank {r} should fail");
        // Rank 0 times out waiting for rank 2; rank 1, waiting on rank 0 for rank 2's piece, either
        // times out too or sees rank 0 exit first, whichever comes first.
        assert!(
            err.contains("rank 2") && (err.contains("dist.timeout") || err.contains("rank 0 is gone")),
            "rank {r}: {err}"
        );
    }
    assert!(
        out[0].1.contains("rank 2"),
        "rank 0 does not name the stalled rank: {}",
        out[0].1
    );
    assert!(
        took < Duration::from_secs(12),
        "the live ranks took {took:?} with dist.timeout = 3"
    );
    assert!(
        code2 != 0 && err2.contains("is gone"),
        "the stalled rank, once woken: {err2}"
    );
    assert_reaped(&pids);
    gtopk::train::checkpoint::latest(&run).unwrap().unwrap();
}

#[test]
fn garbage_on_the_rendezvous_port_does_not_disturb_the_job() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path());
    let sets = [
        "dist.workers=3",
        "train.batch_size=18",
        "train.max_steps=2",
        "dist.timeout=10",
    ];
    let port = free_port();
    let run = dir.path().join("run");
    let first = spawn(&cfg, &run, 0, 3, port, &sets);
    // Once rank 0 listens: a connection that sends noise, one that sends a huge length prefix,
    // and one that connects and says nothing, held open through the whole job.
    let deadline = Instant::now() + Duration::from_secs(30);
    let silent = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("rank 0 never listened: {e}"),
        }
    };
    let mut rng = gtopk::rng::Rng::new(5);
    let noise: Vec<u8> = (0..4096).map(|_| rng.next_u32() as u8).collect();
    for payload in [&noise[..], &[0xff; 64][..], b"GET / HTTP/1.1\r\n\r\n"] {
        let mut g = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _ = g.write_all(payload);
    }
    let mut ranks = vec![first];
    ranks.extend((1..3).map(|r| spawn(&cfg, &run, r, 3, port, &sets)));
    let pids: Vec<u32> = ranks.iter().map(|r| r.0.id()).collect();
    for (r, (code, err)) in finish(ranks, Duration::from_secs(60)).into_iter().enumerate() {
        assert_eq!(code, 0, "rank {r} failed: {err}");
    }
    drop(silent);
    assert_reaped(&pids);
}

#[test]
fn a_rank_that_never_starts_ends_the_others_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path());
    let sets = ["dist.workers=3", "train.batch_size=18", "dist.timeout=3"];
    let port = free_port();
    let run = dir.path().join("run");
    let ranks: Vec<Rank> = (0..2).map(|r| spawn(&cfg, &run, r, 3, port, &sets)).collect();
    let pids: Vec<u32> = ranks.iter().map(|r| r.0.id()).collect();
    let started = Instant::now();
    for (r, (code, err)) in finish(ranks, Duration::from_secs(30)).into_iter().enumerate() {
        assert_ne!(code, 0, "rank {r}");
        assert!(
            err.contains("rank 2 did not join within 3s (dist.timeout)"),
            "rank {r}: {err}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "took {:?}",
        started.elapsed()
    );
    assert_reaped(&pids);
}
