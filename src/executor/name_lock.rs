//! Who may write a name in a store: one writer per dataset name (`STORE/.<name>.lock`), one
//! ingest per store (`STORE/.ingest.lock`). The shard tasks of one sharded run hold their
//! dataset's name together.
//!
//! Why these mechanics, for local disks and the shared file systems clusters use (NFS v3/v4,
//! Lustre, GPFS), where `flock`/`fcntl` locks are either not shared between hosts or vanish
//! with a client's lease in ways a job cannot see:
//! - A lock is a small JSON file naming its holder (what, host, pid, since, command, run). It is
//!   written aside and hard-linked into place: `link` fails when the name exists, atomically,
//!   on every one of those file systems, and the file is complete the moment it appears.
//! - The holder refreshes the file's modification time every quarter of the stale time (a
//!   background thread), and checks on each beat that the file is still its own.
//! - A lock is stale when its holder is on this host and its process is gone (or is another
//!   process under a reused pid: the start time differs), or when it has not been refreshed
//!   for the stale time, whichever host holds it (`SENSORIUM_INGEST_LOCK_STALE_SECONDS`,
//!   default 600: longer than any pause of a living process, shorter than an operator's
//!   patience). A stale lock is renamed aside (one taker wins the rename) and checked to be
//!   the one judged stale before it is removed.
//! - Shard tasks of one run name the run (the job's identity); a task finding its own run's
//!   lock joins it instead of being refused. A run's lock stays until `finalize` takes it over
//!   or, once no task refreshes it any more, it goes stale.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The holder of a lock, as written in the lock file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Holder {
    /// What holds it: `convert`, `finalize`, `ingest`, `shard task`.
    pub what: String,
    pub host: String,
    pub pid: u32,
    /// The holder process's start time (Linux: clock ticks after boot), to tell a reused pid.
    #[serde(default)]
    pub start_time: Option<u64>,
    /// Seconds since the Unix epoch.
    pub since: u64,
    pub command: String,
    /// Set for shard tasks: the sharded run they belong to; its tasks share the lock.
    #[serde(default)]
    pub run: Option<String>,
    /// The boot and PID namespace the pid belongs to (`BOOT_ID/pid:[INODE]`): containers that
    /// share a host name (host networking) do not share pids, so a pid is only checked where
    /// it means the same process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_space: Option<String>,
    /// The holder's stale time in milliseconds: a taker waits for the longer of its own and
    /// this, so hosts configured differently never take over a lock refreshed on a slower beat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_millis: Option<u64>,
    /// Unique to one taking of a lock: a record equal to this holder's is this very taking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl Holder {
    /// This process, doing `what` (as part of sharded run `run`, for shard tasks).
    pub fn this_process(what: &str, run: Option<String>) -> Holder {
        Holder {
            what: what.into(),
            host: super::hostname(),
            pid: std::process::id(),
            start_time: process_start_time(std::process::id()),
            since: unix_now(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            run,
            pid_space: pid_space(),
            stale_millis: Some(u64::try_from(stale_after().as_millis()).unwrap_or(u64::MAX)),
            token: Some(unique_token()),
        }
    }

    /// How long this holder's lock may go unrefreshed before it is taken for abandoned.
    pub fn stale_after(&self) -> Duration {
        self.recorded_stale()
            .map_or(stale_after(), |r| r.max(stale_after()))
    }

    fn recorded_stale(&self) -> Option<Duration> {
        self.stale_millis
            .filter(|&ms| ms > 0)
            .map(Duration::from_millis)
    }

    /// Whether a pid recorded by this holder means the same process here: the same host name,
    /// boot and PID namespace. Records of older versions name no namespace: the host decides.
    fn pids_comparable(&self) -> bool {
        let this_host = !self.host.is_empty() && self.host == super::hostname();
        let same_space = match (&self.pid_space, self.stale_millis) {
            (None, None) => true,
            (None, Some(_)) => false,
            (Some(space), _) => Some(space) == pid_space().as_ref(),
        };
        this_host && same_space
    }

    /// `convert (pid 123 on node7, since 2026-12-03 08:00:00 UTC): sensorium-ingest convert ...`
    pub fn describe(&self) -> String {
        if self.pid == 0 && self.host.is_empty() {
            return format!(
                "{} (the lock file is not a lock record: it is taken over once older than the stale time)",
                self.what
            );
        }
        format!(
            "{} (pid {} on {}, since {}): {}",
            self.what,
            self.pid,
            if self.host.is_empty() {
                "?"
            } else {
                &self.host
            },
            format_utc(self.since),
            self.command
        )
    }
}

