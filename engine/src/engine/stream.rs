//! The client's end of one request: [`GenerationStream`], its events in order; dropping it
//! cancels the request.

use std::pin::Pin;
use std::sync::mpsc;
use std::task::{Context, Poll};

use tokio::sync::mpsc as tokio_mpsc;

use super::Command;
use crate::request::GenerationEvent;

/// The events of one request. `next().await` yields them in order and `None` after the last
/// (`Usage` or `Error`). Also a `futures::Stream`. Dropping it early cancels the request.
#[derive(Debug)]
pub struct GenerationStream {
    rx: tokio_mpsc::UnboundedReceiver<GenerationEvent>,
    key: u64,
    cancel: mpsc::Sender<Command>,
    done: bool,
}

impl GenerationStream {
    pub(super) fn new(
        rx: tokio_mpsc::UnboundedReceiver<GenerationEvent>,
        key: u64,
        cancel: mpsc::Sender<Command>,
    ) -> Self {
        GenerationStream { rx, key, cancel, done: false }
    }

    /// The next event; `None` once the request is over.
    pub async fn next(&mut self) -> Option<GenerationEvent> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<GenerationEvent>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(ev)) => {
                if matches!(ev, GenerationEvent::Usage(_) | GenerationEvent::Error(_)) {
                    self.done = true;
                }
                Poll::Ready(Some(ev))
            }
            Poll::Ready(None) => {
                // The engine went away without closing the request (it stopped or died).
                self.done = true;
                Poll::Ready(Some(GenerationEvent::Error("the engine stopped before the request finished".into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl futures::Stream for GenerationStream {
    type Item = GenerationEvent;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<GenerationEvent>> {
        self.get_mut().poll_event(cx)
    }
}

impl Drop for GenerationStream {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.cancel.send(Command::Cancel(self.key));
        }
    }
}
