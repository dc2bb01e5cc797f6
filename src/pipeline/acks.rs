//! Settling one channel's deliveries: which `basic.ack`s a batch sends, and the
//! deliveries held back meanwhile.
//!
//! A poison command is not rejected at once: a requeued delivery comes straight
//! back, so every worker that gets it would fail it again in a tight loop. Its
//! delivery is *held* on its channel for a jittered, growing pause
//! (`POISON_RETRY_MIN_MS` … `POISON_RETRY_MAX_MS`), then rejected with requeue,
//! which the queue counts towards its delivery limit. An `ack multiple`
//! settles every unsettled tag up to the one it names, so while a delivery is
//! held the batches acked after it must name their tags one by one above it:
//! acking the held delivery by accident would lose the command.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// Delivery tags of one channel held back before their reject.
#[derive(Clone, Default)]
pub(super) struct Held(Arc<Mutex<BTreeSet<u64>>>);

impl Held {
    pub fn hold(&self, tag: u64) {
        self.set().insert(tag);
    }

    /// Called once the delivery's reject has been sent on the channel, so an
    /// ack sent after it can no longer settle the tag first.
    pub fn release(&self, tag: u64) {
        self.set().remove(&tag);
    }

    pub fn lowest(&self) -> Option<u64> {
        self.set().first().copied()
    }

    fn set(&self) -> std::sync::MutexGuard<'_, BTreeSet<u64>> {
        // The set is never left half-changed, so a panic elsewhere poisons nothing real.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One `basic.ack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ack {
    pub tag: u64,
    pub multiple: bool,
}

/// The acks that settle `tags`, one batch's deliveries (every unsettled tag of
/// the channel below them is theirs or held), leaving out the `rejected` ones,
/// whose tags the broker no longer knows. Below the lowest held tag one
/// `multiple` ack on the highest tag covers the batch; above it each tag is
/// acked alone.
pub(super) fn to_send(tags: &[u64], rejected: &[u64], lowest_held: Option<u64>) -> Vec<Ack> {
    let mut ack: Vec<u64> = tags
        .iter()
        .copied()
        .filter(|t| !rejected.contains(t))
        .collect();
    ack.sort_unstable();
    let split = lowest_held.map_or(ack.len(), |h| ack.partition_point(|&t| t < h));
    let (below, above) = ack.split_at(split);
    let mut out = Vec::with_capacity(1 + above.len());
    if let Some(&last) = below.last() {
        // `multiple` also when rejected tags lie below: it skips settled tags.
        out.push(Ack {
            tag: last,
            multiple: tags.len() > 1,
        });
    }
    out.extend(above.iter().map(|&tag| Ack {
        tag,
        multiple: false,
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn multiple(tag: u64) -> Ack {
        Ack {
            tag,
            multiple: true,
        }
    }

    fn single(tag: u64) -> Ack {
        Ack {
            tag,
            multiple: false,
        }
    }

    #[test]
    fn a_batch_with_nothing_held_is_one_multiple_ack_on_its_highest_tag() {
        assert_eq!(to_send(&[3, 4, 5], &[], None), vec![multiple(5)]);
        assert_eq!(to_send(&[7], &[], None), vec![single(7)]);
    }

    #[test]
    fn rejected_tags_are_never_named() {
        assert_eq!(to_send(&[3, 4, 5], &[5], None), vec![multiple(4)]);
        assert_eq!(to_send(&[3, 4, 5], &[3, 4, 5], None), vec![]);
        assert_eq!(to_send(&[9], &[9], None), vec![]);
    }

    #[test]
    fn no_multiple_ack_reaches_a_held_tag() {
        // Held below the whole batch: every tag alone.
        assert_eq!(
            to_send(&[10, 11, 12], &[], Some(4)),
            vec![single(10), single(11), single(12)]
        );
        // Held inside the batch's range: multiple below it, alone above.
        assert_eq!(
            to_send(&[3, 4, 6, 7], &[6], Some(5)),
            vec![multiple(4), single(7)]
        );
        // Held above the batch: as if nothing were held.
        assert_eq!(to_send(&[3, 4], &[], Some(9)), vec![multiple(4)]);
    }

    #[test]
    fn every_ack_covers_only_the_batch_and_never_a_held_tag() {
        // Exhaustive over small cases: tags 1..=6 of which a subset is the
        // batch, a subset of that rejected, and one other tag held.
        for batch_bits in 1u32..64 {
            let tags: Vec<u64> = (1..=6)
                .filter(|t| batch_bits & (1 << (t - 1)) != 0)
                .collect();
            for rejected_bits in 0u32..64 {
                if rejected_bits & !batch_bits != 0 {
                    continue;
                }
                let rejected: Vec<u64> = (1..=6)
                    .filter(|t| rejected_bits & (1 << (t - 1)) != 0)
                    .collect();
                for held in (1..=7).filter(|t| !tags.contains(t)) {
                    let acks = to_send(&tags, &rejected, Some(held));
                    let mut settled: BTreeSet<u64> = rejected.iter().copied().collect();
                    for a in &acks {
                        assert!(!settled.contains(&a.tag), "{a:?} names a settled tag");
                        if a.multiple {
                            assert!(a.tag < held, "{a:?} covers held {held}");
                            settled.extend(tags.iter().filter(|&&t| t <= a.tag));
                        } else {
                            settled.insert(a.tag);
                        }
                    }
                    let want: BTreeSet<u64> = tags.iter().copied().collect();
                    assert_eq!(
                        settled, want,
                        "tags {tags:?} rejected {rejected:?} held {held}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_lowest_held_tag_follows_holds_and_releases() {
        let h = Held::default();
        assert_eq!(h.lowest(), None);
        h.hold(8);
        h.hold(5);
        assert_eq!(h.lowest(), Some(5));
        h.release(5);
        assert_eq!(h.lowest(), Some(8));
        h.release(8);
        assert_eq!(h.lowest(), None);
    }
}