/// What a caller does about a lock that is held.
#[derive(Debug, Clone, Copy)]
pub enum Waiting {
    /// Refuse at once (exit 75, naming the holder).
    No,
    /// Wait for the holder, at most this long (`None`: for as long as it takes).
    Up(Option<Duration>),
}

/// A held lock. Dropping it removes the file if it is still this holder's (a joined shard
/// task leaves it to its run).
pub struct NameLock {
    path: PathBuf,
    holder: Holder,
    owner: bool,
    /// The sharded run's record this lock took over (`finalize`): put back if the work fails,
    /// so the run keeps its name for the next finalize.
    taken_from: Option<Holder>,
    /// The work is done: the lock is removed, not given back.
    done: bool,
    lost: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    beat: Option<std::thread::JoinHandle<()>>,
}

/// How the lock at a path may be taken.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub path: &'a Path,
    pub holder: Holder,
    /// What a refusal says before naming the holder: `another writer holds dataset NAME`.
    pub refusal: &'a str,
    pub waiting: Waiting,
    /// Take over a lock held by this sharded run (`finalize` of the run), when none of its
    /// tasks still runs.
    pub take_over_run: Option<&'a str>,
}

impl NameLock {
    pub fn acquire(request: Request) -> Result<NameLock> {
        let deadline = match request.waiting {
            Waiting::Up(Some(limit)) => Some(SystemTime::now() + limit),
            _ => None,
        };
        let mut announced = false;
        loop {
            match try_acquire(&request)? {
                Attempt::Held(lock) => return Ok(*lock),
                Attempt::Again => std::thread::sleep(poll_interval()),
                Attempt::Busy(holder) => {
                    let waits = matches!(request.waiting, Waiting::Up(_))
                        && deadline.is_none_or(|d| SystemTime::now() < d);
                    if !waits {
                        return Err(busy(&request, &holder));
                    }
                    if !announced {
                        tracing::warn!(lock = %request.path.display(), holder = %holder.describe(), "waiting for the holder to finish");
                        announced = true;
                    }
                    std::thread::sleep(poll_interval());
                }
            }
        }
    }

    /// Whether the lock is still this holder's: false once someone took it over (after this
    /// process stopped refreshing it for the stale time, or removed it by hand).
    pub fn still_held(&self) -> bool {
        !self.lost.load(Ordering::Relaxed)
            && read_holder(&self.path).is_ok_and(|h| self.matches(&h))
    }

    /// Whether `other`, read from the file, is this lock: a shard task's is its run's.
    fn matches(&self, other: &Holder) -> bool {
        match &self.holder.run {
            Some(run) if !self.owner => other.run.as_deref() == Some(run),
            _ => *other == self.holder,
        }
    }

    /// An error if the lock is no longer held: nothing may be published then.
    pub fn check_held(&self) -> Result<()> {
        if self.still_held() {
            return Ok(());
        }
        let now = read_holder(&self.path)
            .map(|h| h.describe())
            .unwrap_or_else(|_| "nobody".into());
        Err(Error::Busy {
            path: self.path.clone(),
            what: "this run lost its lock".into(),
            holder: now,
            hint: "another process took the name over (this run stalled for longer than the stale time?); run the command again".into(),
        })
    }
}

impl NameLock {
    /// The work the lock was for is complete: dropping it removes it.
    pub fn finish(&mut self) {
        self.done = true;
    }
}

