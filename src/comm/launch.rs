//! Who am I in the job? Rank, world size and local rank come from whichever launcher started the
//! process (torchrun, Open MPI, MPICH/Hydra, Slurm, or `scripts/launch.sh`, which speaks torchrun's
//! variables); explicit command-line values override them. No MPI library is linked: the launchers'
//! environment variables are all we need.
//!
//! Precedence when several launchers' variables are present: torchrun > Open MPI > MPICH > Slurm.
//! The innermost launcher sets its variables per process, while outer ones leak theirs into every
//! child: inside an `sbatch` allocation every process inherits `SLURM_PROCID`/`SLURM_NTASKS` of the
//! batch step, even when `mpirun` or `launch.sh` started it, so Slurm comes last; `launch.sh` and
//! torchrun set `RANK` explicitly for exactly this process, so they come first.

use anyhow::{bail, Result};

/// Where this process sits in the job, and where rank 0's rendezvous store listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchInfo {
    pub rank: usize,
    pub world_size: usize,
    /// Index among the ranks on this host (selects the GPU).
    pub local_rank: usize,
    pub master_addr: String,
    /// `None` when nobody said: fine for one process, an error for a multi-process job.
    pub master_port: Option<u16>,
    /// The launcher the values came from: "torchrun", "openmpi", "mpich", "slurm", "flags" or "none".
    pub source: &'static str,
}

/// Values given explicitly (command-line flags); each one that is set wins over the environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    pub rank: Option<usize>,
    pub world_size: Option<usize>,
    pub local_rank: Option<usize>,
    pub master_addr: Option<String>,
    pub master_port: Option<u16>,
}

struct Launcher {
    name: &'static str,
    rank: &'static str,
    size: &'static str,
    local: &'static str,
}

/// In precedence order (see the module comment).
const LAUNCHERS: [Launcher; 4] = [
    Launcher {
        name: "torchrun",
        rank: "RANK",
        size: "WORLD_SIZE",
        local: "LOCAL_RANK",
    },
    Launcher {
        name: "openmpi",
        rank: "OMPI_COMM_WORLD_RANK",
        size: "OMPI_COMM_WORLD_SIZE",
        local: "OMPI_COMM_WORLD_LOCAL_RANK",
    },
    Launcher {
        name: "mpich",
        rank: "PMI_RANK",
        size: "PMI_SIZE",
        local: "MPI_LOCALRANKID",
    },
    Launcher {
        name: "slurm",
        rank: "SLURM_PROCID",
        size: "SLURM_NTASKS",
        local: "SLURM_LOCALID",
    },
];

/// Used when neither MASTER_ADDR nor a flag names rank 0's host: right for every single-host job.
pub const DEFAULT_MASTER_ADDR: &str = "127.0.0.1";

/// A value and the name of where it came from, so errors can point at the variable or flag to fix.
struct Sourced<T> {
    value: T,
    origin: String,
}

impl LaunchInfo {
    /// mpirun or srun started this process (Open MPI's, MPICH's or Slurm's variables won), so an
    /// MPI library can join the job from its own launcher's state.
    pub fn started_by_mpi_launcher(&self) -> bool {
        matches!(self.source, "openmpi" | "mpich" | "slurm")
    }

    /// Reads the real process environment.
    pub fn from_env(overrides: &Overrides) -> Result<LaunchInfo> {
        Self::detect(|k| std::env::var(k).ok(), overrides)
    }

