//! Choosing flex tasks to preempt so that a critical task fits, losing as little work as
//! possible.
//!
//! A victim's work is what killing it throws away: the CPU it has been granted times how long
//! it has run (cpu-millis x seconds; a task not started yet costs nothing). On each node that
//! the critical task's hard constraints admit, victims are taken cheapest first until the task
//! fits; the node whose victims cost least wins, then the one with fewer victims.

use berth_model::resources::Resources;

/// A flex task that could be preempted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Task id.
    pub task_id: String,
    /// What it holds.
    pub resources: Resources,
    /// Work lost if it is killed now.
    pub work: u64,
}

/// One node's view for a preemption decision.
#[derive(Debug, Clone)]
pub struct NodeCandidates {
    /// Node id.
    pub node_id: String,
    /// Capacity free now.
    pub free: Resources,
    /// Its preemptible tasks.
    pub victims: Vec<Candidate>,
}

/// The chosen node and the tasks to preempt there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Where the critical task will go.
    pub node_id: String,
    /// The tasks to preempt, cheapest first.
    pub victims: Vec<String>,
    /// Their total work.
    pub work: u64,
}

/// The cheapest way to make room for `need`, if preempting flex tasks can make any.
pub fn plan(need: &Resources, nodes: Vec<NodeCandidates>) -> Option<Plan> {
    let mut best: Option<Plan> = None;
    for mut n in nodes {
        if need.fits_in(&n.free) {
            // Room without preempting anything: not a preemption case.
            continue;
        }
        n.victims
            .sort_by(|a, b| (a.work, &a.task_id).cmp(&(b.work, &b.task_id)));
        let mut free = n.free;
        let mut taken = Vec::new();
        let mut work = 0u64;
        for v in &n.victims {
            if need.fits_in(&free) {
                break;
            }
            free = free.saturating_add(&v.resources);
            work = work.saturating_add(v.work);
            taken.push(v.task_id.clone());
        }
        if !need.fits_in(&free) {
            continue;
        }
        let better = best.as_ref().is_none_or(|b| {
            (work, taken.len(), &n.node_id) < (b.work, b.victims.len(), &b.node_id)
        });
        if better {
            best = Some(Plan {
                node_id: n.node_id,
                victims: taken,
                work,
            });
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(cpu: u32) -> Resources {
        Resources {
            cpu_millis: cpu,
            memory_mib: 64,
            ..Default::default()
        }
    }

    fn victim(id: &str, cpu: u32, work: u64) -> Candidate {
        Candidate {
            task_id: id.into(),
            resources: res(cpu),
            work,
        }
    }

    #[test]
    fn picks_the_node_and_victims_that_lose_least_work() {
        let nodes = vec![
            NodeCandidates {
                node_id: "a".into(),
                free: res(0),
                // Two long-running tasks would have to go.
                victims: vec![victim("a1", 500, 900), victim("a2", 500, 800)],
            },
            NodeCandidates {
                node_id: "b".into(),
                free: res(500),
                // One task just started is enough; the big old one stays.
                victims: vec![victim("b-old", 1000, 5000), victim("b-new", 500, 10)],
            },
        ];
        let p = plan(&res(1000), nodes).unwrap();
        assert_eq!(p.node_id, "b");
        assert_eq!(p.victims, ["b-new"]);
        assert_eq!(p.work, 10);
    }

    #[test]
    fn no_plan_when_preempting_everything_is_not_enough() {
        let nodes = vec![NodeCandidates {
            node_id: "a".into(),
            free: res(100),
            victims: vec![victim("a1", 200, 1)],
        }];
        assert_eq!(plan(&res(1000), nodes), None);
    }

    #[test]
    fn fewer_victims_break_ties_of_equal_work() {
        let nodes = vec![
            NodeCandidates {
                node_id: "a".into(),
                free: res(0),
                victims: vec![victim("a1", 500, 0), victim("a2", 500, 0)],
            },
            NodeCandidates {
                node_id: "b".into(),
                free: res(0),
                victims: vec![victim("b1", 1000, 0)],
            },
        ];
        assert_eq!(plan(&res(1000), nodes).unwrap().victims, ["b1"]);
    }
}