impl Drop for NameLock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(beat) = self.beat.take() {
            let _ = beat.join();
        }
        if !self.owner || !read_holder(&self.path).is_ok_and(|h| h == self.holder) {
            return;
        }
        match (&self.taken_from, self.done) {
            (Some(run), false) => {
                let _ = replace(&self.path, run);
            }
            _ => {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

enum Attempt {
    Held(Box<NameLock>),
    Busy(Box<Holder>),
    /// The lock changed under this look: look again.
    Again,
}

/// How often a lock that keeps changing under the look is looked at before giving up.
const LOOKS: usize = 100;

fn try_acquire(request: &Request) -> Result<Attempt> {
    for _ in 0..LOOKS {
        match look(request)? {
            Attempt::Again => continue,
            settled => return Ok(settled),
        }
    }
    Ok(read_holder(request.path).map_or(Attempt::Again, |h| Attempt::Busy(Box::new(h))))
}

fn look(request: &Request) -> Result<Attempt> {
    // A sharded run's lock belongs to the run, not to the task that happened to create it:
    // no task removes it, `finalize` takes it over.
    let owner = request.holder.run.is_none();
    if create(request.path, &request.holder)? {
        let lock = start(request.path, &request.holder, owner, None)?;
        return Ok(Attempt::Held(Box::new(lock)));
    }
    let current = match read_holder(request.path) {
        // This very record: a `link` that NFS retried and reported as "exists" (and whose
        // link count the client had not seen yet) did create it.
        Ok(current) if current == request.holder => {
            let lock = start(request.path, &request.holder, owner, None)?;
            return Ok(Attempt::Held(Box::new(lock)));
        }
        Ok(current) => current,
        // Gone since the link failed: look again.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Attempt::Again),
        // Not a lock record (written by hand, or damaged): judged by its age alone.
        Err(_) => {
            if is_stale(request.path, &unknown_holder("another process")) {
                take_over_stale(request.path, None)?;
                return Ok(Attempt::Again);
            }
            return Ok(Attempt::Busy(Box::new(unknown_holder("another process"))));
        }
    };
    if is_stale(request.path, &current) {
        take_over_stale(request.path, Some(&current))?;
        return Ok(Attempt::Again);
    }
    let own_run = current.run.is_some() && current.run == request.holder.run;
    if own_run && request.take_over_run.is_none() {
        // Another task of the same sharded run holds it: share it.
        let lock = start(request.path, &request.holder, false, None)?;
        return Ok(Attempt::Held(Box::new(lock)));
    }
    if current.run.is_some() && current.run.as_deref() == request.take_over_run {
        return take_over_run(request, &current);
    }
    Ok(Attempt::Busy(Box::new(current)))
}

/// `finalize` takes its run's lock over, exclusively: the run's record is renamed aside (one
/// taker wins), checked, and this holder's created in its place; a task of the run that
/// re-creates the lock meanwhile wins instead.
fn take_over_run(request: &Request, run: &Holder) -> Result<Attempt> {
    let aside = aside_path(request.path, "run");
    match std::fs::rename(request.path, &aside) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Attempt::Again),
        Err(e) => return Err(Error::io(request.path, "cannot take over the lock", e)),
    }
    let moved = read_holder(&aside).ok();
    if moved.as_ref() != Some(run) {
        let _ = std::fs::hard_link(&aside, request.path);
        let _ = std::fs::remove_file(&aside);
        return Ok(Attempt::Again);
    }
    let _ = std::fs::remove_file(&aside);
    if !create(request.path, &request.holder)? {
        return Ok(Attempt::Again);
    }
    let lock = start(request.path, &request.holder, true, Some(run.clone()))?;
    Ok(Attempt::Held(Box::new(lock)))
}

fn busy(request: &Request, holder: &Holder) -> Error {
    Error::Busy {
        path: request.path.to_path_buf(),
        what: request.refusal.to_string(),
        holder: holder.describe(),
        hint: "wait for it to finish, or pass --wait to wait for it; a holder that died is taken over on its own host at once, from other hosts once its lock is older than the stale time (docs/operations.md)".into(),
    }
}

