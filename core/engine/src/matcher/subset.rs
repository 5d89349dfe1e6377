//! A set of subscriptions filed under one index key (a trie node, a hash bucket).
//!
//! Members carry the subscription's id and event mask, and whether an exact key hit is
//! enough to match: the common case — one equality condition — is then answered from the
//! bucket alone, without touching the subscription (a cache miss per candidate at 1M
//! subscriptions). Most buckets hold one member: no heap allocation then.

use indexmap::IndexMap;

type BigSet = IndexMap<u32, (u64, u8), ahash::RandomState>;

/// Past this many members a bucket switches from a vector to a hash-indexed map.
const SMALL_LIMIT: usize = 8;

/// `flags` bit: the subscription's filter is exactly the condition it is indexed under.
pub(crate) const EXACT: u8 = 0x80;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Member {
    pub(crate) slot: u32,
    /// Event mask (INSERT/UPDATE/DELETE bits) and EXACT.
    pub(crate) flags: u8,
    pub(crate) id: u64,
}

#[derive(Debug, Default)]
pub(crate) enum SubSet {
    #[default]
    Empty,
    One(Member),
    Small(Vec<Member>),
    Large(Box<BigSet>),
}

impl SubSet {
    /// Adds `member`; callers never add a slot twice.
    pub(crate) fn insert(&mut self, member: Member) {
        match self {
            SubSet::Empty => *self = SubSet::One(member),
            SubSet::One(first) => {
                debug_assert_ne!(first.slot, member.slot);
                *self = SubSet::Small(vec![*first, member]);
            }
            SubSet::Small(v) if v.len() < SMALL_LIMIT => {
                debug_assert!(v.iter().all(|m| m.slot != member.slot));
                v.push(member);
            }
            SubSet::Small(v) => {
                let mut big: BigSet = v.drain(..).map(|m| (m.slot, (m.id, m.flags))).collect();
                big.insert(member.slot, (member.id, member.flags));
                *self = SubSet::Large(Box::new(big));
            }
            SubSet::Large(s) => {
                s.insert(member.slot, (member.id, member.flags));
            }
        }
    }

    pub(crate) fn remove(&mut self, slot: u32) -> bool {
        match self {
            SubSet::Empty => false,
            SubSet::One(only) => {
                let removed = only.slot == slot;
                if removed {
                    *self = SubSet::Empty;
                }
                removed
            }
            SubSet::Small(v) => match v.iter().position(|m| m.slot == slot) {
                Some(i) => {
                    v.swap_remove(i);
                    if v.len() == 1 {
                        *self = SubSet::One(v[0]);
                    }
                    true
                }
                None => false,
            },
            SubSet::Large(s) => {
                let removed = s.swap_remove(&slot).is_some();
                if s.len() <= SMALL_LIMIT / 2 {
                    *self = SubSet::Small(
                        s.iter()
                            .map(|(&slot, &(id, flags))| Member { slot, flags, id })
                            .collect(),
                    );
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
            SubSet::Empty => 0,
            SubSet::One(_) => 1,
            SubSet::Small(v) => v.len(),
            SubSet::Large(s) => s.len(),
        }
    }

    pub(crate) fn for_each(&self, f: &mut impl FnMut(Member)) {
        match self {
            SubSet::Empty => {}
            SubSet::One(m) => f(*m),
            SubSet::Small(v) => v.iter().copied().for_each(f),
            SubSet::Large(s) => {
                for (&slot, &(id, flags)) in s.iter() {
                    f(Member { slot, flags, id });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(slot: u32) -> Member {
        Member {
            slot,
            flags: 1,
            id: u64::from(slot) + 1000,
        }
    }

    #[test]
    fn grows_and_shrinks() {
        let mut s = SubSet::default();
        for i in 0..100 {
            s.insert(m(i));
        }
        assert!(matches!(s, SubSet::Large(_)));
        assert_eq!(s.len(), 100);
        for i in 0..100 {
            assert!(s.remove(i));
            assert!(!s.remove(i));
        }
        assert!(s.is_empty());
        assert!(matches!(s, SubSet::Empty));
        s.insert(m(7));
        assert_eq!(s.len(), 1);
        assert!(matches!(s, SubSet::One(x) if x == m(7)));
        s.insert(m(8));
        let mut seen = Vec::new();
        s.for_each(&mut |x| seen.push(x.id));
        assert_eq!(seen, [1007, 1008]);
        assert!(s.remove(7));
        assert!(matches!(s, SubSet::One(x) if x == m(8)));
    }

    #[test]
    fn stays_small() {
        assert!(std::mem::size_of::<SubSet>() <= 32);
    }
}
