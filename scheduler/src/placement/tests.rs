//! Placement tests: each constraint, scoring, explanations, and invariants under random load.

use super::*;
use proptest::prelude::{ProptestConfig, any, prop_assert, prop_assert_eq, proptest};
use proptest::strategy::Strategy as _;

fn res(cpu: u32, mem: u64) -> Resources {
    Resources {
        cpu_millis: cpu,
        memory_mib: mem,
        ..Default::default()
    }
}

fn node(id: &str, cap: Resources, attrs: &[(&str, &str)]) -> NodeSpec {
    NodeSpec {
        id: id.into(),
        capacity: cap,
        attributes: attrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn constraints(hard: &[&str], soft: &[&str]) -> Constraints {
    Constraints::parse(&berth_proto::Constraints {
        hard: hard.iter().map(|s| s.to_string()).collect(),
        soft: soft.iter().map(|s| s.to_string()).collect(),
    })
    .expect("valid constraints")
}

fn place(
    e: &mut Engine,
    job: &str,
    r: Resources,
    c: &Constraints,
    s: Strategy,
    n: usize,
) -> (Vec<String>, Option<String>) {
    e.place_job(
        &Request {
            job_id: job,
            resources: &r,
            constraints: c,
            strategy: s,
        },
        n,
    )
}

fn none() -> Constraints {
    Constraints::default()
}

#[test]
fn binpack_prefers_fuller_and_spread_emptier() {
    let mut e = Engine::new();
    let cap = res(4000, 8192);
    e.upsert_node(node("empty", cap, &[]));
    e.upsert_node(node("half", cap, &[]));
    e.allocate("half", "other", &res(2000, 4096));
    let r = res(500, 512);
    let (b, _) = place(&mut e, "j1", r, &none(), Strategy::Binpack, 1);
    assert_eq!(b, ["half"]);
    let (s, _) = place(&mut e, "j2", r, &none(), Strategy::Spread, 1);
    assert_eq!(s, ["empty"]);
}

#[test]
fn skips_nodes_that_do_not_fit_and_explains_the_resource() {
    let mut e = Engine::new();
    e.upsert_node(node("node-a", res(4000, 20 * 1024), &[]));
    e.upsert_node(node("node-b", res(4000, 8192), &[]));
    let (p, why) = place(
        &mut e,
        "j",
        res(500, 64 * 1024),
        &none(),
        Strategy::Binpack,
        1,
    );
    assert!(p.is_empty());
    assert_eq!(
        why.unwrap(),
        "2 nodes: memory (needs 64Gi; largest free: 20Gi on node-a)"
    );
    let (p, why) = place(
        &mut e,
        "j",
        res(500, 16 * 1024),
        &none(),
        Strategy::Binpack,
        2,
    );
    assert_eq!(p, ["node-a"]);
    assert!(why.unwrap().starts_with("2 nodes: memory"));
}

#[test]
fn no_nodes_and_not_ready_nodes_are_explained() {
    let mut e = Engine::new();
    let r = res(100, 64);
    let (_, why) = place(&mut e, "j", r, &none(), Strategy::Binpack, 1);
    assert_eq!(why.unwrap(), "no ready nodes");
    e.upsert_node(node("a", res(1000, 1000), &[]));
    e.set_schedulable("a", false);
    let (_, why) = place(&mut e, "j", r, &none(), Strategy::Binpack, 1);
    assert_eq!(why.unwrap(), "1 node: not ready");
    e.set_schedulable("a", true);
    assert_eq!(
        place(&mut e, "j", r, &none(), Strategy::Binpack, 1).0,
        ["a"]
    );
}

#[test]
fn unique_host_puts_one_task_per_node() {
    let mut e = Engine::new();
    for id in ["a", "b"] {
        e.upsert_node(node(id, res(8000, 8192), &[]));
    }
    let c = constraints(&["unique_host"], &[]);
    let (p, why) = place(&mut e, "j", res(100, 64), &c, Strategy::Binpack, 3);
    let mut p2 = p.clone();
    p2.sort();
    assert_eq!(p2, ["a", "b"]);
    assert_eq!(why.unwrap(), "2 nodes: unique host");
    // Another job is not affected.
    assert_eq!(
        place(&mut e, "k", res(100, 64), &c, Strategy::Binpack, 2)
            .0
            .len(),
        2
    );
}

#[test]
fn exclusive_host_keeps_other_jobs_off_and_avoids_busy_nodes() {
    let mut e = Engine::new();
    for id in ["busy", "free"] {
        e.upsert_node(node(id, res(8000, 8192), &[]));
    }
    e.allocate("busy", "other", &res(100, 64));
    let c = constraints(&["exclusive_host"], &[]);
    let (p, _) = place(&mut e, "x", res(100, 64), &c, Strategy::Binpack, 2);
    assert_eq!(p, ["free", "free"], "its own tasks may share its node");
    // No one else lands on the exclusive job's node, even though it is the fuller one.
    let (p, _) = place(&mut e, "y", res(100, 64), &none(), Strategy::Binpack, 1);
    assert_eq!(p, ["busy"]);
    e.allocate("busy", "y", &res(7700, 64));
    let (_, why) = place(&mut e, "z", res(200, 64), &none(), Strategy::Binpack, 1);
    assert_eq!(
        why.unwrap(),
        "1 node: exclusive host; 1 node: cpu (needs 200m; largest free: 100m on busy)",
        "on equal counts, constraints come before resources"
    );
    // Once its tasks are gone the node is open again.
    e.release("free", "x", &res(100, 64));
    e.release("free", "x", &res(100, 64));
    assert_eq!(
        place(&mut e, "z", res(200, 64), &none(), Strategy::Binpack, 1).0,
        ["free"]
    );
}

#[test]
fn hard_zone_balance_fills_zones_evenly() {
    let mut e = Engine::new();
    for (id, z) in [("a1", "a"), ("a2", "a"), ("b1", "b"), ("c1", "c")] {
        e.upsert_node(node(id, res(16000, 16384), &[("zone", z)]));
    }
    e.upsert_node(node("nozone", res(16000, 16384), &[]));
    let c = constraints(&["zone_balance"], &[]);
    let (p, why) = place(&mut e, "j", res(100, 64), &c, Strategy::Binpack, 9);
    assert!(why.is_none());
    let mut per_zone = HashMap::new();
    for id in &p {
        assert_ne!(id, "nozone");
        *per_zone.entry(&id[..1]).or_insert(0) += 1;
    }
    assert_eq!(per_zone.values().collect::<Vec<_>>(), [&3, &3, &3]);
    // Zone c full: the balance holds, and the reason says so.
    e.allocate("c1", "filler", &res(16000 - 300, 64));
    let (p, why) = place(&mut e, "j", res(100, 64), &c, Strategy::Binpack, 3);
    assert_eq!(p.len(), 2);
    let why = why.unwrap();
    // a1, a2, b1 are in zones that are ahead; `nozone` has no zone at all.
    assert!(why.contains("4 nodes: zone balance"), "{why}");
    assert!(why.contains("1 node: cpu"), "{why}");
}

#[test]
fn attribute_rules_filter_and_are_named_when_they_exclude() {
    let mut e = Engine::new();
    e.upsert_node(node(
        "m5",
        res(4000, 4096),
        &[("instance_type", "m5.xlarge")],
    ));
    e.upsert_node(node(
        "c5",
        res(4000, 4096),
        &[("instance_type", "c5.xlarge")],
    ));
    e.upsert_node(node("bare", res(4000, 4096), &[]));
    let c = constraints(&["instance_type == m5.xlarge"], &[]);
    let (p, why) = place(&mut e, "j", res(3000, 64), &c, Strategy::Binpack, 2);
    assert_eq!(p, ["m5"]);
    assert_eq!(
        why.unwrap(),
        "2 nodes: instance_type == m5.xlarge; 1 node: cpu (needs 3; largest free: 1 on m5)"
    );
    let c = constraints(&["instance_type =~ ^c5"], &[]);
    assert_eq!(
        place(&mut e, "k", res(100, 64), &c, Strategy::Binpack, 1).0,
        ["c5"]
    );
    let c = constraints(&["instance_type exists", "instance_type != c5.xlarge"], &[]);
    assert_eq!(
        place(&mut e, "l", res(100, 64), &c, Strategy::Binpack, 1).0,
        ["m5"]
    );
}

#[test]
fn soft_constraints_prefer_but_do_not_block() {
    let mut e = Engine::new();
    e.upsert_node(node("ssd", res(4000, 4096), &[("disk", "ssd")]));
    e.upsert_node(node("hdd", res(4000, 4096), &[("disk", "hdd")]));
    // hdd is fuller, so binpack alone would pick it.
    e.allocate("hdd", "other", &res(2000, 2048));
    let c = constraints(&[], &["disk == ssd"]);
    assert_eq!(
        place(&mut e, "j", res(100, 64), &c, Strategy::Binpack, 1).0,
        ["ssd"]
    );
    // Soft unique host spreads while it can, then doubles up instead of failing.
    let c = constraints(&[], &["unique_host"]);
    let (p, why) = place(&mut e, "u", res(100, 64), &c, Strategy::Binpack, 3);
    assert!(why.is_none());
    let mut p2 = p[..2].to_vec();
    p2.sort();
    assert_eq!(p2, ["hdd", "ssd"]);
}

#[test]
fn release_and_placeholders_keep_the_books() {
    let mut e = Engine::new();
    // A task restored onto a node that has not registered yet.
    e.allocate("ghost", "j", &res(500, 64));
    assert_eq!(e.usage("ghost"), Some((res(500, 64), 1)));
    let (_, why) = place(&mut e, "k", res(1, 1), &none(), Strategy::Binpack, 1);
    assert_eq!(why.unwrap(), "1 node: not ready");
    e.upsert_node(node("ghost", res(1000, 1024), &[]));
    let (p, _) = place(&mut e, "k", res(500, 64), &none(), Strategy::Binpack, 1);
    assert_eq!(p, ["ghost"]);
    let (_, why) = place(&mut e, "k", res(500, 64), &none(), Strategy::Binpack, 1);
    assert!(why.unwrap().starts_with("1 node: cpu"));
    e.release("ghost", "j", &res(500, 64));
    assert_eq!(e.usage("ghost"), Some((res(500, 64), 1)));
    assert_eq!(
        place(&mut e, "k", res(500, 64), &none(), Strategy::Binpack, 1).0,
        ["ghost"]
    );
}

#[test]
fn a_reserved_node_is_kept_for_its_job() {
    let mut e = Engine::new();
    e.upsert_node(node("r", res(4000, 4096), &[]));
    e.reserve("r", "critical");
    let (_, why) = place(&mut e, "other", res(100, 64), &none(), Strategy::Binpack, 1);
    assert_eq!(why.unwrap(), "1 node: reserved for a preempting task");
    assert_eq!(
        place(
            &mut e,
            "critical",
            res(100, 64),
            &none(),
            Strategy::Binpack,
            1
        )
        .0,
        ["r"]
    );
    e.unreserve("r");
    assert_eq!(
        place(&mut e, "other", res(100, 64), &none(), Strategy::Binpack, 1).0,
        ["r"]
    );
}

#[derive(Debug, Clone)]
struct JobGen {
    cpu: u32,
    mem: u64,
    tasks: usize,
    unique: bool,
    zone: bool,
    rule: Option<&'static str>,
    spread: bool,
}

fn job_gen() -> impl proptest::strategy::Strategy<Value = JobGen> {
    (
        1u32..3000,
        1u64..4096,
        1usize..30,
        any::<bool>(),
        any::<bool>(),
        proptest::option::of(proptest::sample::select(
            &[
                "zone in [a, b]",
                "kind == big",
                "kind != big",
                "kind exists",
            ][..],
        )),
        any::<bool>(),
    )
        .prop_map(|(cpu, mem, tasks, unique, zone, rule, spread)| JobGen {
            cpu,
            mem,
            tasks,
            unique,
            zone,
            rule,
            spread,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// No node is ever over-committed, unique host is never violated, hard zone balance stays
    /// within 1, and the indexed search never misses a node that a full scan would find.
    #[test]
    fn placement_invariants(
        nodes in proptest::collection::vec((1u32..16, 1u64..16, 0usize..3, any::<bool>()), 1..30),
        jobs in proptest::collection::vec(job_gen(), 1..12),
    ) {
        let mut e = Engine::new();
        let zones = ["a", "b", "c"];
        let mut caps = HashMap::new();
        for (i, (cpu, mem, z, big)) in nodes.iter().enumerate() {
            let id = format!("n{i}");
            let cap = res(cpu * 1000, mem * 1024);
            let mut attrs = vec![("zone", zones[*z])];
            if *big {
                attrs.push(("kind", "big"));
            }
            e.upsert_node(node(&id, cap, &attrs));
            caps.insert(id, (cap, zones[*z]));
        }
        let mut used: HashMap<String, Resources> = HashMap::new();
        for (j, g) in jobs.iter().enumerate() {
            let job = format!("job{j}");
            let mut hard = Vec::new();
            if g.unique { hard.push("unique_host"); }
            if g.zone { hard.push("zone_balance"); }
            if let Some(r) = g.rule { hard.push(r); }
            let c = constraints(&hard, &[]);
            let r = res(g.cpu, g.mem);
            let strategy = if g.spread { Strategy::Spread } else { Strategy::Binpack };
            let req = Request { job_id: &job, resources: &r, constraints: &c, strategy };
            let (placed, why) = e.place_job(&req, g.tasks);
            let mut per_node: HashMap<&str, u32> = HashMap::new();
            let mut per_zone: HashMap<&str, u32> = HashMap::new();
            for id in &placed {
                let (cap, zone) = caps[id];
                let u = used.entry(id.clone()).or_default();
                *u = u.saturating_add(&r);
                prop_assert!(u.fits_in(&cap), "{id} over-committed: {u} of {cap}");
                *per_node.entry(id).or_default() += 1;
                *per_zone.entry(zone).or_default() += 1;
                let attrs = &e.node(e.by_id[id]).unwrap().attributes;
                for h in &c.hard {
                    prop_assert!(h.matches(attrs), "{id} breaks {h}");
                }
            }
            if g.unique {
                prop_assert!(per_node.values().all(|c| *c == 1), "unique host broken: {per_node:?}");
            }
            if g.zone {
                let live: Vec<&str> = zones.iter().copied()
                    .filter(|z| caps.values().any(|(_, nz)| nz == z)).collect();
                let counts: Vec<u32> = live.iter().map(|z| per_zone.get(z).copied().unwrap_or(0)).collect();
                let (lo, hi) = (counts.iter().min().copied().unwrap_or(0), counts.iter().max().copied().unwrap_or(0));
                prop_assert!(hi - lo <= 1, "zone balance broken: {per_zone:?}");
            }
            if why.is_some() {
                // Whatever the index skipped, a full scan finds nothing either.
                prop_assert_eq!(first_fit(&mut e, &req), None);
            }
        }
    }
}
