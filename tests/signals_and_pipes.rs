//! How a run meets the terminal and the shell, through the binary: Ctrl-C at a terminal (a SIGINT
//! to the whole process group, sometimes delivered twice) on ranks gtopk spawned, `kill -INT` from
//! a script whose background jobs ignore SIGINT, and a reader that closes the pipe early.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Kills a whole process group when dropped, so a failing test leaves no rank behind.
struct Group(std::process::Child);

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: signalling a process group this test created.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

fn group_alive(pgid: i32) -> bool {
    // SAFETY: signal 0 only asks whether any process of the group exists.
    unsafe { libc::kill(-pgid, 0) == 0 }
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not after {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The step of the resume line and the command it gives, or a panic showing stderr.
fn resume_line(err: &str) -> (u64, String) {
    let line = err
        .lines()
        .find(|l| l.starts_with("interrupted at step "))
        .unwrap_or_else(|| panic!("no resume line in\n{err}"));
    let (step, rest) = line["interrupted at step ".len()..].split_once(';').unwrap();
    (
        step.parse().unwrap(),
        rest.trim_start_matches(" resume with: ").to_string(),
    )
}

/// A stopped run's promise: the checkpoint of the step it names is there and whole.
fn assert_checkpointed(run: &Path, step: u64, err: &str) {
    let dir = run.join(format!("checkpoints/step-{step:08}"));
    if let Err(e) = gtopk::train::checkpoint::verify(&dir) {
        panic!("{e:#}\n{err}");
    }
}

/// `[sh -c 'trap "" INT; exec ...'] gtopk train CONFIG --plain --run-dir RUN` for 400 epochs of the
/// tiny job on `backend`, as the leader of a new process group, stderr into `log`.
/// `ignoring_sigint`: started as a non-interactive shell starts a background job.
fn start_long_run(d: &Path, run: &Path, log: &Path, backend: &str, ignoring_sigint: bool) -> Group {
    let cfg = common::write_config(d);
    let mut cmd = if ignoring_sigint {
        let mut c = Command::new("sh");
        c.args(["-c", "trap '' INT; exec \"$@\"", "sh", env!("CARGO_BIN_EXE_gtopk")]);
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_gtopk"))
    };
    let child = cmd
        .args([
            "train",
            cfg.to_str().unwrap(),
            "--plain",
            "--run-dir",
            run.to_str().unwrap(),
        ])
        .args(["--set", "train.epochs=400", "--set", "train.log_every=1"])
        .args(["--set", &format!("dist.backend={backend}")])
        .current_dir(d)
        .env("RAYON_NUM_THREADS", "1")
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    Group(child)
}

/// The exit status of a signalled job, which must come within two minutes.
fn exit_after_signal(job: &mut Group, what: &str) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = job.0.try_wait().unwrap() {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{what}: still running after SIGINT"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_terminal_ctrl_c_at_random_moments_stops_spawned_ranks_with_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let seed = 33;
    let mut rng = gtopk::rng::Rng::new(seed);
    for i in 0..20 {
        // From the ranks' exec through rendezvous, the first steps, evaluations and checkpoints.
        let delay = Duration::from_millis(rng.below(1500));
        // Odd tries: the same Ctrl-C delivered twice (to the group, then to the parent, as
        // `timeout -s INT` does), which must not count as a second Ctrl-C.
        let twice = i % 2 == 1;
        let what = format!("try {i} (seed {seed}): SIGINT {delay:?} after the ranks started, twice: {twice}");
        let run = d.join(format!("run{i}"));
        let log = d.join(format!("err{i}"));
        let mut job = start_long_run(d, &run, &log, "tcp", false);
        let pgid = job.0.id() as i32;
        let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
        wait_for(&what, Duration::from_secs(60), || {
            read_log().contains("rank 1: process")
        });
        std::thread::sleep(delay);
        // SAFETY: signalling the group and the process this test started.
        unsafe {
            libc::kill(-pgid, libc::SIGINT);
            if twice {
                libc::kill(pgid, libc::SIGINT);
            }
        }
        let status = exit_after_signal(&mut job, &what);
        let err = read_log();
        assert_eq!(status.code(), Some(130), "{what}\n{err}");
        let (step, _) = resume_line(&err);
        assert_checkpointed(&run, step, &err);
        wait_for(
            &format!("{what}: a rank outlived its parent"),
            Duration::from_secs(5),
            || !group_alive(pgid),
        );
    }
}

#[test]
fn kill_int_from_a_script_stops_in_process_and_spawned_runs_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for backend in ["local", "tcp"] {
        let run = d.join(backend);
        let log = d.join(format!("{backend}.err"));
        let mut job = start_long_run(d, &run, &log, backend, true);
        let logged_step =
            || std::fs::read_to_string(run.join("metrics.jsonl")).is_ok_and(|t| t.contains("\"step\":2,"));
        wait_for(backend, Duration::from_secs(60), logged_step);
        // SAFETY: signalling the process this test started.
        unsafe { libc::kill(job.0.id() as i32, libc::SIGINT) };
        let status = exit_after_signal(&mut job, backend);
        let err = std::fs::read_to_string(&log).unwrap();
        assert_eq!(status.code(), Some(130), "{backend}\n{err}");
        let (step, _) = resume_line(&err);
        assert_checkpointed(&run, step, &err);
    }
}

#[test]
fn a_reader_that_closes_the_pipe_early_does_not_end_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = common::write_config(d);
    for backend in ["local", "tcp"] {
        let run = d.join(backend);
        // `gtopk train ... 2>&1 | head -2`: one pipe for both streams, closed after two lines.
        let mut child = Command::new("sh")
            .args(["-c", "exec \"$@\" 2>&1", "sh", env!("CARGO_BIN_EXE_gtopk")])
            .args([
                "train",
                cfg.to_str().unwrap(),
                "--plain",
                "--run-dir",
                run.to_str().unwrap(),
            ])
            .args([
                "--set",
                "train.log_every=1",
                "--set",
                &format!("dist.backend={backend}"),
            ])
            .current_dir(d)
            .env("RAYON_NUM_THREADS", "1")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let head: Vec<String> = lines.by_ref().take(2).map(Result::unwrap).collect();
        drop(lines);
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{backend}: {head:?}");
        // It trained to the end: the last epoch's record and its checkpoint.
        let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        assert!(
            metrics.contains("\"kind\":\"epoch\",\"step\":12"),
            "{backend}: {metrics}"
        );
        assert_checkpointed(&run, 12, &head.join("\n"));
    }
}
