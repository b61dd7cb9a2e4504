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
    // A rank that talks to rank 2 names it; a rank that first sees another survivor exit says
    // that peer is gone (which one comes first depends on the machine's load).
    let out = finish(ranks, Duration::from_secs(30));
    for (r, (code, err)) in out.iter().enumerate() {
        assert_ne!(*code, 0, "rank {r} should fail");
        assert!(
            err.contains("rank 2") || err.contains("is gone"),
            "rank {r} neither names the lost rank nor a lost peer: {err}"
        );
    }
    assert!(
        out.iter().any(|(_, err)| err.contains("rank 2")),
        "no rank names the lost rank 2: {out:?}"
    );
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
    for (r, (code, _)) in out.iter().enumerate() {
        assert_ne!(*code, 0, "rank {r} should fail");
    }
    // Rank 0 times out waiting for rank 2 and names it. Rank 1 waits on rank 0 (for rank 2's
    // piece): it times out naming rank 2 or rank 0, or sees rank 0 exit first, whichever comes
    // first; all three happen.
    let ended = |err: &str| err.contains("dist.timeout") || err.contains("is gone");
    assert!(
        out[0].1.contains("rank 2") && out[0].1.contains("dist.timeout"),
        "rank 0 does not name the stalled rank: {}",
        out[0].1
    );
    assert!(ended(&out[1].1), "rank 1: {}", out[1].1);
    // A hang would run into finish's 30 s; dist.timeout (3 s) plus teardown stays well below
    // 25 s even on a loaded machine (12 s was exceeded under a parallel build).
    assert!(
        took < Duration::from_secs(25),
        "the live ranks took {took:?} with dist.timeout = 3"
    );
    assert!(code2 != 0 && ended(&err2), "the stalled rank, once woken: {err2}");
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

/// `gtopk train` as a user types it on one machine: no launcher variables at all, so the process
/// starts the ranks itself.
fn one_command(cfg: &Path, how: &str, run: &Path, sets: &[&str]) -> Command {
    let mut cmd = common::train_command(cfg, how, run, sets);
    common::without_launcher(&mut cmd);
    cmd
}

/// The job's pipes, read while it runs, so neither ever fills.
struct Job {
    rank: Rank,
    out: Option<std::thread::JoinHandle<String>>,
    err: std::sync::mpsc::Receiver<String>,
    err_lines: Vec<String>,
}

impl Job {
    fn start(mut cmd: Command) -> Job {
        let mut child = cmd.spawn().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut stdout, &mut s).unwrap();
            s
        });
        let (tx, err) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Job {
            rank: Rank(child),
            out: Some(out),
            err,
            err_lines: Vec::new(),
        }
    }

    fn poll_stderr(&mut self) {
        self.err_lines.extend(self.err.try_iter());
    }

    /// The process ids of the ranks the job started, from its "rank R: process PID" lines.
    fn rank_pids(&mut self, world: usize) -> Vec<u32> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.poll_stderr();
            let pids: Vec<u32> = (0..world)
                .filter_map(|r| {
                    let head = format!("rank {r}: process ");
                    self.err_lines.iter().find_map(|l| l.strip_prefix(&head)?.parse().ok())
                })
                .collect();
            if pids.len() == world {
                return pids;
            }
            assert!(Instant::now() < deadline, "no rank pids in {:?}", self.err_lines);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// (exit code, stdout, stderr) once it ends within `limit`.
    fn finish(mut self, limit: Duration) -> (i32, String, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.rank.0.try_wait().unwrap() {
                break s;
            }
            assert!(start.elapsed() < limit, "the job is still running after {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = self.out.take().unwrap().join().unwrap();
        // The reader ends when the pipe closes, which it does with the process.
        let rest: Vec<String> = self.err.iter().collect();
        self.err_lines.extend(rest);
        (status.code().unwrap_or(-1), out, self.err_lines.join("\n"))
    }
}

