//! Channel names, channel patterns (`*` one segment, `>` one or more trailing segments) and
//! the segment trie that matches a name against every pattern at once.

use ahash::AHashMap;

use super::error::ChannelNameError;
use super::subset::{Member, SubSet};

pub const MAX_CHANNEL_BYTES: usize = 255;
pub const SEPARATOR: char = ':';

/// Checks a channel name (`pattern == false`) or pattern, left to right, segment by segment.
///
/// Empty name, then byte length; then for each segment in order: empty segment; a whole
/// `*` / `>` segment (patterns only; `>` must be last); else each character in order.
pub fn check_channel(name: &str, pattern: bool) -> Result<(), ChannelNameError> {
    if name.is_empty() {
        return Err(ChannelNameError::new("empty channel name", 0));
    }
    if name.len() > MAX_CHANNEL_BYTES {
        return Err(ChannelNameError::new(
            "channel name longer than 255 bytes",
            0,
        ));
    }
    let segment_count = name.split(SEPARATOR).count();
    let mut offset = 0usize;
    for (index, segment) in name.split(SEPARATOR).enumerate() {
        let seg_len = segment.chars().count();
        if segment.is_empty() {
            return Err(ChannelNameError::new("empty segment", offset));
        }
        if pattern && segment == "*" {
        } else if pattern && segment == ">" {
            if index + 1 != segment_count {
                return Err(ChannelNameError::new(
                    "'>' is only allowed as the last segment",
                    offset,
                ));
            }
        } else {
            for (i, c) in segment.chars().enumerate() {
                let at = offset + i;
                if c == '*' || c == '>' {
                    let reason = if pattern {
                        "wildcard must be a whole segment"
                    } else {
                        "wildcards are only allowed in patterns"
                    };
                    return Err(ChannelNameError::new(reason, at));
                }
                if is_ascii_control(c) || c.is_whitespace() {
                    return Err(ChannelNameError::new(
                        format!("invalid character U+{:04X}", c as u32),
                        at,
                    ));
                }
            }
        }
        offset += seg_len + 1;
    }
    Ok(())
}

/// U+0000..U+001F and U+007F, as docs/matcher.md says (not Rust's wider `is_control`).
fn is_ascii_control(c: char) -> bool {
    (c as u32) < 0x20 || c == '\u{7f}'
}

/// One level of the pattern trie.
#[derive(Default, Debug)]
pub(crate) struct TrieNode {
    children: AHashMap<Box<str>, TrieNode>,
    star: Option<Box<TrieNode>>,
    /// Patterns that end exactly here.
    exact: SubSet,
    /// Patterns `...:>` whose `>` stands at the next level.
    tail: SubSet,
}

