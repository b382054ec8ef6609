//! The batching policy as plain data: a FIFO of queued request parts, grouped by shape key.
//! No channels or clocks inside, so it is tested directly.

use std::collections::VecDeque;
use tokio::time::Instant;

use crate::tensor::{DataType, Tensor};

/// Dtype and non-batch dims of every input: only parts with equal keys share a batch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ShapeKey(Vec<(DataType, Vec<usize>)>);

impl ShapeKey {
    pub(crate) fn of(inputs: &[Tensor]) -> ShapeKey {
        ShapeKey(
            inputs
                .iter()
                .map(|t| (t.dtype, t.shape.get(1..).unwrap_or_default().to_vec()))
                .collect(),
        )
    }
}

/// What the state needs to know of a queued item.
pub(crate) trait Queued {
    fn rows(&self) -> usize;
    fn key(&self) -> &ShapeKey;
    fn enqueued(&self) -> Instant;
    fn deadline(&self) -> Instant;
    /// The client is gone; nobody waits for the answer.
    fn is_cancelled(&self) -> bool;
}

/// Items removed because they can no longer run.
pub(crate) struct Dead<T> {
    /// Deadline passed: the caller answers these with 504.
    pub expired: Vec<T>,
    /// Client gone: nothing to answer.
    pub cancelled: usize,
}

#[derive(Default)]
pub(crate) struct State<T> {
    queue: VecDeque<T>,
}

impl<T: Queued> State<T> {
    pub(crate) fn new() -> State<T> {
        State {
            queue: VecDeque::new(),
        }
    }

    pub(crate) fn push(&mut self, item: T) {
        self.queue.push_back(item);
    }

    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// When the oldest item arrived.
    pub(crate) fn oldest(&self) -> Option<Instant> {
        self.queue.front().map(Queued::enqueued)
    }

