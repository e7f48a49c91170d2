//! Multi-resource vectors: what a task asks for and what a node has.

use std::fmt;

use berth_proto as pb;

use crate::quantity::{format_cpu_millis, format_mib};

/// CPU, memory, disk, GPUs and network bandwidth.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Resources {
    /// Millicores.
    pub cpu_millis: u32,
    /// MiB.
    pub memory_mib: u64,
    /// MiB.
    pub disk_mib: u64,
    /// Whole devices.
    pub gpus: u32,
    /// Mbps.
    pub network_mbps: u32,
}

/// One dimension of [`Resources`], for explanations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dimension {
    /// CPU millicores.
    Cpu,
    /// Memory MiB.
    Memory,
    /// Disk MiB.
    Disk,
    /// GPU count.
    Gpus,
    /// Network Mbps.
    Network,
}

impl Dimension {
    /// All dimensions, in display order.
    pub const ALL: [Dimension; 5] = [
        Dimension::Cpu,
        Dimension::Memory,
        Dimension::Disk,
        Dimension::Gpus,
        Dimension::Network,
    ];

    /// The field name used in specs and errors.
    pub fn name(self) -> &'static str {
        match self {
            Dimension::Cpu => "cpu",
            Dimension::Memory => "memory",
            Dimension::Disk => "disk",
            Dimension::Gpus => "gpus",
            Dimension::Network => "network_mbps",
        }
    }
}

impl Resources {
    /// The amount of one dimension, as u64.
    pub fn get(&self, d: Dimension) -> u64 {
        match d {
            Dimension::Cpu => u64::from(self.cpu_millis),
            Dimension::Memory => self.memory_mib,
            Dimension::Disk => self.disk_mib,
            Dimension::Gpus => u64::from(self.gpus),
            Dimension::Network => u64::from(self.network_mbps),
        }
    }

    /// Formats one dimension's amount for people (`500m`, `64Mi`, `2`).
    pub fn format(d: Dimension, amount: u64) -> String {
        match d {
            Dimension::Cpu => format_cpu_millis(u32::try_from(amount).unwrap_or(u32::MAX)),
            Dimension::Memory | Dimension::Disk => format_mib(amount),
            Dimension::Gpus => amount.to_string(),
            Dimension::Network => format!("{amount} Mbps"),
        }
    }

    /// Whether `self` fits in `free` in every dimension.
    pub fn fits_in(&self, free: &Resources) -> bool {
        Dimension::ALL.iter().all(|&d| self.get(d) <= free.get(d))
    }

    /// The first dimension in which `self` does not fit in `free`.
    pub fn first_shortfall(&self, free: &Resources) -> Option<Dimension> {
        Dimension::ALL
            .into_iter()
            .find(|&d| self.get(d) > free.get(d))
    }

    /// Component-wise sum, saturating.
    pub fn saturating_add(&self, o: &Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_add(o.cpu_millis),
            memory_mib: self.memory_mib.saturating_add(o.memory_mib),
            disk_mib: self.disk_mib.saturating_add(o.disk_mib),
            gpus: self.gpus.saturating_add(o.gpus),
            network_mbps: self.network_mbps.saturating_add(o.network_mbps),
        }
    }

    /// Component-wise difference, saturating at zero.
    pub fn saturating_sub(&self, o: &Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_sub(o.cpu_millis),
            memory_mib: self.memory_mib.saturating_sub(o.memory_mib),
            disk_mib: self.disk_mib.saturating_sub(o.disk_mib),
            gpus: self.gpus.saturating_sub(o.gpus),
            network_mbps: self.network_mbps.saturating_sub(o.network_mbps),
        }
    }
}

impl From<&pb::Resources> for Resources {
    fn from(r: &pb::Resources) -> Self {
        Resources {
            cpu_millis: r.cpu_millis,
            memory_mib: r.memory_mib,
            disk_mib: r.disk_mib,
            gpus: r.gpus,
            network_mbps: r.network_mbps,
        }
    }
}

impl From<Resources> for pb::Resources {
    fn from(r: Resources) -> Self {
        pb::Resources {
            cpu_millis: r.cpu_millis,
            memory_mib: r.memory_mib,
            disk_mib: r.disk_mib,
            gpus: r.gpus,
            network_mbps: r.network_mbps,
        }
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cpu {}, memory {}, disk {}, gpus {}",
            format_cpu_millis(self.cpu_millis),
            format_mib(self.memory_mib),
            format_mib(self.disk_mib),
            self.gpus
        )?;
        if self.network_mbps > 0 {
            write!(f, ", network {} Mbps", self.network_mbps)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb() -> impl Strategy<Value = Resources> {
        (
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
        )
            .prop_map(|(c, m, d, g, n)| Resources {
                cpu_millis: c,
                memory_mib: m,
                disk_mib: d,
                gpus: g,
                network_mbps: n,
            })
    }

    proptest! {
        #[test]
        fn add_then_sub_is_identity_without_overflow(a in arb(), b in arb()) {
            let sum = a.saturating_add(&b);
            if Dimension::ALL.iter().all(|&d| a.get(d).checked_add(b.get(d)).is_some_and(|s| s == sum.get(d))) {
                prop_assert_eq!(sum.saturating_sub(&b), a);
            }
        }

        #[test]
        fn fits_iff_no_shortfall(a in arb(), b in arb()) {
            prop_assert_eq!(a.fits_in(&b), a.first_shortfall(&b).is_none());
        }

        #[test]
        fn proto_round_trip(a in arb()) {
            prop_assert_eq!(Resources::from(&pb::Resources::from(a)), a);
        }
    }
}
