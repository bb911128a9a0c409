//! CONNECT relay without user-space copies (Linux): `splice(2)` moves a tunnel's bytes from one
//! socket into a pipe and from the pipe into the other socket, so payload pages never cross into
//! the proxy's memory. On loopback this halves the proxy's CPU per relayed byte compared with a
//! read/write loop (`benches/egress.rs`, CONNECT scenario).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes a pipe may hold: one splice call moves up to this much. The kernel's default pipe
/// (16 pages) would need ~3 round trips per 170 KB payload; a larger pipe only pins pages while
/// data is in flight. Raising it can fail (`/proc/sys/fs/pipe-max-size`); the default then serves.
const PIPE_BYTES: usize = 256 << 10;

/// One direction's pipe: both ends non-blocking, closed on drop.
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    pub(crate) fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ / F_GETPIPE_SZ on a pipe we own; failure leaves the pipe as it was.
        let capacity = unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_BYTES as libc::c_int,
            );
            libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ)
        };
        let capacity = usize::try_from(capacity).unwrap_or(0).max(4096);
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain descriptors and null offsets (sockets and pipes have no file position).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Moves bytes from `from` to `to` until `from` reaches end of stream, then half-closes `to`.
/// `moved` is called with the size of every chunk that reached `to`. Returns the bytes moved.
///
/// The pipe is always emptied before the next read, so an `EAGAIN` from a read means the source
/// socket has nothing, and one from a write means the destination socket is full: tokio's
/// readiness tracking then waits on the right socket.
pub(crate) async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    moved: impl Fn(u64),
) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let n = from
            .async_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe.write.as_raw_fd(), pipe.capacity)
            })
            .await?;
        if n == 0 {
            break;
        }
        let mut left = n;
        while left > 0 {
            let m = to
                .async_io(Interest::WRITABLE, || {
                    splice(pipe.read.as_raw_fd(), to.as_raw_fd(), left)
                })
                .await?;
            if m == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            left -= m;
            moved(m as u64);
        }
        total += n as u64;
    }
    // The peer sees end of stream in this direction; the other direction goes on.
    // SAFETY: shutdown on a socket descriptor `to` keeps open.
    unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) };
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn relays_both_ways_byte_identical_and_propagates_half_close() {
        // client <-> (proxy_client | proxy_upstream) <-> server
        let (mut client, proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        let up = Pipe::new().unwrap();
        let down = Pipe::new().unwrap();
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let reply = b"reply after half-close".to_vec();

        let relay = async {
            tokio::try_join!(
                one_way(&proxy_client, &proxy_upstream, &up, |_| ()),
                one_way(&proxy_upstream, &proxy_client, &down, |_| ()),
            )
        };
        let client_side = async {
            client.write_all(&payload).await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        };
        let server_side = async {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            server.write_all(&reply).await.unwrap();
            server.shutdown().await.unwrap();
            got
        };
        let (relayed, to_client, to_server) = tokio::join!(relay, client_side, server_side);
        let (n_up, n_down) = relayed.unwrap();
        assert_eq!(
            to_server, payload,
            "upstream got the client's bytes unchanged"
        );
        assert_eq!(to_client, reply);
        assert_eq!(n_up, payload.len() as u64);
        assert_eq!(n_down, reply.len() as u64);
    }
}
