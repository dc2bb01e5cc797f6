//! How a consumer gathers a batch. It takes what the prefetch window has
//! already delivered; with `BATCH_WAIT_MS`, and only while another of the
//! worker's batches is in the database, it waits for more. A batch's cost is
//! mostly per batch (BENCHMARKS.md, "Cost at fixed rates"), and a batch formed while another
//! is committing would queue behind it for the CPU and the WAL flush anyway;
//! when nothing else is in the database it goes at once, so a lone command
//! never waits.

use futures_util::stream::Peekable;
use futures_util::{FutureExt, Stream, StreamExt};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

/// How many of a worker's batches are between their load and the sending of
/// their publications, and a wake-up for when none is.
#[derive(Debug, Default)]
pub(super) struct InDatabase {
    batches: AtomicUsize,
    none: Notify,
}

/// One batch in the database, until dropped.
pub(super) struct Entered<'a>(&'a InDatabase);

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        if self.0.batches.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.none.notify_waiters();
        }
    }
}

impl InDatabase {
    pub fn enter(&self) -> Entered<'_> {
        self.batches.fetch_add(1, Ordering::AcqRel);
        Entered(self)
    }

    fn busy(&self) -> bool {
        self.batches.load(Ordering::Acquire) > 0
    }

    /// Resolves once no batch is in the database.
    async fn until_none(&self) {
        loop {
            let none = self.none.notified();
            tokio::pin!(none);
            // Registered before the check, so a drop in between is not missed.
            none.as_mut().enable();
            if !self.busy() {
                return;
            }
            none.await;
        }
    }
}

/// Adds to `batch` (which holds the first delivery) what has already arrived,
/// then, while another batch is in the database and for at most `wait`, what
/// arrives, up to `max`. An error or the stream's end is left in the stream
/// for the caller's next read.
pub(super) async fn gather<S, T, E>(
    consumer: &mut Peekable<S>,
    batch: &mut Vec<T>,
    max: usize,
    wait: Duration,
    in_db: &InDatabase,
) where
    S: Stream<Item = Result<T, E>> + Unpin,
{
    while batch.len() < max {
        match next_ready(consumer) {
            Some(d) => batch.push(d),
            None => break,
        }
    }
    if wait.is_zero() || batch.len() >= max || !in_db.busy() {
        return;
    }
    let until = tokio::time::Instant::now() + wait;
    let none = in_db.until_none();
    tokio::pin!(none);
    while batch.len() < max {
        let arrived = tokio::select! {
            biased;
            a = tokio::time::timeout_at(until, Pin::new(&mut *consumer).peek()) => a,
            _ = &mut none => return,
        };
        if !matches!(arrived, Ok(Some(Ok(_)))) {
            return;
        }
        match next_ready(consumer) {
            Some(d) => batch.push(d),
            None => return,
        }
    }
}

/// The next delivery if one is there now; an error or the end stays unread
/// only when peeked first, so this takes only a ready `Ok`.
fn next_ready<S, T, E>(consumer: &mut Peekable<S>) -> Option<T>
where
    S: Stream<Item = Result<T, E>> + Unpin,
{
    match Pin::new(&mut *consumer).peek().now_or_never() {
        Some(Some(Ok(_))) => match consumer.next().now_or_never() {
            Some(Some(Ok(d))) => Some(d),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;

    type Item = Result<u32, &'static str>;

    /// A stream that yields `first` at once, then each of `later` after its delay.
    fn deliveries(first: &[u32], later: Vec<(u64, Item)>) -> Pin<Box<dyn Stream<Item = Item>>> {
        let now = stream::iter(first.iter().map(|&d| Ok(d)).collect::<Vec<Item>>());
        let later = stream::iter(later).then(|(ms, item)| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            item
        });
        Box::pin(now.chain(later))
    }

    async fn gathered(
        s: Pin<Box<dyn Stream<Item = Item>>>,
        wait_ms: u64,
        in_db: &InDatabase,
    ) -> (Vec<u32>, Peekable<Pin<Box<dyn Stream<Item = Item>>>>) {
        let mut s = s.peekable();
        let first = s.next().await.unwrap().unwrap();
        let mut batch = vec![first];
        gather(
            &mut s,
            &mut batch,
            10,
            Duration::from_millis(wait_ms),
            in_db,
        )
        .await;
        (batch, s)
    }

    #[tokio::test(start_paused = true)]
    async fn takes_what_has_arrived_and_does_not_wait_when_nothing_is_in_the_database() {
        let in_db = InDatabase::default();
        let started = tokio::time::Instant::now();
        let (batch, _) = gathered(deliveries(&[1, 2, 3], vec![(5, Ok(4))]), 100, &in_db).await;
        assert_eq!(batch, [1, 2, 3]);
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "a lone batch never waits"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_more_while_another_batch_is_in_the_database() {
        let in_db = InDatabase::default();
        let _other = in_db.enter();
        let later = vec![(5, Ok(2)), (5, Ok(3)), (200, Ok(4))];
        let started = tokio::time::Instant::now();
        let (batch, _) = gathered(deliveries(&[1], later), 50, &in_db).await;
        assert_eq!(batch, [1, 2, 3], "what came within the wait");
        assert_eq!(started.elapsed(), Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn stops_waiting_when_the_other_batch_leaves_the_database() {
        let in_db = InDatabase::default();
        let other = in_db.enter();
        let leaving = async move {
            tokio::time::sleep(Duration::from_millis(8)).await;
            drop(other);
        };
        let later = vec![(5, Ok(2)), (100, Ok(3))];
        let started = tokio::time::Instant::now();
        let ((batch, _), ()) =
            tokio::join!(gathered(deliveries(&[1], later), 1_000, &in_db), leaving);
        assert_eq!(batch, [1, 2]);
        assert_eq!(started.elapsed(), Duration::from_millis(8));
    }

    #[tokio::test(start_paused = true)]
    async fn leaves_an_error_and_the_end_for_the_caller() {
        let in_db = InDatabase::default();
        let _other = in_db.enter();
        let (batch, mut rest) = gathered(
            deliveries(&[1, 2], vec![(5, Err("channel closed")), (5, Ok(9))]),
            50,
            &in_db,
        )
        .await;
        assert_eq!(batch, [1, 2]);
        assert_eq!(rest.next().await, Some(Err("channel closed")));
        let (batch, mut rest) = gathered(deliveries(&[1], vec![]), 50, &in_db).await;
        assert_eq!(batch, [1]);
        assert_eq!(rest.next().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn never_takes_more_than_the_batch_size() {
        let in_db = InDatabase::default();
        let _other = in_db.enter();
        let all: Vec<u32> = (1..=15).collect();
        let (batch, mut rest) = gathered(deliveries(&all, vec![]), 50, &in_db).await;
        assert_eq!(batch, (1..=10).collect::<Vec<_>>());
        assert_eq!(rest.next().await, Some(Ok(11)));
    }
}
