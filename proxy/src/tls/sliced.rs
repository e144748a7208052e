//! Writes to a rustls stream in 2 KiB slices ([`Sliced`]). rustls still builds full-size
//! records, but copies each slice into the record with its own `memcpy`. A single 16 KiB
//! `memcpy` makes glibc (2.36 here) use `rep movsb`, which on AMD Zen CPUs runs ~30x slower when
//! the destination is 1-31 bytes past the source modulo 64, as a record's payload (5 bytes after
//! its header) often is: up to a fifth of the sending sidecar's CPU. Slices below glibc's
//! `rep movsb` threshold (2112 bytes here) are copied with vector moves. Used by the TCP copier
//! (`crate::tcp`) and under tunnel connections' HTTP/2 (`crate::tunnel`), which writes a DATA
//! frame as its 9-byte header and the payload.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The slice size (below glibc's `rep movsb` threshold).
pub const SLICE: usize = 2 * 1024;
/// Most slices per write (64 KiB of payload).
const MAX_SLICES: usize = 32;

/// `S` with its writes handed on in [`SLICE`]-sized vectored slices.
#[derive(Debug)]
pub struct Sliced<S>(pub S);

impl<S: AsyncRead + Unpin> AsyncRead for Sliced<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Sliced<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let mut k = 0;
        'fill: for b in bufs {
            for c in b.chunks(SLICE) {
                if k == MAX_SLICES {
                    break 'fill;
                }
                slices[k] = IoSlice::new(c);
                k += 1;
            }
        }
        if k == 0 {
            return Poll::Ready(Ok(0));
        }
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, &slices[..k])
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn bytes_pass_unchanged_in_any_write_shape() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = Sliced(a);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            got
        });
        // Plain writes and vectored writes of a header + payload, as HTTP/2 does.
        w.write_all(&data[..100_000]).await.unwrap();
        let (mut at, end) = (100_000, data.len());
        while at < end {
            let hdr = &data[at..(at + 9).min(end)];
            let body = &data[(at + 9).min(end)..(at + 9 + 70_000).min(end)];
            let want = hdr.len() + body.len();
            let mut done = 0;
            while done < want {
                let n = if done < hdr.len() {
                    w.write_vectored(&[IoSlice::new(&hdr[done..]), IoSlice::new(body)])
                        .await
                        .unwrap()
                } else {
                    w.write(&body[done - hdr.len()..]).await.unwrap()
                };
                assert!(n > 0);
                done += n;
            }
            at += want;
        }
        w.shutdown().await.unwrap();
        drop(w);
        assert!(reader.await.unwrap() == data);
    }
}
