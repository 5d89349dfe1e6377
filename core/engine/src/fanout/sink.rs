//! What the fan-out writes to: a socket behind a trait, so that the state machine runs
//! against a fake in tests, and the descriptor the real one writes to.

use std::io::{self, IoSlice};

/// The most slices the fan-out hands a sink in one call: Linux's `IOV_MAX` (a `sendmsg` with
/// more fails with EMSGSIZE), so gathered frames past it take several calls.
pub const MAX_SLICES: usize = 1024;

/// A connection's socket as the fan-out sees it: a non-blocking stream it writes bytes to.
///
/// `write_vectored` writes the slices in order, without blocking, and says how many bytes
/// the stream took: all of them, a prefix (the rest is the fan-out's to keep), or none
/// (`Ok(0)` or an error). `WouldBlock` and any other error both mean "none now": the
/// connection's trio writer takes over the bytes and finds a broken socket itself.
/// `Interrupted` is retried. The fan-out never passes more than [`MAX_SLICES`] slices, nor
/// an empty list.
///
/// `Send`: `uncork` may write to several sinks on several threads at once (each sink on one
/// thread).
pub trait Sink: Send {
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
}

#[cfg(unix)]
pub use fd::FdSink;

#[cfg(unix)]
mod fd {
    use std::io::{self, IoSlice};
    use std::os::fd::{AsRawFd, RawFd};

    use super::{Sink, MAX_SLICES};

    /// A stream socket the fan-out writes to, by the transport's descriptor number.
    ///
    /// **The descriptor rule.** The fan-out borrows the number: it must stay open, naming
    /// this socket, until the sink is dropped (the hub detaches a connection, `FanOut.close`
    /// or `detach`, before its socket is closed). Were the socket closed first, the kernel
    /// could give the number to another connection and the fan-out would write one client's
    /// frames to another. Python keeps the rule: `Session.end` detaches, every built-in
    /// transport ends its session before the socket closes, and the node detaches whatever a
    /// transport left attached before it closes a connection (docs/architecture.md).
    ///
    /// Why not the fan-out's own duplicate of the descriptor, which would make the rule hold
    /// by construction: it costs a second descriptor per attached WebSocket, which halves the
    /// connections an open-files limit allows (10,000 subscribers need 20,200 descriptors on
    /// a machine whose hard limit is 20,000, and cannot be raised there).
    #[derive(Debug)]
    pub struct FdSink {
        fd: RawFd,
    }

