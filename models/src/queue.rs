//! The queue in front of the runner's threads: one lane per source, served in turn, under one
//! bound.
//!
//! Work waits here for inference threads, at the agent (a lane per sensor) and at a replica
//! (a lane per connection, that is per agent). Each source has a FIFO lane of its own and the
//! threads take from the lanes in turn, up to [`QUANTUM`] items per lane per turn, so an item
//! of a quiet source waits behind at most a few items of each other busy source, not behind a
//! flooding source's whole backlog. The bound is on all lanes together, so one busy source may
//! still use the whole queue to ride out a burst. When it is full, the source holding the most
//! gives way, in one of two ways:
//!
//! - [`Lanes::push`] (the agent, where a window given up is lost): the longest lane gives up
//!   its oldest item to make room for the one arriving (longest-queue drop), so the sensor
//!   sending more than its share loses windows, its stalest first.
//! - [`Lanes::admit`] (a replica, where a request turned away runs on its agent instead): the
//!   arriving item is refused if no lane holds more than its own; otherwise the longest lane
//!   gives up its newest item, which has waited least and has the most time left to be run
//!   elsewhere.
//!
//! Either way a source holding less than the others is never turned away.
//!
//! [`Lanes`] is that logic as plain data, driven directly by the tests; [`FairQueue`] puts
//! it behind a mutex and a condition variable for the worker threads and closes, like a
//! channel, once every [`QueueSender`] is gone. Nothing here reads a clock.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// A lane that held more than this many items gives its memory back when it empties, so a
/// burst on one source does not keep a queue's worth of memory per source that ever had one.
const LANE_KEEP: usize = 64;

/// Most items a lane gives in one turn. One a turn interleaves every busy sensor's results,
/// which cost a pinned agent fed 8-window payloads from 20 sensors a tenth of its throughput
/// (`bench-edge --pin --workers 1 --batch 8 --cbor`); 8 a turn keeps a payload's windows
/// together and measured the same as a single FIFO queue.
pub const QUANTUM: usize = 8;

/// Rounds a worker waits for an item before it sleeps: six of doubling spins, then yields.
const SPIN_STEPS: u32 = 10;

/// Per-lane FIFO queues served round robin, with a bound on all of them together.
#[derive(Debug)]
pub struct Lanes<T> {
    lanes: Vec<VecDeque<T>>,
    /// The lanes holding items, in the order they are served next.
    turn: VecDeque<usize>,
    /// Items taken from the front lane in its current turn.
    served: usize,
    len: usize,
    capacity: usize,
}

impl<T> Lanes<T> {
    /// Empty lanes holding at most `capacity` items together (at least one).
    pub fn new(capacity: usize) -> Self {
        Lanes {
            lanes: Vec::new(),
            turn: VecDeque::new(),
            served: 0,
            len: 0,
            capacity: capacity.max(1),
        }
    }

    /// Items held in all lanes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no lane holds an item.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Items held in `lane`.
    pub fn lane_len(&self, lane: usize) -> usize {
        self.lanes.get(lane).map_or(0, VecDeque::len)
    }

    /// Queues `item` at the back of `lane`. When the lanes are full, the longest lane — the
    /// arriving item's own when none is longer — gives up its oldest item to make room, and
    /// that item is returned. Finding it reads the length of every lane holding items, at most
    /// `capacity` of them, and only when the lanes are full.
    pub fn push(&mut self, lane: usize, item: T) -> Option<T> {
        let displaced = if self.len >= self.capacity {
            self.drop_oldest_of_longest(lane)
        } else {
            None
        };
        self.enqueue(lane, item);
        displaced
    }

    /// Queues `item` at the back of `lane` if there is room; gives it back otherwise.
    pub fn try_push(&mut self, lane: usize, item: T) -> Result<(), T> {
        if self.len >= self.capacity {
            return Err(item);
        }
        self.enqueue(lane, item);
        Ok(())
    }

