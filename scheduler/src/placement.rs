//! Placement: where each task goes, by multi-resource bin-packing under constraints.
//!
//! [`Engine`] keeps every node's free capacity and each job's spread over nodes and zones,
//! indexed so that a decision looks at a handful of nodes rather than all of them:
//!
//! - candidates come from an ordered index of free CPU (binpack walks up from the smallest
//!   node that fits, spread walks down from the emptiest), from the set of empty nodes (for
//!   `exclusive_host`), or from an attribute index (for a hard `KEY == V` / `KEY in [..]`);
//! - each candidate is filtered by resources and hard constraints, and the first
//!   [`SAMPLE`] that pass are scored; the walk goes on (up to [`MAX_FEASIBLE`]) only while no
//!   candidate satisfies every soft constraint.
//!
//! Score = [`W_PACK`] x packing + [`W_SOFT`] x (share of soft constraints met), where packing
//! is the node's mean utilisation over its dimensions after placing the task (binpack) or one
//! minus it (spread). Soft constraints outweigh packing: a node meeting them all beats any node
//! that does not.
//!
//! When a task fits nowhere, [`Engine::explain`] scans every node once and counts, per node,
//! the first check that excluded it: "37 nodes: memory; 12 nodes: unique host".

use std::collections::{BTreeMap, BTreeSet, HashMap};

use berth_model::constraint::{AttrOp, Constraint, Constraints, ZONE};
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

impl Strategy {
    /// Reads `binpack` or `spread`.
    pub fn parse(s: &str) -> Option<Strategy> {
        match s {
            "binpack" => Some(Strategy::Binpack),
            "spread" => Some(Strategy::Spread),
            _ => None,
        }
    }
}

/// Weight of packing (or spreading) in a node's score.
pub const W_PACK: f64 = 1.0;
/// Weight of the share of soft constraints met; above [`W_PACK`] so that they win.
pub const W_SOFT: f64 = 2.0;
/// Feasible candidates scored per decision when the best meets every soft constraint.
pub const SAMPLE: usize = 8;
/// Most feasible candidates scored per decision.
pub const MAX_FEASIBLE: usize = 256;

/// A node as placement sees it when it (re)registers.
#[derive(Debug, Clone, Default)]
pub struct NodeSpec {
    /// Node id.
    pub id: String,
    /// Total capacity offered to tasks.
    pub capacity: Resources,
    /// Attributes (`zone`, `instance_type`, ...).
    pub attributes: HashMap<String, String>,
}

/// What a job asks of placement.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The job, for unique/exclusive host and zone balance.
    pub job_id: &'a str,
    /// What one task needs.
    pub resources: &'a Resources,
    /// The job's parsed constraints.
    pub constraints: &'a Constraints,
    /// The job's strategy, or the scheduler's default.
    pub strategy: Strategy,
}

type Slot = usize;
type JobIx = u32;
type ZoneIx = u32;

#[derive(Debug)]
struct Node {
    id: String,
    capacity: Resources,
    allocated: Resources,
    attributes: HashMap<String, String>,
    zone: Option<ZoneIx>,
    schedulable: bool,
    tasks: u32,
    /// Tasks per job on this node.
    jobs: HashMap<JobIx, u32>,
    /// The job that holds this node exclusively, while it has tasks here.
    exclusive: Option<JobIx>,
}

impl Node {
    fn free(&self) -> Resources {
        self.capacity.saturating_sub(&self.allocated)
    }
}

#[derive(Debug, Default)]
struct JobUse {
    nodes: HashMap<Slot, u32>,
    zones: HashMap<ZoneIx, u32>,
    exclusive: bool,
}

/// Why a node cannot take a task, in the order checks are made.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Exclusion {
    NotReady,
    Rule(String),
    ExclusiveHost,
    UniqueHost,
    ZoneBalance,
    Resource(Dimension),
}

