//! How many ranks of a job share this node, as each launcher tells its processes.

use anyhow::Result;

/// The variable holding the number of ranks on this node, per launcher (`LaunchInfo::source`).
/// Slurm's is a list over nodes, read by `slurm_tasks_here`.
fn local_size_var(launcher: &str) -> Option<&'static str> {
    match launcher {
        // torchrun; the spawner (`spawn.rs`) and scripts/launch.sh speak torchrun's variables.
        "torchrun" => Some("LOCAL_WORLD_SIZE"),
        "openmpi" => Some("OMPI_COMM_WORLD_LOCAL_SIZE"),
        // MPICH's Hydra (and Intel MPI, built on it).
        "mpich" => Some("MPI_LOCALNRANKS"),
        _ => None,
    }
}

/// (ranks on this node, the variable that said so), or None where the launcher did not say.
/// `get` looks a variable up (unset or blank: None).
pub(super) fn ranks_on_this_node(
    launcher: &str,
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<(usize, String)>> {
    if let Some(var) = local_size_var(launcher) {
        return get(var)
            .map(|v| Ok((super::positive(var, &v, "ranks on this node")?, var.to_string())))
            .transpose();
    }
    if launcher != "slurm" {
        return Ok(None);
    }
    if let Some(v) = get("SLURM_NTASKS_PER_NODE") {
        let n = super::positive("SLURM_NTASKS_PER_NODE", &v, "tasks per node")?;
        return Ok(Some((n, "SLURM_NTASKS_PER_NODE".into())));
    }
    // A job step's own layout first: a step may use part of the allocation.
    for var in ["SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"] {
        if let Some(list) = get(var) {
            let node = match get("SLURM_NODEID") {
                Some(v) => v
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| anyhow::anyhow!("SLURM_NODEID = {v:?}: expected a node index (0, 1, ...)"))?,
                None => 0,
            };
            let n = slurm_tasks_here(&list, node).map_err(|why| anyhow::anyhow!("{var} = {list:?}: {why}"))?;
            return Ok(Some((n, format!("{var}, node {node}"))));
        }
    }
    Ok(None)
}

/// The tasks on node `node` from Slurm's compressed list of tasks per node: "4", "2(x3),1".
fn slurm_tasks_here(list: &str, node: usize) -> std::result::Result<usize, String> {
    let mut first = 0;
    for item in list.split(',') {
        let item = item.trim();
        let (count, repeat) = match item.split_once("(x") {
            Some((c, r)) => (c, r.strip_suffix(')').ok_or_else(|| format!("{item:?} lacks its ')'"))?),
            None => (item, "1"),
        };
        let count = count
            .parse::<usize>()
            .ok()
            .filter(|&c| c > 0)
            .ok_or_else(|| format!("{item:?} is not a positive task count"))?;
        let repeat = repeat
            .parse::<usize>()
            .ok()
            .filter(|&r| r > 0)
            .ok_or_else(|| format!("{item:?} has no positive repeat count"))?;
        if node < first + repeat {
            return Ok(count);
        }
        first += repeat;
    }
    Err(format!("lists {first} nodes, none for SLURM_NODEID {node}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn each_launcher_names_its_ranks_on_this_node() {
        let vars = [
            ("LOCAL_WORLD_SIZE", "3"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
            ("MPI_LOCALNRANKS", "5"),
        ];
        let get = env(&vars);
        let n = |l| ranks_on_this_node(l, &get).unwrap().map(|(n, _)| n);
        assert_eq!(n("torchrun"), Some(3));
        assert_eq!(n("openmpi"), Some(4));
        assert_eq!(n("mpich"), Some(5));
        assert_eq!(n("none"), None);
        assert_eq!(n("slurm"), None);
    }

    #[test]
    fn slurm_lists_tasks_per_node_compressed() {
        assert_eq!(slurm_tasks_here("4", 0), Ok(4));
        for (node, want) in [(0, 2), (2, 2), (3, 1), (4, 3)] {
            assert_eq!(slurm_tasks_here("2(x3),1,3", node), Ok(want), "node {node}");
        }
        assert!(slurm_tasks_here("2(x3),1", 4).unwrap_err().contains("lists 4 nodes"));
        assert!(slurm_tasks_here("2(x3", 0).unwrap_err().contains("')'"));
        assert!(slurm_tasks_here("0", 0).unwrap_err().contains("positive task count"));
        let vars = [("SLURM_TASKS_PER_NODE", "2(x2),1"), ("SLURM_NODEID", "2")];
        let got = ranks_on_this_node("slurm", &env(&vars)).unwrap().unwrap();
        assert_eq!(got, (1, "SLURM_TASKS_PER_NODE, node 2".to_string()));
        let vars = [("SLURM_TASKS_PER_NODE", "8"), ("SLURM_NTASKS_PER_NODE", "2")];
        assert_eq!(ranks_on_this_node("slurm", &env(&vars)).unwrap().unwrap().0, 2);
    }

    #[test]
    fn a_malformed_count_names_its_variable() {
        for (launcher, var, value) in [
            ("openmpi", "OMPI_COMM_WORLD_LOCAL_SIZE", "x"),
            ("torchrun", "LOCAL_WORLD_SIZE", "0"),
            ("slurm", "SLURM_NTASKS_PER_NODE", "-1"),
            ("slurm", "SLURM_TASKS_PER_NODE", "2(x"),
        ] {
            let vars = [(var, value)];
            let e = format!("{:#}", ranks_on_this_node(launcher, &env(&vars)).unwrap_err());
            assert!(e.contains(&format!("{var} = {value:?}")), "{e}");
        }
        let vars = [("SLURM_TASKS_PER_NODE", "2"), ("SLURM_NODEID", "a")];
        let e = format!("{:#}", ranks_on_this_node("slurm", &env(&vars)).unwrap_err());
        assert!(e.contains("SLURM_NODEID = \"a\""), "{e}");
    }
}
