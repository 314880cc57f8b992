//! Accepted connections, adjusted for how h2 writes small responses.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// A TCP connection that tells h2 it cannot do vectored writes, so that h2
/// coalesces responses.
///
/// With vectored writes available, h2 (0.4) does not copy a DATA payload of
/// 256 bytes or more into its write buffer but chains it, and it holds only
/// one chained payload at a time: every such response then costs a write
/// syscall of its own. keyward's ext_authz answers are a few hundred bytes
/// (identity headers and dynamic metadata), so under load it made a `writev`
/// per check, where an empty server's tiny answers share one. Without
/// vectored writes h2 copies payloads under 1 KiB into its buffer and writes
/// many responses at once. See BENCHMARKS.md for what this is worth.
///
/// Generic so that it can wrap a TLS stream too (`tls::TlsConn`):
/// tokio-rustls's stream claims vectored writes whatever the connection
/// under it says.
#[derive(Debug)]
pub struct Coalescing<T = TcpStream>(pub T);

impl<T: AsyncRead + Unpin> AsyncRead for Coalescing<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

// `is_write_vectored` keeps its default, `false`: that is the point.
impl<T: AsyncWrite + Unpin> AsyncWrite for Coalescing<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl Connected for Coalescing {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.connect_info()
    }
}
