//! A set of subscription slots that is small and cheap while it holds few members (most
//! index buckets hold one) and keeps O(1) insert and remove when it grows.

use indexmap::IndexSet;

type BigSet = IndexSet<u32, ahash::RandomState>;

/// Past this many members a bucket switches from a vector to a hash-indexed set.
const SMALL_LIMIT: usize = 8;

#[derive(Debug)]
pub(crate) enum SubSet {
    Small(Vec<u32>),
    Large(Box<BigSet>),
}

impl Default for SubSet {
    fn default() -> Self {
        SubSet::Small(Vec::new())
    }
}

impl SubSet {
    /// Adds `slot`; callers never add a slot twice.
    pub(crate) fn insert(&mut self, slot: u32) {
        match self {
            SubSet::Small(v) if v.len() < SMALL_LIMIT => {
                debug_assert!(!v.contains(&slot));
                v.push(slot);
            }
            SubSet::Small(v) => {
                let mut big: BigSet = v.drain(..).collect();
                big.insert(slot);
                *self = SubSet::Large(Box::new(big));
            }
            SubSet::Large(s) => {
                s.insert(slot);
            }
        }
    }

    pub(crate) fn remove(&mut self, slot: u32) -> bool {
        match self {
            SubSet::Small(v) => match v.iter().position(|s| *s == slot) {
                Some(i) => {
                    v.swap_remove(i);
                    if v.is_empty() {
                        // Give the allocation back: an empty bucket is about to be pruned.
                        *v = Vec::new();
                    }
                    true
                }
                None => false,
            },
            SubSet::Large(s) => {
                let removed = s.swap_remove(&slot);
                if s.len() <= SMALL_LIMIT / 2 {
                    *self = SubSet::Small(s.iter().copied().collect());
                }
                removed
            }
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            SubSet::Small(v) => v.len(),
            SubSet::Large(s) => s.len(),
        }
    }

    pub(crate) fn for_each(&self, f: &mut impl FnMut(u32)) {
        match self {
            SubSet::Small(v) => v.iter().copied().for_each(f),
            SubSet::Large(s) => s.iter().copied().for_each(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_shrinks() {
        let mut s = SubSet::default();
        for i in 0..100 {
            s.insert(i);
        }
        assert!(matches!(s, SubSet::Large(_)));
        assert_eq!(s.len(), 100);
        for i in 0..100 {
            assert!(s.remove(i));
            assert!(!s.remove(i));
        }
        assert!(s.is_empty());
        assert!(matches!(s, SubSet::Small(_)));
        let mut seen = Vec::new();
        s.insert(7);
        s.for_each(&mut |x| seen.push(x));
        assert_eq!(seen, [7]);
    }
}