    /// `env` looks a variable up (tests pass a fake environment). An empty variable counts as unset,
    /// because `VAR=` is how people clear one in a job script.
    pub fn detect(env: impl Fn(&str) -> Option<String>, overrides: &Overrides) -> Result<LaunchInfo> {
        let get = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let launcher = LAUNCHERS.iter().find(|l| get(l.rank).is_some());

        let mut rank = None;
        let mut world = None;
        let mut local = None;
        if let Some(l) = launcher {
            rank = Some(parse_var::<usize>(l.rank, &get(l.rank).unwrap_or_default(), l.name)?);
            let size = get(l.size)
                .ok_or_else(|| anyhow::anyhow!("{} is set but {} is not (launcher: {})", l.rank, l.size, l.name))?;
            world = Some(parse_var::<usize>(l.size, &size, l.name)?);
            if let Some(v) = get(l.local) {
                local = Some(parse_var::<usize>(l.local, &v, l.name)?);
            }
        }

        let flag = |value: Option<usize>, name: &str| {
            value.map(|value| Sourced {
                value,
                origin: format!("--{name}"),
            })
        };
        let rank = flag(overrides.rank, "rank").or(rank);
        let world = flag(overrides.world_size, "world-size").or(world);
        let local = flag(overrides.local_rank, "local-rank").or(local);
        let from_flags = overrides.rank.is_some() || overrides.world_size.is_some();
        let source = match launcher {
            Some(l) => l.name,
            None if from_flags => "flags",
            None => "none",
        };

        let (rank, world) = match (rank, world) {
            (Some(r), Some(w)) => (r, w),
            (None, None) => (
                Sourced {
                    value: 0,
                    origin: "default".into(),
                },
                Sourced {
                    value: 1,
                    origin: "default".into(),
                },
            ),
            (Some(r), None) => bail!(
                "{} = {} given but no world size: pass --world-size or start under a launcher",
                r.origin,
                r.value
            ),
            (None, Some(w)) if w.value == 1 => (
                Sourced {
                    value: 0,
                    origin: "default".into(),
                },
                w,
            ),
            (None, Some(w)) => bail!(
                "{} = {} given but no rank: pass --rank or start under a launcher (torchrun, mpirun, srun, \
                 scripts/launch.sh)",
                w.origin,
                w.value
            ),
        };
        if world.value == 0 {
            bail!("{} = 0: a job needs at least one rank", world.origin);
        }
        if rank.value >= world.value {
            bail!(
                "{} = {} is outside the world: {} = {} allows ranks 0..{}",
                rank.origin,
                rank.value,
                world.origin,
                world.value,
                world.value - 1
            );
        }
        // Without a local rank from the launcher, the global rank is right whenever all ranks share
        // one host; on several hosts it points past the last GPU, an error at device selection rather
        // than every rank silently piling onto GPU 0.
        let local_rank = match local {
            Some(l) if l.value >= world.value => {
                bail!("{} = {} is not below the world size {}", l.origin, l.value, world.value)
            }
            Some(l) => l.value,
            None => rank.value,
        };

        let master_addr = overrides
            .master_addr
            .clone()
            .or_else(|| get("MASTER_ADDR").map(|a| a.trim().to_string()))
            .unwrap_or_else(|| DEFAULT_MASTER_ADDR.to_string());
        let master_port = match (overrides.master_port, get("MASTER_PORT")) {
            (Some(p), _) => Some(p),
            (None, Some(v)) => Some(
                v.trim()
                    .parse::<u16>()
                    .map_err(|_| anyhow::anyhow!("MASTER_PORT = {v:?} is not a port number (0-65535)"))?,
            ),
            (None, None) => None,
        };

        Ok(LaunchInfo {
            rank: rank.value,
            world_size: world.value,
            local_rank,
            master_addr,
            master_port,
            source,
        })
    }
}