    impl FdSink {
        /// A sink writing to the stream socket `fd`. Errors: the descriptor's (EBADF,
        /// ENOTSOCK), or InvalidInput when the socket is not a stream socket (a datagram
        /// socket would lose or split frames).
        ///
        /// # Safety
        ///
        /// `fd` must stay open, naming this socket, until the sink is dropped.
        pub unsafe fn borrow(fd: RawFd) -> io::Result<FdSink> {
            let mut kind: libc::c_int = 0;
            let mut size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt writes at most `size` bytes into `kind`, a c_int we own; a
            // number that is not open fails with EBADF.
            let got = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_TYPE,
                    (&mut kind as *mut libc::c_int).cast(),
                    &mut size,
                )
            };
            if got < 0 {
                return Err(io::Error::last_os_error());
            }
            if kind != libc::SOCK_STREAM {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not a stream socket",
                ));
            }
            Ok(FdSink { fd })
        }
    }

    impl AsRawFd for FdSink {
        fn as_raw_fd(&self) -> RawFd {
            self.fd
        }
    }

    impl Sink for FdSink {
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            debug_assert!(!bufs.is_empty() && bufs.len() <= MAX_SLICES);
            let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
            let n = if let [buf] = bufs {
                // One frame (the common case, a publication to a free connection): send().
                // SAFETY: `buf` is a live slice that send() only reads; `self.fd` is open
                // (`borrow`'s contract).
                unsafe { libc::send(self.fd, buf.as_ptr().cast(), buf.len(), flags) }
            } else {
                // SAFETY: a zeroed msghdr is valid; its iov points at `bufs`, whose IoSlices
                // have the layout of iovec on unix, and whose bytes sendmsg only reads;
                // `self.fd` is open (`borrow`'s contract).
                unsafe {
                    let mut msg: libc::msghdr = std::mem::zeroed();
                    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
                    msg.msg_iovlen = bufs.len() as _;
                    libc::sendmsg(self.fd, &msg, flags)
                }
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(n as usize)
        }
    }

    #[cfg(test)]
    mod tests {
        use std::io::{ErrorKind, IoSlice, Read};
        use std::os::fd::AsRawFd;
        use std::os::unix::net::{UnixDatagram, UnixStream};

        use super::*;

        fn write(sink: &mut FdSink, parts: &[&[u8]]) -> io::Result<usize> {
            let bufs: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
            sink.write_vectored(&bufs)
        }

        fn read_now(peer: &mut UnixStream) -> Vec<u8> {
            peer.set_nonblocking(true).unwrap();
            let mut got = Vec::new();
            let mut buf = [0; 65536];
            loop {
                match peer.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
            got
        }

        #[test]
        fn writes_one_or_several_slices_to_the_socket() {
            let (ours, mut peer) = UnixStream::pair().unwrap();
            // SAFETY: `ours` outlives the sink.
            let mut sink = unsafe { FdSink::borrow(ours.as_raw_fd()) }.unwrap();
            assert_eq!(sink.as_raw_fd(), ours.as_raw_fd());
            assert_eq!(write(&mut sink, &[b"one"]).unwrap(), 3);
            assert_eq!(write(&mut sink, &[b"two", b"", b"three"]).unwrap(), 8);
            assert_eq!(read_now(&mut peer), b"onetwothree");
        }

        #[test]
        fn a_full_socket_takes_part_then_would_block() {
            let (ours, _peer) = UnixStream::pair().unwrap();
            // SAFETY: `ours` outlives the sink.
            let mut sink = unsafe { FdSink::borrow(ours.as_raw_fd()) }.unwrap();
            let big = vec![7u8; 1 << 20];
            let mut took = 0;
            let error = loop {
                match write(&mut sink, &[&big[..1000], &big[1000..]]) {
                    Ok(n) => {
                        assert!(n > 0 && n <= big.len());
                        took += n;
                    }
                    Err(e) => break e,
                }
            };
            assert_eq!(error.kind(), ErrorKind::WouldBlock);
            assert!(took > 0);
        }

        #[test]
        fn a_closed_peer_is_an_error_not_a_signal() {
            let (ours, peer) = UnixStream::pair().unwrap();
            // SAFETY: `ours` outlives the sink.
            let mut sink = unsafe { FdSink::borrow(ours.as_raw_fd()) }.unwrap();
            drop(peer);
            // MSG_NOSIGNAL: EPIPE, no SIGPIPE (which would end the test process).
            assert_eq!(
                write(&mut sink, &[b"x"]).unwrap_err().kind(),
                ErrorKind::BrokenPipe
            );
        }

        #[test]
        fn only_stream_sockets_are_taken() {
            let (datagram, _) = UnixDatagram::pair().unwrap();
            // SAFETY: the descriptors outlive the calls (no sink is made).
            let e = unsafe { FdSink::borrow(datagram.as_raw_fd()) }.unwrap_err();
            assert_eq!(e.to_string(), "not a stream socket");
            let file =
                std::fs::File::open(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
            let e = unsafe { FdSink::borrow(file.as_raw_fd()) }.unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ENOTSOCK));
        }

        #[test]
        fn a_closed_number_is_refused() {
            let (ours, _peer) = UnixStream::pair().unwrap();
            let number = ours.as_raw_fd();
            drop(ours);
            // SAFETY: nothing is made from a closed number.
            let e = unsafe { FdSink::borrow(number) }.unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EBADF));
        }
    }
}
