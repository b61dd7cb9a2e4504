//! Training across the hosts of scripts/netlab.sh: each rank in a network namespace of its own,
//! behind a shaped link, over the tcp backend. Needs root and network namespaces, so it is ignored
//! by a plain `cargo test`; `.ci/run` runs it with `--ignored` where the machine allows, and says
//! so where it does not.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const HOSTS: usize = 3;
const RATE: &str = "20mbit";
/// A namespace prefix of this test's own, so that a lab a person has up is left alone.
const PREFIX: &str = "gtlci";

fn netlab() -> Command {
    let mut cmd = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/netlab.sh"));
    cmd.env("NETLAB_PREFIX", PREFIX);
    cmd
}

/// Takes the lab down when dropped, also when an assertion fails.
struct Lab;

impl Lab {
    fn up() -> Lab {
        let out = netlab().args(["up", &HOSTS.to_string(), RATE]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "netlab.sh up failed:\n{text}");
        eprint!("{text}");
        Lab
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = netlab().arg("down").status();
    }
}

/// (rate line, bytes sent) of host h's shaper, from `tc -s qdisc`.
fn shaper(h: usize) -> (String, u64) {
    let out = netlab()
        .args(["run", &h.to_string(), "tc", "-s", "qdisc", "show", "dev", "eth0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let sent = text
        .split_whitespace()
        .skip_while(|w| *w != "Sent")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no 'Sent N bytes' in tc's statistics of host {h}:\n{text}"));
    (text, sent)
}

/// The quickstart with gTop-k on 3 workers, 2 steps, and a test split small enough that a loaded
/// CI machine evaluates it within the timeout.
const SETS: [&str; 7] = [
    "sparse.method=gtopk",
    "dist.workers=3",
    "train.batch_size=48",
    "train.max_steps=2",
    "train.log_every=1",
    "data.synthetic_test=96",
    "dist.timeout=300",
];

fn quickstart() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/quickstart.toml")
}

#[test]
#[ignore = "needs root and network namespaces: .ci/run runs it with --ignored"]
fn gtopk_over_tcp_across_shaped_hosts_matches_in_process_workers() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    let mut cmd = common::train_command(&quickstart(), "--run-dir", &local, &SETS);
    let out = cmd.args(["--set", "dist.backend=local"]).output().unwrap();
    assert!(
        out.status.success(),
        "in-process run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let lab = Lab::up();
    let before: Vec<u64> = (0..HOSTS).map(|h| shaper(h).1).collect();
    let across = dir.path().join("across");
    let ranks: Vec<common::Rank> = (0..HOSTS)
        .map(|h| {
            let train = common::train_command(&quickstart(), "--run-dir", &across, &SETS);
            let mut cmd = netlab();
            cmd.args(["run", &h.to_string(), "env"])
                .arg(format!("RANK={h}"))
                .arg(format!("WORLD_SIZE={HOSTS}"))
                .arg("MASTER_ADDR=10.77.0.1")
                .arg("MASTER_PORT=29511")
                .arg(train.get_program())
                .args(train.get_args())
                .args(["--set", "dist.backend=tcp"])
                .env("RAYON_NUM_THREADS", "1")
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            common::Rank(cmd.spawn().unwrap())
        })
        .collect();
    for (h, (code, err)) in common::finish(ranks, Duration::from_secs(300)).into_iter().enumerate() {
        assert_eq!(code, 0, "rank {h} (host h{h}) failed:\n{err}");
    }
    assert_eq!(
        common::records(&local),
        common::records(&across),
        "ranks across the lab's hosts and in-process workers disagree"
    );

    // The rate held: every host's shaper is still the one set up, and its traffic went through it.
    for (h, sent_before) in before.into_iter().enumerate() {
        let (text, sent) = shaper(h);
        assert!(text.contains("rate 20Mbit"), "host {h}'s shaper changed:\n{text}");
        assert!(sent > sent_before, "host {h} sent nothing through its shaper:\n{text}");
    }
    drop(lab);
}