fn parse_var<T: std::str::FromStr>(name: &str, value: &str, launcher: &str) -> Result<Sourced<T>> {
    match value.trim().parse::<T>() {
        Ok(value) => Ok(Sourced {
            value,
            origin: name.to_string(),
        }),
        Err(_) => bail!("{name} = {value:?} (set by {launcher}) is not a non-negative integer"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn detect(vars: &[(&str, &str)], ov: &Overrides) -> Result<LaunchInfo> {
        let env: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        LaunchInfo::detect(|k| env.get(k).cloned(), ov)
    }

    fn ok(vars: &[(&str, &str)]) -> LaunchInfo {
        detect(vars, &Overrides::default()).unwrap()
    }

    fn err(vars: &[(&str, &str)], ov: &Overrides) -> String {
        format!("{:#}", detect(vars, ov).unwrap_err())
    }

    #[test]
    fn no_launcher_is_a_single_process() {
        assert_eq!(
            ok(&[]),
            LaunchInfo {
                rank: 0,
                world_size: 1,
                local_rank: 0,
                master_addr: DEFAULT_MASTER_ADDR.into(),
                master_port: None,
                source: "none",
            }
        );
    }

    #[test]
    fn torchrun_variables() {
        let i = ok(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node7"),
            ("MASTER_PORT", "29500"),
        ]);
        assert_eq!((i.rank, i.world_size, i.local_rank, i.source), (3, 8, 1, "torchrun"));
        assert_eq!((i.master_addr.as_str(), i.master_port), ("node7", Some(29500)));
    }

    #[test]
    fn open_mpi_variables() {
        let i = ok(&[
            ("OMPI_COMM_WORLD_RANK", "5"),
            ("OMPI_COMM_WORLD_SIZE", "6"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "2"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "1234"),
        ]);
        assert_eq!((i.rank, i.world_size, i.local_rank, i.source), (5, 6, 2, "openmpi"));
        assert_eq!((i.master_addr.as_str(), i.master_port), ("10.0.0.1", Some(1234)));
    }

    #[test]
    fn mpich_variables_with_and_without_local_rank() {
        let i = ok(&[("PMI_RANK", "2"), ("PMI_SIZE", "4"), ("MPI_LOCALRANKID", "0")]);
        assert_eq!((i.rank, i.world_size, i.local_rank, i.source), (2, 4, 0, "mpich"));
        assert_eq!((i.master_addr.as_str(), i.master_port), (DEFAULT_MASTER_ADDR, None));
        // Hydra without MPI_LOCALRANKID: the documented fallback is the global rank.
        let i = ok(&[("PMI_RANK", "2"), ("PMI_SIZE", "4")]);
        assert_eq!(i.local_rank, 2);
    }

    #[test]
    fn slurm_variables() {
        let i = ok(&[("SLURM_PROCID", "7"), ("SLURM_NTASKS", "16"), ("SLURM_LOCALID", "3")]);
        assert_eq!((i.rank, i.world_size, i.local_rank, i.source), (7, 16, 3, "slurm"));
    }

    #[test]
    fn mpirun_and_srun_are_mpi_launchers_torchrun_is_not() {
        let mpi = |vars: &[(&str, &str)]| ok(vars).started_by_mpi_launcher();
        assert!(mpi(&[("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "2")]));
        assert!(mpi(&[("PMI_RANK", "0"), ("PMI_SIZE", "2")]));
        assert!(mpi(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")]));
        assert!(!mpi(&[("RANK", "0"), ("WORLD_SIZE", "2")]));
        assert!(!mpi(&[]));
        // launch.sh inside an allocation: torchrun's variables win, so no MPI.
        assert!(!mpi(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1")
        ]));
    }

    #[test]
    fn precedence_when_launchers_overlap() {
        // mpirun inside an sbatch allocation: the inherited Slurm values must lose.
        let slurm = [("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1"), ("SLURM_LOCALID", "0")];
        let mut vars = slurm.to_vec();
        vars.extend([("PMI_RANK", "1"), ("PMI_SIZE", "3")]);
        assert_eq!((ok(&vars).rank, ok(&vars).source), (1, "mpich"));
        vars.extend([("OMPI_COMM_WORLD_RANK", "2"), ("OMPI_COMM_WORLD_SIZE", "4")]);
        assert_eq!((ok(&vars).rank, ok(&vars).source), (2, "openmpi"));
        vars.extend([("RANK", "3"), ("WORLD_SIZE", "5"), ("LOCAL_RANK", "0")]);
        let i = ok(&vars);
        assert_eq!((i.rank, i.world_size, i.local_rank, i.source), (3, 5, 0, "torchrun"));
        // An empty variable is unset, so the next launcher in line applies.
        let i = ok(&[
            ("RANK", ""),
            ("WORLD_SIZE", ""),
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
        ]);
        assert_eq!((i.rank, i.source), (1, "slurm"));
    }

    #[test]
    fn overrides_win_field_by_field() {
        let env = [
            ("RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "a"),
            ("MASTER_PORT", "1000"),
        ];
        let ov = Overrides {
            rank: Some(2),
            master_port: Some(2000),
            ..Default::default()
        };
        let i = detect(&env, &ov).unwrap();
        assert_eq!((i.rank, i.world_size, i.local_rank), (2, 4, 1));
        assert_eq!(
            (i.master_addr.as_str(), i.master_port, i.source),
            ("a", Some(2000), "torchrun")
        );

        let ov = Overrides {
            rank: Some(1),
            world_size: Some(2),
            local_rank: Some(0),
            master_addr: Some("host0".into()),
            master_port: Some(0),
        };
        let i = detect(&[], &ov).unwrap();
        assert_eq!(
            i,
            LaunchInfo {
                rank: 1,
                world_size: 2,
                local_rank: 0,
                master_addr: "host0".into(),
                master_port: Some(0),
                source: "flags",
            }
        );
        let i = detect(
            &[],
            &Overrides {
                world_size: Some(1),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((i.rank, i.world_size, i.source), (0, 1, "flags"));
    }

    #[test]
    fn errors_name_the_variable_or_flag() {
        let none = Overrides::default();
        let e = err(&[("RANK", "one"), ("WORLD_SIZE", "4")], &none);
        assert!(e.contains("RANK = \"one\"") && e.contains("torchrun"), "{e}");
        let e = err(&[("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "-2")], &none);
        assert!(e.contains("OMPI_COMM_WORLD_SIZE = \"-2\""), "{e}");
        let e = err(
            &[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_LOCALID", "x")],
            &none,
        );
        assert!(e.contains("SLURM_LOCALID = \"x\""), "{e}");
        let e = err(&[("PMI_RANK", "0")], &none);
        assert!(e.contains("PMI_RANK is set but PMI_SIZE is not"), "{e}");
        let e = err(&[("RANK", "4"), ("WORLD_SIZE", "4")], &none);
        assert!(
            e.contains("RANK = 4 is outside the world") && e.contains("WORLD_SIZE = 4"),
            "{e}"
        );
        let e = err(&[("RANK", "0"), ("WORLD_SIZE", "0")], &none);
        assert!(e.contains("WORLD_SIZE = 0"), "{e}");
        let e = err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "2")], &none);
        assert!(e.contains("LOCAL_RANK = 2 is not below the world size 2"), "{e}");
        let e = err(&[("MASTER_PORT", "70000")], &none);
        assert!(e.contains("MASTER_PORT = \"70000\" is not a port number"), "{e}");

        let flags = |rank, world_size| Overrides {
            rank,
            world_size,
            ..Default::default()
        };
        let e = err(&[("RANK", "0"), ("WORLD_SIZE", "2")], &flags(Some(5), None));
        assert!(
            e.contains("--rank = 5 is outside the world") && e.contains("WORLD_SIZE = 2"),
            "{e}"
        );
        let e = err(&[], &flags(None, Some(4)));
        assert!(e.contains("--world-size = 4 given but no rank"), "{e}");
        let e = err(&[], &flags(Some(1), None));
        assert!(e.contains("--rank = 1 given but no world size"), "{e}");
        let e = err(&[], &flags(Some(0), Some(0)));
        assert!(e.contains("--world-size = 0"), "{e}");
    }

    fn launch_sh(args: &[&str]) -> std::process::Output {
        std::process::Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/launch.sh"))
            .args(args)
            .env_remove("MASTER_PORT")
            .output()
            .unwrap()
    }

    fn sorted_lines(out: &[u8]) -> Vec<String> {
        let mut lines: Vec<String> = String::from_utf8_lossy(out).lines().map(String::from).collect();
        lines.sort();
        lines
    }

    const SHOW_ENV: &str = "echo $RANK $WORLD_SIZE $LOCAL_RANK $MASTER_ADDR $MASTER_PORT";

    #[test]
    fn launch_sh_gives_each_rank_its_variables_and_prefix() {
        let out = launch_sh(&["-n", "3", "-p", "12345", "--", "sh", "-c", SHOW_ENV]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(
            sorted_lines(&out.stdout),
            (0..3)
                .map(|r| format!("[rank {r}] {r} 3 {r} 127.0.0.1 12345"))
                .collect::<Vec<_>>()
        );
        let help = launch_sh(&["--help"]);
        assert!(help.status.success() && String::from_utf8_lossy(&help.stdout).starts_with("Usage:"));
        let bad = launch_sh(&["-n", "2"]);
        assert_eq!(bad.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&bad.stderr).contains("no command given"));
    }

    #[test]
    fn launch_sh_fills_host_slots_in_order() {
        let file = std::env::temp_dir().join(format!("gtopk-hosts-{}.txt", std::process::id()));
        std::fs::write(&file, "# two slots here\nlocalhost slots=2\n\nlocalhost\n").unwrap();
        let out = launch_sh(&["-H", file.to_str().unwrap(), "--", "sh", "-c", SHOW_ENV]);
        std::fs::remove_file(&file).unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // Both lines name the same host, so local ranks count on across them.
        assert_eq!(
            sorted_lines(&out.stdout),
            (0..3)
                .map(|r| format!("[rank {r}] {r} 3 {r} localhost 29500"))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn launch_sh_stops_every_rank_when_one_fails() {
        let start = std::time::Instant::now();
        let script = "if [ $RANK = 1 ]; then exit 3; fi; trap '' TERM; echo waiting; exec sleep 60";
        let out = launch_sh(&["-n", "3", "--grace", "1", "--", "sh", "-c", script]);
        assert_eq!(out.status.code(), Some(3));
        // Ranks 0 and 2 ignore SIGTERM: only the SIGKILL after the grace time ends them.
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("rank 1 exited with status 3; stopping the other ranks"),
            "{err}"
        );
    }
}