    /// The earliest deadline of any item.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.queue.iter().map(Queued::deadline).min()
    }

    /// Removes items whose client left or whose deadline is at or before `now`.
    pub(crate) fn remove_dead(&mut self, now: Instant) -> Dead<T> {
        let mut dead = Dead {
            expired: Vec::new(),
            cancelled: 0,
        };
        // The usual case, checked on every turn of the batcher: nothing to remove, no new queue.
        if !self
            .queue
            .iter()
            .any(|item| item.is_cancelled() || item.deadline() <= now)
        {
            return dead;
        }
        let mut keep = VecDeque::with_capacity(self.queue.len());
        for item in self.queue.drain(..) {
            if item.is_cancelled() {
                dead.cancelled += 1;
            } else if item.deadline() <= now {
                dead.expired.push(item);
            } else {
                keep.push_back(item);
            }
        }
        self.queue = keep;
        dead
    }

    /// Removes everything (when no device can run it).
    pub(crate) fn drain(&mut self) -> Vec<T> {
        self.queue.drain(..).collect()
    }

    /// Indices of the next batch of at most `max_rows` rows: the oldest item, then later items
    /// with its key in arrival order until one does not fit. Also whether one did not fit (so
    /// waiting cannot make this batch bigger).
    fn plan(&self, max_rows: usize, batchable: bool) -> (Vec<usize>, usize, bool) {
        let Some(head) = self.queue.front() else {
            return (Vec::new(), 0, false);
        };
        let mut picked = vec![0];
        let mut rows = head.rows();
        if !batchable {
            return (picked, rows, true);
        }
        for (i, item) in self.queue.iter().enumerate().skip(1) {
            if item.key() != head.key() {
                continue;
            }
            if rows + item.rows() > max_rows {
                return (picked, rows, true);
            }
            rows += item.rows();
            picked.push(i);
        }
        (picked, rows, false)
    }

    /// Whether a batch for a device taking `max_rows` is as full as it can get now.
    pub(crate) fn batch_full(&self, max_rows: usize, batchable: bool) -> bool {
        let (_, rows, blocked) = self.plan(max_rows, batchable);
        blocked || rows >= max_rows
    }

    /// Rows the next batch would have.
    pub(crate) fn next_batch_rows(&self, max_rows: usize, batchable: bool) -> usize {
        self.plan(max_rows, batchable).1
    }

    /// Takes the next batch (see [`State::batch_full`]); without batching, one item.
    pub(crate) fn take_batch(&mut self, max_rows: usize, batchable: bool) -> Vec<T> {
        let (picked, _, _) = self.plan(max_rows, batchable);
        let mut batch = Vec::with_capacity(picked.len());
        // Remove from the back so earlier indices stay valid, then restore arrival order.
        for &i in picked.iter().rev() {
            batch.push(self.queue.remove(i).expect("planned index exists"));
        }
        batch.reverse();
        batch
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    struct Item {
        id: usize,
        rows: usize,
        key: ShapeKey,
        at: Instant,
        deadline: Instant,
        cancelled: bool,
    }

    impl Queued for Item {
        fn rows(&self) -> usize {
            self.rows
        }
        fn key(&self) -> &ShapeKey {
            &self.key
        }
        fn enqueued(&self) -> Instant {
            self.at
        }
        fn deadline(&self) -> Instant {
            self.deadline
        }
        fn is_cancelled(&self) -> bool {
            self.cancelled
        }
    }

    fn key(cols: usize) -> ShapeKey {
        ShapeKey(vec![(DataType::F32, vec![cols])])
    }

    fn item(id: usize, rows: usize, cols: usize) -> Item {
        let at = Instant::now();
        Item {
            id,
            rows,
            key: key(cols),
            at,
            deadline: at + Duration::from_secs(10),
            cancelled: false,
        }
    }

    fn ids(batch: &[Item]) -> Vec<usize> {
        batch.iter().map(|i| i.id).collect()
    }

    #[test]
    fn merges_rows_up_to_the_device_max_in_arrival_order() {
        let mut s = State::new();
        for (id, rows) in [(0, 3), (1, 2), (2, 4), (3, 1)] {
            s.push(item(id, rows, 4));
        }
        assert_eq!(s.next_batch_rows(8, true), 5);
        assert!(
            s.batch_full(8, true),
            "item 2 does not fit, so waiting cannot help"
        );
        assert_eq!(ids(&s.take_batch(8, true)), vec![0, 1]);
        assert_eq!(ids(&s.take_batch(8, true)), vec![2, 3]);
        assert!(s.is_empty());
    }

    #[test]
    fn only_equal_shapes_share_a_batch() {
        let mut s = State::new();
        s.push(item(0, 1, 4));
        s.push(item(1, 1, 5));
        s.push(item(2, 1, 4));
        assert_eq!(ids(&s.take_batch(8, true)), vec![0, 2]);
        assert_eq!(ids(&s.take_batch(8, true)), vec![1]);
    }

    #[test]
    fn a_batch_that_is_not_full_can_wait() {
        let mut s = State::new();
        s.push(item(0, 2, 4));
        assert!(!s.batch_full(8, true));
        assert!(s.batch_full(2, true));
        assert!(
            s.batch_full(8, false),
            "an unbatched model never waits for company"
        );
        s.push(item(1, 2, 4));
        assert_eq!(ids(&s.take_batch(8, false)), vec![0]);
    }

    #[test]
    fn removes_cancelled_and_expired_items() {
        let mut s = State::new();
        let mut gone = item(0, 1, 4);
        gone.cancelled = true;
        let mut late = item(1, 1, 4);
        late.deadline = late.at;
        s.push(gone);
        s.push(late);
        s.push(item(2, 1, 4));
        let dead = s.remove_dead(Instant::now());
        assert_eq!(dead.cancelled, 1);
        assert_eq!(ids(&dead.expired), vec![1]);
        assert_eq!(s.len(), 1);
        assert_eq!(ids(&s.take_batch(8, true)), vec![2]);
    }
}
