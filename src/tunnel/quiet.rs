//! A future polled only when it woke its task.
//!
//! `tokio::select!` polls every branch each time its task wakes. A
//! stream's task wakes for every read and write it carries, and its
//! `CancellationToken::cancelled()` branches (the forward ended, the
//! operator lost access) take the token's lock at every such poll: on the
//! hub's port-forward path that was six lock round trips and ~4 % of the
//! hub's instructions per kept-alive request. [`Quiet`] wraps such a
//! branch: it is polled at its first poll and then only after its own
//! waker fired, and otherwise costs registering the task's waker and an
//! atomic swap (and, once, a box and an `Arc`). Like a fused future it
//! stays pending once it has returned its output.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// `inner`, polled only when it woke the task (see the module docs).
pub struct Quiet<F> {
    inner: Pin<Box<F>>,
    flag: Arc<Flag>,
    waker: Waker,
    done: bool,
}

struct Flag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> Quiet<F> {
    pub fn new(inner: F) -> Quiet<F> {
        let flag = Arc::new(Flag {
            // Polled at the first poll, which registers its wakers.
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Quiet {
            inner: Box::pin(inner),
            waker: Waker::from(flag.clone()),
            flag,
            done: false,
        }
    }
}

impl<F: Future> Future for Quiet<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        if this.done {
            return Poll::Pending;
        }
        // Registered before the flag is read: a wake after the read finds
        // this task's waker and polls again.
        this.flag.task.register(cx.waker());
        if !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let out = this
            .inner
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker));
        this.done = out.is_ready();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; ready once `open` is set (and its waker woken).
    struct Gate {
        polls: Arc<AtomicUsize>,
        open: Arc<AtomicBool>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
    }

    impl Future for Gate {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.open.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn it_is_polled_once_then_only_after_its_own_wake_and_ends_when_its_future_does() {
        let polls = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicBool::new(false));
        let waker = Arc::new(std::sync::Mutex::new(None::<Waker>));
        let mut q = Quiet::new(Gate {
            polls: polls.clone(),
            open: open.clone(),
            waker: waker.clone(),
        });
        let mut q = Pin::new(&mut q);
        let task = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&task);
        for _ in 0..5 {
            assert!(q.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(
            polls.load(Ordering::SeqCst),
            1,
            "polled at the first poll only"
        );
        // Its waker fires: the next poll polls it, once.
        waker.lock().unwrap().take().unwrap().wake();
        assert!(q.as_mut().poll(&mut cx).is_pending());
        assert!(q.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
        open.store(true, Ordering::SeqCst);
        waker.lock().unwrap().take().unwrap().wake();
        assert!(q.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 3);
    }

    /// Counts its wakes.
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_task_woken_is_the_one_that_polled_last() {
        let open = Arc::new(AtomicBool::new(false));
        let inner = Arc::new(std::sync::Mutex::new(None::<Waker>));
        let mut q = Quiet::new(Gate {
            polls: Arc::new(AtomicUsize::new(0)),
            open: open.clone(),
            waker: inner.clone(),
        });
        let mut q = Pin::new(&mut q);
        let (a, b) = (
            Arc::new(Count(AtomicUsize::new(0))),
            Arc::new(Count(AtomicUsize::new(0))),
        );
        let (wa, wb) = (Waker::from(a.clone()), Waker::from(b.clone()));
        assert!(q.as_mut().poll(&mut Context::from_waker(&wa)).is_pending());
        assert!(q.as_mut().poll(&mut Context::from_waker(&wb)).is_pending());
        open.store(true, Ordering::SeqCst);
        inner.lock().unwrap().take().unwrap().wake();
        assert_eq!(a.0.load(Ordering::SeqCst), 0, "not the task that moved on");
        assert_eq!(b.0.load(Ordering::SeqCst), 1, "the task that polled last");
        assert!(q.as_mut().poll(&mut Context::from_waker(&wb)).is_ready());
        // Fused: pending from then on, its future not polled again.
        assert!(q.as_mut().poll(&mut Context::from_waker(&wb)).is_pending());
    }

    #[tokio::test]
    async fn a_cancellation_from_another_task_ends_a_select_on_an_idle_task() {
        let token = tokio_util::sync::CancellationToken::new();
        let stop = Quiet::new(token.clone().cancelled_owned());
        let cancel = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            token.cancel();
        });
        // Nothing else wakes this task: only the token's own wake can
        // (the timeout's timer would too, at 10 s, hence the time check).
        let t0 = std::time::Instant::now();
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            tokio::select! {
                _ = stop => true,
                _ = std::future::pending::<()>() => false,
            }
        })
        .await;
        assert_eq!(ended, Ok(true));
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(5),
            "the cancellation woke the idle task at once, not the timeout ({:?})",
            t0.elapsed()
        );
        cancel.await.unwrap();
    }

    #[tokio::test]
    async fn a_cancellation_from_another_task_ends_a_select_on_a_busy_task() {
        let token = tokio_util::sync::CancellationToken::new();
        let stop = Quiet::new(token.clone().cancelled_owned());
        tokio::pin!(stop);
        let (mut a, mut b) = tokio::io::duplex(64);
        let cancel = tokio::spawn({
            let token = token.clone();
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                token.cancel();
            }
        });
        // A busy task: woken by its reads over and over, never by the
        // token until it is cancelled.
        let feeder = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while b.write_all(b"x").await.is_ok() {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        });
        let mut buf = [0u8; 8];
        let mut reads = 0;
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                tokio::select! {
                    _ = &mut stop => break,
                    r = tokio::io::AsyncReadExt::read(&mut a, &mut buf) => {
                        assert!(r.unwrap() > 0);
                        reads += 1;
                    }
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "the cancellation was seen");
        assert!(reads > 5, "the task was busy meanwhile ({reads} reads)");
        cancel.await.unwrap();
        feeder.abort();
    }
}