impl Exclusion {
    fn label(&self) -> String {
        match self {
            Exclusion::NotReady => "not ready".into(),
            Exclusion::Rule(r) => r.clone(),
            Exclusion::ExclusiveHost => "exclusive host".into(),
            Exclusion::UniqueHost => "unique host".into(),
            Exclusion::ZoneBalance => "zone balance".into(),
            Exclusion::Resource(d) => d.name().to_string(),
        }
    }
}

/// The cluster's nodes and allocations, indexed for placement.
#[derive(Debug, Default)]
pub struct Engine {
    nodes: Vec<Option<Node>>,
    by_id: HashMap<String, Slot>,
    spare: Vec<Slot>,
    /// Schedulable nodes by free CPU.
    by_free_cpu: BTreeSet<(u32, Slot)>,
    /// Schedulable nodes without tasks.
    empty: BTreeSet<Slot>,
    /// Schedulable nodes by attribute key and value.
    by_attr: HashMap<String, HashMap<String, BTreeSet<Slot>>>,
    zone_ix: HashMap<String, ZoneIx>,
    /// Schedulable nodes per zone.
    zone_nodes: Vec<u32>,
    job_ix: HashMap<String, JobIx>,
    job_name: HashMap<JobIx, String>,
    next_job: JobIx,
    job_use: HashMap<JobIx, JobUse>,
}

impl Engine {
    /// An engine with no nodes.
    pub fn new() -> Engine {
        Engine::default()
    }

    /// Adds a node or updates its capacity and attributes; it becomes schedulable. Its
    /// allocations are kept.
    pub fn upsert_node(&mut self, spec: NodeSpec) {
        let zone = spec.attributes.get(ZONE).map(|z| self.zone(z));
        let slot = self.slot(&spec.id);
        self.unindex(slot);
        if let Some(n) = self.nodes[slot].as_mut() {
            n.capacity = spec.capacity;
            n.attributes = spec.attributes;
            n.zone = zone;
            n.schedulable = true;
        }
        self.index(slot);
    }

    /// Marks a node as taking new tasks or not (lost, draining, disconnected).
    pub fn set_schedulable(&mut self, node_id: &str, schedulable: bool) {
        let Some(&slot) = self.by_id.get(node_id) else {
            return;
        };
        self.unindex(slot);
        if let Some(n) = self.nodes[slot].as_mut() {
            n.schedulable = schedulable;
        }
        self.index(slot);
    }

    /// Records a task of `job_id` on `node_id` (creating an unschedulable placeholder for a
    /// node not seen yet, as after a restart).
    pub fn allocate(&mut self, node_id: &str, job_id: &str, res: &Resources) {
        let slot = self.slot(node_id);
        let job = self.job(job_id);
        self.unindex(slot);
        let zone = self.nodes[slot].as_ref().and_then(|n| n.zone);
        if let Some(n) = self.nodes[slot].as_mut() {
            n.allocated = n.allocated.saturating_add(res);
            n.tasks += 1;
            *n.jobs.entry(job).or_default() += 1;
        }
        let exclusive = {
            let u = self.job_use.entry(job).or_default();
            *u.nodes.entry(slot).or_default() += 1;
            if let Some(z) = zone {
                *u.zones.entry(z).or_default() += 1;
            }
            u.exclusive
        };
        if exclusive && let Some(n) = self.nodes[slot].as_mut() {
            n.exclusive = Some(job);
        }
        self.index(slot);
    }

    /// Forgets a task of `job_id` on `node_id`.
    pub fn release(&mut self, node_id: &str, job_id: &str, res: &Resources) {
        let (Some(&slot), Some(&job)) = (self.by_id.get(node_id), self.job_ix.get(job_id)) else {
            return;
        };
        self.unindex(slot);
        let mut zone = None;
        if let Some(n) = self.nodes[slot].as_mut()
            && let Some(c) = n.jobs.get_mut(&job)
        {
            *c -= 1;
            if *c == 0 {
                n.jobs.remove(&job);
                if n.exclusive == Some(job) {
                    n.exclusive = None;
                }
            }
            n.allocated = n.allocated.saturating_sub(res);
            n.tasks = n.tasks.saturating_sub(1);
            zone = n.zone;
        }
        if let Some(u) = self.job_use.get_mut(&job) {
            dec(&mut u.nodes, slot);
            if let Some(z) = zone {
                dec(&mut u.zones, z);
            }
            if u.nodes.is_empty() {
                self.forget_job(job);
            }
        }
        self.index(slot);
    }

