//! KV memory under a budget, and the prefix cache.
//!
//! Every sequence's cache is counted against the budget from its admission to its end, and grows
//! ([`KvPool::grow`]) as its tokens are written; a sequence whose first step does not fit waits
//! (its request stays queued) and one that cannot grow makes the engine preempt, so the caches
//! never hold more than the budget. A finished sequence's
//! cache is kept, with the tokens it holds, as a prefix entry: a later prompt that starts with the
//! same tokens (the XGen-Inst header, a shared system prompt, earlier turns of a conversation,
//! the same document) takes the entry and computes only the rest. Entries are evicted least
//! recently used whenever a new cache needs their room.
//!
//! Invariant: `in_use + Σ entry bytes ≤ budget` after every call (a budget of `None` is
//! unbounded).

use xgen_model::{KvCache, Model};

/// Whether finished sequences' caches are kept for later prompts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefixCache {
    On,
    Off,
}

/// A finished sequence's cache and the tokens at its positions.
struct Entry {
    tokens: Vec<u32>,
    cache: KvCache,
}

/// The caches of the running sequences (counted) and the prefix entries (evictable).
pub struct KvPool {
    budget: Option<usize>,
    /// Cache bytes per position of one sequence.
    per_token: usize,
    in_use: usize,
    /// Least recently used first.
    entries: Vec<Entry>,
    prefix: PrefixCache,
}

/// A cache for a new sequence: `reused` of its prompt's positions are already computed.
pub struct Reserved {
    pub cache: KvCache,
    pub reused: usize,
}

/// Why a sequence got no cache.
#[derive(Debug)]
pub enum Refused {
    /// Not now: the running sequences hold the room. Try again when one ends.
    Busy,
    /// Never: it needs more than the whole budget.
    TooLarge {
        needed: usize,
        budget: usize,
    },
    Model(String),
}

impl KvPool {
    pub fn new(model: &Model, budget: Option<usize>, prefix: PrefixCache) -> Result<Self, String> {
        let per_token = model.new_cache(1, 1).map_err(|e| e.to_string())?.size_bytes();
        Ok(Self { budget, per_token, in_use: 0, entries: Vec::new(), prefix })
    }

    /// Cache bytes of one sequence of `positions`.
    pub fn bytes_for(&self, positions: usize) -> usize {
        positions * self.per_token
    }

    /// Bytes held: running sequences' caches and prefix entries.
    pub fn held(&self) -> usize {
        self.in_use + self.entries.iter().map(|e| e.cache.size_bytes()).sum::<usize>()
    }

    pub fn budget(&self) -> Option<usize> {
        self.budget
    }

    pub fn entries(&self) -> usize {
        self.entries.len()
    }

    /// A cache of `capacity` positions for `prompt`, starting from the longest cached prefix of
    /// it (at most all but its last token, whose logits the caller needs).
    pub fn reserve(&mut self, model: &Model, prompt: &[u32], capacity: usize) -> Result<Reserved, Refused> {
        let needed = self.bytes_for(capacity);
        let limit = self.budget.unwrap_or(usize::MAX);
        if needed > limit {
            return Err(Refused::TooLarge { needed, budget: limit });
        }
        // The reused entry leaves the list: used in place when it has the room, else copied into
        // a new cache (both held during the copy) and dropped.
        let taken = self.longest_prefix(prompt).map(|(i, len)| (self.entries.remove(i), len));
        let in_place = taken.as_ref().is_some_and(|(e, _)| e.cache.capacity() >= capacity);
        let taken_bytes = taken.as_ref().map_or(0, |(e, _)| e.cache.size_bytes());
        let mut extra = if in_place { taken_bytes } else { taken_bytes + needed };
        let mut taken = taken;
        // Least recently used entries go first.
        while self.in_use + self.entry_bytes() + extra > limit && !self.entries.is_empty() {
            self.entries.remove(0);
        }
        if self.in_use + self.entry_bytes() + extra > limit
            && taken.is_some()
            && self.in_use + needed <= limit
        {
            // Copying would not fit beside the entry: start afresh without it.
            taken = None;
            extra = needed;
        }
        if self.in_use + self.entry_bytes() + extra > limit {
            if let Some((entry, _)) = taken {
                self.entries.push(entry);
            }
            return Err(Refused::Busy);
        }
        let model_error = |e: xgen_model::ModelError| Refused::Model(e.to_string());
        let (cache, reused) = match taken {
            Some((mut entry, len)) => {
                entry.cache.truncate(len);
                let cache = if in_place {
                    entry.cache
                } else {
                    entry.cache.resized(capacity).map_err(model_error)?
                };
                (cache, len)
            }
            None => (model.new_cache(1, capacity).map_err(model_error)?, 0),
        };
        self.in_use += cache.size_bytes();
        Ok(Reserved { cache, reused })
    }

    /// Whether `bytes` more fit beside the running caches (prefix entries would be evicted).
    pub fn has_room(&self, bytes: usize) -> bool {
        self.in_use + bytes <= self.budget.unwrap_or(usize::MAX)
    }

    /// Why a sequence of `positions` could never run here (`None`: it fits the budget alone).
    pub fn refuse(&self, positions: usize) -> Option<Refused> {
        let (needed, budget) = (self.bytes_for(positions), self.budget?);
        (needed > budget).then_some(Refused::TooLarge { needed, budget })
    }

    /// A copy of running `cache` with room for `capacity` positions, prefix entries evicted
    /// (oldest first) to make room; [`Refused::Busy`] when the running caches hold it. The caller
    /// drops `cache` for the copy at once.
    pub fn grow(&mut self, cache: &KvCache, capacity: usize) -> Result<KvCache, Refused> {
        let (old, new) = (cache.size_bytes(), self.bytes_for(capacity));
        let limit = self.budget.unwrap_or(usize::MAX);
        // Both are held during the copy.
        while self.in_use + self.entry_bytes() + new > limit && !self.entries.is_empty() {
            self.entries.remove(0);
        }
        if self.in_use + self.entry_bytes() + new > limit {
            return Err(Refused::Busy);
        }
        let grown = cache.resized(capacity).map_err(|e| Refused::Model(e.to_string()))?;
        self.in_use = self.in_use + grown.size_bytes() - old;
        Ok(grown)
    }

    /// A sequence ended: its cache, holding `tokens` at its first positions, becomes a prefix
    /// entry (or is freed when prefix caching is off).
    pub fn release(&mut self, cache: KvCache, tokens: &[u32]) {
        self.in_use -= cache.size_bytes();
        let len = cache.len().min(tokens.len());
        if self.prefix == PrefixCache::Off || len == 0 {
            return;
        }
        self.entries.push(Entry { tokens: tokens[..len].to_vec(), cache });
    }

    /// A running sequence's cache dropped without keeping it (an error, a shutdown).
    pub fn forget(&mut self, cache: &KvCache) {
        self.in_use -= cache.size_bytes();
    }

    fn entry_bytes(&self) -> usize {
        self.entries.iter().map(|e| e.cache.size_bytes()).sum()
    }

    /// The entry sharing the most leading tokens with `prompt` (at most `prompt.len() - 1`),
    /// and that count; `None` when none shares any. Marks nothing: the caller takes it.
    fn longest_prefix(&self, prompt: &[u32]) -> Option<(usize, usize)> {
        let limit = prompt.len().saturating_sub(1);
        self.entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, e.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count().min(limit)))
            .filter(|&(_, len)| len > 0)
            .max_by_key(|&(i, len)| (len, i))
    }
}

#[cfg(test)]
mod tests;
