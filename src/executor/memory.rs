//! How much memory a conversion may need, and how many threads fit in the memory it is given.
//!
//! Why: a cluster job that passes its memory limit (SLURM `--mem`, a container's limit) is
//! killed, not slowed, and a task killed near its end has lost everything it did. Memory grows
//! with the thread count (each thread encodes one shard in memory), not with the number of
//! trials, so the thread count is what to fit: the output is the same at any thread count, only
//! the speed changes.
//!
//! The estimate is an upper bound from the plan: a fixed part, plus per thread the trials it
//! reads at once (one trial, or a whole shard where `zarrs` encodes the shards), the encoded
//! shard taken as incompressible, the largest source entry twice (its compressed bytes and, off
//! the in-place path, its inflated copy), the copy buffer of direct I/O writes
//! (`writers::output_store`), and from 2 threads on the unit a thread encodes when it helps
//! with another's shard. On the Sensorium layout the measured peak is well under it
//! (docs/operations.md, "Memory"; docs/performance.md, "Threads and memory").

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::pipeline::plan::Plan;
use crate::source::Source;
use crate::stages::kind::StageNeed;

/// What the process holds whatever the stage: code, allocator, source index, plan, records.
/// Set above the measured peak of a conversion whose arrays are tiny (the bundled fixture),
/// which is this part alone, and of a real-size mouse at 1 thread less that thread's buffers
/// (docs/performance.md, "Threads and memory").
pub const FIXED_BYTES: u64 = 64 << 20;

/// The memory each stage needs, from the plan (no data read).
pub struct MemoryModel {
    stages: Vec<StageNeed>,
}

impl MemoryModel {
    /// From the stages that may run (`runs(index)`): the others need no memory.
    pub fn new(
        plan: &Plan,
        runs: impl Fn(usize) -> bool,
        source: &Source,
        pipeline_file: &str,
    ) -> Result<MemoryModel> {
        let stages = plan
            .stages
            .iter()
            .enumerate()
            .filter(|(i, _)| runs(*i))
            .map(|(_, stage)| stage.memory(source, pipeline_file))
            .collect::<Result<Vec<StageNeed>>>()?;
        Ok(MemoryModel { stages })
    }

    /// Upper bound of the peak resident memory at `threads` threads.
    pub fn estimate(&self, threads: usize) -> u64 {
        let largest_stage = self
            .stages
            .iter()
            .map(|s| {
                let threads = threads.min(s.items).max(1) as u64;
                let helping = if threads > 1 { s.per_helping_thread } else { 0 };
                s.fixed
                    .saturating_add(s.per_thread.saturating_add(helping).saturating_mul(threads))
            })
            .max()
            .unwrap_or(0);
        FIXED_BYTES.saturating_add(largest_stage)
    }

    /// The most threads, up to `wanted`, whose estimate fits in `limit` (at least 1).
    pub fn threads_within(&self, wanted: usize, limit: u64) -> usize {
        (1..=wanted.max(1))
            .rev()
            .find(|&t| self.estimate(t) <= limit)
            .unwrap_or(1)
    }
}

/// A memory limit and where it came from, for messages and `run.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MemoryLimit {
    pub bytes: u64,
    pub origin: String,
}

/// The memory this process may use: the tightest of its cgroup's limit (what SLURM with
/// `ConstrainRAMSpace`, Docker and Kubernetes set, and the kernel enforces) and SLURM's
/// allocation (`SLURM_MEM_PER_NODE`, or `SLURM_MEM_PER_CPU` times the task's CPUs), which
/// SLURM enforces by polling where it has no cgroup. None when nothing limits it. Cgroups are
/// Linux's: elsewhere the files are absent and only SLURM's variables and `--max-memory` count.
pub fn detect_limit() -> Option<MemoryLimit> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut limits = cgroup_limits(&cgroups, Path::new("/sys/fs/cgroup"));
    limits.extend(slurm_limit(|name| std::env::var(name).ok()));
    limits.into_iter().min_by_key(|l| l.bytes)
}

/// Values at or above this are how cgroup v1 says "no limit" (a page-rounded i64::MAX).
const UNLIMITED: u64 = 1 << 62;