    /// What is allocated on a node, and how many tasks it runs.
    pub fn usage(&self, node_id: &str) -> Option<(Resources, u32)> {
        let n = self.node(*self.by_id.get(node_id)?)?;
        Some((n.allocated, n.tasks))
    }

    /// Number of nodes known.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no node is known.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Places up to `count` tasks of one job in one pass and records them. Returns the chosen
    /// node ids in order; when a task fits nowhere, the rest are not tried and the second
    /// value says why.
    pub fn place_job(&mut self, req: &Request<'_>, count: usize) -> (Vec<String>, Option<String>) {
        let mut placed = Vec::with_capacity(count);
        for _ in 0..count {
            match self.choose(req) {
                Some(slot) => {
                    let id = self.nodes[slot].as_ref().map(|n| n.id.clone());
                    if let Some(id) = id {
                        self.allocate(&id, req.job_id, req.resources);
                        placed.push(id);
                    }
                }
                None => {
                    let why = self.explain(req);
                    self.forget_if_idle(req.job_id);
                    return (placed, Some(why));
                }
            }
        }
        (placed, None)
    }

    /// The best node for one task of `req`, without recording it.
    pub fn choose(&mut self, req: &Request<'_>) -> Option<Slot> {
        let job = self.job_ix.get(req.job_id).copied();
        if req
            .constraints
            .hard_has(|c| matches!(c, Constraint::ExclusiveHost))
        {
            // Remember, so that every later allocation of the job claims its node.
            let j = self.job(req.job_id);
            self.job_use.entry(j).or_default().exclusive = true;
        }
        let ctx = Ctx::new(self, req, job);
        let mut best: Option<(f64, Slot)> = None;
        let mut feasible = 0;
        let mut perfect = false;
        let mut consider = |slot: Slot, engine: &Engine| -> bool {
            let Some(n) = engine.node(slot) else {
                return false;
            };
            if ctx.exclusion(engine, slot, n).is_some() {
                return false;
            }
            let (score, all_soft) = ctx.score(engine, slot, n);
            if best.is_none_or(|(b, s)| score > b || score == b && slot < s) {
                best = Some((score, slot));
            }
            feasible += 1;
            perfect |= all_soft;
            feasible >= MAX_FEASIBLE || feasible >= SAMPLE && perfect
        };
        match ctx.source(self) {
            Source::Slots(slots) => {
                for slot in slots {
                    if consider(slot, self) {
                        break;
                    }
                }
            }
            Source::Cpu => {
                let fits = self.by_free_cpu.range((req.resources.cpu_millis, 0)..);
                match req.strategy {
                    Strategy::Binpack => {
                        for &(_, slot) in fits {
                            if consider(slot, self) {
                                break;
                            }
                        }
                    }
                    Strategy::Spread => {
                        for &(_, slot) in fits.rev() {
                            if consider(slot, self) {
                                break;
                            }
                        }
                    }
                }
            }
        }
        best.map(|(_, slot)| slot)
    }

