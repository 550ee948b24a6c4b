//! A parallel loop whose working state is made once per pool thread and reused by every item
//! that thread runs: source readers (each holds an entry's compressed and inflated bytes),
//! trial buffers and shard encoders (MBs to tens of MB).
//!
//! Why not rayon's `map_init`: it makes a new state per split job, not per thread - many times
//! per stage, each a fresh buffer of tens of MB that the kernel must fault in and zero
//! (docs/performance.md, "One working state per thread"). Here each worker makes
//! its state once, takes items one at a time (in order, so the work stays balanced to the last
//! item), and drops the state on its own thread when no item is left, so the allocator gets the
//! memory back at once rather than from another thread later.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use rayon::prelude::*;

/// Locks `m`, even if a thread panicked holding it: the users of this helper keep nothing
/// half-changed under their locks (single pushes, inserts, counters), and a panicking thread
/// fails the whole run anyway.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What an item's work can see of the loop.
pub struct Queue<'a> {
    idle: &'a AtomicUsize,
    next: &'a AtomicUsize,
    items: usize,
}

impl Queue<'_> {
    /// The item the next worker to ask will get, if any is left: a guess (another worker may
    /// take it first), good for hints such as prefetching its input.
    pub fn next_item(&self) -> Option<usize> {
        Some(self.next.load(Ordering::Relaxed)).filter(|&i| i < self.items)
    }

    /// Workers that found no item left and wait for the others: the items still running may
    /// spread their own work over that many more threads.
    pub fn idle_workers(&self) -> usize {
        self.idle.load(Ordering::Relaxed)
    }
}

/// `work(i, state, queue)` for every `i` in `0..items` on the current pool, results in item
/// order.
pub fn map_with_state<S, R: Send>(
    items: usize,
    init: impl Fn() -> S + Sync,
    work: impl Fn(usize, &mut S, &Queue) -> R + Sync,
) -> Vec<R> {
    map_with_state_helping(items, init, work, |_| false)
}

/// `map_with_state`, where a worker that finds no item left calls `help(state)` until it
/// returns `false`, to take part of the items still running (whose work must then look for
/// the help and wait for it).
pub fn map_with_state_helping<S, R: Send>(
    items: usize,
    init: impl Fn() -> S + Sync,
    work: impl Fn(usize, &mut S, &Queue) -> R + Sync,
    help: impl Fn(&mut S) -> bool + Sync,
) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let idle = AtomicUsize::new(0);
    let queue = Queue {
        idle: &idle,
        next: &next,
        items,
    };
    let workers = rayon::current_num_threads().clamp(1, items.max(1));
    let mut done: Vec<(usize, R)> = (0..workers)
        .into_par_iter()
        .with_max_len(1)
        .flat_map_iter(|_| {
            // Made on first item: a worker that finds nothing left makes no state.
            let mut state = None;
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= items {
                    idle.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                out.push((i, work(i, state.get_or_insert_with(&init), &queue)));
            }
            if let Some(state) = &mut state {
                while help(state) {}
            }
            out
        })
        .collect();
    done.sort_unstable_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a thread pool")
    }

    #[test]
    fn every_item_once_in_order_with_one_state_per_thread() {
        for (threads, items) in [(1, 0), (1, 5), (2, 1), (2, 64), (4, 3), (3, 100)] {
            let made = AtomicUsize::new(0);
            let got = pool(threads).install(|| {
                map_with_state(
                    items,
                    || {
                        made.fetch_add(1, Ordering::Relaxed);
                        0usize
                    },
                    |i, runs, _| {
                        *runs += 1;
                        i * 10
                    },
                )
            });
            assert_eq!(got, (0..items).map(|i| i * 10).collect::<Vec<_>>());
            let made = made.load(Ordering::Relaxed);
            assert!(
                made <= threads.min(items),
                "{made} states, {threads} threads, {items} items"
            );
        }
    }

    #[test]
    fn items_are_spread_over_the_threads() {
        let per_thread = pool(2).install(|| {
            map_with_state(
                8,
                || (),
                |_, (), _| {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    rayon::current_thread_index()
                },
            )
        });
        let first = per_thread[0];
        assert!(
            per_thread.iter().any(|&t| t != first),
            "one thread ran every item"
        );
    }
}
