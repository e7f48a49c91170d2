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
use rustc_hash::FxHashMap;

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
/// Nodes ordered by free CPU.
type CpuIndex = BTreeSet<(u32, Slot)>;

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
    jobs: FxHashMap<JobIx, u32>,
    /// The job that holds this node exclusively, while it has tasks here.
    exclusive: Option<JobIx>,
    /// The job this node's freed room is kept for (a preemption in progress).
    reserved: Option<JobIx>,
}

impl Node {
    fn free(&self) -> Resources {
        self.capacity.saturating_sub(&self.allocated)
    }
}

#[derive(Debug, Default)]
struct JobUse {
    nodes: FxHashMap<Slot, u32>,
    zones: FxHashMap<ZoneIx, u32>,
    exclusive: bool,
    /// Nodes reserved for the job.
    reserved: u32,
}

/// Why a node cannot take a task, in the order checks are made.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Exclusion {
    NotReady,
    /// The index of a hard attribute rule in the request's list.
    Rule(usize),
    ExclusiveHost,
    Reserved,
    UniqueHost,
    ZoneBalance,
    Resource(Dimension),
}

impl Exclusion {
    fn label(&self, rules: &[&Constraint]) -> String {
        match self {
            Exclusion::NotReady => "not ready".into(),
            Exclusion::Rule(i) => rules.get(*i).map(|r| r.label()).unwrap_or_default(),
            Exclusion::ExclusiveHost => "exclusive host".into(),
            Exclusion::Reserved => "reserved for a preempting task".into(),
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
    by_free_cpu: CpuIndex,
    /// Schedulable nodes without tasks.
    empty: BTreeSet<Slot>,
    /// Schedulable nodes by attribute key and value, then by free CPU.
    by_attr: HashMap<String, HashMap<String, CpuIndex>>,
    zone_ix: HashMap<String, ZoneIx>,
    /// Schedulable nodes per zone.
    zone_nodes: Vec<u32>,
    job_ix: HashMap<String, JobIx>,
    job_name: FxHashMap<JobIx, String>,
    next_job: JobIx,
    job_use: FxHashMap<JobIx, JobUse>,
    /// Bumped whenever room may have appeared (a release, a node added or back).
    epoch: u64,
    /// Capacity of the schedulable nodes.
    total: Resources,
}

impl Engine {
    /// An engine with no nodes.
    pub fn new() -> Engine {
        Engine::default()
    }

    /// Adds a node or updates its capacity and attributes; it becomes schedulable. Its
    /// allocations are kept.
    pub fn upsert_node(&mut self, spec: NodeSpec) {
        self.epoch += 1;
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
        self.epoch += 1;
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
        self.unindex_alloc(slot);
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
        self.index_alloc(slot);
    }

    /// Forgets a task of `job_id` on `node_id`.
    pub fn release(&mut self, node_id: &str, job_id: &str, res: &Resources) {
        self.epoch += 1;
        let (Some(&slot), Some(&job)) = (self.by_id.get(node_id), self.job_ix.get(job_id)) else {
            return;
        };
        self.unindex_alloc(slot);
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
            if u.nodes.is_empty() && u.reserved == 0 {
                self.forget_job(job);
            }
        }
        self.index_alloc(slot);
    }

    /// What is allocated on a node, and how many tasks it runs.
    pub fn usage(&self, node_id: &str) -> Option<(Resources, u32)> {
        let n = self.node(*self.by_id.get(node_id)?)?;
        Some((n.allocated, n.tasks))
    }

    /// Changes whenever a task that did not fit might fit now; a job that failed at one epoch
    /// need not be tried again until it changes.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Keeps a node's room for one job: no other job's task is placed there until
    /// [`Engine::unreserve`]. A node holds one reservation; a new one replaces it.
    pub fn reserve(&mut self, node_id: &str, job_id: &str) {
        self.unreserve(node_id);
        let Some(&slot) = self.by_id.get(node_id) else {
            return;
        };
        let job = self.job(job_id);
        self.job_use.entry(job).or_default().reserved += 1;
        if let Some(n) = self.nodes[slot].as_mut() {
            n.reserved = Some(job);
        }
    }

    /// Ends a node's reservation.
    pub fn unreserve(&mut self, node_id: &str) {
        let Some(&slot) = self.by_id.get(node_id) else {
            return;
        };
        let Some(job) = self.nodes[slot].as_mut().and_then(|n| n.reserved.take()) else {
            return;
        };
        self.epoch += 1;
        if let Some(u) = self.job_use.get_mut(&job) {
            u.reserved = u.reserved.saturating_sub(1);
            if u.nodes.is_empty() && u.reserved == 0 {
                self.forget_job(job);
            }
        }
    }

    /// The capacity of all schedulable nodes.
    pub fn total_capacity(&self) -> Resources {
        self.total
    }

    /// A node's free capacity.
    pub fn free(&self, node_id: &str) -> Option<Resources> {
        Some(self.node(*self.by_id.get(node_id)?)?.free())
    }

    /// Whether a task of `req` could go to this node if it had room: it is schedulable and
    /// meets every hard constraint.
    pub fn admits(&self, node_id: &str, req: &Request<'_>) -> bool {
        let Some(&slot) = self.by_id.get(node_id) else {
            return false;
        };
        let Some(n) = self.node(slot) else {
            return false;
        };
        let ctx = Ctx::new(self, req);
        matches!(ctx.exclusion(slot, n), None | Some(Exclusion::Resource(_)))
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
        self.note_exclusive(req);
        let ctx = Ctx::new(self, req);
        let mut best: Option<(f64, Slot)> = None;
        let mut feasible = 0;
        let mut perfect = false;
        // Returns true once enough candidates were scored.
        let mut consider = |slot: Slot| -> bool {
            let Some(n) = self.node(slot) else {
                return false;
            };
            // The cheap check first; `exclusion` orders its checks for explanations.
            if !req.resources.fits_in(&n.free()) || ctx.exclusion(slot, n).is_some() {
                return false;
            }
            let (score, all_soft) = ctx.score(slot, n);
            if best.is_none_or(|(b, s)| score > b || score == b && slot < s) {
                best = Some((score, slot));
            }
            feasible += 1;
            perfect |= all_soft;
            feasible >= MAX_FEASIBLE || feasible >= SAMPLE && perfect
        };
        match ctx.source() {
            Source::Held(slots) => {
                let _ = slots
                    .into_iter()
                    .chain(self.empty.iter().copied())
                    .any(&mut consider);
            }
            Source::Attr(sets) => {
                let from = (req.resources.cpu_millis, 0);
                for set in sets {
                    let fits = set.range(from..);
                    let done = match req.strategy {
                        Strategy::Binpack => fits.map(|&(_, s)| s).any(&mut consider),
                        Strategy::Spread => fits.rev().map(|&(_, s)| s).any(&mut consider),
                    };
                    if done {
                        break;
                    }
                }
            }
            Source::Cpu => {
                let fits = self.by_free_cpu.range((req.resources.cpu_millis, 0)..);
                let _ = match req.strategy {
                    Strategy::Binpack => fits.map(|&(_, s)| s).any(&mut consider),
                    Strategy::Spread => fits.rev().map(|&(_, s)| s).any(&mut consider),
                };
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
        let ctx = Ctx::new(self, req);
        let mut counts: BTreeMap<Exclusion, u32> = BTreeMap::new();
        let mut largest: HashMap<Dimension, (u64, &str)> = HashMap::new();
        for (slot, n) in self.nodes.iter().enumerate() {
            let Some(n) = n else { continue };
            match ctx.exclusion(slot, n) {
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
                let mut s = format!("{c} {nodes}: {}", e.label(&ctx.rules));
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
            jobs: FxHashMap::default(),
            exclusive: None,
            reserved: None,
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

    /// For an `exclusive_host` job, remembers it so that every later allocation of the job
    /// claims its node.
    fn note_exclusive(&mut self, req: &Request<'_>) {
        if req
            .constraints
            .hard_has(|c| matches!(c, Constraint::ExclusiveHost))
        {
            let j = self.job(req.job_id);
            self.job_use.entry(j).or_default().exclusive = true;
        }
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
            && self
                .job_use
                .get(&j)
                .is_none_or(|u| u.nodes.is_empty() && u.reserved == 0)
        {
            self.forget_job(j);
        }
    }

    /// Takes a node out of the allocation indexes before its allocation changes.
    fn unindex_alloc(&mut self, slot: Slot) {
        let Some(n) = self.nodes[slot].as_ref() else {
            return;
        };
        if n.schedulable {
            let key = (n.free().cpu_millis, slot);
            self.by_free_cpu.remove(&key);
            self.empty.remove(&slot);
            for (k, v) in &n.attributes {
                if let Some(set) = self.by_attr.get_mut(k).and_then(|m| m.get_mut(v)) {
                    set.remove(&key);
                }
            }
        }
    }

    /// Puts a node back into the allocation indexes.
    fn index_alloc(&mut self, slot: Slot) {
        let Some(n) = self.nodes[slot].as_ref() else {
            return;
        };
        if n.schedulable {
            let key = (n.free().cpu_millis, slot);
            self.by_free_cpu.insert(key);
            if n.tasks == 0 {
                self.empty.insert(slot);
            }
            for (k, v) in &n.attributes {
                match self.by_attr.get_mut(k).and_then(|m| m.get_mut(v)) {
                    Some(set) => {
                        set.insert(key);
                    }
                    None => {
                        self.by_attr
                            .entry(k.clone())
                            .or_default()
                            .entry(v.clone())
                            .or_default()
                            .insert(key);
                    }
                }
            }
        }
    }

    /// Takes a node out of every index before its capacity, attributes or readiness change.
    fn unindex(&mut self, slot: Slot) {
        self.unindex_alloc(slot);
        let Some(n) = self.nodes[slot].as_ref() else {
            return;
        };
        if !n.schedulable {
            return;
        }
        self.total = self.total.saturating_sub(&n.capacity);
        if let Some(z) = n.zone {
            self.zone_nodes[z as usize] -= 1;
        }
    }

    /// Puts a node back into every index after it changed.
    fn index(&mut self, slot: Slot) {
        self.index_alloc(slot);
        let Some(n) = self.nodes[slot].as_ref() else {
            return;
        };
        if !n.schedulable {
            return;
        }
        self.total = self.total.saturating_add(&n.capacity);
        if let Some(z) = n.zone {
            self.zone_nodes[z as usize] += 1;
        }
    }
}

fn dec<K: std::hash::Hash + Eq>(m: &mut FxHashMap<K, u32>, k: K) {
    if let Some(c) = m.get_mut(&k) {
        *c -= 1;
        if *c == 0 {
            m.remove(&k);
        }
    }
}

/// Where one decision looks for candidates.
enum Source<'a> {
    /// Nodes the (exclusive) job holds; the empty nodes follow.
    Held(Vec<Slot>),
    /// Nodes with the values a hard attribute rule asks for, by free CPU.
    Attr(Vec<&'a CpuIndex>),
    /// The free-CPU index, in the strategy's direction.
    Cpu,
}

/// One decision's view of a request: its constraints sorted by kind, and the job's spread.
struct Ctx<'a> {
    e: &'a Engine,
    req: &'a Request<'a>,
    job: Option<JobIx>,
    /// Where the job's tasks are now.
    uses: Option<&'a JobUse>,
    rules: Vec<&'a Constraint>,
    unique: bool,
    exclusive: bool,
    /// Zones a task may go to under hard zone balance (those where the job has fewest).
    zones: Option<Vec<ZoneIx>>,
    zone_min: u32,
}

impl<'a> Ctx<'a> {
    fn new(e: &'a Engine, req: &'a Request<'a>) -> Ctx<'a> {
        let job = e.job_ix.get(req.job_id).copied();
        let uses = job.and_then(|j| e.job_use.get(&j));
        let c = req.constraints;
        let rules = c
            .hard
            .iter()
            .filter(|c| matches!(c, Constraint::Attr { .. }))
            .collect();
        let zone_count = |z: ZoneIx| uses.and_then(|u| u.zones.get(&z)).copied().unwrap_or(0);
        let balance = c.hard_has(|c| matches!(c, Constraint::ZoneBalance))
            || c.soft_has(|c| matches!(c, Constraint::ZoneBalance));
        let live: Vec<ZoneIx> = if balance {
            (0..e.zone_nodes.len() as ZoneIx)
                .filter(|z| e.zone_nodes[*z as usize] > 0)
                .collect()
        } else {
            Vec::new()
        };
        let zone_min = live.iter().map(|z| zone_count(*z)).min().unwrap_or(0);
        let zones = c
            .hard_has(|c| matches!(c, Constraint::ZoneBalance))
            .then(|| {
                live.iter()
                    .copied()
                    .filter(|z| zone_count(*z) == zone_min)
                    .collect()
            });
        Ctx {
            e,
            req,
            job,
            uses,
            rules,
            unique: c.hard_has(|c| matches!(c, Constraint::UniqueHost)),
            exclusive: c.hard_has(|c| matches!(c, Constraint::ExclusiveHost)),
            zones,
            zone_min,
        }
    }

    fn job_on(&self, slot: Slot) -> u32 {
        self.uses
            .and_then(|u| u.nodes.get(&slot))
            .copied()
            .unwrap_or(0)
    }

    fn zone_count(&self, z: Option<ZoneIx>) -> u32 {
        match (self.uses, z) {
            (Some(u), Some(z)) => u.zones.get(&z).copied().unwrap_or(0),
            _ => 0,
        }
    }

    /// Where to look for candidates.
    fn source(&self) -> Source<'a> {
        if self.exclusive {
            let mut held: Vec<Slot> = self
                .uses
                .map(|u| u.nodes.keys().copied().collect())
                .unwrap_or_default();
            held.sort_unstable();
            return Source::Held(held);
        }
        // The most selective indexed rule, when it narrows the search: its sets are ordered
        // by free CPU like the main index, so a single set is never worse.
        let mut best: Option<(usize, Vec<&'a CpuIndex>)> = None;
        for r in &self.rules {
            let Constraint::Attr { key, op } = r else {
                continue;
            };
            let values: &[String] = match op {
                AttrOp::Eq(v) => std::slice::from_ref(v),
                AttrOp::In(vs) => vs,
                _ => continue,
            };
            let by_value = self.e.by_attr.get(key);
            let sets: Vec<&CpuIndex> = values
                .iter()
                .filter_map(|v| by_value.and_then(|m| m.get(v)))
                .collect();
            let size = sets.iter().map(|s| s.len()).sum();
            if best.as_ref().is_none_or(|(b, _)| size < *b) {
                best = Some((size, sets));
            }
        }
        match best {
            Some((size, sets)) if sets.len() == 1 || size < self.e.by_free_cpu.len() => {
                Source::Attr(sets)
            }
            _ => Source::Cpu,
        }
    }

    /// The first check that keeps this task off the node, if any.
    fn exclusion(&self, slot: Slot, n: &Node) -> Option<Exclusion> {
        if !n.schedulable {
            return Some(Exclusion::NotReady);
        }
        let free = n.free();
        let fits = self.req.resources.fits_in(&free);
        for (i, r) in self.rules.iter().enumerate() {
            if !r.matches(&n.attributes) {
                return Some(Exclusion::Rule(i));
            }
        }
        if n.exclusive.is_some() && n.exclusive != self.job {
            return Some(Exclusion::ExclusiveHost);
        }
        if self.exclusive && n.tasks > self.job_on(slot) {
            return Some(Exclusion::ExclusiveHost);
        }
        if n.reserved.is_some() && n.reserved != self.job {
            return Some(Exclusion::Reserved);
        }
        if self.unique && self.job_on(slot) > 0 {
            return Some(Exclusion::UniqueHost);
        }
        if let Some(zones) = &self.zones
            && !n.zone.is_some_and(|z| zones.contains(&z))
        {
            return Some(Exclusion::ZoneBalance);
        }
        if !fits {
            for d in Dimension::ALL {
                if self.req.resources.get(d) > free.get(d) {
                    return Some(Exclusion::Resource(d));
                }
            }
        }
        None
    }

    /// The node's score, and whether it meets every soft constraint.
    fn score(&self, slot: Slot, n: &Node) -> (f64, bool) {
        let free = n.free();
        let mut sum = 0.0;
        let mut dims = 0.0;
        for d in Dimension::ALL {
            let cap = n.capacity.get(d);
            if cap == 0 {
                continue;
            }
            let used = cap.saturating_sub(free.get(d)) + self.req.resources.get(d);
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
                Constraint::UniqueHost => self.job_on(slot) == 0,
                Constraint::ExclusiveHost => n.tasks == self.job_on(slot),
                Constraint::ZoneBalance => {
                    n.zone.is_some() && self.zone_count(n.zone) <= self.zone_min
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
    e.note_exclusive(req);
    let ctx = Ctx::new(e, req);
    let slot = e
        .nodes
        .iter()
        .enumerate()
        .find(|(slot, n)| {
            n.as_ref()
                .is_some_and(|n| ctx.exclusion(*slot, n).is_none())
        })
        .map(|(slot, _)| slot)?;
    let id = e.nodes[slot].as_ref()?.id.clone();
    e.allocate(&id, req.job_id, req.resources);
    Some(id)
}

#[cfg(test)]
mod tests;
