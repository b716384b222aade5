//! Running code inside another network namespace, and namespace cookies.
//!
//! Interface names and indices, TCX links and netlink requests all resolve in the
//! calling *thread's* namespace. So work inside a slot namespace runs on a scoped
//! thread that first `setns`es into it; the caller's thread never changes
//! namespace.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::sched::{CloneFlags, setns};

use super::BpfError;

/// Runs `f` on a fresh thread inside the network namespace `netns` and returns
/// its result.
pub fn in_netns<R, F>(netns: BorrowedFd<'_>, f: F) -> Result<R, BpfError>
where
    R: Send,
    F: FnOnce() -> Result<R, BpfError> + Send,
{
    std::thread::scope(|s| {
        s.spawn(move || {
            setns(netns, CloneFlags::CLONE_NEWNET).map_err(|e| {
                BpfError::syscall("setns(CLONE_NEWNET) into the slot namespace", e.into())
            })?;
            f()
        })
        .join()
        .unwrap_or_else(|_| {
            Err(BpfError::syscall(
                "the namespace worker thread",
                io::Error::other("panicked"),
            ))
        })
    })
}

/// The cookie (`SO_NETNS_COOKIE`, the value `bpf_get_netns_cookie` returns) of the
/// calling thread's network namespace.
pub fn current_netns_cookie() -> Result<u64, BpfError> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(BpfError::syscall(
            "socket(AF_INET, SOCK_DGRAM)",
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(BpfError::syscall(
            "getsockopt(SO_NETNS_COOKIE)",
            io::Error::last_os_error(),
        ));
    }
    Ok(cookie)
}
