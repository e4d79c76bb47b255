//! Length-prefixed JSON frames over a Unix stream socket, each optionally
//! carrying file descriptors. A frame is a 4-byte big-endian length and that
//! many bytes of JSON; descriptors ride on the `sendmsg` that writes the length,
//! so the receiver gets them with the `recvmsg` that reads it.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Frames larger than this are refused: no message of ours comes near it, and
/// a peer that sends one is broken or hostile.
pub const MAX_FRAME: usize = 16 << 20;
/// At most this many descriptors travel with one frame (`model package`
/// passes every shard of a split model, its licenses and template).
pub const MAX_FDS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("the peer closed the connection")]
    Closed,
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    #[error("a frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
}

fn nix_io(e: nix::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

/// Send `msg` with `fds` attached.
pub fn send_frame<T: Serialize>(
    sock: &UnixStream,
    msg: &T,
    fds: &[RawFd],
) -> Result<(), FrameError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let len = (body.len() as u32).to_be_bytes();
    if fds.is_empty() {
        let mut w = sock;
        w.write_all(&len)?;
    } else {
        let cmsg = [ControlMessage::ScmRights(fds)];
        let iov = [IoSlice::new(&len)];
        let mut sent = loop {
            match sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None) {
                Err(nix::Error::EINTR) => continue,
                other => break other.map_err(nix_io)?,
            }
        };
        let mut w = sock;
        while sent < len.len() {
            sent += w.write(&len[sent..])?;
        }
    }
    let mut w = sock;
    w.write_all(&body)?;
    Ok(())
}

/// Receive one frame and the descriptors that came with it.
pub fn recv_frame<T: DeserializeOwned>(sock: &UnixStream) -> Result<(T, Vec<OwnedFd>), FrameError> {
    let mut len = [0u8; 4];
    let mut cmsg_buf = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut fds = Vec::new();
    let got = {
        let mut iov = [IoSliceMut::new(&mut len)];
        let msg = loop {
            match recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg_buf),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Err(nix::Error::EINTR) => continue,
                other => break other.map_err(nix_io)?,
            }
        };
        for c in msg.cmsgs().map_err(nix_io)? {
            if let ControlMessageOwned::ScmRights(list) = c {
                // SAFETY: the kernel just installed these descriptors in our
                // table for us; nothing else owns them.
                fds.extend(
                    list.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        msg.bytes
    };
    if got == 0 {
        return Err(FrameError::Closed);
    }
    let mut r = sock;
    if got < len.len() {
        r.read_exact(&mut len[got..]).map_err(eof_is_closed)?;
    }
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_FRAME {
        return Err(FrameError::TooLarge(n));
    }
    let mut body = vec![0u8; n];
    r.read_exact(&mut body).map_err(eof_is_closed)?;
    Ok((serde_json::from_slice(&body)?, fds))
}

fn eof_is_closed(e: std::io::Error) -> FrameError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        FrameError::Closed
    } else {
        FrameError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Seek;

    #[test]
    fn frames_round_trip_with_and_without_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut file = tempfile_like();
        file.write_all(b"hello").unwrap();
        send_frame(&a, &serde_json::json!({"x": 1}), &[]).unwrap();
        send_frame(&a, &vec!["y".to_string()], &[file.as_raw_fd()]).unwrap();
        let (first, fds): (serde_json::Value, _) = recv_frame(&b).unwrap();
        assert_eq!((first, fds.len()), (serde_json::json!({"x": 1}), 0));
        let (second, fds): (Vec<String>, _) = recv_frame(&b).unwrap();
        assert_eq!(second, vec!["y".to_string()]);
        let mut got = std::fs::File::from(fds.into_iter().next().unwrap());
        got.rewind().unwrap();
        let mut s = String::new();
        got.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
        drop(a);
        assert!(matches!(
            recv_frame::<serde_json::Value>(&b),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn oversized_frames_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut w = &a;
        w.write_all(&(u32::MAX).to_be_bytes()).unwrap();
        assert!(matches!(
            recv_frame::<serde_json::Value>(&b),
            Err(FrameError::TooLarge(_))
        ));
    }

    fn tempfile_like() -> std::fs::File {
        let path = std::env::temp_dir().join(format!("moat-frame-test-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        f
    }
}
