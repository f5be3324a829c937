//! How a forward pass spreads over the rayon pool: products split in chunks that idle threads
//! take over ([`for_each_chunk`]), and the pool's other workers kept awake for the whole pass
//! ([`on_pool_awake`]).
//!
//! Each thread owns a contiguous share of the rows and walks it front to back in chunks (one
//! stream, prefetched ahead); a thread whose share is done takes the chunks still left in the
//! others' shares, one at a time, from the front. A thread that wakes late (an idle rayon worker
//! takes 30-50 µs to wake) or streams slower only gives chunks away instead of making the others
//! wait for its whole share, which is what a static split per thread (or rayon's few large tasks)
//! did: in an 8-layer q4_0 decode the threads were busy 85.5% of each product's wall time that
//! way, 92.6% with chunks.

use std::{
    ops::Range,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Mutex,
    },
};

/// Runs `f` on a rayon worker (inline when already on one) while every other worker of the pool
/// polls for work until `f` returns, as llama.cpp's threads spin between the operations of a
/// graph. A sleeping rayon worker takes 30-50 µs (in this VM) to wake and the thread waking it
/// spends tens of µs in the futex call, per product; with the workers polling, a product's tasks
/// start within a few µs. 7B q4_0 decode, alternated: 6.46/6.90/6.72/6.71 tok/s against
/// 6.45/6.22/6.45/6.43 with the workers asleep between products. An idle poll yields the core to
/// the OS, so other threads (candle's elementwise pool during prompts) still get it.
pub(crate) fn on_pool_awake<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let done = AtomicBool::new(false);
    /// Ends the polling however `f` exits (a panic too: the scope waits for the pollers).
    struct Finish<'a>(&'a AtomicBool);
    impl Drop for Finish<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    rayon::scope(|scope| {
        let owner = rayon::current_thread_index();
        for _ in 1..rayon::current_num_threads() {
            let done = &done;
            scope.spawn(move |_| {
                // Other workers steal the oldest jobs first, so they take the pollers; should `f`'s
                // own thread ever take one back while it waits inside `f`, polling there would
                // never return (`f` is suspended below this frame).
                if rayon::current_thread_index() == owner {
                    return;
                }
                while !done.load(Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::thread::yield_now();
                    }
                }
            });
        }
        let _finish = Finish(&done);
        f()
    })
}

/// Runs `f(items, out)` for every chunk of `chunk` items of `0..n` on the rayon pool, where `out`
/// is the chunk's part of `out` (`per_item` values per item, `out.len() == n · per_item`). Every
/// chunk runs exactly once; which thread runs it is not fixed.
pub(crate) fn for_each_chunk<T: Send>(
    n: usize,
    chunk: usize,
    out: &mut [T],
    per_item: usize,
    f: impl Fn(Range<usize>, &mut [T]) + Sync,
) {
    assert_eq!(out.len(), n * per_item, "one output slot per item");
    let chunk = chunk.max(1);
    let chunks = n.div_ceil(chunk);
    let threads = rayon::current_num_threads().clamp(1, chunks.max(1));
    // Chunk outputs, each taken once by whichever thread claims the chunk.
    let slots: Vec<Mutex<Option<&mut [T]>>> =
        out.chunks_mut(chunk * per_item).map(|s| Mutex::new(Some(s))).collect();
    // Share `s` is chunks `bounds[s]..bounds[s + 1]`; `next[s]` the first one not yet claimed.
    let bounds: Vec<usize> = (0..=threads).map(|s| s * chunks / threads).collect();
    let next: Vec<AtomicUsize> = bounds[..threads].iter().map(|&b| AtomicUsize::new(b)).collect();
    let worker = |own: usize| {
        for s in (own..own + threads).map(|s| s % threads) {
            loop {
                let c = next[s].fetch_add(1, Ordering::Relaxed);
                if c >= bounds[s + 1] {
                    break;
                }
                let slot = slots[c].lock().unwrap_or_else(|e| e.into_inner()).take();
                let out = slot.expect("a chunk is claimed once");
                f(c * chunk..((c + 1) * chunk).min(n), out);
            }
        }
    };
    rayon::scope(|scope| {
        for own in 1..threads {
            let worker = &worker;
            scope.spawn(move |_| worker(own));
        }
        worker(0);
    });
}

#[cfg(test)]
mod tests {
    use super::{for_each_chunk, on_pool_awake};

    #[test]
    fn awake_pool_runs_nested_work_and_ends_on_any_pool_size() {
        for threads in [1, 2, 4] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let total = pool.install(|| {
                on_pool_awake(|| {
                    // Nested passes and parallel loops inside one, as a forward pass has.
                    (0..3)
                        .map(|i| {
                            on_pool_awake(|| {
                                let mut out = vec![0usize; 100];
                                for_each_chunk(100, 7, &mut out, 1, |items, out| {
                                    for (o, i) in out.iter_mut().zip(items) {
                                        *o = i;
                                    }
                                });
                                out.iter().sum::<usize>() + i
                            })
                        })
                        .sum::<usize>()
                })
            });
            assert_eq!(total, 3 * 4950 + 3, "{threads} threads");
        }
    }

    #[test]
    fn a_panic_in_the_pass_reaches_the_caller() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let caught = pool.install(|| std::panic::catch_unwind(|| on_pool_awake(|| panic!("in the pass"))));
        assert!(caught.is_err());
    }

    #[test]
    fn every_item_once_with_its_own_output() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for (n, chunk, per_item) in [(0, 4, 2), (1, 4, 1), (10, 3, 2), (64, 16, 3), (1000, 7, 1), (5, 100, 2)]
        {
            let mut out = vec![0usize; n * per_item];
            pool.install(|| {
                for_each_chunk(n, chunk, &mut out, per_item, |items, out| {
                    assert_eq!(out.len(), items.len() * per_item);
                    for (i, o) in items.flat_map(|i| std::iter::repeat_n(i, per_item)).zip(out) {
                        *o += i + 1;
                    }
                })
            });
            let want: Vec<usize> = (0..n).flat_map(|i| std::iter::repeat_n(i + 1, per_item)).collect();
            assert_eq!(out, want, "n {n}, chunk {chunk}");
        }
    }
}
