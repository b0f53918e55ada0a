//! A backend's answer body: polling it drives its connection, and every chunk already
//! received goes out in one frame.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::{ConnPool, conn::Conn};

/// At most this much already-received body is merged into one frame.
const MERGE_LIMIT: usize = 64 << 10;

/// A backend's answer body. Polling it drives its connection, which goes
/// back to the pool once the body has been read to its end; dropped earlier
/// (the client went away), the connection is closed, which tells the backend
/// to stop generating.
pub struct UpstreamBody {
    inner: Incoming,
    conn: Option<Conn>,
    pool: Arc<ConnPool>,
    /// What came after the data merged into the last frame: the end, an
    /// error or trailers, handed out by the next poll.
    stashed: Option<Option<Result<Frame<Bytes>, hyper::Error>>>,
}

impl UpstreamBody {
    pub(super) fn new(inner: Incoming, conn: Conn, pool: Arc<ConnPool>) -> Self {
        Self {
            inner,
            conn: Some(conn),
            pool,
            stashed: None,
        }
    }

    /// The next frame from the connection, which hands over one decoded
    /// chunk per turn: take what is there, else let it decode (or read) the
    /// next one and look again.
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut polled = Pin::new(&mut self.inner).poll_frame(cx);
        if polled.is_pending() {
            if let Some(conn) = &mut self.conn {
                conn.drive(cx);
            }
            polled = Pin::new(&mut self.inner).poll_frame(cx);
        }
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.conn = None,
            _ => {}
        }
        polled
    }

    fn release(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.put_idle(conn);
        }
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(stashed) = this.stashed.take() {
            return Poll::Ready(stashed);
        }
        let data = match ready!(this.poll_next(cx)) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
            },
            other => return Poll::Ready(other),
        };
        // Everything else that has already arrived goes out with it: one
        // frame, one chunk to encode and write, instead of one per token.
        let mut merged = BytesMut::new();
        while !this.inner.is_end_stream() && data.len() + merged.len() < MERGE_LIMIT {
            match this.poll_next(cx) {
                Poll::Pending => break,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(next) => {
                        if merged.is_empty() {
                            merged.reserve(MERGE_LIMIT.min(4 * (data.len() + next.len())));
                            merged.extend_from_slice(&data);
                        }
                        merged.extend_from_slice(&next);
                    }
                    Err(trailers) => {
                        this.stashed = Some(Some(Ok(trailers)));
                        break;
                    }
                },
                // The end or the error follows the data, on the next poll.
                Poll::Ready(other) => {
                    this.stashed = Some(other);
                    break;
                }
            }
        }
        let data = if merged.is_empty() {
            data
        } else {
            merged.freeze()
        };
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        match &self.stashed {
            Some(Some(_)) => false,
            _ => self.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}
