//! Capacity groups: named quotas on cpu, memory and gpus, in two tiers, and the fair order
//! in which groups get to place their pending tasks.
//!
//! - `critical` groups have capacity reserved for them: their tasks are placed first, are
//!   never preempted, and a critical task that fits nowhere may preempt flex tasks.
//! - `flex` groups are best effort: their tasks may be preempted.
//!
//! A group's tasks never take it over its quota; the rest wait with a reason. Among groups
//! of one tier, the one with the smallest dominant share (its largest fraction of the
//! cluster's cpu, memory or gpus in use) places next, as in Dominant Resource Fairness. Jobs
//! that name no group are in the default group: flex, without a quota.

use std::collections::HashMap;

use berth_model::resources::{Dimension, Resources};

/// The group of jobs that name none.
pub const DEFAULT_GROUP: &str = "default";

/// A group's tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Tier {
    /// Reserved capacity; never preempted; may preempt flex tasks.
    Critical,
    /// Best effort; may be preempted.
    #[default]
    Flex,
}

impl Tier {
    /// Reads `critical` or `flex`.
    pub fn parse(s: &str) -> Option<Tier> {
        match s {
            "critical" => Some(Tier::Critical),
            "flex" => Some(Tier::Flex),
            _ => None,
        }
    }

    /// The name used in config and output.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Critical => "critical",
            Tier::Flex => "flex",
        }
    }
}

/// One capacity group as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct CapacityGroup {
    /// Its name, as jobs give it.
    pub name: String,
    /// Its tier.
    pub tier: Tier,
    /// The most its tasks may hold at once: cpu, memory and gpus; `None` for no limit.
    pub cpu_millis: Option<u32>,
    /// Memory quota in MiB.
    pub memory_mib: Option<u64>,
    /// GPU quota.
    pub gpus: Option<u32>,
}

impl CapacityGroup {
    fn limit(&self, d: Dimension) -> Option<u64> {
        match d {
            Dimension::Cpu => self.cpu_millis.map(u64::from),
            Dimension::Memory => self.memory_mib,
            Dimension::Gpus => self.gpus.map(u64::from),
            _ => None,
        }
    }
}

/// The configured groups and what each holds now.
#[derive(Debug, Default)]
pub struct Groups {
    defs: HashMap<String, CapacityGroup>,
    usage: HashMap<String, Resources>,
}

impl Groups {
    /// Groups from configuration; the default group is added unless configured.
    pub fn new(groups: &[CapacityGroup]) -> Groups {
        let mut defs: HashMap<String, CapacityGroup> =
            groups.iter().map(|g| (g.name.clone(), g.clone())).collect();
        defs.entry(DEFAULT_GROUP.to_string())
            .or_insert_with(|| CapacityGroup {
                name: DEFAULT_GROUP.to_string(),
                tier: Tier::Flex,
                cpu_millis: None,
                memory_mib: None,
                gpus: None,
            });
        Groups {
            defs,
            usage: HashMap::new(),
        }
    }

    /// The group a job's `capacity_group` field names.
    pub fn resolve(name: &str) -> &str {
        if name.is_empty() { DEFAULT_GROUP } else { name }
    }

    /// Whether a group exists.
    pub fn exists(&self, name: &str) -> bool {
        self.defs.contains_key(Self::resolve(name))
    }

    /// The configured group names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.defs.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// A group's definition.
    pub fn get(&self, name: &str) -> Option<&CapacityGroup> {
        self.defs.get(Self::resolve(name))
    }

    /// A group's tier (flex for unknown names).
    pub fn tier(&self, name: &str) -> Tier {
        self.get(name).map(|g| g.tier).unwrap_or_default()
    }

    /// What a group's tasks hold now.
    pub fn usage(&self, name: &str) -> Resources {
        self.usage
            .get(Self::resolve(name))
            .copied()
            .unwrap_or_default()
    }

    /// Counts a task's resources against its group.
    pub fn add(&mut self, name: &str, res: &Resources) {
        let u = self
            .usage
            .entry(Self::resolve(name).to_string())
            .or_default();
        *u = u.saturating_add(res);
    }

    /// Gives a task's resources back to its group.
    pub fn sub(&mut self, name: &str, res: &Resources) {
        if let Some(u) = self.usage.get_mut(Self::resolve(name)) {
            *u = u.saturating_sub(res);
        }
    }

    /// How many more tasks of size `req` fit in the group's quota (at most `want`), and when
    /// that is fewer than `want`, the quota that binds.
    pub fn room(&self, name: &str, req: &Resources, want: usize) -> (usize, Option<Dimension>) {
        let Some(g) = self.get(name) else {
            return (want, None);
        };
        let used = self.usage(name);
        let mut fit = want;
        let mut binding = None;
        for d in [Dimension::Cpu, Dimension::Memory, Dimension::Gpus] {
            let (Some(limit), per) = (g.limit(d), req.get(d)) else {
                continue;
            };
            if per == 0 {
                continue;
            }
            let n = usize::try_from(limit.saturating_sub(used.get(d)) / per).unwrap_or(usize::MAX);
            if n < fit {
                fit = n;
                binding = Some(d);
            }
        }
        (fit, binding)
    }