/// Memory limits of the cgroups in `/proc/self/cgroup` text `cgroups` and of their ancestors
/// (a parent's limit binds its children), under the cgroup mount `root`. v2 `memory.max`
/// (mounted at the root, or at `unified` on hybrid systems), v1 `memory.limit_in_bytes`; the
/// namespace root is checked too, because in a container the paths listed may be the host's.
fn cgroup_limits(cgroups: &str, root: &Path) -> Vec<MemoryLimit> {
    let mut files: Vec<PathBuf> = Vec::new();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (dirs, file) = if controllers.is_empty() {
            (vec![root.to_path_buf(), root.join("unified")], "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            (vec![root.join("memory")], "memory.limit_in_bytes")
        } else {
            continue;
        };
        for dir in dirs {
            let mut at = Some(Path::new(path.trim_start_matches('/')));
            while let Some(rel) = at {
                files.push(dir.join(rel).join(file));
                at = rel.parent();
            }
        }
    }
    files.sort();
    files.dedup();
    files
        .into_iter()
        .filter_map(|file| {
            let text = std::fs::read_to_string(&file).ok()?;
            let bytes: u64 = text.trim().parse().ok()?; // `max`: no limit
            (bytes < UNLIMITED).then(|| MemoryLimit {
                bytes,
                origin: format!("cgroup {}", file.display()),
            })
        })
        .collect()
}

/// SLURM's memory allocation of this task, from its environment (values in MB = MiB).
fn slurm_limit(var: impl Fn(&str) -> Option<String>) -> Option<MemoryLimit> {
    var("SLURM_JOB_ID")?;
    let mib = |name: &str| var(name)?.trim().parse::<u64>().ok().filter(|&m| m > 0);
    if let Some(m) = mib("SLURM_MEM_PER_NODE") {
        return Some(MemoryLimit {
            bytes: m << 20,
            origin: format!("SLURM_MEM_PER_NODE={m}"),
        });
    }
    let per_cpu = mib("SLURM_MEM_PER_CPU")?;
    let cpus = mib("SLURM_CPUS_PER_TASK").unwrap_or(1);
    Some(MemoryLimit {
        bytes: (per_cpu << 20).saturating_mul(cpus),
        origin: format!("SLURM_MEM_PER_CPU={per_cpu} x {cpus} CPUs"),
    })
}

/// Cores to use when `--threads` is not given: what the process may run on (affinity, CPU
/// quota), and no more than a SLURM task was given (`SLURM_CPUS_PER_TASK`), because SLURM
/// without task affinity lets a task see every core of the node.
pub fn default_threads(var: impl Fn(&str) -> Option<String>) -> usize {
    let visible = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let slurm = var("SLURM_JOB_ID").and_then(|_| {
        var("SLURM_CPUS_PER_TASK")?
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
    });
    slurm.map_or(visible, |n| n.min(visible)).max(1)
}

/// The thread count of a run and how it was chosen.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ThreadChoice {
    pub threads: usize,
    /// What was asked (`--threads`) or the default from the cores.
    pub wanted: usize,
    pub limit: Option<MemoryLimit>,
    /// Upper bound of the peak resident memory at `threads`.
    pub estimate_bytes: u64,
}

/// Chooses the thread count: as asked (or every core the process may use), lowered until the
/// estimate fits in the memory limit (`--max-memory`, else what [`detect_limit`] finds). Says
/// so on stderr when it lowers the count or when one thread may not fit either.
pub fn choose_threads(
    requested: Option<usize>,
    max_memory: Option<u64>,
    model: &MemoryModel,
) -> ThreadChoice {
    let wanted = requested
        .unwrap_or_else(|| default_threads(|name| std::env::var(name).ok()))
        .max(1);
    let limit = match max_memory {
        Some(bytes) => Some(MemoryLimit {
            bytes,
            origin: "--max-memory".into(),
        }),
        None => detect_limit(),
    };
    let threads = limit
        .as_ref()
        .map_or(wanted, |l| model.threads_within(wanted, l.bytes));
    let mb = |b: u64| b.div_ceil(1 << 20);
    if let Some(l) = &limit {
        if threads < wanted {
            tracing::warn!(
                "{wanted} threads may need up to {} MiB, more than the memory limit of {} MiB ({}): using {threads} (the output is the same at any thread count; give the job more memory to use more threads)",
                mb(model.estimate(wanted)),
                mb(l.bytes),
                l.origin
            );
        }
        if model.estimate(threads) > l.bytes {
            tracing::warn!(
                "even 1 thread may need up to {} MiB, more than the memory limit of {} MiB ({}); the run may be killed: give the job more memory, or make the pipeline's shards smaller (fewer trials per shard)",
                mb(model.estimate(threads)),
                mb(l.bytes),
                l.origin
            );
        }
    }
    ThreadChoice {
        threads,
        wanted,
        estimate_bytes: model.estimate(threads),
        limit,
    }
}