    /// Queues `item` at the back of `lane` unless the lanes are full and none holds more than
    /// `lane`, in which case the item is given back. When full and another lane is longer,
    /// the longest gives up its newest item to make room, and that item is returned.
    pub fn admit(&mut self, lane: usize, item: T) -> Result<Option<T>, T> {
        if self.len < self.capacity {
            self.enqueue(lane, item);
            return Ok(None);
        }
        let Some(longest) = self.longest_other_than(lane) else {
            return Err(item);
        };
        let displaced = self.take_from(longest, VecDeque::pop_back);
        self.enqueue(lane, item);
        Ok(displaced)
    }

    /// The next item: the oldest of the lane whose turn it is.
    pub fn pop(&mut self) -> Option<T> {
        let lane = *self.turn.front()?;
        let queue = &mut self.lanes[lane];
        let item = queue.pop_front()?;
        self.served += 1;
        if queue.is_empty() {
            if queue.capacity() > LANE_KEEP {
                queue.shrink_to(0);
            }
            self.turn.pop_front();
            self.served = 0;
        } else if self.served >= QUANTUM {
            self.turn.rotate_left(1);
            self.served = 0;
        }
        self.len -= 1;
        Some(item)
    }

    fn enqueue(&mut self, lane: usize, item: T) {
        if lane >= self.lanes.len() {
            self.lanes.resize_with(lane + 1, VecDeque::new);
        }
        let queue = &mut self.lanes[lane];
        if queue.is_empty() {
            self.turn.push_back(lane);
        }
        queue.push_back(item);
        self.len += 1;
    }

    fn drop_oldest_of_longest(&mut self, arriving: usize) -> Option<T> {
        let longest = self.longest_other_than(arriving).unwrap_or(arriving);
        self.take_from(longest, VecDeque::pop_front)
    }

    /// The longest lane if it holds more than `lane`. Reads the length of every lane holding
    /// items, at most `capacity` of them.
    fn longest_other_than(&self, lane: usize) -> Option<usize> {
        let own = self.lane_len(lane);
        self.turn
            .iter()
            .copied()
            .max_by_key(|&l| self.lanes[l].len())
            .filter(|&l| self.lanes[l].len() > own)
    }

    /// Takes an item out of `lane` with `end` (its front or its back), keeping the turn.
    fn take_from(&mut self, lane: usize, end: fn(&mut VecDeque<T>) -> Option<T>) -> Option<T> {
        let queue = self.lanes.get_mut(lane)?;
        let item = end(queue)?;
        if queue.is_empty() {
            if self.turn.front() == Some(&lane) {
                self.served = 0;
            }
            self.turn.retain(|&l| l != lane);
        }
        self.len -= 1;
        Some(item)
    }
}

/// What a worker's [`FairQueue::take`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// At least one item was taken.
    Some,
    /// Nothing was queued (only when not waiting).
    Empty,
    /// Nothing was queued and every sender is gone: the workers may stop.
    Closed,
}

#[derive(Debug)]
struct State<T> {
    lanes: Lanes<T>,
    senders: usize,
    /// Workers waiting for an item.
    waiting: usize,
}

/// [`Lanes`] shared between the threads that queue work and the workers that take it.
#[derive(Debug)]
pub struct FairQueue<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    /// A copy of the length, readable without the lock (the router reads it per window).
    len: AtomicUsize,
}