    /// Why a group's tasks wait on its quota of `d`, with its use now.
    pub fn quota_reason(&self, name: &str, d: Dimension) -> String {
        let Some(g) = self.get(name) else {
            return String::new();
        };
        format!(
            "capacity group {} is at its {} quota ({} of {} in use)",
            g.name,
            d.name(),
            Resources::format(d, self.usage(name).get(d)),
            Resources::format(d, g.limit(d).unwrap_or(0)),
        )
    }

    /// A group's dominant share of `total`: its largest fraction of cpu, memory or gpus.
    pub fn dominant_share(&self, name: &str, total: &Resources) -> f64 {
        let used = self.usage(name);
        [Dimension::Cpu, Dimension::Memory, Dimension::Gpus]
            .into_iter()
            .filter(|d| total.get(*d) > 0)
            .map(|d| used.get(d) as f64 / total.get(d) as f64)
            .fold(0.0, f64::max)
    }
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

    fn group(name: &str, tier: Tier, cpu: Option<u32>, mem: Option<u64>) -> CapacityGroup {
        CapacityGroup {
            name: name.into(),
            tier,
            cpu_millis: cpu,
            memory_mib: mem,
            gpus: None,
        }
    }

    #[test]
    fn room_follows_the_binding_quota() {
        let mut g = Groups::new(&[group("web", Tier::Critical, Some(2000), Some(1024))]);
        let r = res(500, 128);
        assert_eq!(g.room("web", &r, 10).0, 4);
        g.add("web", &res(1500, 128));
        let (n, why) = g.room("web", &r, 10);
        assert_eq!((n, why), (1, Some(Dimension::Cpu)));
        assert_eq!(
            g.quota_reason("web", Dimension::Cpu),
            "capacity group web is at its cpu quota (1500m of 2 in use)"
        );
        g.sub("web", &res(1500, 128));
        assert_eq!(g.room("web", &res(100, 512), 10).0, 2, "memory binds now");
        assert_eq!(
            g.room("", &r, 10),
            (10, None),
            "the default group has no quota"
        );
        assert!(g.exists("") && g.exists("web") && !g.exists("batch"));
        assert_eq!(g.names(), ["default", "web"]);
    }

    proptest::proptest! {
        /// Whatever the quota and the sequence of requests and releases, taking what `room`
        /// allows never puts a group over its quota, and `room` never refuses what fits.
        #[test]
        fn room_never_lets_a_group_over_its_quota(
            cpu_quota in 1u32..20_000,
            mem_quota in proptest::option::of(1u64..20_000),
            steps in proptest::collection::vec((1u32..3000, 1u64..3000, 0usize..20, proptest::bool::ANY), 1..40),
        ) {
            let mut g = Groups::new(&[CapacityGroup {
                name: "g".into(),
                tier: Tier::Flex,
                cpu_millis: Some(cpu_quota),
                memory_mib: mem_quota,
                gpus: None,
            }]);
            let mut held: Vec<Resources> = Vec::new();
            for (cpu, mem, want, release) in steps {
                if release && let Some(r) = held.pop() {
                    g.sub("g", &r);
                }
                let r = res(cpu, mem);
                let (n, why) = g.room("g", &r, want);
                proptest::prop_assert!(n <= want);
                for _ in 0..n {
                    g.add("g", &r);
                    held.push(r);
                }
                let used = g.usage("g");
                proptest::prop_assert!(used.cpu_millis <= cpu_quota);
                if let Some(m) = mem_quota {
                    proptest::prop_assert!(used.memory_mib <= m);
                }
                if n < want {
                    // Refused only because one more would go over.
                    proptest::prop_assert!(why.is_some());
                    let over_cpu = used.cpu_millis + cpu > cpu_quota;
                    let over_mem = mem_quota.is_some_and(|m| used.memory_mib + mem > m);
                    proptest::prop_assert!(over_cpu || over_mem);
                }
            }
        }
    }

    #[test]
    fn dominant_share_is_the_largest_fraction() {
        let mut g = Groups::new(&[]);
        let total = res(10_000, 10_000);
        g.add("a", &res(1000, 5000));
        g.add("b", &res(3000, 1000));
        assert_eq!(g.dominant_share("a", &total), 0.5);
        assert_eq!(g.dominant_share("b", &total), 0.3);
        assert_eq!(g.dominant_share("c", &total), 0.0);
    }
}
