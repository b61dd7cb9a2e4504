//! How a job runs on this machine: every worker a thread of this process, this process one rank of
//! a launcher's job, or this process starting one process per worker. A pure function of what is
//! known before anything starts, so the whole table is tested without GPUs or launchers.

use crate::config::Backend;
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Nccl,
    /// Host bytes over the system's MPI (feature `mpi`).
    Mpi,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "tcp",
            Transport::Nccl => "nccl",
            Transport::Mpi => "mpi",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Every worker a thread of this process, over the in-process communicator.
    Local,
    /// This process is one rank; someone else started the others.
    Process(Transport),
    /// This process starts one process per worker (which then run `Process`) and waits for them.
    Spawn(Transport),
}

/// The inputs of the decision.
#[derive(Clone, Copy, Debug)]
pub struct Situation {
    pub backend: Backend,
    pub workers: usize,
    /// The model runs on a GPU (`device` is "cuda", "cuda:N", or "auto" with a GPU visible).
    pub cuda: bool,
    /// GPUs the job may spread over, one per process: those visible, or 1 when the config pins an
    /// ordinal ("cuda:N"), since every process would open that same GPU.
    pub gpus: usize,
    /// The world size a launcher (or --rank/--world-size) gave this process; None without one.
    pub launcher: Option<usize>,
    /// This process can start copies of itself (the command line can; a library caller cannot).
    pub can_spawn: bool,
    /// The binary has the `mpi` feature.
    pub mpi_build: bool,
    /// The launcher is mpirun or srun (Open MPI's, MPICH's or Slurm's variables), whose processes
    /// MPI_Init can join.
    pub mpi_launcher: bool,
}

/// How the ranks of a `Process` plan find each other before training: the TCP rendezvous store, or
/// MPI itself (the mpi transport, and NCCL's unique id broadcast over MPI).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bootstrap {
    Tcp,
    Mpi,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub plan: Plan,
    pub bootstrap: Bootstrap,
    /// One line for the log: what was chosen and why.
    pub why: String,
}

fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Decides how the job runs; an error names `dist.backend` and says what would work.
pub fn plan(s: &Situation) -> Result<Choice, String> {
    let mut c = transport(s)?;
    // A GPU job that mpirun/srun started joins through MPI in an MPI build: the cluster's launcher
    // is then the whole launch, no MASTER_ADDR/MASTER_PORT needed.
    if matches!(c.plan, Plan::Process(Transport::Mpi))
        || (matches!(c.plan, Plan::Process(Transport::Nccl)) && s.mpi_build && s.mpi_launcher)
    {
        c.bootstrap = Bootstrap::Mpi;
        if c.plan == Plan::Process(Transport::Nccl) {
            c.why.push_str(" (NCCL bootstrapped over MPI)");
        }
    }
    Ok(c)
}