impl<T> FairQueue<T> {
    /// A queue of `capacity` items and its first sender.
    pub fn new(capacity: usize) -> (Arc<FairQueue<T>>, QueueSender<T>) {
        let queue = Arc::new(FairQueue {
            state: Mutex::new(State {
                lanes: Lanes::new(capacity),
                senders: 1,
                waiting: 0,
            }),
            ready: Condvar::new(),
            len: AtomicUsize::new(0),
        });
        let sender = QueueSender(Arc::clone(&queue));
        (queue, sender)
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether no item is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while the lock was held leaves the lanes consistent: every method of
        // `Lanes` finishes its changes before it can panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits a few microseconds for an item without the lock, as a worker that has just run
    /// dry would otherwise go to sleep and be woken (two system calls) for a window arriving
    /// a moment later, over and over under a steady load.
    fn spin_until_queued(&self) {
        for step in 0..SPIN_STEPS {
            if !self.is_empty() {
                return;
            }
            if step < 6 {
                for _ in 0..1u32 << step {
                    std::hint::spin_loop();
                }
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Takes the next item and, after it, up to `most(&first) − 1` more, in turn across the
    /// lanes, into `out`. With `wait`, blocks until there is an item or every sender is gone.
    pub fn take(&self, out: &mut Vec<T>, most: impl FnOnce(&T) -> usize, wait: bool) -> Taken {
        let mut spun = false;
        let mut state = self.lock();
        let first = loop {
            if let Some(item) = state.lanes.pop() {
                break item;
            }
            if state.senders == 0 {
                return Taken::Closed;
            }
            if !wait {
                return Taken::Empty;
            }
            if !spun {
                spun = true;
                drop(state);
                self.spin_until_queued();
                state = self.lock();
                continue;
            }
            state.waiting += 1;
            state = self
                .ready
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.waiting -= 1;
        };
        let most = most(&first).max(1);
        out.push(first);
        for _ in 1..most {
            match state.lanes.pop() {
                Some(item) => out.push(item),
                None => break,
            }
        }
        self.len.store(state.lanes.len(), Ordering::Relaxed);
        Taken::Some
    }
}

/// A way to queue items; the queue closes when the last one is dropped.
#[derive(Debug)]
pub struct QueueSender<T>(Arc<FairQueue<T>>);

impl<T> QueueSender<T> {
    /// Queues `item` on `lane`; when the queue is full, returns the item given up to make
    /// room (see [`Lanes::push`]).
    pub fn push(&self, lane: usize, item: T) -> Option<T> {
        let mut state = self.0.lock();
        let displaced = state.lanes.push(lane, item);
        self.queued(state);
        displaced
    }

    /// Queues `item` on `lane` if there is room; gives it back otherwise.
    pub fn try_push(&self, lane: usize, item: T) -> Result<(), T> {
        let mut state = self.0.lock();
        state.lanes.try_push(lane, item)?;
        self.queued(state);
        Ok(())
    }

    /// Queues `item` on `lane` unless the queue is full and no lane is longer than its own
    /// (the item is then given back); returns the item given up to make room, if any (see
    /// [`Lanes::admit`]).
    pub fn admit(&self, lane: usize, item: T) -> Result<Option<T>, T> {
        let mut state = self.0.lock();
        let displaced = state.lanes.admit(lane, item)?;
        self.queued(state);
        Ok(displaced)
    }

    fn queued(&self, state: MutexGuard<'_, State<T>>) {
        self.0.len.store(state.lanes.len(), Ordering::Relaxed);
        let wake = state.waiting > 0;
        drop(state);
        if wake {
            self.0.ready.notify_one();
        }
    }
}

impl<T> Clone for QueueSender<T> {
    fn clone(&self) -> Self {
        self.0.lock().senders += 1;
        QueueSender(Arc::clone(&self.0))
    }
}

impl<T> Drop for QueueSender<T> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.senders -= 1;
        if state.senders == 0 {
            drop(state);
            self.0.ready.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn drain<T>(lanes: &mut Lanes<T>) -> Vec<T> {
        std::iter::from_fn(|| lanes.pop()).collect()
    }

    #[test]
    fn lanes_are_served_in_turn_each_in_its_own_order() {
        let mut lanes = Lanes::new(100);
        for i in 0..QUANTUM + 2 {
            assert!(lanes.push(0, (0, i)).is_none());
        }
        assert!(lanes.push(1, (1, 0)).is_none());
        assert!(lanes.push(2, (2, 0)).is_none());
        assert!(lanes.push(2, (2, 1)).is_none());
        let mut want: Vec<_> = (0..QUANTUM).map(|i| (0, i)).collect();
        want.extend([(1, 0), (2, 0), (2, 1), (0, QUANTUM), (0, QUANTUM + 1)]);
        assert_eq!(drain(&mut lanes), want);
        assert!(lanes.is_empty());
    }

    #[test]
    fn a_full_queue_sheds_the_oldest_of_the_longest_lane() {
        let mut lanes = Lanes::new(4);
        for i in 0..3 {
            lanes.push(7, ("flood", i));
        }
        lanes.push(1, ("quiet", 0));
        // Full: a quiet sensor's window pushes out the flooding sensor's oldest.
        assert_eq!(lanes.push(1, ("quiet", 1)), Some(("flood", 0)));
        // Two each: the arriving lane is as long as any, so it gives up its own oldest.
        assert_eq!(lanes.push(1, ("quiet", 2)), Some(("quiet", 0)));
        assert_eq!(lanes.push(7, ("flood", 3)), Some(("flood", 1)));
        assert_eq!(lanes.len(), 4);
        assert_eq!(lanes.lane_len(7), 2);
        assert_eq!(
            drain(&mut lanes),
            [("flood", 2), ("flood", 3), ("quiet", 1), ("quiet", 2)]
        );
        for i in 0..4 {
            lanes.push(7, ("flood", i));
        }
        // `try_push` never sheds.
        assert_eq!(lanes.try_push(3, ("late", 0)), Err(("late", 0)));
        assert_eq!(lanes.len(), 4);
    }

    #[test]
    fn a_full_queue_admits_a_shorter_lane_in_place_of_the_newest_of_the_longest() {
        let mut lanes = Lanes::new(4);
        for i in 0..3 {
            assert_eq!(lanes.admit(7, ("flood", i)), Ok(None));
        }
        assert_eq!(lanes.admit(1, ("quiet", 0)), Ok(None));
        // Full, and the flooding lane is the longest: it gives up its newest.
        assert_eq!(lanes.admit(1, ("quiet", 1)), Ok(Some(("flood", 2))));
        // Two each: nobody holds more than the arriving lane, so it is refused.
        assert_eq!(lanes.admit(7, ("flood", 3)), Err(("flood", 3)));
        assert_eq!(lanes.admit(1, ("quiet", 2)), Err(("quiet", 2)));
        // A new lane holds less than either; of two as long, the one served later gives way.
        assert_eq!(lanes.admit(4, ("new", 0)), Ok(Some(("quiet", 1))));
        assert_eq!(lanes.len(), 4);
        assert_eq!(
            drain(&mut lanes),
            [("flood", 0), ("flood", 1), ("quiet", 0), ("new", 0)]
        );
    }

    #[test]
    fn a_lane_emptied_by_shedding_leaves_the_turn() {
        let mut lanes = Lanes::new(1);
        lanes.push(5, 'a');
        assert_eq!(lanes.push(2, 'b'), Some('a'));
        assert_eq!(drain(&mut lanes), ['b']);
        assert!(lanes.turn.is_empty());
    }

    #[test]
    fn the_queue_closes_when_the_last_sender_goes_and_what_waits_is_taken_first() {
        let (queue, sender) = FairQueue::new(8);
        let other = sender.clone();
        sender.push(0, 1);
        drop(sender);
        other.push(1, 2);
        let worker = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || {
                let mut got = Vec::new();
                while queue.take(&mut got, |_| 1, true) == Taken::Some {}
                got
            })
        };
        other.push(1, 3);
        drop(other);
        assert_eq!(worker.join().ok(), Some(vec![1, 2, 3]));
        assert_eq!(queue.len(), 0);
    }

    #[test]
    fn a_take_gathers_up_to_what_the_first_item_allows() {
        let (queue, sender) = FairQueue::new(16);
        for i in 0..10 {
            sender.push(i % 2, i);
        }
        let mut got = Vec::new();
        assert_eq!(queue.take(&mut got, |&first| first + 4, false), Taken::Some);
        assert_eq!(got, [0, 2, 4, 6]);
        assert_eq!(queue.len(), 6);
        got.clear();
        assert_eq!(queue.take(&mut got, |_| 100, false), Taken::Some);
        assert_eq!(got, [8, 1, 3, 5, 7, 9]);
        assert_eq!(queue.take(&mut got, |_| 1, false), Taken::Empty);
    }

    /// A model of the lanes: the items of each lane, oldest first.
    type Model = Vec<VecDeque<usize>>;

    /// Drives `lanes` and a model of them through `ops`, each an arrival on a lane or a pop.
    /// `arrive` queues item `next` on `lane` and brings the model along; every pop must come
    /// out in its lane's order, the lanes must hold what the model holds within the bound
    /// after every step, and what is left must come out exactly once at the end.
    fn replay(
        capacity: usize,
        ops: Vec<(usize, bool)>,
        mut arrive: impl FnMut(
            &mut Lanes<(usize, usize)>,
            &mut Model,
            usize,
            usize,
        ) -> Result<(), TestCaseError>,
    ) -> Result<(), TestCaseError> {
        let mut lanes: Lanes<(usize, usize)> = Lanes::new(capacity);
        let mut model: Model = vec![VecDeque::new(); 4];
        for (next, (lane, pop)) in ops.into_iter().enumerate() {
            if pop {
                if let Some((l, i)) = lanes.pop() {
                    prop_assert_eq!(model[l].pop_front(), Some(i));
                }
            } else {
                arrive(&mut lanes, &mut model, lane, next)?;
            }
            prop_assert!(lanes.len() <= capacity);
            prop_assert_eq!(lanes.len(), model.iter().map(VecDeque::len).sum::<usize>());
        }
        while let Some((l, i)) = lanes.pop() {
            prop_assert_eq!(model[l].pop_front(), Some(i));
        }
        prop_assert!(model.iter().all(VecDeque::is_empty));
        Ok(())
    }

    fn longest(model: &Model) -> usize {
        model.iter().map(VecDeque::len).max().unwrap_or(0)
    }

    proptest! {
        /// Whatever the arrivals, the bound holds, each lane comes out in its own order, a
        /// shed item is the oldest of a longest lane (of another lane only if it is longer
        /// than the arriving one's), and every item comes out exactly once, taken or shed.
        #[test]
        fn lanes_keep_their_bound_their_order_and_every_item(
            capacity in 1usize..12,
            ops in proptest::collection::vec((0usize..4, any::<bool>()), 0..200),
        ) {
            replay(capacity, ops, |lanes, model, lane, next| {
                let full = lanes.len() == capacity;
                let (longest, own) = (longest(model), model[lane].len());
                match lanes.push(lane, (lane, next)) {
                    Some((l, i)) => {
                        prop_assert!(full);
                        prop_assert_eq!(model[l].len(), longest);
                        prop_assert!(l == lane || longest > own);
                        prop_assert_eq!(model[l].pop_front(), Some(i));
                    }
                    None => prop_assert!(!full),
                }
                model[lane].push_back(next);
                Ok(())
            })?;
        }

        /// Admission: the bound holds, lanes keep their order, an item is refused only when
        /// the lanes are full and none holds more than its own, a displaced item is the newest
        /// of a lane longer than the arriving one's, and every item comes out exactly once.
        #[test]
        fn admission_refuses_only_the_longest_and_displaces_only_the_newest(
            capacity in 1usize..12,
            ops in proptest::collection::vec((0usize..4, any::<bool>()), 0..200),
        ) {
            replay(capacity, ops, |lanes, model, lane, next| {
                let full = lanes.len() == capacity;
                let (longest, own) = (longest(model), model[lane].len());
                match lanes.admit(lane, (lane, next)) {
                    Err(refused) => {
                        prop_assert!(full && longest == own);
                        prop_assert_eq!(refused, (lane, next));
                        return Ok(());
                    }
                    Ok(Some((l, i))) => {
                        prop_assert!(full && longest > own);
                        prop_assert_eq!(model[l].len(), longest);
                        prop_assert_eq!(model[l].pop_back(), Some(i));
                    }
                    Ok(None) => prop_assert!(!full),
                }
                model[lane].push_back(next);
                Ok(())
            })?;
        }
    }
}