/// A holder whose record names nobody (a damaged or foreign lock file): judged by age alone.
pub(crate) fn unknown_holder(what: &str) -> Holder {
    Holder {
        what: what.into(),
        host: String::new(),
        pid: 0,
        start_time: None,
        since: 0,
        command: String::new(),
        run: None,
        pid_space: None,
        stale_millis: None,
        token: None,
    }
}

/// Creates the lock file with `holder`'s record, atomically: false when it exists.
fn create(path: &Path, holder: &Holder) -> Result<bool> {
    let aside = aside_path(path, "new");
    if let Err(e) = write_record(&aside, holder) {
        let _ = std::fs::remove_file(&aside);
        return Err(e);
    }
    let linked = std::fs::hard_link(&aside, path);
    // NFSv3 may retransmit a `link` that succeeded and report the retry's EEXIST: the aside
    // file's link count tells whether the lock is this one.
    let ours = match &linked {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::metadata(&aside).is_ok_and(|m| std::os::unix::fs::MetadataExt::nlink(&m) == 2)
        }
        _ => false,
    };
    let _ = std::fs::remove_file(&aside);
    match linked {
        Ok(()) => Ok(true),
        Err(_) if ours => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(Error::io(path, "cannot create the lock file", e)),
    }
}

/// Puts `holder`'s record in place of the current one (rename replaces atomically).
fn replace(path: &Path, holder: &Holder) -> Result<()> {
    let aside = aside_path(path, "new");
    write_record(&aside, holder)?;
    std::fs::rename(&aside, path).map_err(|e| Error::io(path, "cannot take over the lock", e))
}

fn write_record(path: &Path, holder: &Holder) -> Result<()> {
    let mut text =
        serde_json::to_string_pretty(holder).map_err(|e| Error::Internal(e.to_string()))?;
    text.push('\n');
    super::lock::write_synced(path, text.as_bytes())
}

fn aside_path(path: &Path, what: &str) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(Default::default, |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!("{name}.{what}.{}", unique_token()))
}

/// `HOST.NAMESPACE.PID.NANOS.COUNT`: host name and pid alone can repeat (containers sharing a
/// host name are all pid 1), the clock and a counter tell their files and takings apart.
fn unique_token() -> String {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}.{}.{}.{nanos}.{}",
        super::hostname(),
        namespace_number(),
        std::process::id(),
        COUNT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The number of this process's PID namespace (`0` where Linux does not tell it).
fn namespace_number() -> u64 {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .and_then(|link| {
            let text = link.to_string_lossy().into_owned();
            text.strip_prefix("pid:[")?.strip_suffix(']')?.parse().ok()
        })
        .unwrap_or(0)
}

/// Removes the files that processes killed while taking or handing over the lock at `path`
/// left beside it (`NAME.new.TOKEN`, ...): those of processes gone from this host and PID
/// namespace at once, any other once older than the stale time. Run by a new holder.
fn sweep_asides(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let token = file_name
            .to_str()
            .and_then(|f| f.strip_prefix(name)?.strip_prefix('.'))
            .and_then(|rest| rest.split_once('.'))
            .filter(|(what, _)| matches!(*what, "new" | "stale" | "run"))
            .map(|(_, token)| token);
        if token.is_some_and(|t| abandoned(t, &entry.path())) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn abandoned(token: &str, file: &Path) -> bool {
    let old = std::fs::metadata(file)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > stale_after()));
    let mut fields = token.rsplitn(5, '.');
    let (_count, _nanos) = (fields.next(), fields.next());
    let pid = fields.next().and_then(|p| p.parse::<libc::pid_t>().ok());
    let namespace = fields.next().and_then(|n| n.parse::<u64>().ok());
    let here = fields.next() == Some(super::hostname().as_str())
        && namespace.is_some_and(|n| n != 0 && n == namespace_number());
    old || (here && pid.is_some_and(process_gone))
}