impl TrieNode {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.star.is_none()
            && self.exact.is_empty()
            && self.tail.is_empty()
    }

    /// Files `member` under a valid pattern.
    pub(crate) fn insert(&mut self, pattern: &str, member: Member) {
        let mut node = self;
        for segment in pattern.split(SEPARATOR) {
            node = match segment {
                ">" => {
                    node.tail.insert(member);
                    return;
                }
                "*" => node.star.get_or_insert_with(Default::default),
                s => node.children.entry(s.into()).or_default(),
            };
        }
        node.exact.insert(member);
    }

    /// Removes `slot` filed under `pattern` and prunes nodes left empty.
    pub(crate) fn remove(&mut self, pattern: &str, slot: u32) {
        let segments: Vec<&str> = pattern.split(SEPARATOR).collect();
        self.remove_at(&segments, slot);
    }

    fn remove_at(&mut self, segments: &[&str], slot: u32) {
        let Some((first, rest)) = segments.split_first() else {
            self.exact.remove(slot);
            return;
        };
        match *first {
            ">" => {
                self.tail.remove(slot);
            }
            "*" => {
                if let Some(star) = self.star.as_mut() {
                    star.remove_at(rest, slot);
                    if star.is_empty() {
                        self.star = None;
                    }
                }
            }
            s => {
                if let Some(child) = self.children.get_mut(s) {
                    child.remove_at(rest, slot);
                    if child.is_empty() {
                        self.children.remove(s);
                    }
                }
            }
        }
    }

    /// Calls `found` with every member whose pattern matches the name split into `segments`.
    pub(crate) fn collect(&self, segments: &[&str], found: &mut impl FnMut(Member)) {
        let Some((first, rest)) = segments.split_first() else {
            self.exact.for_each(found);
            return;
        };
        self.tail.for_each(found);
        if let Some(child) = self.children.get(*first) {
            child.collect(rest, found);
        }
        if let Some(star) = &self.star {
            star.collect(rest, found);
        }
    }

    pub(crate) fn node_count(&self) -> usize {
        1 + self
            .children
            .values()
            .map(TrieNode::node_count)
            .sum::<usize>()
            + self.star.as_ref().map_or(0, |s| s.node_count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(name: &str, pattern: bool) -> (String, usize) {
        let e = check_channel(name, pattern).unwrap_err();
        (e.reason, e.position)
    }

    #[test]
    fn names_and_patterns() {
        for ok in ["a", "room:42", "org:acme:doc:7f3a", "é:ü"] {
            check_channel(ok, false).unwrap();
            check_channel(ok, true).unwrap();
        }
        for ok in ["*", ">", "room:*", "room:>", "*:chat", "*:*:>"] {
            check_channel(ok, true).unwrap();
        }
        assert_eq!(err("", false), ("empty channel name".into(), 0));
        assert_eq!(
            err(&"x".repeat(256), false).0,
            "channel name longer than 255 bytes"
        );
        assert_eq!(err("a::b", false), ("empty segment".into(), 2));
        assert_eq!(err(":a", false), ("empty segment".into(), 0));
        assert_eq!(err("a:", false), ("empty segment".into(), 2));
        assert_eq!(err("a b", false), ("invalid character U+0020".into(), 1));
        assert_eq!(
            err("a\u{7f}", false),
            ("invalid character U+007F".into(), 1)
        );
        assert_eq!(
            err("room:*", false),
            ("wildcards are only allowed in patterns".into(), 5)
        );
        assert_eq!(
            err("room*", true),
            ("wildcard must be a whole segment".into(), 4)
        );
        assert_eq!(
            err(">:a", true),
            ("'>' is only allowed as the last segment".into(), 0)
        );
    }

    fn matches(patterns: &[&str], name: &str) -> Vec<u32> {
        let mut root = TrieNode::default();
        for (slot, p) in patterns.iter().enumerate() {
            root.insert(
                p,
                Member {
                    slot: slot as u32,
                    flags: 0,
                    id: slot as u64,
                },
            );
        }
        let segments: Vec<&str> = name.split(SEPARATOR).collect();
        let mut out = Vec::new();
        root.collect(&segments, &mut |m| out.push(m.slot));
        out.sort();
        out
    }

    #[test]
    fn wildcards() {
        let p = [
            "room:1",
            "room:*",
            "room:>",
            "*:1",
            ">",
            "room",
            "room:1:chat",
            "*",
        ];
        assert_eq!(matches(&p, "room:1"), [0, 1, 2, 3, 4]);
        assert_eq!(matches(&p, "room"), [4, 5, 7]);
        assert_eq!(matches(&p, "room:1:chat"), [2, 4, 6]);
        assert_eq!(matches(&p, "lobby:1"), [3, 4]);
    }

    #[test]
    fn remove_prunes() {
        let mut root = TrieNode::default();
        root.insert(
            "a:b:c",
            Member {
                slot: 1,
                flags: 0,
                id: 1,
            },
        );
        root.insert(
            "a:*:>",
            Member {
                slot: 2,
                flags: 0,
                id: 2,
            },
        );
        assert!(root.node_count() > 1);
        root.remove("a:b:c", 1);
        root.remove("a:*:>", 2);
        assert!(root.is_empty());
    }
}