/// Gone, or a zombie waiting for an init that does not reap (the process has ended either way).
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn one_command_starts_its_own_ranks_and_matches_in_process_workers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path());
    let sets = ["dist.backend=tcp", "sparse.method=gtopk", "sparse.density=0.01"];
    let local = dir.path().join("local");
    common::run(&common::config(&sets[1..]), &local, false).unwrap();

    let run = dir.path().join("spawned");
    let mut job = Job::start(one_command(&cfg, "--run-dir", &run, &sets));
    let pids = job.rank_pids(2);
    let (code, out, err) = job.finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("2 workers on the CPU: starting one process per worker over tcp"),
        "{err}"
    );
    // Only rank 0 logs progress; rank 1's lines show in the failure test.
    assert!(err.contains("[rank 0] epoch 1: test loss"), "{err}");
    // One summary, the parent's, as the in-process backend prints it.
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(summary["steps"], 12);
    assert!(summary["test_accuracy"].is_number(), "{summary}");
    assert_eq!(common::records(&local), common::records(&run));
    assert!(pids.iter().all(|&p| ended(p)), "a rank outlived the job");
}

#[test]
fn a_spawned_job_resumes_as_one_command_too() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path());
    let sets = ["dist.backend=tcp", "train.checkpoint_every=4"];
    let whole = dir.path().join("whole");
    common::run(&common::config(&sets[1..]), &whole, false).unwrap();

    let run = dir.path().join("run");
    let first = [&sets[..], &["train.max_steps=4"]].concat();
    let (code, _, err) = Job::start(one_command(&cfg, "--run-dir", &run, &first)).finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{err}");
    // A second start into the same directory is refused by rank 0 for every rank.
    let (code, _, err) = Job::start(one_command(&cfg, "--run-dir", &run, &sets)).finish(Duration::from_secs(60));
    assert_ne!(code, 0);
    assert!(err.contains("already holds a run"), "{err}");
    let (code, _, err) = Job::start(one_command(&cfg, "--resume", &run, &sets)).finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{err}");
    assert_eq!(common::records(&whole), common::records(&run));
}

#[test]
fn a_failing_spawned_rank_ends_the_job_and_leaves_no_process() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path());
    let run = dir.path().join("run");
    let mut cmd = one_command(&cfg, "--run-dir", &run, &["dist.backend=tcp", "dist.timeout=5"]);
    cmd.env(gtopk::fault::ENV, "nan-grad:1:3");
    let started = Instant::now();
    let mut job = Job::start(cmd);
    let pids = job.rank_pids(2);
    let (code, _, err) = job.finish(Duration::from_secs(30));
    assert_ne!(code, 0);
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.starts_with("error: rank ")
            && last.contains("failed")
            && last.contains("non-finite")
            && last.contains("[1]"),
        "{err}"
    );
    assert!(err.contains("\n[rank 1] warning: GTOPK_FAULT_INJECT"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    assert!(pids.iter().all(|&p| ended(p)), "a rank outlived the job");
}

#[test]
fn a_killed_rank_is_named_and_a_killed_parent_takes_its_ranks_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path());
    let sets = [
        &ENDLESS[..],
        &["dist.backend=tcp", "train.log_every=1", "dist.timeout=5"],
    ]
    .concat();

    // One rank dies: the job fails naming it, the other rank is stopped.
    let run = dir.path().join("a");
    let mut job = Job::start(one_command(&cfg, "--run-dir", &run, &sets));
    let pids = job.rank_pids(3);
    wait_until_running(&run, 3);
    signal(pids[2], "-KILL");
    let killed_at = Instant::now();
    let (code, _, err) = job.finish(Duration::from_secs(30));
    assert_ne!(code, 0);
    assert!(err.contains("error: rank 2 of 3 failed (signal: 9"), "{err}");
    assert!(
        killed_at.elapsed() < Duration::from_secs(15),
        "took {:?}",
        killed_at.elapsed()
    );
    assert!(pids.iter().all(|&p| ended(p)), "a rank outlived the job");

    // The parent is killed outright (no chance to clean up): its ranks notice and stop.
    let run = dir.path().join("b");
    let mut job = Job::start(one_command(&cfg, "--run-dir", &run, &sets));
    let pids = job.rank_pids(3);
    wait_until_running(&run, 3);
    signal(job.rank.0.id(), "-KILL");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pids.iter().all(|&p| ended(p)) {
        assert!(Instant::now() < deadline, "ranks outlived their parent");
        std::thread::sleep(Duration::from_millis(50));
    }
}