fn transport(s: &Situation) -> Result<Choice, String> {
    let p = s.workers;
    let workers = count(p, "worker", "workers");
    let on = if s.cuda {
        count(s.gpus, "GPU", "GPUs")
    } else {
        "the CPU".to_string()
    };
    let choice = |plan, why: String| {
        Ok(Choice {
            plan,
            bootstrap: Bootstrap::Tcp,
            why,
        })
    };
    if s.backend == Backend::Nccl && !s.cuda {
        return Err(
            "dist.backend = \"nccl\" needs the model on a GPU, but the device is the CPU (no GPU visible, or a \
             binary without `cuda`): use dist.backend = \"tcp\" or \"auto\""
                .into(),
        );
    }
    if s.backend == Backend::Mpi && !s.mpi_build {
        return Err(
            "dist.backend = \"mpi\": this binary was built without the `mpi` feature: build with `--features mpi`, \
             or use dist.backend = \"tcp\" or \"auto\""
                .into(),
        );
    }
    let explicit = match s.backend {
        Backend::Local => {
            return choice(
                Plan::Local,
                format!("{workers} on {on}: in-process workers (dist.backend = \"local\")"),
            )
        }
        Backend::Tcp => Some(Transport::Tcp),
        Backend::Nccl => Some(Transport::Nccl),
        Backend::Mpi => Some(Transport::Mpi),
        Backend::Auto => None,
    };
    // Under `srun` or in an allocation, every command inherits a launcher's variables for a world of
    // one; for `auto` that is no launcher at all, so the job can still use this node's GPUs.
    let launcher = s.launcher.filter(|&w| explicit.is_some() || w > 1);
    if let Some(world) = launcher {
        let t = explicit.unwrap_or(match (s.cuda, s.mpi_build && s.mpi_launcher) {
            (true, _) => Transport::Nccl,
            (false, true) => Transport::Mpi,
            (false, false) => Transport::Tcp,
        });
        return choice(
            Plan::Process(t),
            format!("one rank of a {world}-process job from the launcher, over {t}"),
        );
    }
    match explicit {
        None if p == 1 => choice(Plan::Local, format!("{workers} on {on}: in-process (local backend)")),
        None if s.cuda && s.gpus >= p && s.can_spawn => choice(
            Plan::Spawn(Transport::Nccl),
            format!("{workers} on {on}: one process per GPU over nccl"),
        ),
        None if s.cuda && s.gpus >= p => choice(
            Plan::Local,
            format!(
                "{workers} on {on}: in-process workers on GPU 0 (local backend; this caller cannot start processes)"
            ),
        ),
        None if s.cuda => choice(
            Plan::Local,
            format!("{workers} on {on}: in-process workers, one after another on GPU 0 (local backend)"),
        ),
        None => choice(
            Plan::Local,
            format!("{workers} on {on}: in-process workers (local backend)"),
        ),
        Some(t) if p == 1 => choice(Plan::Process(t), format!("{workers} on {on}: a one-process {t} job")),
        // MPI's processes come from its launcher; this one cannot make itself their parent.
        Some(Transport::Mpi) => Err(format!(
            "dist.backend = \"mpi\" with dist.workers = {p} and no launcher: start the ranks with \
             `mpirun -np {p} gtopk train ...` or `srun -n {p} gtopk train ...`, or use dist.backend = \"tcp\""
        )),
        Some(t) if !s.can_spawn => Err(format!(
            "dist.backend = \"{t}\" with dist.workers = {p} and no launcher: this caller cannot start the \
             processes; start them with a launcher (torchrun, mpirun, srun, scripts/launch.sh) or use \
             dist.backend = \"local\""
        )),
        Some(Transport::Nccl) if s.gpus < p => Err(format!(
            "dist.backend = \"nccl\" with dist.workers = {p} needs a GPU per worker, but {on} can be used \
             (NCCL cannot run two ranks on one GPU): use dist.backend = \"auto\" or \"local\" to run several \
             workers on one GPU"
        )),
        Some(t) => choice(
            Plan::Spawn(t),
            format!("{workers} on {on}: starting one process per worker over {t} (dist.backend = \"{t}\")"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Backend::{Auto, Local, Mpi, Nccl, Tcp};
    use Plan::{Process, Spawn};
    use Transport as T;

    /// backend, cuda, gpus, launcher world, workers => plan
    type Row = (Backend, bool, usize, Option<usize>, usize, Plan);

    fn decide(
        backend: Backend,
        cuda: bool,
        gpus: usize,
        launcher: Option<usize>,
        workers: usize,
    ) -> Result<Plan, String> {
        plan(&Situation {
            backend,
            workers,
            cuda,
            gpus,
            launcher,
            can_spawn: true,
            mpi_build: false,
            mpi_launcher: false,
        })
        .map(|c| c.plan)
    }

    #[test]
    fn the_table() {
        #[rustfmt::skip]
        let rows: &[Row] = &[
            // No launcher, auto: a GPU per worker spawns, anything less stays in this process.
            (Auto, true,  8, None,    4, Spawn(T::Nccl)),
            (Auto, true,  4, None,    4, Spawn(T::Nccl)),
            (Auto, true,  2, None,    4, Plan::Local),
            (Auto, true,  1, None,    4, Plan::Local),
            (Auto, false, 0, None,    4, Plan::Local),
            (Auto, true,  4, None,    1, Plan::Local),
            (Auto, false, 0, None,    1, Plan::Local),
            // Under a launcher: one rank, nccl on a GPU, tcp on the CPU.
            (Auto, true,  1, Some(4), 4, Process(T::Nccl)),
            (Auto, false, 0, Some(4), 4, Process(T::Tcp)),
            // A launcher's world of one (an allocation's leaked variables) is no launcher for auto.
            (Auto, true,  4, Some(1), 4, Spawn(T::Nccl)),
            (Auto, false, 0, Some(1), 4, Plan::Local),
            // Explicit transports: the launcher's rank, or processes started here.
            (Tcp,  false, 0, Some(4), 4, Process(T::Tcp)),
            (Tcp,  true,  4, Some(4), 4, Process(T::Tcp)),
            (Tcp,  false, 0, Some(1), 1, Process(T::Tcp)),
            (Tcp,  false, 0, None,    1, Process(T::Tcp)),
            (Tcp,  false, 0, None,    3, Spawn(T::Tcp)),
            (Tcp,  true,  1, None,    3, Spawn(T::Tcp)),
            (Nccl, true,  1, Some(4), 4, Process(T::Nccl)),
            (Nccl, true,  4, None,    4, Spawn(T::Nccl)),
            (Nccl, true,  1, None,    1, Process(T::Nccl)),
            // Explicit local: as before, whatever the machine or the environment says.
            (Local, true,  8, None,    4, Plan::Local),
            (Local, false, 0, Some(4), 4, Plan::Local),
        ];
        for &(backend, cuda, gpus, launcher, workers, want) in rows {
            let got = decide(backend, cuda, gpus, launcher, workers);
            assert_eq!(
                got,
                Ok(want),
                "{backend:?} cuda={cuda} gpus={gpus} launcher={launcher:?} workers={workers}"
            );
        }
    }

    #[test]
    fn refusals_name_dist_backend() {
        for (backend, cuda, gpus, launcher, workers, want) in [
            (Nccl, false, 0, None, 2, "needs the model on a GPU"),
            (Nccl, false, 0, Some(2), 2, "needs the model on a GPU"),
            (Nccl, true, 1, None, 4, "needs a GPU per worker"),
        ] {
            let e = decide(backend, cuda, gpus, launcher, workers).unwrap_err();
            assert!(e.contains("dist.backend = \"nccl\"") && e.contains(want), "{e}");
        }
        let no_spawn = |backend| {
            plan(&Situation {
                backend,
                workers: 4,
                cuda: true,
                gpus: 4,
                launcher: None,
                can_spawn: false,
                mpi_build: false,
                mpi_launcher: false,
            })
        };
        let e = no_spawn(Tcp).unwrap_err();
        assert!(e.contains("dist.backend = \"tcp\"") && e.contains("launcher"), "{e}");
        assert_eq!(no_spawn(Auto).unwrap().plan, Plan::Local);
    }

    #[test]
    fn the_log_line_says_what_and_why() {
        let why = |backend, cuda, gpus, workers| {
            plan(&Situation {
                backend,
                workers,
                cuda,
                gpus,
                launcher: None,
                can_spawn: true,
                mpi_build: false,
                mpi_launcher: false,
            })
            .unwrap()
            .why
        };
        assert_eq!(
            why(Auto, true, 1, 4),
            "4 workers on 1 GPU: in-process workers, one after another on GPU 0 (local backend)"
        );
        assert_eq!(
            why(Auto, true, 8, 4),
            "4 workers on 8 GPUs: one process per GPU over nccl"
        );
        assert_eq!(
            why(Auto, false, 0, 4),
            "4 workers on the CPU: in-process workers (local backend)"
        );
        assert!(why(Tcp, false, 0, 2).contains("starting one process per worker over tcp"));
    }

    /// backend, cuda, mpi build, mpi launcher, launcher world, workers => plan and bootstrap
    type MpiRow = (Backend, bool, bool, bool, Option<usize>, usize, Plan, Bootstrap);

    #[test]
    fn the_mpi_table() {
        use Bootstrap::{Mpi as ByMpi, Tcp as ByTcp};
        #[rustfmt::skip]
        let rows: &[MpiRow] = &[
            // auto under mpirun/srun in an MPI build: mpi on the CPU, NCCL bootstrapped over MPI.
            (Auto, false, true,  true,  Some(4), 4, Process(T::Mpi),  ByMpi),
            (Auto, true,  true,  true,  Some(4), 4, Process(T::Nccl), ByMpi),
            // ... but not without the feature, nor under torchrun / launch.sh.
            (Auto, false, false, true,  Some(4), 4, Process(T::Tcp),  ByTcp),
            (Auto, true,  false, true,  Some(4), 4, Process(T::Nccl), ByTcp),
            (Auto, false, true,  false, Some(4), 4, Process(T::Tcp),  ByTcp),
            (Auto, true,  true,  false, Some(4), 4, Process(T::Nccl), ByTcp),
            // A world of one from an allocation is no launcher for auto.
            (Auto, false, true,  true,  Some(1), 4, Plan::Local,      ByTcp),
            // Explicit mpi: the launcher's rank, or a one-rank job (MPI singleton).
            (Mpi,  false, true,  true,  Some(4), 4, Process(T::Mpi),  ByMpi),
            (Mpi,  true,  true,  true,  Some(4), 4, Process(T::Mpi),  ByMpi),
            (Mpi,  false, true,  false, None,    1, Process(T::Mpi),  ByMpi),
            // Explicit tcp and nccl keep their own bootstrap choice.
            (Tcp,  false, true,  true,  Some(4), 4, Process(T::Tcp),  ByTcp),
            (Nccl, true,  true,  true,  Some(4), 4, Process(T::Nccl), ByMpi),
            (Nccl, true,  true,  false, None,    4, Spawn(T::Nccl),   ByTcp),
        ];
        for &(backend, cuda, mpi_build, mpi_launcher, launcher, workers, want, boot) in rows {
            let got = plan(&Situation {
                backend,
                workers,
                cuda,
                gpus: if cuda { 4 } else { 0 },
                launcher,
                can_spawn: true,
                mpi_build,
                mpi_launcher,
            })
            .map(|c| (c.plan, c.bootstrap));
            assert_eq!(
                got,
                Ok((want, boot)),
                "{backend:?} cuda={cuda} mpi_build={mpi_build} mpi_launcher={mpi_launcher} launcher={launcher:?} \
                 workers={workers}"
            );
        }
    }

    #[test]
    fn mpi_refusals_name_dist_backend_and_the_fix() {
        let refuse = |mpi_build, workers| {
            plan(&Situation {
                backend: Mpi,
                workers,
                cuda: false,
                gpus: 0,
                launcher: None,
                can_spawn: true,
                mpi_build,
                mpi_launcher: false,
            })
            .unwrap_err()
        };
        let e = refuse(false, 1);
        assert!(
            e.contains("dist.backend = \"mpi\"") && e.contains("--features mpi"),
            "{e}"
        );
        let e = refuse(true, 3);
        assert!(
            e.contains("dist.backend = \"mpi\"") && e.contains("mpirun -np 3"),
            "{e}"
        );
    }
}