    /// Why one task of `req` fits on no node: each node counted once, under the first check
    /// that excludes it.
    pub fn explain(&self, req: &Request<'_>) -> String {
        if self.by_id.is_empty() {
            return "no ready nodes".to_string();
        }
        let ctx = Ctx::new(self, req, self.job_ix.get(req.job_id).copied());
        let mut counts: BTreeMap<Exclusion, u32> = BTreeMap::new();
        let mut largest: HashMap<Dimension, (u64, &str)> = HashMap::new();
        for (slot, n) in self.nodes.iter().enumerate() {
            let Some(n) = n else { continue };
            match ctx.exclusion(self, slot, n) {
                Some(e) => {
                    if let Exclusion::Resource(d) = e {
                        let free = n.free().get(d);
                        let l = largest.entry(d).or_insert((free, &n.id));
                        if free > l.0 || free == l.0 && n.id.as_str() < l.1 {
                            *l = (free, &n.id);
                        }
                    }
                    *counts.entry(e).or_default() += 1;
                }
                // Fits now: it would be placed on the next pass.
                None => return "a node fits now; waiting for the next pass".to_string(),
            }
        }
        let mut parts: Vec<(u32, Exclusion)> = counts.into_iter().map(|(e, c)| (c, e)).collect();
        parts.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        parts
            .into_iter()
            .map(|(c, e)| {
                let nodes = if c == 1 { "node" } else { "nodes" };
                let mut s = format!("{c} {nodes}: {}", e.label());
                if let Exclusion::Resource(d) = e
                    && let Some((free, id)) = largest.get(&d)
                {
                    s.push_str(&format!(
                        " (needs {}; largest free: {} on {id})",
                        Resources::format(d, req.resources.get(d)),
                        Resources::format(d, *free),
                    ));
                }
                s
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn node(&self, slot: Slot) -> Option<&Node> {
        self.nodes.get(slot).and_then(Option::as_ref)
    }

    fn slot(&mut self, id: &str) -> Slot {
        if let Some(&s) = self.by_id.get(id) {
            return s;
        }
        let node = Node {
            id: id.to_string(),
            capacity: Resources::default(),
            allocated: Resources::default(),
            attributes: HashMap::new(),
            zone: None,
            schedulable: false,
            tasks: 0,
            jobs: HashMap::new(),
            exclusive: None,
        };
        let slot = match self.spare.pop() {
            Some(s) => {
                self.nodes[s] = Some(node);
                s
            }
            None => {
                self.nodes.push(Some(node));
                self.nodes.len() - 1
            }
        };
        self.by_id.insert(id.to_string(), slot);
        slot
    }

    fn zone(&mut self, z: &str) -> ZoneIx {
        if let Some(&ix) = self.zone_ix.get(z) {
            return ix;
        }
        let ix = self.zone_nodes.len() as ZoneIx;
        self.zone_nodes.push(0);
        self.zone_ix.insert(z.to_string(), ix);
        ix
    }

    fn job(&mut self, id: &str) -> JobIx {
        if let Some(&ix) = self.job_ix.get(id) {
            return ix;
        }
        // A handle is free once its job has no tasks anywhere.
        let mut ix = self.next_job;
        while self.job_name.contains_key(&ix) {
            ix = ix.wrapping_add(1);
        }
        self.next_job = ix.wrapping_add(1);
        self.job_ix.insert(id.to_string(), ix);
        self.job_name.insert(ix, id.to_string());
        ix
    }

    fn forget_job(&mut self, job: JobIx) {
        self.job_use.remove(&job);
        if let Some(id) = self.job_name.remove(&job) {
            self.job_ix.remove(&id);
        }
    }

    /// Drops the handle of a job that holds nothing (one whose tasks all failed to place).
    fn forget_if_idle(&mut self, job_id: &str) {
        if let Some(&j) = self.job_ix.get(job_id)
            && self.job_use.get(&j).is_none_or(|u| u.nodes.is_empty())
        {
            self.forget_job(j);
        }
    }

    /// Takes a node out of the indexes before it changes.
    fn unindex(&mut self, slot: Slot) {
        let Some(n) = self.nodes[slot].as_ref() else {
            return;
        };
        if !n.schedulable {
            return;
        }
        self.by_free_cpu.remove(&(n.free().cpu_millis, slot));
        self.empty.remove(&slot);
        for (k, v) in &n.attributes {
            if let Some(set) = self.by_attr.get_mut(k).and_then(|m| m.get_mut(v)) {
                set.remove(&slot);
            }
        }
        if let Some(z) = n.zone {
            self.zone_nodes[z as usize] -= 1;
        }
    }

    /// Puts a node back into the indexes after it changed.
    fn index(&mut self, slot: Slot) {
        let Some(n) = self.nodes[slot].as_ref() else {
            return;
        };
        if !n.schedulable {
            return;
        }
        self.by_free_cpu.insert((n.free().cpu_millis, slot));
        if n.tasks == 0 {
            self.empty.insert(slot);
        }
        for (k, v) in &n.attributes {
            self.by_attr
                .entry(k.clone())
                .or_default()
                .entry(v.clone())
                .or_default()
                .insert(slot);
        }
        if let Some(z) = n.zone {
            self.zone_nodes[z as usize] += 1;
        }
    }
}

fn dec<K: std::hash::Hash + Eq>(m: &mut HashMap<K, u32>, k: K) {
    if let Some(c) = m.get_mut(&k) {
        *c -= 1;
        if *c == 0 {
            m.remove(&k);
        }
    }
}

enum Source {
    /// A short explicit candidate list.
    Slots(Vec<Slot>),
    /// The free-CPU index, in the strategy's direction.
    Cpu,
}

/// One decision's view of a request: its constraints sorted by kind, and the job's spread.
struct Ctx<'r> {
    req: &'r Request<'r>,
    job: Option<JobIx>,
    rules: Vec<&'r Constraint>,
    unique: bool,
    exclusive: bool,
    /// Zones a task may go to under hard zone balance (those where the job has fewest).
    zones: Option<Vec<ZoneIx>>,
    soft_zone_min: u32,
}

impl<'r> Ctx<'r> {
    fn new(e: &Engine, req: &'r Request<'r>, job: Option<JobIx>) -> Ctx<'r> {
        let c = req.constraints;
        let rules = c
            .hard
            .iter()
            .filter(|c| matches!(c, Constraint::Attr { .. }))
            .collect();
        let zone_count = |z: ZoneIx| {
            job.and_then(|j| e.job_use.get(&j))
                .and_then(|u| u.zones.get(&z))
                .copied()
                .unwrap_or(0)
        };
        let live: Vec<ZoneIx> = (0..e.zone_nodes.len() as ZoneIx)
            .filter(|z| e.zone_nodes[*z as usize] > 0)
            .collect();
        let min = live.iter().map(|z| zone_count(*z)).min().unwrap_or(0);
        let zones = c
            .hard_has(|c| matches!(c, Constraint::ZoneBalance))
            .then(|| {
                live.iter()
                    .copied()
                    .filter(|z| zone_count(*z) == min)
                    .collect()
            });
        Ctx {
            req,
            job,
            rules,
            unique: c.hard_has(|c| matches!(c, Constraint::UniqueHost)),
            exclusive: c.hard_has(|c| matches!(c, Constraint::ExclusiveHost)),
            zones,
            soft_zone_min: min,
        }
    }

    fn job_on(&self, e: &Engine, slot: Slot) -> u32 {
        self.job
            .and_then(|j| e.job_use.get(&j))
            .and_then(|u| u.nodes.get(&slot))
            .copied()
            .unwrap_or(0)
    }

    fn zone_count(&self, e: &Engine, z: Option<ZoneIx>) -> u32 {
        match (self.job.and_then(|j| e.job_use.get(&j)), z) {
            (Some(u), Some(z)) => u.zones.get(&z).copied().unwrap_or(0),
            _ => 0,
        }
    }

    /// Where to look for candidates.
    fn source(&self, e: &Engine) -> Source {
        if self.exclusive {
            // Nodes the job already holds, then empty ones.
            let mut slots: Vec<Slot> = self
                .job
                .and_then(|j| e.job_use.get(&j))
                .map(|u| u.nodes.keys().copied().collect())
                .unwrap_or_default();
            slots.sort_unstable();
            slots.extend(e.empty.iter().copied());
            return Source::Slots(slots);
        }
        // The most selective indexed rule, when one is much smaller than the cluster.
        let mut best: Option<Vec<Slot>> = None;
        for r in &self.rules {
            let Constraint::Attr { key, op } = r else {
                continue;
            };
            let values: Vec<&String> = match op {
                AttrOp::Eq(v) => vec![v],
                AttrOp::In(vs) => vs.iter().collect(),
                _ => continue,
            };
            let by_value = e.by_attr.get(key);
            let slots: Vec<Slot> = values
                .iter()
                .filter_map(|v| by_value.and_then(|m| m.get(*v)))
                .flatten()
                .copied()
                .collect();
            if best.as_ref().is_none_or(|b| slots.len() < b.len()) {
                best = Some(slots);
            }
        }
        match best {
            Some(slots) if slots.len() * 4 <= e.by_free_cpu.len() => Source::Slots(slots),
            _ => Source::Cpu,
        }
    }

    /// The first check that keeps this task off the node, if any.
    fn exclusion(&self, e: &Engine, slot: Slot, n: &Node) -> Option<Exclusion> {
        if !n.schedulable {
            return Some(Exclusion::NotReady);
        }
        for r in &self.rules {
            if !r.matches(&n.attributes) {
                return Some(Exclusion::Rule(r.label()));
            }
        }
        let mine = self.job_on(e, slot);
        if self.exclusive && n.tasks > mine {
            return Some(Exclusion::ExclusiveHost);
        }
        if n.exclusive.is_some() && n.exclusive != self.job {
            return Some(Exclusion::ExclusiveHost);
        }
        if self.unique && mine > 0 {
            return Some(Exclusion::UniqueHost);
        }
        if let Some(zones) = &self.zones
            && !n.zone.is_some_and(|z| zones.contains(&z))
        {
            return Some(Exclusion::ZoneBalance);
        }
        let free = n.free();
        for d in Dimension::ALL {
            if self.req.resources.get(d) > free.get(d) {
                return Some(Exclusion::Resource(d));
            }
        }
        None
    }

    /// The node's score, and whether it meets every soft constraint.
    fn score(&self, e: &Engine, slot: Slot, n: &Node) -> (f64, bool) {
        let mut sum = 0.0;
        let mut dims = 0.0;
        for d in Dimension::ALL {
            let cap = n.capacity.get(d);
            if cap == 0 {
                continue;
            }
            let used = cap.saturating_sub(n.free().get(d)) + self.req.resources.get(d);
            sum += used as f64 / cap as f64;
            dims += 1.0;
        }
        let util = if dims == 0.0 { 0.0 } else { sum / dims };
        let pack = match self.req.strategy {
            Strategy::Binpack => util,
            Strategy::Spread => 1.0 - util,
        };
        let soft = &self.req.constraints.soft;
        if soft.is_empty() {
            return (W_PACK * pack, true);
        }
        let met = soft
            .iter()
            .filter(|c| match c {
                Constraint::UniqueHost => self.job_on(e, slot) == 0,
                Constraint::ExclusiveHost => n.tasks == self.job_on(e, slot),
                Constraint::ZoneBalance => {
                    n.zone.is_some() && self.zone_count(e, n.zone) <= self.soft_zone_min
                }
                Constraint::Attr { .. } => c.matches(&n.attributes),
            })
            .count();
        let share = met as f64 / soft.len() as f64;
        (W_PACK * pack + W_SOFT * share, met == soft.len())
    }
}

/// The reference placement for benchmarks: first fit by a linear scan over every node, with
/// the same constraint checks.
pub fn first_fit(e: &mut Engine, req: &Request<'_>) -> Option<String> {
    if req
        .constraints
        .hard_has(|c| matches!(c, Constraint::ExclusiveHost))
    {
        let j = e.job(req.job_id);
        e.job_use.entry(j).or_default().exclusive = true;
    }
    let ctx = Ctx::new(e, req, e.job_ix.get(req.job_id).copied());
    let slot = e
        .nodes
        .iter()
        .enumerate()
        .find(|(slot, n)| {
            n.as_ref()
                .is_some_and(|n| ctx.exclusion(e, *slot, n).is_none())
        })
        .map(|(slot, _)| slot)?;
    let id = e.nodes[slot].as_ref()?.id.clone();
    e.allocate(&id, req.job_id, req.resources);
    Some(id)
}

#[cfg(test)]
mod tests;
