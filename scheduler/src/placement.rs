//! Placement: multi-resource bin-packing of one task onto the best node.
//!
//! Pure functions over a view of the nodes, so that the actor can call them without effects
//! and tests can check them exhaustively. The fitness of a node is its mean utilisation over
//! the dimensions it has, after placing the task: `binpack` picks the highest (fill nodes, keep
//! others empty for big tasks), `spread` the lowest.

use berth_model::resources::{Dimension, Resources};

/// How to choose among nodes that fit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Most-allocated first.
    #[default]
    Binpack,
    /// Least-allocated first.
    Spread,
}

/// What placement needs to know of one node.
#[derive(Debug, Clone)]
pub struct NodeView<'a> {
    /// Node id.
    pub id: &'a str,
    /// Total capacity.
    pub capacity: Resources,
    /// Capacity not yet allocated.
    pub free: Resources,
}

/// The index of the best node in `nodes` for `req`, or a reason users can read.
pub fn place(req: &Resources, nodes: &[NodeView<'_>], strategy: Strategy) -> Result<usize, String> {
    let mut best: Option<(usize, f64)> = None;
    for (i, n) in nodes.iter().enumerate() {
        if !req.fits_in(&n.free) {
            continue;
        }
        let score = fitness(req, n);
        let better = match (best, strategy) {
            (None, _) => true,
            (Some((_, b)), Strategy::Binpack) => score > b,
            (Some((_, b)), Strategy::Spread) => score < b,
        };
        if better {
            best = Some((i, score));
        }
    }
    best.map(|(i, _)| i).ok_or_else(|| why_not(req, nodes))
}

/// Mean utilisation over the node's non-zero dimensions once `req` is placed.
fn fitness(req: &Resources, n: &NodeView<'_>) -> f64 {
    let mut sum = 0.0;
    let mut dims = 0.0;
    for d in Dimension::ALL {
        let cap = n.capacity.get(d);
        if cap == 0 {
            continue;
        }
        let used = cap - n.free.get(d).min(cap) + req.get(d);
        sum += used as f64 / cap as f64;
        dims += 1.0;
    }
    if dims == 0.0 { 0.0 } else { sum / dims }
}

/// Explains why `req` fits on none of `nodes`.
pub fn why_not(req: &Resources, nodes: &[NodeView<'_>]) -> String {
    if nodes.is_empty() {
        return "no ready nodes".to_string();
    }
    for d in Dimension::ALL {
        let want = req.get(d);
        if want == 0 {
            continue;
        }
        let largest = nodes
            .iter()
            .max_by(|a, b| a.free.get(d).cmp(&b.free.get(d)).then(b.id.cmp(a.id)));
        if let Some(n) = largest
            && n.free.get(d) < want
        {
            return format!(
                "no node has {} {} free (largest: {} on {})",
                Resources::format(d, want),
                d.name(),
                Resources::format(d, n.free.get(d)),
                n.id
            );
        }
    }
    format!(
        "no node has {req} free at once ({} nodes checked)",
        nodes.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(cpu: u32, mem: u64) -> Resources {
        Resources {
            cpu_millis: cpu,
            memory_mib: mem,
            ..Default::default()
        }
    }

    fn node(id: &str, cap: Resources, free: Resources) -> NodeView<'_> {
        NodeView {
            id,
            capacity: cap,
            free,
        }
    }

    #[test]
    fn binpack_prefers_fuller_and_spread_emptier() {
        let cap = res(4000, 8192);
        let nodes = [node("empty", cap, cap), node("half", cap, res(2000, 4096))];
        let req = res(500, 512);
        assert_eq!(place(&req, &nodes, Strategy::Binpack), Ok(1));
        assert_eq!(place(&req, &nodes, Strategy::Spread), Ok(0));
    }

    #[test]
    fn skips_nodes_that_do_not_fit() {
        let cap = res(4000, 8192);
        let nodes = [node("full", cap, res(100, 8192)), node("ok", cap, cap)];
        assert_eq!(place(&res(500, 64), &nodes, Strategy::Binpack), Ok(1));
    }

    #[test]
    fn explains_the_binding_dimension() {
        let nodes = [
            node("node-a", res(4000, 20 * 1024), res(4000, 20 * 1024)),
            node("node-b", res(4000, 8192), res(4000, 8192)),
        ];
        assert_eq!(
            place(&res(500, 64 * 1024), &nodes, Strategy::Binpack),
            Err("no node has 64Gi memory free (largest: 20Gi on node-a)".to_string())
        );
        assert_eq!(
            place(&res(1, 1), &[], Strategy::Binpack),
            Err("no ready nodes".into())
        );
    }

    #[test]
    fn explains_when_no_single_node_has_everything() {
        let nodes = [
            node("cpu-rich", res(4000, 100), res(4000, 100)),
            node("mem-rich", res(100, 4000), res(100, 4000)),
        ];
        let err = place(&res(1000, 1000), &nodes, Strategy::Binpack).unwrap_err();
        assert!(err.contains("at once (2 nodes checked)"), "{err}");
    }
}