/// `512M`, `2G`, `1.5GiB`, `800MB`, `1073741824`: K, M, G and T are powers of 1024, as in
/// SLURM's `--mem`; a bare number is bytes.
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (examples: 512M, 2G, 1073741824)"))?;
    let scale: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use K, M, G or T)"
            ))
        }
    };
    let bytes = value * scale as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("{text:?} is not a usable memory size"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(stages: Vec<StageNeed>) -> MemoryModel {
        MemoryModel { stages }
    }

    #[test]
    fn estimate_takes_the_largest_stage_and_caps_threads_at_its_items() {
        let m = model(vec![
            StageNeed {
                fixed: 0,
                per_thread: 90 << 20,
                per_helping_thread: 10 << 20,
                items: 4,
            },
            StageNeed {
                fixed: 300 << 20,
                per_thread: 0,
                per_helping_thread: 0,
                items: 1,
            },
        ]);
        assert_eq!(m.estimate(1), FIXED_BYTES + (300 << 20));
        assert_eq!(m.estimate(4), FIXED_BYTES + (400 << 20));
        // One thread helps nobody.
        let alone = model(vec![StageNeed {
            fixed: 0,
            per_thread: 90 << 20,
            per_helping_thread: 10 << 20,
            items: 4,
        }]);
        assert_eq!(alone.estimate(1), FIXED_BYTES + (90 << 20));
        assert_eq!(alone.estimate(2), FIXED_BYTES + (200 << 20));
        // Only 4 shards: an 8th thread holds no buffer.
        assert_eq!(m.estimate(8), m.estimate(4));
        assert_eq!(m.threads_within(8, FIXED_BYTES + (350 << 20)), 3);
        assert_eq!(m.threads_within(8, FIXED_BYTES + (400 << 20)), 8);
        assert_eq!(m.threads_within(8, 1), 1);
    }

    #[test]
    fn sizes_parse_like_slurm_mem() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("800mb"), Ok(800 << 20));
        assert_eq!(parse_size("1073741824"), Ok(1 << 30));
        for bad in ["", "G", "12X", "-1G", "0", "1e400", "..5M"] {
            assert!(parse_size(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn cgroup_limits_of_v2_v1_and_their_ancestors() {
        let root = tempfile::tempdir().expect("a temporary folder");
        let write = |rel: &str, text: &str| {
            let path = root.path().join(rel);
            std::fs::create_dir_all(path.parent().expect("a parent")).expect("folders");
            std::fs::write(path, text).expect("a file");
        };
        // v2: the job's own cgroup has no limit, its parent (the SLURM job) has.
        write("slurm/job_7/step_0/memory.max", "max\n");
        write("slurm/job_7/memory.max", "1073741824\n");
        write("memory.max", "max\n");
        let found = cgroup_limits("0::/slurm/job_7/step_0\n", root.path());
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].bytes, 1 << 30);
        assert!(
            found[0].origin.ends_with("slurm/job_7/memory.max"),
            "{found:?}"
        );
        // v1: "no limit" is a huge value; only the memory controller's line counts.
        write("memory/docker/abc/memory.limit_in_bytes", "536870912\n");
        write("memory/memory.limit_in_bytes", "9223372036854771712\n");
        let found = cgroup_limits(
            "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n",
            root.path(),
        );
        assert_eq!(
            found.iter().map(|l| l.bytes).collect::<Vec<_>>(),
            vec![512 << 20]
        );
        assert!(cgroup_limits("garbage\n0::/nowhere\n", root.path()).is_empty());
        // Hybrid systems mount v2 at `unified`.
        write("unified/user.slice/memory.max", "2147483648\n");
        let found = cgroup_limits("0::/user.slice/session-1.scope\n", root.path());
        assert_eq!(
            found.iter().map(|l| l.bytes).collect::<Vec<_>>(),
            vec![2 << 30]
        );
    }

    #[test]
    fn slurm_allocation_from_its_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(slurm_limit(env(&[("SLURM_MEM_PER_NODE", "4000")])), None);
        let node = slurm_limit(env(&[
            ("SLURM_JOB_ID", "9"),
            ("SLURM_MEM_PER_NODE", "4000"),
        ]));
        assert_eq!(node.map(|l| l.bytes), Some(4000 << 20));
        let per_cpu = slurm_limit(env(&[
            ("SLURM_JOB_ID", "9"),
            ("SLURM_MEM_PER_CPU", "500"),
            ("SLURM_CPUS_PER_TASK", "4"),
        ]));
        assert_eq!(per_cpu.map(|l| l.bytes), Some(2000 << 20));
        assert_eq!(slurm_limit(env(&[("SLURM_JOB_ID", "9")])), None);
        let visible = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(
            default_threads(env(&[("SLURM_JOB_ID", "9"), ("SLURM_CPUS_PER_TASK", "1")])),
            1
        );
        assert_eq!(
            default_threads(env(&[("SLURM_CPUS_PER_TASK", "1")])),
            visible
        );
        assert_eq!(
            default_threads(env(&[
                ("SLURM_JOB_ID", "9"),
                ("SLURM_CPUS_PER_TASK", "999")
            ])),
            visible
        );
    }
}
