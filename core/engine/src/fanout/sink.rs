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
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

    use super::{Sink, MAX_SLICES};

    /// A stream socket the fan-out owns a descriptor of: its own duplicate, taken when the
    /// socket is attached and closed when it is detached (the fan-out drops the sink).
    ///
    /// **The descriptor rule.** The fan-out writes only to descriptors it owns. A transport
    /// hands the fan-out its socket's number; `duplicate` makes the fan-out's own
    /// descriptor for the same socket at that moment. From then on the transport may close
    /// its socket whenever it likes: the number it closed may be reused by the kernel for
    /// another connection, a file, anything, and the fan-out still writes to the socket it
    /// was given, never to the new owner of the number. The cost: the socket stays open
    /// (the peer sees no close) until both are closed, the transport's descriptor and the
    /// fan-out's, so the hub detaches a connection when its transport ends it, before the
    /// transport closes the socket; and an attached socket takes two descriptors.
    #[derive(Debug)]
    pub struct FdSink {
        fd: OwnedFd,
    }

    impl FdSink {
        /// The fan-out's own descriptor of the stream socket `fd` (close-on-exec). Errors:
        /// the descriptor's (EBADF, ENOTSOCK), or InvalidInput when the socket is not a
        /// stream socket (a datagram socket would lose or split frames).
        pub fn duplicate(fd: BorrowedFd<'_>) -> io::Result<FdSink> {
            let fd = fd.try_clone_to_owned()?;
            let mut kind: libc::c_int = 0;
            let mut size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt writes at most `size` bytes into `kind`, a c_int we own;
            // `fd` is open (owned).
            let got = unsafe {
                libc::getsockopt(
                    fd.as_raw_fd(),
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

    impl AsFd for FdSink {
        fn as_fd(&self) -> BorrowedFd<'_> {
            self.fd.as_fd()
        }
    }

    impl Sink for FdSink {
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            debug_assert!(!bufs.is_empty() && bufs.len() <= MAX_SLICES);
            let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
            let n = if let [buf] = bufs {
                // One frame (the common case, a publication to a free connection): send().
                // SAFETY: `buf` is a live slice that send() only reads; `self.fd` is open:
                // the sink owns it.
                unsafe { libc::send(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), flags) }
            } else {
                // SAFETY: a zeroed msghdr is valid; its iov points at `bufs`, whose IoSlices
                // have the layout of iovec on unix, and whose bytes sendmsg only reads;
                // `self.fd` is open: the sink owns it.
                unsafe {
                    let mut msg: libc::msghdr = std::mem::zeroed();
                    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
                    msg.msg_iovlen = bufs.len() as _;
                    libc::sendmsg(self.fd.as_raw_fd(), &msg, flags)
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
        use std::io::{ErrorKind, IoSlice, Read, Write};
        use std::os::fd::{AsFd, AsRawFd};
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
            let mut sink = FdSink::duplicate(ours.as_fd()).unwrap();
            assert_ne!(sink.as_fd().as_raw_fd(), ours.as_raw_fd());
            assert_eq!(write(&mut sink, &[b"one"]).unwrap(), 3);
            assert_eq!(write(&mut sink, &[b"two", b"", b"three"]).unwrap(), 8);
            assert_eq!(read_now(&mut peer), b"onetwothree");
        }

        #[test]
        fn a_full_socket_takes_part_then_would_block() {
            let (ours, _peer) = UnixStream::pair().unwrap();
            let mut sink = FdSink::duplicate(ours.as_fd()).unwrap();
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
            let mut sink = FdSink::duplicate(ours.as_fd()).unwrap();
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
            let e = FdSink::duplicate(datagram.as_fd()).unwrap_err();
            assert_eq!(e.to_string(), "not a stream socket");
            let file =
                std::fs::File::open(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
            let e = FdSink::duplicate(file.as_fd()).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ENOTSOCK));
        }

        /// The descriptor rule: once the transport closed its descriptor, the number may be
        /// reused; the sink still writes to the socket it was given, which stays open (its
        /// peer sees no end of stream) until the sink is dropped.
        #[test]
        fn the_sink_writes_to_its_own_socket_whatever_the_number_now_names() {
            let (ours, mut peer) = UnixStream::pair().unwrap();
            let number = ours.as_raw_fd();
            let mut sink = FdSink::duplicate(ours.as_fd()).unwrap();
            drop(ours); // the transport closes its socket without detaching
            let (mut reuser, mut reuser_peer) = (None, None);
            let mut made = Vec::new();
            for _ in 0..64 {
                let (a, b) = UnixStream::pair().unwrap();
                if a.as_raw_fd() == number {
                    (reuser, reuser_peer) = (Some(a), Some(b));
                    break;
                }
                made.push((a, b)); // keep the numbers taken, so the next pair gets others
            }
            let (mut reuser, mut reuser_peer) = (reuser.unwrap(), reuser_peer.unwrap());
            assert_eq!(write(&mut sink, &[b"for the peer"]).unwrap(), 12);
            assert_eq!(read_now(&mut peer), b"for the peer");
            assert_eq!(read_now(&mut reuser_peer), b"");
            reuser.write_all(b"the reuser's own").unwrap();
            assert_eq!(read_now(&mut reuser_peer), b"the reuser's own");
            // The socket is still open: the peer sees its end only when the sink goes.
            peer.set_nonblocking(true).unwrap();
            let mut buf = [0; 16];
            assert_eq!(
                peer.read(&mut buf).unwrap_err().kind(),
                ErrorKind::WouldBlock
            );
            drop(sink);
            assert_eq!(peer.read(&mut buf).unwrap(), 0);
        }
    }
}