/// Whether no process has this pid (here): only "no such process" says so, not a process
/// this user may not signal.
fn process_gone(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 checks that the process exists and may be signalled; nothing is sent.
    pid > 0
        && unsafe { libc::kill(pid, 0) } != 0
        && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// The holder recorded in a lock file. Locks of older versions (`pid host since`) are read
/// too, so a lock they left is still honoured or taken over by the same rules.
pub fn read_holder(path: &Path) -> std::io::Result<Holder> {
    let text = std::fs::read_to_string(path)?;
    if let Ok(holder) = serde_json::from_str(&text) {
        return Ok(holder);
    }
    let mut parts = text.split_whitespace();
    let (pid, host, since) = (parts.next(), parts.next(), parts.next());
    let pid = pid.and_then(|p| p.parse().ok());
    match (pid, host) {
        (Some(pid), Some(host)) => Ok(Holder {
            host: host.into(),
            pid,
            since: since.and_then(|s| s.parse().ok()).unwrap_or(0),
            ..unknown_holder("ingest")
        }),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a lock record",
        )),
    }
}

fn is_stale(path: &Path, holder: &Holder) -> bool {
    if dead_on_this_host(holder) {
        return true;
    }
    let refreshed = std::fs::metadata(path).and_then(|m| m.modified());
    refreshed.is_ok_and(|t| t.elapsed().is_ok_and(|age| age > holder.stale_after()))
}

/// A holder on this host, in this PID namespace, whose process is gone. An unknown host name
/// cannot tell two hosts apart, another PID namespace (a container sharing the host name) gives
/// its pids other meanings, and a sharded run's tasks come and go: such holders are judged by
/// age alone.
pub(crate) fn dead_on_this_host(holder: &Holder) -> bool {
    holder.pids_comparable() && holder.run.is_none() && !process_alive(holder)
}

/// Whether the holder's process still runs, as far as this system tells. Only "no such
/// process" counts as gone: a process this user may not signal or see (another user's, under
/// `hidepid`) is alive, and a pid now used by a process that started at another time is gone.
fn process_alive(holder: &Holder) -> bool {
    let pid = match libc::pid_t::try_from(holder.pid) {
        Ok(pid) if pid > 0 => pid,
        _ => return true,
    };
    if process_gone(pid) {
        return false;
    }
    match (process_stat(holder.pid), holder.start_time) {
        // A zombie has exited; its parent has not collected it yet.
        (Some(('Z', _)), _) => false,
        (Some((_, now)), Some(recorded)) => now == recorded,
        _ => true,
    }
}

/// This process's boot and PID namespace, where Linux tells them.
fn pid_space() -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let namespace = std::fs::read_link("/proc/self/ns/pid").ok()?;
    Some(format!("{}/{}", boot.trim(), namespace.display()))
}

/// The holder of the lock at `path` if it is held and not stale: what `finalize` asks of the
/// markers of its run's running tasks.
pub fn live_holder(path: &Path) -> Option<Holder> {
    let holder = read_holder(path).ok()?;
    (!is_stale(path, &holder)).then_some(holder)
}

/// Renames a stale lock aside and removes it, if it is still the one judged stale (`None`: a
/// file that is not a lock record); one of several processes taking over wins the rename, the
/// others find a fresh lock.
fn take_over_stale(path: &Path, judged: Option<&Holder>) -> Result<()> {
    let aside = aside_path(path, "stale");
    match std::fs::rename(path, &aside) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, "cannot take over a stale lock", e)),
    }
    let moved = read_holder(&aside);
    let same = match (judged, &moved) {
        (Some(judged), Ok(moved)) => moved == judged,
        (None, Err(e)) => e.kind() == std::io::ErrorKind::InvalidData,
        _ => false,
    };
    if same {
        let old = judged.map_or_else(|| "a damaged lock file".into(), Holder::describe);
        tracing::warn!(lock = %path.display(), holder = %old, "took over a stale lock");
    } else {
        // Someone took it over between the look and the rename: give theirs back.
        let _ = std::fs::hard_link(&aside, path);
    }
    let _ = std::fs::remove_file(&aside);
    Ok(())
}

