//! Splitting a product's output rows across the rayon pool so no thread waits at the end.
//!
//! Each thread owns a contiguous share of the rows and walks it front to back in chunks (one
//! stream, prefetched ahead); a thread whose share is done takes the chunks still left in the
//! others' shares, one at a time, from the front. A thread that wakes late (an idle rayon worker
//! takes 30-50 µs to wake) or streams slower only gives chunks away instead of making the others
//! wait for its whole share, which is what a static split per thread (or rayon's few large tasks)
//! did: in a q4_0 decode step the workers were idle 10-17% of the time.

use std::{
    ops::Range,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
};

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
    use super::for_each_chunk;

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
