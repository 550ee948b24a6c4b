//! Encoded objects written on I/O threads, so that a worker reads its next item while its last
//! object goes to disk.
//!
//! Why: a direct I/O write and its `fsync` block the worker for the device's time, and a
//! blocked worker leaves its core idle: a conversion that wrote nothing at all was measurably
//! faster on 1 and on 2 threads (docs/performance.md, "Write-behind I/O threads").
//!
//! No buffer is added: the encoder's output buffer is lent to the I/O thread and comes back
//! before the worker encodes again ([`EncoderSlot::encoder`] waits for it), which is after it
//! has read the next shard's trials, so in practice it never waits. One I/O thread per worker
//! keeps as many writes in flight as before (parallel file systems and NVMe devices gain from
//! several); they spend their time blocked in the kernel, not on the cores: the objects are
//! hashed by their workers before they are handed over.
//!
//! A failed write is returned to the worker when it next asks for its encoder, and by [`run`]
//! in any case, so a stage whose last write failed fails too.

use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::Mutex;

use zarrs::storage::{StoreKey, WritableStorageTraits};

use super::output_store::OutputStore;
use super::shard::ShardEncoder;
use crate::per_thread::lock;

/// The buffer an I/O thread returns, with the outcome of its write.
type Returned = (Vec<u8>, Result<(), String>);

struct Job {
    key: StoreKey,
    buffer: Vec<u8>,
    start: usize,
    /// The object's BLAKE3, taken on the worker (see [`WriteBehind::store`]).
    hash: String,
    reply: SyncSender<Returned>,
}

/// Hands objects to the I/O threads of [`run`].
pub struct WriteBehind<'a> {
    jobs: Sender<Job>,
    output: &'a OutputStore,
}

/// One worker's encoder and the write of the last object it encoded.
#[derive(Default)]
pub struct EncoderSlot {
    encoder: ShardEncoder,
    in_flight: Option<Receiver<Returned>>,
}

impl EncoderSlot {
    /// The encoder, once the write of its last object is done and its buffer is back. The
    /// error of that write, if it failed.
    pub fn encoder(&mut self) -> Result<&mut ShardEncoder, String> {
        if let Some(reply) = self.in_flight.take() {
            let (buffer, written) = reply
                .recv()
                .map_err(|_| "an I/O thread stopped before finishing a write".to_string())?;
            self.encoder.give_back(buffer);
            written?;
        }
        Ok(&mut self.encoder)
    }
}

impl Drop for EncoderSlot {
    /// Waits for the last write, so its buffer is freed on the worker's thread, with the
    /// encoder's: freed on an I/O thread (which ends with its stage), the allocator kept the
    /// memory until the end of the run, which raised the peak. Its error, if any, is `run`'s.
    fn drop(&mut self) {
        let _ = self.encoder();
    }
}

/// Runs `work` with `threads` I/O threads taking the objects it hands to the [`WriteBehind`],
/// and returns once every object is written: `work`'s result, and the first failed write, if
/// any (the workers may have seen it already).
pub fn run<R>(
    output: &OutputStore,
    threads: usize,
    work: impl FnOnce(&WriteBehind) -> R,
) -> (R, Result<(), String>) {
    let (jobs, queue) = channel::<Job>();
    let queue = Mutex::new(queue);
    let first_error = Mutex::new(None::<String>);
    let result = std::thread::scope(|scope| {
        let mut started = 0;
        for i in 0..threads.max(1) {
            let spawned = std::thread::Builder::new()
                .name(format!("write-{i}"))
                .spawn_scoped(scope, || io_thread(output, &queue, &first_error));
            match spawned {
                Ok(_) => started += 1,
                // Fewer I/O threads only means fewer writes in flight; with none, every write
                // is made on its worker's thread (`store`).
                Err(e) => {
                    tracing::warn!(error = %e, started, "cannot start more I/O threads");
                    break;
                }
            }
        }
        let jobs = if started > 0 { jobs } else { channel().0 };
        let writer = WriteBehind { jobs, output };
        // Returning drops the writer, which closes the queue: the I/O threads finish what is
        // in it and stop, and the scope waits for them.
        work(&writer)
    });
    let failed = first_error.into_inner().unwrap_or_else(|e| e.into_inner());
    (result, failed.map_or(Ok(()), Err))
}

fn io_thread(
    output: &OutputStore,
    queue: &Mutex<Receiver<Job>>,
    first_error: &Mutex<Option<String>>,
) {
    loop {
        // The lock is held while waiting: the thread that has it takes the next job.
        let job = match lock(queue).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let written = output
            .write_hashed(&job.key, &job.buffer[job.start..], job.hash)
            .map_err(|e| format!("{}: {e}", job.key));
        if let Err(e) = &written {
            lock(first_error).get_or_insert_with(|| e.clone());
        }
        // The worker may be gone (its stage failed): the error is kept above.
        let _ = job.reply.send((job.buffer, written));
    }
}

impl WriteBehind<'_> {
    /// Writes the object `slot`'s encoder encoded last at `key`, on an I/O thread; or erases
    /// `key` now if there is none (all fill, as `zarrs` does).
    pub fn store(&self, slot: &mut EncoderSlot, key: StoreKey) -> Result<(), String> {
        let encoder = slot.encoder()?;
        let Some((buffer, start)) = encoder.take_object() else {
            return self.output.erase(&key).map_err(|e| format!("{key}: {e}"));
        };
        // Hashed here, not on the I/O thread: `--threads` is the number of cores a job keeps
        // busy, and the I/O threads are only to wait on the device. Hashed there, a
        // `--threads 1` conversion ran part of its BLAKE3 on a second core
        // (docs/performance.md, "Hashing on the worker"). The bytes were also just encoded on
        // this core.
        let hash = blake3::hash(&buffer[start..]).to_hex().to_string();
        let (reply, returned) = sync_channel(1);
        let job = Job {
            key,
            buffer,
            start,
            hash,
            reply,
        };
        match self.jobs.send(job) {
            Ok(()) => {
                slot.in_flight = Some(returned);
                Ok(())
            }
            // No I/O thread (see `run`): written here.
            Err(failed) => {
                let job = failed.0;
                let written = self
                    .output
                    .write_hashed(&job.key, &job.buffer[job.start..], job.hash)
                    .map_err(|e| format!("{}: {e}", job.key));
                slot.encoder.give_back(job.buffer);
                written
            }
        }
    }
}