/// Starts refreshing the lock in the background.
fn start(
    path: &Path,
    holder: &Holder,
    owner: bool,
    taken_from: Option<Holder>,
) -> Result<NameLock> {
    sweep_asides(path);
    let lost = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut lock = NameLock {
        path: path.to_path_buf(),
        holder: holder.clone(),
        owner,
        taken_from,
        done: false,
        lost: lost.clone(),
        stop: stop.clone(),
        beat: None,
    };
    let (beat_path, beat_holder) = (path.to_path_buf(), holder.clone());
    let beat = std::thread::Builder::new()
        .name("lock-heartbeat".into())
        .spawn(move || heartbeat(&beat_path, &beat_holder, owner, &lost, &stop))
        // Without a heartbeat the lock would go stale under a living run: refuse to start.
        .map_err(|e| Error::io(path, "cannot start the lock's heartbeat thread", e))?;
    lock.beat = Some(beat);
    Ok(lock)
}

fn heartbeat(path: &Path, holder: &Holder, owner: bool, lost: &AtomicBool, stop: &AtomicBool) {
    let beat = |record: Option<&Holder>| {
        // A task sharing its run's lock beats at least as often as the record it refreshes
        // promises (the stale time of the task that created it).
        let promised = record
            .and_then(Holder::recorded_stale)
            .unwrap_or(stale_after());
        (stale_after().min(promised) / 4).max(Duration::from_millis(200))
    };
    let mut interval = beat(None);
    let step = Duration::from_millis(100);
    let mut waited = Duration::ZERO;
    let mut missing = 0;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(step);
        waited += step;
        if waited < interval {
            continue;
        }
        waited = Duration::ZERO;
        // Lost when another holder's record is there, or none for two beats in a row (a
        // losing stale-taker puts a live lock back at once); a failed read (a network file
        // system's hiccup) is tried again on the next beat.
        match read_holder(path) {
            Ok(h) if is_ours(&h, holder, owner) => {
                missing = 0;
                interval = beat(Some(&h));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && missing == 0 => {
                missing = 1;
                continue;
            }
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => continue,
            _ => {
                lost.store(true, Ordering::Relaxed);
                return;
            }
        }
        let _ = std::fs::File::options()
            .write(true)
            .open(path)
            .and_then(|f| f.set_modified(SystemTime::now()));
    }
}

fn is_ours(found: &Holder, holder: &Holder, owner: bool) -> bool {
    match owner {
        true => found == holder,
        false => found.run == holder.run,
    }
}

/// How long a lock may go unrefreshed before it is taken for abandoned, as this process is
/// configured (`Holder::stale_after` also heeds the holder's own setting).
pub fn stale_after() -> Duration {
    std::env::var("SENSORIUM_INGEST_LOCK_STALE_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .unwrap_or(Duration::from_secs(600))
}

fn poll_interval() -> Duration {
    (stale_after() / 20).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// A process's state letter and start time in clock ticks after boot (`/proc/<pid>/stat`,
/// fields 3 and 22); `None` where there is no such process, or no /proc.
fn process_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last `)`.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    Some((state, fields.nth(18)?.parse().ok()?))
}

fn process_start_time(pid: u32) -> Option<u64> {
    process_stat(pid).map(|(_, start)| start)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `2026-12-03 08:00:00 UTC` (civil from days, Howard Hinnant's algorithm).
fn format_utc(seconds: u64) -> String {
    let days = (seconds / 86_400) as i64;
    let rest = seconds % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(what: &str, run: Option<&str>) -> Holder {
        Holder {
            command: format!("test {what}"),
            ..Holder::this_process(what, run.map(String::from))
        }
    }

    fn request<'a>(path: &'a Path, holder: Holder) -> Request<'a> {
        Request {
            path,
            holder,
            refusal: "another writer holds dataset d",
            waiting: Waiting::No,
            take_over_run: None,
        }
    }

    #[test]
    fn a_second_writer_is_refused_and_told_who_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".d.lock");
        let first = NameLock::acquire(request(&path, holder("convert", None))).unwrap();
        let refused = NameLock::acquire(request(&path, holder("finalize", None)));
        match refused {
            Err(Error::Busy { holder, .. }) => {
                assert!(holder.contains("convert (pid"), "{holder}");
                assert!(holder.contains(&std::process::id().to_string()), "{holder}");
            }
            Err(other) => panic!("expected Busy, got {other}"),
            Ok(_) => panic!("a second writer got the lock"),
        }
        assert!(first.still_held());
        drop(first);
        assert!(!path.exists());
        NameLock::acquire(request(&path, holder("convert", None))).unwrap();
    }

    #[test]
    fn shard_tasks_of_one_run_share_it_and_finalize_takes_it_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".d.lock");
        let a = NameLock::acquire(request(&path, holder("shard task", Some("run1")))).unwrap();
        let b = NameLock::acquire(request(&path, holder("shard task", Some("run1")))).unwrap();
        assert!(NameLock::acquire(request(&path, holder("shard task", Some("run2")))).is_err());
        assert!(NameLock::acquire(request(&path, holder("convert", None))).is_err());
        drop((a, b));
        // A run's lock outlives its tasks, until its finalize takes it over.
        assert!(path.exists());
        let finalize = || Request {
            take_over_run: Some("run1"),
            ..request(&path, holder("finalize", None))
        };
        // A finalize that fails gives the name back to the run.
        let failed = NameLock::acquire(finalize()).unwrap();
        assert_eq!(read_holder(&path).unwrap().what, "finalize");
        assert!(
            NameLock::acquire(finalize()).is_err(),
            "two finalizes took it over"
        );
        drop(failed);
        assert_eq!(read_holder(&path).unwrap().run.as_deref(), Some("run1"));
        // One that publishes removes it.
        let mut done = NameLock::acquire(finalize()).unwrap();
        done.finish();
        drop(done);
        assert!(!path.exists());
    }

    #[test]
    fn a_dead_holder_on_this_host_is_taken_over_and_old_records_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".ingest.lock");
        // A pid that cannot exist (above the kernel's pid_max).
        std::fs::write(&path, format!("99999999 {} 0\n", super::super::hostname())).unwrap();
        let lock = NameLock::acquire(request(&path, holder("ingest", None))).unwrap();
        assert_eq!(read_holder(&path).unwrap().pid, std::process::id());
        drop(lock);
    }

    #[test]
    fn pids_count_only_in_their_own_namespace() {
        let here = holder("convert", None);
        assert!(here.pids_comparable());
        let container = Holder {
            pid_space: Some("another-boot/pid:[1]".into()),
            ..here.clone()
        };
        assert!(!container.pids_comparable());
        // A holder of this version that could not read its namespace: judged by age.
        let unknown = Holder {
            pid_space: None,
            ..here.clone()
        };
        assert!(!unknown.pids_comparable());
        // A record of an older version names none: its host decides.
        let older = Holder {
            pid_space: None,
            stale_millis: None,
            ..here
        };
        assert!(older.pids_comparable());
    }

    #[test]
    fn a_holders_longer_stale_time_wins() {
        let slow = Holder {
            stale_millis: Some(3_600_000),
            ..holder("convert", None)
        };
        assert_eq!(
            slow.stale_after(),
            Duration::from_secs(3600).max(stale_after())
        );
        let quick = Holder {
            stale_millis: Some(1),
            ..holder("convert", None)
        };
        assert_eq!(quick.stale_after(), stale_after());
    }

    #[test]
    fn files_left_by_killed_takers_are_swept_by_the_next_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".d.lock");
        let host = super::super::hostname();
        let space = namespace_number();
        // A pid that cannot exist (above the kernel's pid_max), and this living process.
        let dead = dir
            .path()
            .join(format!(".d.lock.new.{host}.{space}.99999999.1.0"));
        let alive = dir.path().join(format!(
            ".d.lock.new.{host}.{space}.{}.1.0",
            std::process::id()
        ));
        let elsewhere = dir.path().join(".d.lock.stale.other-node.7.99999999.1.0");
        for f in [&dead, &alive, &elsewhere] {
            std::fs::write(f, "{}").unwrap();
        }
        let lock = NameLock::acquire(request(&path, holder("convert", None))).unwrap();
        assert!(!dead.exists());
        assert!(alive.exists() && elsewhere.exists());
        drop(lock);
    }

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(1_796_286_000), "2026-12-03 08:20:00 UTC");
    }
}
